"""The GRPO family's advantages and losses on per-token log-probabilities (Shao et al. 2024, DeepSeekMath; GSPO:
Zheng et al. 2025; clip-higher and token-level aggregation: Yu et al. 2025, DAPO).

For a prompt, G completions are sampled; completion i gets reward r_i. Its advantage is group-normalised:

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)      scale_rewards="group"
    A_i = (r_i - mean_group(r)) / (std_batch(r) + eps)      scale_rewards="batch"
    A_i =  r_i - mean_group(r)                              scale_rewards="none"   (Dr. GRPO)

with the unbiased standard deviation and eps = 1e-4 (as TRL's GRPOTrainer). With log pi(y_t) the policy's
log-probability of completion token t, pi_old the rollout policy's and the importance ratio

    grpo: w_t = exp(log pi(y_t) - log pi_old(y_t))                                 (per token)
    gspo: w_t = exp(mean_t' (log pi(y_t') - log pi_old(y_t')))                     (per sequence)

the per-token loss is -min(w_t A_i, clip(w_t, 1 - clip_low, 1 + clip_high) A_i), plus beta times the k3
estimate of KL(pi || pi_ref): exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1. The loss aggregates over the
completion tokens of the batch: "token" sums them and divides by their number (every token weighs the same),
"sequence" averages each completion's tokens, then the completions. With pi = pi_old (one update per rollout)
w = 1 and the gradient is REINFORCE's with the group mean as baseline.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from qwen3vl_jax.training.loss import example_totals

SCALE_REWARDS = ("group", "batch", "none")
VARIANTS = ("grpo", "gspo")
AGGREGATIONS = ("token", "sequence")
STD_EPSILON = 1e-4


@flax.struct.dataclass
class Advantages:
    """Per completion (N,): the advantage, and whether its group's rewards all equal (no learning signal)."""

    advantage: jax.Array
    zero_variance: jax.Array


def group_advantages(rewards: jax.Array, *, group_size: int, scale_rewards: str = "group") -> Advantages:
    """rewards (N,) of N / group_size prompts' completions, each prompt's group_size completions consecutive."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r} not in {SCALE_REWARDS}")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not form groups of {group_size} (>= 2) completions")
    groups = rewards.astype(jnp.float32).reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    zero_variance = jnp.all(groups == groups[:, :1], axis=1)
    if scale_rewards == "group":
        centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + STD_EPSILON)
    elif scale_rewards == "batch":
        centred = centred / (groups.reshape(-1).std(ddof=1) + STD_EPSILON)
    return Advantages(centred.reshape(-1), jnp.repeat(zero_variance, group_size))


@flax.struct.dataclass
class PolicyLoss:
    """The aggregated loss (scalar) and, for the metrics, the mean k3 KL and the fraction of completion tokens
    whose ratio was clipped (both over the completion tokens)."""

    loss: jax.Array
    kl: jax.Array
    clip_fraction: jax.Array


def policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    variant: str = "grpo",
    aggregation: str = "token",
    reference_logps: jax.Array | None = None,
    beta: float = 0.0,
    total_tokens: jax.Array | None = None,
    total_sequences: jax.Array | None = None,
) -> PolicyLoss:
    """logps, old_logps, reference_logps, mask (B, L): token t's log-probability under the policy, the rollout
    policy (no gradient) and the reference (no gradient), and whether t is a completion token the loss counts.
    segment_ids (B, L): which completion of its row each token belongs to (packed rows: 1, 2, ...; 0 none); None:
    each row is one completion. advantages: (B,) one per row (segment_ids None), or (B, L) each token's
    completion's advantage. total_tokens / total_sequences: what the "token" / "sequence" sums are divided by (a
    microbatch passes its whole batch's counts, so that the shares add up; default: this batch's own)."""
    if variant not in VARIANTS or aggregation not in AGGREGATIONS:
        raise ValueError(
            f"variant must be in {VARIANTS} and aggregation in {AGGREGATIONS}, got {variant!r}, {aggregation!r}"
        )
    if clip_low < 0 or clip_high < 0 or beta < 0:
        raise ValueError(f"clip_low, clip_high and beta must be >= 0, got {clip_low}, {clip_high}, {beta}")
    if beta and reference_logps is None:
        raise ValueError("beta > 0 needs the reference's log-probabilities")
    mask = mask.astype(jnp.float32)
    if segment_ids is None:
        segment_ids = (mask > 0).astype(jnp.int32)
    advantage = advantages.astype(jnp.float32)
    advantage = jnp.broadcast_to(advantage[:, None] if advantage.ndim == 1 else advantage, logps.shape)
    counts, sequence_of = example_totals(mask, segment_ids)  # completion tokens per (row, segment)
    log_ratio = logps - jax.lax.stop_gradient(old_logps)
    if variant == "gspo":  # one ratio per sequence: its tokens' mean log-ratio
        sums, _ = example_totals(log_ratio * mask, segment_ids)
        log_ratio = (sums / jnp.maximum(counts, 1.0))[sequence_of]
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -jnp.minimum(ratio * advantage, clipped * advantage)
    kl = jnp.zeros_like(per_token)
    if reference_logps is not None:
        delta = jax.lax.stop_gradient(reference_logps) - logps
        kl = jnp.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
    tokens = jnp.maximum(mask.sum() if total_tokens is None else total_tokens, 1.0)
    if aggregation == "token":
        loss = (per_token * mask).sum() / tokens
    else:
        per_sequence, _ = example_totals(per_token * mask, segment_ids)
        sequences = (counts > 0).sum() if total_sequences is None else total_sequences
        loss = (per_sequence / jnp.maximum(counts, 1.0)).sum() / jnp.maximum(sequences, 1.0)
    was_clipped = ((ratio < 1.0 - clip_low) & (advantage < 0)) | ((ratio > 1.0 + clip_high) & (advantage > 0))
    return PolicyLoss(
        loss=loss,
        kl=(kl * mask).sum() / tokens,
        clip_fraction=(was_clipped * mask).sum() / tokens,
    )


def sequence_count(mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The number of completions (row, segment) with at least one token in `mask` (B, L)."""
    counts, _ = example_totals(mask.astype(jnp.float32), segment_ids)
    return (counts > 0).sum().astype(jnp.float32)
