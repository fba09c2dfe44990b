"""Direct preference optimisation (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023) on answer
log-probabilities.

For a pair (chosen answer c, rejected answer r) of one prompt, log pi(y) is the policy's summed log-probability
of answer y's supervised tokens and log pi_ref(y) the frozen reference's. With the implicit rewards
r(y) = beta * (log pi(y) - log pi_ref(y)) and the margin h = (log pi(c) - log pi_ref(c)) - (log pi(r) - log
pi_ref(r)):

    sigmoid (DPO): loss = -log sigmoid(beta * h)
    ipo:           loss = (h - 1 / (2 beta))^2

Metrics: the reward margin r(c) - r(r) and the preference accuracy (the fraction of pairs with r(c) > r(r)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen3vl_jax.training.loss import example_totals

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
