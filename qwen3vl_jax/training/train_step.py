"""The train and eval steps: pure functions of (state, batch), jitted (and sharded) by the trainer."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.model_inputs import ModelInputs
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.modeling.moe import load_balancing_loss, router_z_loss
from qwen3vl_jax.training.distill import chunked_distillation, chunked_top_k_distillation
from qwen3vl_jax.training.dpo import DPO_VARIANTS, pair_answer_logps, preference_losses
from qwen3vl_jax.training.loss import example_totals, token_weights
from qwen3vl_jax.training.optimizer import stop_frozen_gradients


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A frozen teacher (any size of the family, same vocabulary) on the same batch: the loss is alpha * KL_T +
    (1 - alpha) * CE (training/distill.py); KL over the supervised tokens, or every text token. teacher None:
    offline, the teacher's top-k logits come with the batch (training/teacher_cache.py)."""

    teacher: ModelConfig | None
    alpha: float = 0.5
    temperature: float = 1.0
    all_text_tokens: bool = False


@dataclasses.dataclass(frozen=True)
class PreferenceTuning:
    """DPO / IPO on packed preference pairs (training/dpo.py, data.features): the reference is the frozen
    reference parameters given to the step, or, for a LoRA model, the same weights with the adapters off."""

    beta: float = 0.1
    variant: str = "sigmoid"

    def __post_init__(self):
        if self.variant not in DPO_VARIANTS or self.beta <= 0:
            raise ValueError(f"dpo variant must be in {DPO_VARIANTS} and beta > 0, got {self}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # master weights (param_dtype, fp32 for mixed precision)
    opt_state: Any
    rng: jax.Array  # uint32[2], split once per step


def _token_losses(model: Qwen3VL, params, batch: dict, *, loss_chunk: int, dropout_rng: jax.Array | None = None):
    """Per-token cross-entropy (B, L), target has the highest logit (B, L) and the router logits of a batch.
    dropout_rng: LoRA dropout on (training), else off."""
    inputs = ModelInputs.from_batch(batch)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return model.apply(
        {"params": params}, inputs, batch["targets"], chunk=loss_chunk, method=Qwen3VL.token_losses, rngs=rngs
    )


def _objective(
    params,
    batch: dict,
    *,
    model: Qwen3VL,
    total_weight: jax.Array,
    normalization: str,
    microbatches: int,
    loss_chunk: int,
    teacher_params=None,
    distill: Distillation | None = None,
    kl_total_weight: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
):
    """One (micro)batch's part of the loss: its weighted CE sum over the whole batch's total weight (mixed with
    the distillation KL when there is a teacher), plus its MoE router losses divided by the number of
    microbatches; and the counters for the metrics."""
    text = model.config.text
    weights = token_weights(batch["loss_mask"], batch["segment_ids"], normalization=normalization)
    if distill is None:
        ce, correct, router_logits = _token_losses(model, params, batch, loss_chunk=loss_chunk, dropout_rng=dropout_rng)
    else:
        ce, kl, correct, router_logits = _distillation_losses(
            model, params, teacher_params, batch, distill=distill, loss_chunk=loss_chunk, dropout_rng=dropout_rng
        )
    mask = batch["loss_mask"] > 0
    correct = correct & mask
    counters = dict(
        ce=(weights * ce).sum() / total_weight,
        tokens=mask.sum(dtype=jnp.float32),
        correct=correct.sum(dtype=jnp.float32),
        token_ce=jnp.where(mask, ce, 0.0).sum(),
    )
    objective = counters["ce"]
    if distill is not None:
        kl_weights = kl_token_weights(
            batch, all_text_tokens=distill.all_text_tokens, config=model.config, normalization=normalization
        )
        counters["kl"] = (kl_weights * kl).sum() / kl_total_weight
        objective = distill.alpha * counters["kl"] + (1 - distill.alpha) * counters["ce"]
    return _with_router_losses(objective, counters, router_logits, batch, text=text, microbatches=microbatches)


def _with_router_losses(objective, counters: dict, router_logits, batch: dict, *, text, microbatches: int):
    """objective plus, for an MoE model, its coefficients x the load-balancing and z losses of this (micro)batch
    (each divided by the number of microbatches), which `counters` records."""
    if router_logits is None:
        return objective, counters
    real = batch["segment_ids"].reshape(-1) > 0
    counters["aux_loss"] = load_balancing_loss(router_logits, real, top_k=text.num_experts_per_tok) / microbatches
    counters["z_loss"] = router_z_loss(router_logits, real) / microbatches
    objective += text.router_aux_loss_coef * counters["aux_loss"] + text.router_z_loss_coef * counters["z_loss"]
    return objective, counters


def kl_token_weights(batch: dict, *, all_text_tokens: bool, config: ModelConfig, normalization: str) -> jax.Array:
    """The distillation term's token weights: the supervised tokens' (as the CE's), or those of every text token
    that has a next token in its example (not a visual token, not padding), normalised the same way."""
    if not all_text_tokens:
        return token_weights(batch["loss_mask"], batch["segment_ids"], normalization=normalization)
    visual = (batch["input_ids"] == config.image_token_id) | (batch["input_ids"] == config.video_token_id)
    same_example_next = jnp.pad(batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1], ((0, 0), (0, 1)))
    text = (batch["segment_ids"] > 0) & ~visual & same_example_next
    return token_weights(text, batch["segment_ids"], normalization=normalization)


