"""Direct preference optimisation (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023) on answer
log-probabilities.

For a pair (chosen answer c, rejected answer r) of one prompt, log pi(y) is the policy's summed log-probability
of answer y's supervised tokens and log pi_ref(y) the frozen reference's. With the implicit rewards
r(y) = beta * (log pi(y) - log pi_ref(y)) and the margin h = (log pi(c) - log pi_ref(c)) - (log pi(r) - log
pi_ref(r)):

    sigmoid (DPO): loss = -log sigmoid(beta * h)
    ipo:           loss = (h - 1 / (2 beta))^2

Metrics: the reward margin r(c) - r(r) and the preference accuracy (the fraction of pairs with r(c) > r(r)).

`config.objective = "dpo"` with the `config.dpo` section (beta, variant), on packed preference pairs
(data.features: "chosen" / "rejected" answers). The reference is the run's step-0 parameters, or, for a LoRA model,
the same weights with the adapters off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.training.loss import example_totals
from qwen3vl_jax.training.objectives.base import (
    Counters,
    EvalSummary,
    FrozenModel,
    Objective,
    StepSettings,
    token_counters,
    token_losses,
)

DPO_VARIANTS = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class PreferenceLosses:
    """Per pair (P,): the loss and the implicit rewards of the chosen and the rejected answer."""

    loss: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array

    @property
    def margin(self) -> jax.Array:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> jax.Array:
        return (self.chosen_rewards > self.rejected_rewards).astype(jnp.float32)


def answer_logps(token_logps: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Summed log-probabilities of each packed example's supervised tokens: token_logps, loss_mask, segment_ids
    (B, L) -> (B * (L + 1),) indexed like training.loss.example_totals (row b, segment s -> b (L + 1) + s)."""
    return example_totals(jnp.where(loss_mask > 0, token_logps, 0.0), segment_ids)[0]


def pair_answer_logps(token_logps: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array):
    """Packed preference pairs (data.features: segment 2k - 1 the chosen half, 2k the rejected): per row and pair
    slot (B, L // 2), the chosen and the rejected answer's summed log-probabilities and whether the slot holds a
    pair (both halves have supervised tokens)."""
    batch, length = segment_ids.shape
    sums = answer_logps(token_logps, loss_mask, segment_ids).reshape(batch, length + 1)
    counts = example_totals(loss_mask > 0, segment_ids)[0].reshape(batch, length + 1)
    pairs = length // 2
    chosen, rejected = sums[:, 1 : 2 * pairs : 2], sums[:, 2 : 2 * pairs + 1 : 2]
    valid = (counts[:, 1 : 2 * pairs : 2] > 0) & (counts[:, 2 : 2 * pairs + 1 : 2] > 0)
    return chosen, rejected, valid


