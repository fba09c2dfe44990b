"""The train and eval steps: pure functions of (state, batch), jitted (and sharded) by the trainer."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.model_inputs import ModelInputs
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.training.loss import token_cross_entropy, token_weights


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar
    params: Any           # master weights (param_dtype, fp32 for mixed precision)
    opt_state: Any
    rng: jax.Array        # uint32[2], split once per step


def _sums(model: Qwen3VL, params, batch: dict, normalization: str):
    """Weighted CE sum (the differentiated quantity) and the counters of one (micro)batch."""
    logits = model.apply({"params": params}, ModelInputs.from_batch(batch))
    ce = token_cross_entropy(logits, batch["targets"])
    weights = token_weights(batch["loss_mask"], batch["segment_ids"], normalization)
    mask = batch["loss_mask"] > 0
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]) & mask
    counters = dict(weight=weights.sum(), tokens=mask.sum(dtype=jnp.float32), correct=correct.sum(dtype=jnp.float32),
                    token_ce=jnp.where(mask, ce, 0.0).sum())
    return (weights * ce).sum(), counters


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                    loss_normalization: str, grad_accum_steps: int = 1) -> Callable:
    """(state, batch) -> (state, metrics). The batch's rows are split into `grad_accum_steps` microbatches
    (row i goes to microbatch i % steps); gradients of the weighted CE sums are accumulated and divided by the
    total weight, so the update equals that of the whole batch at once."""
    model = Qwen3VL(config)
    grad_fn = jax.value_and_grad(lambda p, b: _sums(model, p, b, loss_normalization), has_aux=True)

    def train_step(state: TrainState, batch: dict):
        if grad_accum_steps == 1:
            (loss_sum, counters), grads = grad_fn(state.params, batch)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]),
                                       0, 1), batch)

            def accumulate(carry, microbatch):
                return jax.tree_util.tree_map(jnp.add, carry, grad_fn(state.params, microbatch)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first))
            ((loss_sum, counters), grads), _ = jax.lax.scan(accumulate, zeros, micro)
        total = jnp.maximum(counters["weight"], 1e-9)
        grads = jax.tree_util.tree_map(lambda g: g / total, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss_sum / total, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step),
                       supervised_tokens=counters["tokens"],
                       token_accuracy=counters["correct"] / jnp.maximum(counters["tokens"], 1.0),
                       token_ce=counters["token_ce"] / jnp.maximum(counters["tokens"], 1.0))
        rng, _ = jax.random.split(state.rng)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return train_step


def make_eval_step(config: ModelConfig) -> Callable:
    """(params, batch) -> sums over the batch: token CE and count, examples and examples whose every
    supervised token is predicted by argmax (= the greedy answer under teacher forcing is exactly right)."""
    model = Qwen3VL(config)

    def eval_step(params, batch: dict):
        logits = model.apply({"params": params}, ModelInputs.from_batch(batch))
        ce = token_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"] > 0
        wrong = mask & (jnp.argmax(logits, axis=-1) != batch["targets"])
        rows, length = batch["segment_ids"].shape
        segment = (batch["segment_ids"] + jnp.arange(rows)[:, None] * (length + 1)).reshape(-1)
        count = lambda x: jax.ops.segment_sum(x.reshape(-1).astype(jnp.float32), segment, rows * (length + 1))
        supervised, errors = count(mask), count(wrong)
        examples = supervised > 0
        return dict(token_ce=jnp.where(mask, ce, 0.0).sum(), tokens=mask.sum(dtype=jnp.float32),
                    examples=examples.sum(dtype=jnp.float32), exact=(examples & (errors == 0)).sum(dtype=jnp.float32))

    return eval_step