def _distillation_losses(
    model: Qwen3VL, params, teacher_params, batch: dict, *, distill: Distillation, loss_chunk, dropout_rng=None
):
    """Per token: the student's CE, KL_T(teacher || student) and hit, and the student's router logits."""
    inputs = ModelInputs.from_batch(batch)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    student_hidden, student_head, router_logits = model.apply(
        {"params": params}, inputs, method=Qwen3VL.hidden_states_and_head, rngs=rngs
    )
    chunk = loss_chunk or student_hidden.shape[1]
    if distill.teacher is None:  # offline: the cached top-k logits
        ce, kl, correct = chunked_top_k_distillation(
            student_hidden,
            student_head,
            batch["teacher_top_logits"],
            batch["teacher_top_ids"],
            batch["targets"],
            temperature=distill.temperature,
            chunk=chunk,
        )
        return ce, kl, correct, router_logits
    teacher = Qwen3VL(distill.teacher)
    teacher_hidden, teacher_head, _ = teacher.apply(
        {"params": jax.lax.stop_gradient(teacher_params)}, inputs, method=Qwen3VL.hidden_states_and_head
    )
    ce, kl, correct = chunked_distillation(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        batch["targets"],
        temperature=distill.temperature,
        chunk=chunk,
    )
    return ce, kl, correct, router_logits


def _preference_objective(
    params,
    batch: dict,
    *,
    model: Qwen3VL,
    reference_model: Qwen3VL,
    reference_params,
    preference: PreferenceTuning,
    total_pairs: jax.Array,
    microbatches: int,
    loss_chunk: int,
    dropout_rng: jax.Array | None = None,
):
    """One (micro)batch's part of the mean preference loss over the whole batch's pairs, plus its MoE router
    losses; and the counters (the policy's token CE for the metrics, reward margins and hits summed over pairs)."""
    losses, valid, ce, correct, router_logits = _pair_losses(
        model,
        reference_model,
        params,
        jax.lax.stop_gradient(reference_params),
        batch,
        preference=preference,
        loss_chunk=loss_chunk,
        dropout_rng=dropout_rng,
    )
    mask = batch["loss_mask"] > 0
    counters = dict(
        ce=jnp.where(mask, ce, 0.0).sum() / jnp.maximum(mask.sum(), 1),
        tokens=mask.sum(dtype=jnp.float32),
        correct=(correct & mask).sum(dtype=jnp.float32),
        token_ce=jnp.where(mask, ce, 0.0).sum(),
        dpo_loss=jnp.where(valid, losses.loss, 0.0).sum() / total_pairs,
        reward_margin=jnp.where(valid, losses.margin, 0.0).sum() / total_pairs,
        preference_accuracy=jnp.where(valid, losses.accuracy, 0.0).sum() / total_pairs,
    )
    text = model.config.text
    return _with_router_losses(
        counters["dpo_loss"], counters, router_logits, batch, text=text, microbatches=microbatches
    )