def preference_losses(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    *,
    beta: float,
    variant: str = "sigmoid",
) -> PreferenceLosses:
    """Answer log-probabilities (P,) of the policy and the reference (no gradient reaches the reference)."""
    if variant not in DPO_VARIANTS:
        raise ValueError(f"dpo variant {variant!r} not in {DPO_VARIANTS}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    chosen = policy_chosen - jax.lax.stop_gradient(reference_chosen)
    rejected = policy_rejected - jax.lax.stop_gradient(reference_rejected)
    margin = chosen - rejected
    if variant == "sigmoid":
        loss = -jax.nn.log_sigmoid(beta * margin)
    else:
        loss = (margin - 1 / (2 * beta)) ** 2
    return PreferenceLosses(loss, beta * jax.lax.stop_gradient(chosen), beta * jax.lax.stop_gradient(rejected))


def without_adapters(config: ModelConfig) -> ModelConfig:
    """A LoRA model's base: the same weights with the adapters off (the reference under LoRA)."""
    return config.replace(lora=dict(rank=0)) if config.lora.rank else config


def _pair_losses(
    model: Qwen3VL,
    params: Any,
    reference_params: Any,
    batch: TrainingBatch,
    *,
    beta: float,
    variant: str,
    loss_chunk: int,
    dropout_rng: jax.Array | None = None,
):
    """The batch's packed pairs scored by the policy and the reference (the policy's model without adapters):
    (PreferenceLosses, valid pair slots (B, L // 2), the policy's token CE and hits (B, L), its router logits)."""
    ce, correct, router_logits = token_losses(model, params, batch, loss_chunk=loss_chunk, dropout_rng=dropout_rng)
    reference_model = Qwen3VL(without_adapters(model.config))
    reference_params = jax.lax.stop_gradient(reference_params)
    reference_ce, _, _ = token_losses(reference_model, reference_params, batch, loss_chunk=loss_chunk)
    pair = dict(loss_mask=batch.loss_mask, segment_ids=batch.segment_ids)
    chosen, rejected, valid = pair_answer_logps(-ce, **pair)
    reference_chosen, reference_rejected, _ = pair_answer_logps(-reference_ce, **pair)
    losses = preference_losses(chosen, rejected, reference_chosen, reference_rejected, beta=beta, variant=variant)
    return losses, valid, ce, correct, router_logits


@dataclasses.dataclass
class PreferenceTuning(Objective):
    """DPO / IPO (module docstring): the mean preference loss over the batch's pairs. The frozen argument is the
    reference's parameters (the step-0 weights), or, for a LoRA model, none: its base is the reference."""

    beta: float = 0.1
    variant: str = "sigmoid"
    frozen_in_eval = True

    def __post_init__(self):
        if self.variant not in DPO_VARIANTS or self.beta <= 0:
            raise ValueError(f"dpo variant must be in {DPO_VARIANTS} and beta > 0, got {self}")

    def frozen_model(self, model_config: ModelConfig) -> FrozenModel | None:
        return None if model_config.lora.rank else FrozenModel(model_config)

    def batch_totals(self, batch: TrainingBatch, settings: StepSettings) -> dict[str, jax.Array]:
        _, _, valid = pair_answer_logps(jnp.zeros(batch.loss_mask.shape), batch.loss_mask, batch.segment_ids)
        tokens = jnp.maximum((batch.loss_mask > 0).sum(), 1).astype(jnp.float32)
        return dict(pairs=jnp.maximum(valid.sum(), 1).astype(jnp.float32), tokens=tokens)

    def loss(
        self,
        params: Any,
        batch: TrainingBatch,
        *,
        frozen_params: Any,
        totals: dict[str, jax.Array],
        settings: StepSettings,
        dropout_rng: jax.Array | None,
    ) -> tuple[jax.Array, Counters, Any]:
        if frozen_params is None and not settings.model.config.lora.rank:
            raise ValueError("preference tuning without LoRA needs the frozen reference parameters")
        losses, valid, ce, correct, router_logits = _pair_losses(
            settings.model,
            params,
            params if frozen_params is None else frozen_params,
            batch,
            beta=self.beta,
            variant=self.variant,
            loss_chunk=settings.loss_chunk,
            dropout_rng=dropout_rng,
        )
        mask, pairs = batch.loss_mask > 0, totals["pairs"]
        mean_ce = jnp.where(mask, ce, 0.0).sum() / totals["tokens"]  # the batch's mean token CE: reported, not trained
        counters = token_counters(ce, correct, batch, ce=mean_ce).replace(
            extra=dict(
                dpo_loss=jnp.where(valid, losses.loss, 0.0).sum() / pairs,
                reward_margin=jnp.where(valid, losses.margin, 0.0).sum() / pairs,
                preference_accuracy=jnp.where(valid, losses.accuracy, 0.0).sum() / pairs,
            )
        )
        return counters.extra["dpo_loss"], counters, router_logits

    def make_eval_step(self, config: ModelConfig, *, loss_chunk: int = 0) -> Callable:
        """(params, batch, reference_params) -> sums over the batch's packed preference pairs: pairs, preference
        loss, reward margin and pairs the policy prefers the right way (reward of chosen > rejected).
        reference_params None: a LoRA model's base is the reference."""
        model = Qwen3VL(config)

        def eval_step(params, batch: TrainingBatch, reference_params=None):
            if reference_params is None and not config.lora.rank:
                raise ValueError("preference evaluation without LoRA needs the frozen reference parameters")
            reference = params if reference_params is None else reference_params
            losses, valid, *_ = _pair_losses(
                model, params, reference, batch, beta=self.beta, variant=self.variant, loss_chunk=loss_chunk
            )
            return dict(
                pairs=valid.sum(dtype=jnp.float32),
                loss=jnp.where(valid, losses.loss, 0.0).sum(),
                margin=jnp.where(valid, losses.margin, 0.0).sum(),
                correct=jnp.where(valid, losses.accuracy, 0.0).sum(),
            )

        return eval_step

    def eval_summary(self, totals: dict[str, float]) -> EvalSummary:
        pairs = max(totals.get("pairs", 0.0), 1)
        metrics = dict(
            preference_accuracy=totals.get("correct", 0.0) / pairs,
            reward_margin=totals.get("margin", 0.0) / pairs,
            dpo_loss=totals.get("loss", 0.0) / pairs,
            pairs=totals.get("pairs", 0.0),
        )
        line = f"preference accuracy {metrics['preference_accuracy']:.3f}, margin {metrics['reward_margin']:.3f}"
        return EvalSummary(metrics, line, metrics["pairs"])


def from_config(config: ConfigDict, model_config: ModelConfig) -> PreferenceTuning:
    """config.dpo: beta, variant."""
    del model_config
    return PreferenceTuning(beta=config.dpo.beta, variant=config.dpo.variant)
