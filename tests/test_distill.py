"""Distillation: the chunked KL_T(teacher || student) and cross-entropy equal a hand-written torch reference on
whole logits, values and gradients (student hidden states and head; nothing flows into the teacher)."""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import ROOT, random_params

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.training.objectives.distill import chunked_distillation, distillation_loss

B, L, HS, HT, V = 2, 13, 16, 24, 40


def case():
    rng = np.random.default_rng(0)
    return dict(
        student_hidden=rng.standard_normal((B, L, HS)).astype(np.float32),
        student_head=(rng.standard_normal((HS, V)) / 3).astype(np.float32),
        teacher_hidden=rng.standard_normal((B, L, HT)).astype(np.float32),
        teacher_head=(rng.standard_normal((HT, V)) / 2).astype(np.float32),
        targets=rng.integers(0, V, (B, L)).astype(np.int32),
        weights=(rng.random((B, L)) * (rng.random((B, L)) > 0.3)).astype(np.float32),
    )


def torch_reference(c, *, temperature, alpha):
    """Whole logits, torch's own log_softmax / kl_div / cross_entropy; loss and grads of the student's inputs."""
    student_hidden = torch.tensor(c["student_hidden"], requires_grad=True)
    student_head = torch.tensor(c["student_head"], requires_grad=True)
    student = student_hidden @ student_head
    teacher = torch.tensor(c["teacher_hidden"]) @ torch.tensor(c["teacher_head"])
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(student / temperature, -1),
        torch.log_softmax(teacher / temperature, -1),
        log_target=True,
        reduction="none",
    ).sum(-1) * (temperature**2)
    ce = torch.nn.functional.cross_entropy(
        student.reshape(-1, V), torch.tensor(c["targets"], dtype=torch.long).reshape(-1), reduction="none"
    ).reshape(B, L)
    w = torch.tensor(c["weights"])
    loss = alpha * (w * kl).sum() / w.sum() + (1 - alpha) * (w * ce).sum() / w.sum()
    loss.backward()
    return (
        kl.detach().numpy(),
        ce.detach().numpy(),
        float(loss.detach()),
        student_hidden.grad.numpy(),
        student_head.grad.numpy(),
    )


@pytest.mark.parametrize("temperature, alpha, chunk", [(1.0, 0.5, 4), (2.0, 0.9, 13), (0.7, 1.0, 5)])
def test_chunked_distillation_equals_torch_on_whole_logits(temperature, alpha, chunk):
    c = case()
    ref_kl, ref_ce, ref_loss, ref_grad_hidden, ref_grad_head = torch_reference(c, temperature=temperature, alpha=alpha)

    def loss(student_hidden, student_head, teacher_hidden, teacher_head):
        ce, kl, _ = chunked_distillation(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            jnp.asarray(c["targets"]),
            temperature=temperature,
            chunk=chunk,
        )
        return distillation_loss(ce, kl, jnp.asarray(c["weights"]), alpha=alpha), (ce, kl)

    args = [jnp.asarray(c[k]) for k in ("student_hidden", "student_head", "teacher_hidden", "teacher_head")]
    (value, (ce, kl)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    np.testing.assert_allclose(kl, ref_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ce, ref_ce, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grad_hidden, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], ref_grad_head, rtol=1e-4, atol=1e-6)
    assert not np.any(grads[2]) and not np.any(grads[3])  # the teacher is frozen


def test_kl_is_zero_for_the_teacher_itself_and_vocabularies_must_match():
    c = case()
    head = jnp.asarray(c["teacher_head"])
    hidden = jnp.asarray(c["teacher_hidden"])
    _, kl, _ = chunked_distillation(hidden, head, hidden, head, jnp.asarray(c["targets"]), temperature=2.0, chunk=4)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="student vocabulary 40 != teacher vocabulary 39"):
        chunked_distillation(hidden, head, hidden, head[:, :39], jnp.asarray(c["targets"]), temperature=1.0, chunk=4)


@dataclasses.dataclass
class StudentAndTeacher:
    """The tiny student and a deeper, wider teacher, their random parameters, and per token of the packed batch
    KL_T(teacher || student) at T = 2 and the student's cross-entropy, from the two models' whole logits in
    float64, each of shape (B, L)."""

    student: ModelConfig
    teacher: ModelConfig
    params: Any
    teacher_params: Any
    kl: np.ndarray
    ce: np.ndarray