def _pair_losses(
    model, reference_model, params, reference_params, batch: dict, *, preference, loss_chunk, dropout_rng=None
):
    """The batch's packed pairs scored by the policy and the reference: (PreferenceLosses, valid pair slots
    (B, L // 2), the policy's token CE and hits, its router logits)."""
    ce, correct, router_logits = _token_losses(model, params, batch, loss_chunk=loss_chunk, dropout_rng=dropout_rng)
    reference_ce, _, _ = _token_losses(reference_model, reference_params, batch, loss_chunk=loss_chunk)
    pair = dict(loss_mask=batch["loss_mask"], segment_ids=batch["segment_ids"])
    chosen, rejected, valid = pair_answer_logps(-ce, **pair)
    reference_chosen, reference_rejected, _ = pair_answer_logps(-reference_ce, **pair)
    losses = preference_losses(
        chosen, rejected, reference_chosen, reference_rejected, beta=preference.beta, variant=preference.variant
    )
    return losses, valid, ce, correct, router_logits


def make_train_step(
    config: ModelConfig,
    *,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_normalization: str,
    grad_accum_steps: int = 1,
    loss_chunk: int = 0,
    freeze: Sequence[str] = (),
    distill: Distillation | None = None,
    preference: PreferenceTuning | None = None,
) -> Callable:
    """(state, batch) -> (state, metrics). The loss is the weighted token cross-entropy over the whole batch
    (training/loss.py) plus, for MoE models, router_aux_loss_coef x the load-balancing loss (and the optional
    z-loss). The batch's rows are split into `grad_accum_steps` microbatches (row i goes to microbatch
    i % steps) whose gradients add up to the whole batch's cross-entropy gradient exactly; the router losses
    are averaged over the microbatches (each computed on its own tokens, as with a smaller batch).
    loss_chunk > 0: the head and the cross-entropy run that many positions at a time (modeling.lm_head). The
    `freeze` parts (training/optimizer.py) get no backward pass, nor, with LoRA adapters (config.lora), any weight
    but the adapters. With `distill`, the step is (state, batch, teacher_params) -> (state, metrics) and the loss
    mixes the teacher's KL in (Distillation); offline (distill.teacher None) it stays (state, batch) and the batch
    carries the teacher's top-k logits. With `preference`, the loss is DPO / IPO over the batch's packed
    pairs (PreferenceTuning) and the step is (state, batch, reference_params), reference_params None for a LoRA
    model (its base is the reference)."""
    model = Qwen3VL(config)
    lora = config.lora.rank > 0
    if distill is not None and preference is not None:
        raise ValueError("distillation and preference tuning are separate objectives: choose one")

    def train_step(state: TrainState, batch: dict, teacher_params=None):
        weights = token_weights(batch["loss_mask"], batch["segment_ids"], normalization=loss_normalization)
        total = jnp.maximum(weights.sum(), 1e-9)
        objective_args = dict(model=model, total_weight=total, normalization=loss_normalization)
        objective_args.update(microbatches=grad_accum_steps, loss_chunk=loss_chunk)
        objective_fn = _objective
        if preference is not None:  # teacher_params is the reference here
            if teacher_params is None and not lora:
                raise ValueError("preference tuning without LoRA needs the frozen reference parameters")
            _, _, valid = pair_answer_logps(
                jnp.zeros(batch["loss_mask"].shape), batch["loss_mask"], batch["segment_ids"]
            )
            objective_fn = functools.partial(
                _preference_objective,
                model=model,
                reference_model=Qwen3VL(config.replace(lora=dict(rank=0))) if lora else model,
                preference=preference,
                total_pairs=jnp.maximum(valid.sum(), 1).astype(jnp.float32),
                microbatches=grad_accum_steps,
                loss_chunk=loss_chunk,
            )
            objective_args = {}
        if config.lora.rank and config.lora.dropout:  # a fresh dropout mask every step
            objective_args.update(dropout_rng=jax.random.fold_in(state.rng, 1))
        if distill is not None:
            kl_weights = kl_token_weights(
                batch, all_text_tokens=distill.all_text_tokens, config=config, normalization=loss_normalization
            )
            kl_total = jnp.maximum(kl_weights.sum(), 1e-9)
            objective_args.update(teacher_params=teacher_params, distill=distill, kl_total_weight=kl_total)

        def objective(params, rows):
            trainable = stop_frozen_gradients(params, freeze, lora=lora)
            if preference is not None:
                reference = params if teacher_params is None else teacher_params
                return objective_fn(trainable, rows, reference_params=reference, **objective_args)
            return objective_fn(trainable, rows, **objective_args)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if grad_accum_steps == 1:
            (loss, counters), grads = grad_fn(state.params, batch)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1),
                batch,
            )

            def accumulate(carry, microbatch):
                return jax.tree_util.tree_map(jnp.add, carry, grad_fn(state.params, microbatch)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first))
            ((loss, counters), grads), _ = jax.lax.scan(accumulate, zeros, micro)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            loss=loss,
            ce_loss=counters["ce"],
            grad_norm=optax.global_norm(grads),
            learning_rate=schedule(state.step),
            supervised_tokens=counters["tokens"],
            token_accuracy=counters["correct"] / jnp.maximum(counters["tokens"], 1.0),
            token_ce=counters["token_ce"] / jnp.maximum(counters["tokens"], 1.0),
        )
        extra = ("aux_loss", "z_loss", "kl", "dpo_loss", "reward_margin", "preference_accuracy")
        metrics.update({k: counters[k] for k in extra if k in counters})
        rng, _ = jax.random.split(state.rng)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return train_step


