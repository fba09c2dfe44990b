"""Offline distillation: the top-k KL against torch by hand (and with every token kept, the exact KL); a student
run reading a cache of all the teacher's logits takes the same steps as the run with the teacher online; a cache
made for other batches is refused, naming what differs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen3vl_jax.training.objectives.distill import kl_divergence, top_k_kl_divergence

V, K = 40, 6


def test_top_k_kl_equals_torch_by_hand_and_with_every_token_the_exact_kl():
    rng = np.random.default_rng(0)
    student = rng.standard_normal((3, 5, V)).astype(np.float32)
    teacher = (2 * rng.standard_normal((3, 5, V))).astype(np.float32)
    order = np.argsort(-teacher, axis=-1).astype(np.int32)
    top_ids = order[..., :K]
    top_logits = np.take_along_axis(teacher, top_ids, -1)

    def top_k_loss(s):
        return top_k_kl_divergence(s, jnp.asarray(top_logits), jnp.asarray(top_ids), temperature=2.0).sum()

    value, grad = jax.value_and_grad(top_k_loss)(jnp.asarray(student))
    s = torch.tensor(student, requires_grad=True)
    p = torch.softmax(torch.tensor(top_logits) / 2.0, -1)  # renormalised over the k tokens
    q = torch.log_softmax(s / 2.0, -1).gather(-1, torch.tensor(top_ids, dtype=torch.long))
    reference = (4.0 * (p * (p.log() - q)).sum(-1)).sum()
    reference.backward()
    np.testing.assert_allclose(value, reference.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-4, atol=1e-7)

    every = np.take_along_axis(teacher, order, -1)  # k = V, in the teacher's order: the exact KL
    exact = kl_divergence(jnp.asarray(student), jnp.asarray(teacher), temperature=0.5)
    np.testing.assert_allclose(
        top_k_kl_divergence(jnp.asarray(student), jnp.asarray(every), jnp.asarray(order), temperature=0.5),
        exact,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random teacher twice as deep as the student, same vocabulary and ViT geometry, saved as an HF dir."""
    import qwen3vl_jax
    from qwen3vl_jax.config import preset

    directory = str(tmp_path_factory.mktemp("teacher"))
    teacher = preset(
        "tiny-cpu",
        text=dict(num_hidden_layers=3, hidden_size=96, intermediate_size=160),
        vision=dict(out_hidden_size=96),
    )
    random = qwen3vl_jax.Qwen3VLModel.from_config(teacher, seed=3)
    # a peaked next-token distribution (a random head's is nearly uniform, and so would be the KL)
    params = dict(random.params, lm_head=jax.tree_util.tree_map(lambda w: 30 * w, random.params["lm_head"]))
    qwen3vl_jax.Qwen3VLModel(teacher, params).save_pretrained(directory)
    return directory


def student_config(**distill):
    from helpers import tiny_config

    config = tiny_config()
    config.model.overrides.text.update(num_hidden_layers=2)
    config.update(steps=3, log_every=1, export_hf=False, loss_chunk=64, objective="distill")
    config.eval.every = 0
    config.checkpoint.every = 1000
    config.data.update(seq_len=128, max_patches=64, batch_size=8)
    config.distill.update(alpha=0.6, temperature=2.0, **distill)
    return config


def metrics_of(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


@pytest.fixture(scope="module")
def cache_of_every_logit(tmp_path_factory, teacher_dir):
    """write_cache of the teacher's top 512 logits (k = the vocabulary) for the 3 steps of student_config; shared
    by the tests below (one that damages it works on a copy)."""
    from experiments.cache_teacher import write_cache

    cache = str(tmp_path_factory.mktemp("cache"))
    write_cache(student_config(teacher=teacher_dir, top_k=512), cache)
    return cache


def test_training_from_a_cache_of_every_logit_equals_training_with_the_teacher(
    tmp_path, teacher_dir, cache_of_every_logit
):
    """k = the vocabulary: the cached KL is the exact KL, so the offline student takes the online student's steps;
    the cache holds only the supervised positions."""
    from qwen3vl_jax.training.trainer import Trainer

    online = student_config(teacher=teacher_dir)
    online.eval.update(every=3, sets=dict(digits=dict(num_examples=8, sources=[online.eval.sets.digits.sources[0]])))
    results = Trainer(online, str(tmp_path / "online")).run()  # the eval step runs without the teacher
    assert results["digits/examples"] >= 8
    cache = cache_of_every_logit
    with np.load(os.path.join(cache, "step_00000002.npz")) as step:
        assert step["top_logits"].shape == (len(step["positions"]), 512)
        assert len(step["positions"]) == int((step["loss_mask"] > 0).sum()) < step["input_ids"].size / 4
    Trainer(student_config(teacher_cache=cache, top_k=512), str(tmp_path / "offline")).run()
    expected, got = metrics_of(tmp_path / "online"), metrics_of(tmp_path / "offline")
    assert [m["step"] for m in got] == [1, 2, 3]
    for name in ("loss", "kl", "ce_loss", "grad_norm"):
        np.testing.assert_allclose([m[name] for m in got], [m[name] for m in expected], rtol=2e-5, err_msg=name)
    assert expected[0]["kl"] > 1.0


def test_a_cache_made_for_other_batches_is_refused_naming_what_differs(tmp_path, teacher_dir, cache_of_every_logit):
    from experiments.cache_teacher import write_cache
    from qwen3vl_jax.training.teacher_cache import TeacherCacheError, step_file
    from qwen3vl_jax.training.trainer import Trainer

    cache = str(tmp_path / "cache")
    shutil.copytree(cache_of_every_logit, cache)  # made by `config`; damaged below
    config = student_config(teacher=teacher_dir, top_k=512)
    with np.load(step_file(cache, 0)) as step:
        assert step["top_ids"].shape[1] == 512

    def offline(**changes):
        student = student_config(teacher_cache=cache, top_k=512)
        for name, value in changes.items():
            target, _, field = name.rpartition(".")
            (student if not target else student[target])[field] = value
        return Trainer(student, str(tmp_path / f"work_{len(os.listdir(tmp_path))}"))

    with pytest.raises(TeacherCacheError, match=r"another data config \(differs in \['seed'\]\)"):
        offline(**{"data.seed": 7})
    with pytest.raises(TeacherCacheError, match=r"another processing config \(differs in \['image_max_pixels'\]\)"):
        offline(**{"processing.image_max_pixels": 128 * 128})
    with pytest.raises(TeacherCacheError, match="cached for all_text_tokens=False, this run has True"):
        offline(**{"distill.all_text_tokens": True})
    with pytest.raises(TeacherCacheError, match=r"top 512 logits are cached, this run has distill\.top_k = 8"):
        offline(**{"distill.top_k": 8})
    with pytest.raises(TeacherCacheError, match="3 steps cached, this run trains 5"):
        offline(steps=5)
    with pytest.raises(ValueError, match="both set"):
        offline(**{"distill.teacher": teacher_dir})
    # a step file from other batches (e.g. a dataset that changed on disk) stops the run at that step
    with np.load(step_file(cache, 1)) as step:
        arrays = dict(step)
    arrays["input_ids"] = np.roll(arrays["input_ids"], 1, axis=1)
    with open(step_file(cache, 1), "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(TeacherCacheError, match=r"step_00000001.npz: the cached batch of step 1 differs .*input_ids"):
        offline().run()
    # writing the same directory for another run is refused
    config.data.seed = 5
    with pytest.raises(TeacherCacheError, match="written for another run"):
        write_cache(config, cache)