@pytest.fixture(scope="module")
def student_and_teacher(batch) -> StudentAndTeacher:
    """Shared by both token selections: nothing here depends on which tokens the KL covers."""
    from qwen3vl_jax.config import preset
    from qwen3vl_jax.modeling.model import Qwen3VL

    student = preset("tiny")
    teacher = preset("tiny", text=dict(num_hidden_layers=4, intermediate_size=192))
    params, teacher_params = random_params(student, 0), random_params(teacher, 9)

    def whole_logits(config, params):
        forward = jax.jit(lambda params: Qwen3VL(config).apply({"params": params}, batch.inputs))
        return np.asarray(forward(params), np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    logits, teacher_logits = whole_logits(student, params), whole_logits(teacher, teacher_params)
    p, q = log_softmax(teacher_logits / 2.0), log_softmax(logits / 2.0)
    return StudentAndTeacher(
        student=student,
        teacher=teacher,
        params=params,
        teacher_params=teacher_params,
        kl=4.0 * (np.exp(p) * (p - q)).sum(-1),
        ce=-np.take_along_axis(log_softmax(logits), batch.targets[..., None], -1)[..., 0],
    )


@pytest.mark.parametrize("all_text_tokens", [False, True], ids=["supervised_tokens", "all_text_tokens"])
def test_a_distillation_step_mixes_the_teachers_kl_into_the_loss(batch, student_and_teacher, all_text_tokens):
    """One train step of the tiny student with a deeper, wider teacher on the same packed batch: its loss is
    alpha * KL_T + (1 - alpha) * CE over the batch, recomputed here from the two models' whole logits."""
    from helpers import OPTIMIZER

    from qwen3vl_jax.training.loss import token_weights
    from qwen3vl_jax.training.objectives.distill import OnlineDistillation
    from qwen3vl_jax.training.optimizer import make_optimizer
    from qwen3vl_jax.training.train_step import TrainState, make_train_step

    student, teacher = student_and_teacher.student, student_and_teacher.teacher
    params, teacher_params = student_and_teacher.params, student_and_teacher.teacher_params
    distill = OnlineDistillation(teacher=teacher, alpha=0.7, temperature=2.0, all_text_tokens=all_text_tokens)
    optimizer, schedule = make_optimizer(OPTIMIZER, total_steps=10, params=params)
    step = make_train_step(
        student, optimizer=optimizer, schedule=schedule, loss_normalization="sqrt", loss_chunk=32, objective=distill
    )
    state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
    _, metrics = jax.jit(step)(state, batch, teacher_params)

    kl, ce = student_and_teacher.kl, student_and_teacher.ce
    w = np.asarray(token_weights(batch.loss_mask, batch.segment_ids, normalization="sqrt"))
    if all_text_tokens:
        ids, segments = batch.input_ids, batch.segment_ids
        visual = (ids == student.image_token_id) | (ids == student.video_token_id)
        has_next = np.pad(segments[:, 1:] == segments[:, :-1], ((0, 0), (0, 1)))
        text = (segments > 0) & ~visual & has_next
        assert text.sum() > (batch.loss_mask > 0).sum()  # the prompts count too
        kl_w = np.asarray(token_weights(text, segments, normalization="sqrt"))
    else:
        kl_w = w
    expected_kl, expected_ce = (kl_w * kl).sum() / kl_w.sum(), (w * ce).sum() / w.sum()
    np.testing.assert_allclose(metrics["kl"], expected_kl, rtol=2e-5)
    np.testing.assert_allclose(metrics["ce_loss"], expected_ce, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss"], 0.7 * expected_kl + 0.3 * expected_ce, rtol=2e-5)


def test_a_teacher_must_share_the_vocabulary_and_the_vit_geometry(tmp_path):
    from ml_collections import ConfigDict

    import qwen3vl_jax
    from qwen3vl_jax.config import preset
    from qwen3vl_jax.modeling.model import abstract_params
    from qwen3vl_jax.training.objectives.distill import from_config

    student = preset("tiny")
    settings = ConfigDict(dict(distill=dict(teacher="", alpha=0.5, temperature=1.0, all_text_tokens=False)))
    settings.distill.update(teacher_cache="", top_k=32)
    with pytest.raises(ValueError, match=r"objective 'distill' needs distill\.teacher"):
        from_config(settings, student)
    for name, teacher in {
        "good": preset("tiny", text=dict(num_hidden_layers=4)),
        "vocab": preset("tiny", text=dict(vocab_size=600)),
        "vit": preset("tiny", vision=dict(num_position_embeddings=64)),
    }.items():
        # from_config reads the teacher's config.json alone: zero weights make a whole checkpoint directory
        # without compiling an initialisation for each of the three models
        zeros = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract_params(teacher))
        qwen3vl_jax.Qwen3VLModel(teacher, zeros).save_pretrained(str(tmp_path / name))
    settings.distill.teacher = str(tmp_path / "good")
    assert from_config(settings, student).teacher.text.num_hidden_layers == 4
    settings.distill.teacher = str(tmp_path / "vocab")
    with pytest.raises(ValueError, match="vocabulary of 600, the student 512"):
        from_config(settings, student)
    settings.distill.teacher = str(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"ViT differs from the student's in \['num_position_embeddings'\]"):
        from_config(settings, student)


def test_the_distillation_experiments_options_set_the_students_budget_width_and_data():
    from qwen3vl_jax.training.run_config import config_from_file

    path = os.path.join(ROOT, "configs", "distill_tiny.py")
    default = config_from_file(path, "/teacher")
    assert (default.base.steps, default.base.model.overrides.text.hidden_size) == (1500, 64)
    assert default.base.data.sources.synthetic.size == 1_000_000
    assert default.variants.distilled.distill.teacher == "/teacher"
    assert default.variants.distilled.objective == "distill"
    changed = config_from_file(path, "/teacher,steps=400,hidden=32,examples=2000")
    text = changed.base.model.overrides.text
    assert (changed.base.steps, text.hidden_size, text.intermediate_size) == (400, 32, 96)
    assert (changed.base.model.overrides.vision.out_hidden_size, changed.base.data.sources.synthetic.size) == (32, 2000)
    for bad in ("/teacher,width=32", "/teacher,steps=many"):
        with pytest.raises(ValueError, match=f"option '{bad.split(',')[1]}': expected one of steps=N, hidden=N"):
            config_from_file(path, bad)
    with pytest.raises(ValueError, match="give the teacher's HF directory"):
        config_from_file(path, "")


def test_the_run_config_names_its_objective_and_a_distillation_switch_needs_it():
    """config.objective picks the module of training/objectives; distill.teacher / teacher_cache set under another
    objective stop the run naming the field, instead of being silently ignored."""
    from helpers import tiny_config

    from qwen3vl_jax.config import preset
    from qwen3vl_jax.training.objectives import available, objective_from
    from qwen3vl_jax.training.objectives.dpo import PreferenceTuning
    from qwen3vl_jax.training.objectives.sft import CrossEntropy

    config, student = tiny_config(), preset("tiny")
    assert available() == ("distill", "dpo", "grpo", "sft")
    assert isinstance(objective_from(config, student), CrossEntropy)
    config.objective = "dpo"
    assert isinstance(objective_from(config, student), PreferenceTuning)
    config.objective = "grpo"
    with pytest.raises(ValueError, match=r"objective 'grpo' needs grpo\.prompts_per_step"):
        objective_from(config, student)
    config.objective = "reinforce"
    with pytest.raises(ValueError, match=r"objective 'reinforce' is not one of \('distill', 'dpo', 'grpo', 'sft'\)"):
        objective_from(config, student)
    config.objective, config.grpo.prompts_per_step = "sft", 8
    with pytest.raises(ValueError, match=r"config\.grpo\.prompts_per_step is set but the objective is 'sft'"):
        objective_from(config, student)
    config.grpo.prompts_per_step = 0
    for objective, switch in (("sft", "teacher"), ("dpo", "teacher_cache")):
        config.objective = objective
        config.distill[switch] = "/somewhere"
        with pytest.raises(ValueError, match=rf"config\.distill\.{switch} is set but the objective is '{objective}'"):
            objective_from(config, student)
        config.distill[switch] = ""
