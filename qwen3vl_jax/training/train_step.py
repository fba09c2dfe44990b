"""The train step: a pure function of (state, batch[, frozen parameters]), jitted (and sharded) by the step builder,
generic over the objective (training/objectives)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.loops import scan_unroll
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.modeling.moe import load_balancing_loss, router_z_loss
from qwen3vl_jax.training.objectives.base import Counters, Objective, StepSettings
from qwen3vl_jax.training.objectives.sft import CrossEntropy
from qwen3vl_jax.training.optimizer import stop_frozen_gradients


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # master weights (param_dtype, fp32 for mixed precision)
    opt_state: Any
    rng: jax.Array  # uint32[2], split once per step


def objective_loss(
    objective: Objective,
    params: Any,
    batch: TrainingBatch,
    *,
    settings: StepSettings,
    totals: dict[str, jax.Array],
    frozen_params: Any = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, Counters]:
    """A (micro)batch's share of the loss — the objective's, plus, for an MoE model, its coefficients x the
    load-balancing and z losses of this (micro)batch, each divided by the number of microbatches — and its
    Counters (which record the router losses). totals: `objective.batch_totals` of the whole batch."""
    value, counters, router_logits = objective.loss(
        params, batch, frozen_params=frozen_params, totals=totals, settings=settings, dropout_rng=dropout_rng
    )
    if router_logits is None:  # a dense model
        return value, counters
    text, microbatches = settings.model.config.text, settings.microbatches
    real = batch.segment_ids.reshape(-1) > 0
    aux = load_balancing_loss(router_logits, real, top_k=text.num_experts_per_tok) / microbatches
    z = router_z_loss(router_logits, real) / microbatches
    value += text.router_aux_loss_coef * aux + text.router_z_loss_coef * z
    return value, counters.replace(extra=dict(counters.extra, aux_loss=aux, z_loss=z))


def split_microbatches(batch: TrainingBatch, steps: int) -> TrainingBatch:
    """(B, ...) arrays -> (steps, B / steps, ...): row i goes to microbatch i % steps."""
    return jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1), batch
    )


def make_train_step(
    config: ModelConfig,
    *,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_normalization: str,
    objective: Objective | None = None,
    grad_accum_steps: int = 1,
    loss_chunk: int = 0,
    freeze: Sequence[str] = (),
) -> Callable:
    """(state, batch[, frozen_params]) -> (state, metrics) for `objective` (default: the cross-entropy,
    objectives/sft.py), plus, for MoE models, router_aux_loss_coef x the load-balancing loss (and the optional
    z-loss). frozen_params: the parameters of `objective.frozen_model(config)` (a teacher, a reference), if any.
    The batch's rows are split into `grad_accum_steps` microbatches (row i goes to microbatch i % steps) whose
    gradients add up to the whole batch's gradient exactly (each objective normalises by whole-batch totals,
    `Objective.batch_totals`); the router losses are averaged over the microbatches (each computed on its own
    tokens, as with a smaller batch). loss_chunk > 0: the head and the loss run that many positions at a time
    (modeling.lm_head). The `freeze` parts (training/optimizer.py) get no backward pass, nor, with LoRA adapters
    (config.lora), any weight but the adapters. Metrics: loss, ce_loss (the objective's cross-entropy term),
    grad_norm, learning_rate, supervised_tokens, token_accuracy, token_ce and the objective's own terms."""
    objective = CrossEntropy() if objective is None else objective
    settings = StepSettings(
        model=Qwen3VL(config), normalization=loss_normalization, microbatches=grad_accum_steps, loss_chunk=loss_chunk
    )
    lora = config.lora.rank > 0

    def train_step(state: TrainState, batch: TrainingBatch, frozen_params: Any = None):
        totals = objective.batch_totals(batch, settings)
        # LoRA dropout: a fresh mask every step
        dropout_rng = jax.random.fold_in(state.rng, 1) if lora and config.lora.dropout else None

        def loss(params, rows):
            trainable = stop_frozen_gradients(params, freeze, lora=lora)
            return objective_loss(
                objective,
                trainable,
                rows,
                settings=settings,
                totals=totals,
                frozen_params=frozen_params,
                dropout_rng=dropout_rng,
            )

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        if grad_accum_steps == 1:
            (value, counters), grads = grad_fn(state.params, batch)
        else:
            micro = split_microbatches(batch, grad_accum_steps)

            def accumulate(carry, microbatch):
                return jax.tree_util.tree_map(jnp.add, carry, grad_fn(state.params, microbatch)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first))
            ((value, counters), grads), _ = jax.lax.scan(accumulate, zeros, micro, unroll=scan_unroll(grad_accum_steps))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        tokens = jnp.maximum(counters.tokens, 1.0)
        metrics = dict(
            loss=value,
            ce_loss=counters.ce,
            grad_norm=optax.global_norm(grads),
            learning_rate=schedule(state.step),
            supervised_tokens=counters.tokens,
            token_accuracy=counters.correct / tokens,
            token_ce=counters.token_ce / tokens,
            **counters.extra,
        )
        rng, _ = jax.random.split(state.rng)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return train_step