def make_eval_step(config: ModelConfig, *, loss_chunk: int = 0) -> Callable:
    """(params, batch) -> sums over the batch: token CE and count, examples and examples whose every
    supervised token is predicted by argmax (= the greedy answer under teacher forcing is exactly right)."""
    model = Qwen3VL(config)

    def eval_step(params, batch: dict):
        ce, correct, _ = _token_losses(model, params, batch, loss_chunk=loss_chunk)
        mask = batch["loss_mask"] > 0
        wrong = mask & ~correct
        (supervised, _), (errors, _) = (example_totals(x, batch["segment_ids"]) for x in (mask, wrong))
        examples = supervised > 0
        return dict(
            token_ce=jnp.where(mask, ce, 0.0).sum(),
            tokens=mask.sum(dtype=jnp.float32),
            examples=examples.sum(dtype=jnp.float32),
            exact=(examples & (errors == 0)).sum(dtype=jnp.float32),
        )

    return eval_step


def make_preference_eval_step(config: ModelConfig, preference: PreferenceTuning, *, loss_chunk: int = 0) -> Callable:
    """(params, batch, reference_params) -> sums over the batch's packed preference pairs: pairs, preference
    loss, reward margin and pairs the policy prefers the right way (reward of chosen > rejected).
    reference_params None: a LoRA model's base is the reference."""
    model = Qwen3VL(config)
    lora = config.lora.rank > 0
    reference_model = Qwen3VL(config.replace(lora=dict(rank=0))) if lora else model

    def eval_step(params, batch: dict, reference_params=None):
        if reference_params is None and not lora:
            raise ValueError("preference evaluation without LoRA needs the frozen reference parameters")
        reference = params if reference_params is None else reference_params
        losses, valid, *_ = _pair_losses(
            model, reference_model, params, reference, batch, preference=preference, loss_chunk=loss_chunk
        )
        return dict(
            pairs=valid.sum(dtype=jnp.float32),
            loss=jnp.where(valid, losses.loss, 0.0).sum(),
            margin=jnp.where(valid, losses.margin, 0.0).sum(),
            correct=jnp.where(valid, losses.accuracy, 0.0).sum(),
        )

    return eval_step
