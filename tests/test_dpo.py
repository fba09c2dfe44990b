"""DPO / IPO losses equal the formulas computed independently in torch (values and gradients), and answer
log-probabilities sum each packed example's supervised tokens."""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.training.objectives.dpo import answer_logps, preference_losses


def torch_reference(policy_c, policy_r, ref_c, ref_r, *, beta, variant):
    pc, pr = torch.tensor(policy_c, requires_grad=True), torch.tensor(policy_r, requires_grad=True)
    h = (pc - torch.tensor(ref_c)) - (pr - torch.tensor(ref_r))
    if variant == "sigmoid":  # the DPO paper's eq. 7
        loss = -torch.nn.functional.logsigmoid(beta * h)
    else:  # IPO (Azar et al., eq. 17)
        loss = (h - 1 / (2 * beta)) ** 2
    loss.sum().backward()
    return loss.detach().numpy(), pc.grad.numpy(), pr.grad.numpy()


@pytest.mark.parametrize("variant, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_losses_and_gradients_equal_torch(variant, beta):
    rng = np.random.default_rng(0)
    policy_c, policy_r, ref_c, ref_r = (rng.normal(-20, 5, 16).astype(np.float64) for _ in range(4))
    ref_loss, ref_grad_c, ref_grad_r = torch_reference(policy_c, policy_r, ref_c, ref_r, beta=beta, variant=variant)

    def total(pc, pr, rc, rr):
        return preference_losses(pc, pr, rc, rr, beta=beta, variant=variant).loss.sum()

    with jax.enable_x64():
        args = [jnp.asarray(a) for a in (policy_c, policy_r, ref_c, ref_r)]
        losses = preference_losses(*args, beta=beta, variant=variant)
        grads = jax.grad(total, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(losses.loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grads[0], ref_grad_c, rtol=1e-12)
    np.testing.assert_allclose(grads[1], ref_grad_r, rtol=1e-12)
    assert not np.any(grads[2]) and not np.any(grads[3])  # the reference is frozen
    np.testing.assert_allclose(losses.margin, beta * ((policy_c - ref_c) - (policy_r - ref_r)), rtol=1e-12)
    np.testing.assert_array_equal(losses.accuracy, (policy_c - ref_c) > (policy_r - ref_r))


def test_answer_logps_sum_each_examples_supervised_tokens():
    token_logps = -np.arange(1, 13, dtype=np.float32).reshape(2, 6)
    segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
    mask = np.array([[0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 1]])
    sums = np.asarray(answer_logps(jnp.asarray(token_logps), jnp.asarray(mask), jnp.asarray(segments)))
    assert sums[1] == -2 - 3 and sums[2] == -5 and sums[7 + 1] == -8 and sums[7 + 2] == -11 - 12
    with pytest.raises(ValueError, match="variant 'hinge' not in"):
        preference_losses(*[jnp.zeros(2)] * 4, beta=0.1, variant="hinge")


@dataclasses.dataclass
class PackedPairs:
    """Five preference pairs packed into rows (chosen, rejected: consecutive segments), two models' parameters and
    each (row, segment)'s summed log-probability of its supervised targets under each model, in float64."""

    config: ModelConfig
    batch: TrainingBatch
    policy: Any
    reference: Any
    policy_logps: dict[tuple[int, int], float]
    reference_logps: dict[tuple[int, int], float]


@pytest.fixture(scope="module")
def packed_pairs() -> PackedPairs:
    """Shared by both variants: nothing here depends on the loss."""
    import grain

    from qwen3vl_jax.config import preset
    from qwen3vl_jax.data.features import Featurizer
    from qwen3vl_jax.data.packing import finalize, pack
    from qwen3vl_jax.data.synthetic import make_record
    from qwen3vl_jax.modeling.model import Qwen3VL, init_params
    from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
    from qwen3vl_jax.processing.chat import load_chat_template

    config = preset("tiny")
    processor = Processor(
        byte_tokenizer(), load_chat_template(None), config=VisionProcessingConfig(image_min_pixels=32 * 32)
    )
    records = []
    for i in range(5):
        source = make_record("shapes", i)
        (image,) = [c["image"] for c in source["messages"][0]["content"] if c["type"] == "image"]
        records.append(dict(id=f"p{i}", prompt=f"Colour {i}?", images=[image], chosen=source["answer"], rejected="no"))
    features = [Featurizer(processor, config, seq_len=256, max_patches=256)(r) for r in records]
    rows = pack(grain.MapDataset.source(features).to_iter_dataset(), seq_len=256, max_patches=256, num_bins=2)
    rows = [finalize(row, config) for row in rows]
    batch = TrainingBatch.from_arrays({k: np.stack([row[k] for row in rows]) for k in rows[0]})
    init = jax.jit(init_params, static_argnums=0)  # one compile for both models
    policy, reference = init(config, jax.random.PRNGKey(0)), init(config, jax.random.PRNGKey(1))
    forward = jax.jit(lambda params: Qwen3VL(config).apply({"params": params}, batch.inputs))

    def sequence_logps(params):  # (rows, segment) -> summed log-probability of the supervised targets
        logits = np.asarray(forward(params), np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        token = np.take_along_axis(logp, batch.targets[..., None], -1)[..., 0] * (batch.loss_mask > 0)
        return {(r, s): token[r][batch.segment_ids[r] == s].sum() for r in range(len(rows)) for s in range(1, 257)}

    return PackedPairs(
        config=config,
        batch=batch,
        policy=policy,
        reference=reference,
        policy_logps=sequence_logps(policy),
        reference_logps=sequence_logps(reference),
    )


@pytest.mark.parametrize("variant", ["sigmoid", "ipo"])
def test_a_dpo_step_on_packed_pairs_equals_the_formula(variant, packed_pairs):
    """One train step on packed preference pairs: its loss, reward margin and accuracy equal the formula applied
    to each half's answer log-probability, summed here from the two models' whole logits; the shares of the batch's
    two microbatches add up to them (what gradient accumulation relies on)."""
    from helpers import OPTIMIZER

    from qwen3vl_jax.modeling.model import Qwen3VL
    from qwen3vl_jax.training.objectives.base import StepSettings
    from qwen3vl_jax.training.objectives.dpo import PreferenceTuning
    from qwen3vl_jax.training.optimizer import make_optimizer
    from qwen3vl_jax.training.train_step import TrainState, make_train_step, objective_loss

    config, batch = packed_pairs.config, packed_pairs.batch
    policy, reference = packed_pairs.policy, packed_pairs.reference
    optimizer, schedule = make_optimizer(OPTIMIZER, total_steps=10, params=policy)
    step = make_train_step(
        config,
        optimizer=optimizer,
        schedule=schedule,
        loss_normalization="token",
        objective=PreferenceTuning(beta=0.2, variant=variant),
    )
    state = TrainState(step=np.int32(0), params=policy, opt_state=optimizer.init(policy), rng=jax.random.PRNGKey(2))
    _, metrics = jax.jit(step)(state, batch, reference)

    ours, ref = packed_pairs.policy_logps, packed_pairs.reference_logps
    pairs = [(r, s) for r in range(batch.batch_size) for s in range(1, 256, 2) if (batch.segment_ids[r] == s).any()]
    assert len(pairs) == 5
    h = np.array([(ours[r, s] - ref[r, s]) - (ours[r, s + 1] - ref[r, s + 1]) for r, s in pairs])
    loss = np.log1p(np.exp(-0.2 * h)) if variant == "sigmoid" else (h - 1 / (2 * 0.2)) ** 2
    np.testing.assert_allclose(metrics["loss"], loss.mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["reward_margin"], 0.2 * h.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["preference_accuracy"], (h > 0).mean(), rtol=1e-6)
    # the held-out evaluation of the same pairs (the trainer's eval step under objective=dpo): sums over pairs
    evaluate = PreferenceTuning(beta=0.2, variant=variant).make_eval_step(config)
    sums = jax.jit(evaluate)(policy, batch, reference)
    assert float(sums["pairs"]) == 5
    np.testing.assert_allclose(sums["loss"], loss.sum(), rtol=1e-4)
    np.testing.assert_allclose(sums["margin"], 0.2 * h.sum(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums["correct"], (h > 0).sum(), rtol=1e-6)
    # the train step splits a batch into microbatches (row i -> microbatch i % n) and adds their losses and
    # counters: each microbatch's share, normalised by the whole batch's totals, adds up to the batch's values
    objective, settings = PreferenceTuning(beta=0.2, variant=variant), StepSettings(Qwen3VL(config), "token")
    totals = objective.batch_totals(batch, settings)
    share = jax.jit(
        lambda rows, policy, reference: objective_loss(
            objective, policy, rows, settings=settings, totals=totals, frozen_params=reference
        )
    )
    parts = [share(jax.tree_util.tree_map(lambda x, i=i: x[i::2], batch), policy, reference) for i in range(2)]
    np.testing.assert_allclose(sum(value for value, _ in parts), metrics["loss"], rtol=1e-5)
    counters = jax.tree_util.tree_map(lambda a, b: a + b, parts[0][1], parts[1][1])
    np.testing.assert_allclose(counters.ce, metrics["ce_loss"], rtol=1e-5)
    np.testing.assert_allclose(counters.extra["reward_margin"], metrics["reward_margin"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lora", [False, True], ids=["reference", "lora_base"])
def test_the_trainer_scores_dpo_against_the_step_0_weights(tmp_path, lora):
    """configs/dpo_toy.py for 1 step through the Trainer: the step's policy is the reference itself (the step-0
    weights, or the LoRA model's base), so its reward margin is 0 and its loss log 2; after its update the held-out
    pairs are scored against the same reference (margin no longer 0)."""
    from helpers import ROOT

    from qwen3vl_jax.training.run_config import config_from_file
    from qwen3vl_jax.training.trainer import Trainer

    config = config_from_file(os.path.join(ROOT, "configs", "dpo_toy.py"))
    config.update(steps=1, log_every=1, export_hf=False)
    config.data.update(seq_len=256, max_patches=32, batch_size=8)
    config.eval.update(every=1, batch_size=8)
    config.eval.sets.held_out.num_examples = 4
    config.optimizer.update(lr=1e-2, warmup_steps=0)
    if lora:
        config.lora.update(rank=4, targets=("q_proj", "v_proj"))
    results = Trainer(config, str(tmp_path / "run")).run()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = next(m for m in map(json.loads, f) if m.get("step") == 1 and "dpo_loss" in m)
    np.testing.assert_allclose(first["reward_margin"], 0.0, atol=1e-6)
    np.testing.assert_allclose(first["dpo_loss"], np.log(2.0), rtol=1e-5)
    assert results["held_out/pairs"] == 4
    assert abs(results["held_out/reward_margin"]) > 1e-6
