"""Cross-entropy on supervised tokens with per-token weights.

Let n_e be the number of supervised tokens of example e (one packed segment) and l_t the cross-entropy of
token t. The loss is  L = sum_t w_t l_t / sum_t w_t  over the supervised tokens of the whole (global) batch, with

  "token":  w_t = 1              every supervised token counts the same (long answers dominate);
  "sample": w_t = 1 / n_e        every example counts the same (each token of a short answer weighs more);
  "sqrt":   w_t = 1 / sqrt(n_e)  the Qwen3-VL paper's square-root normalisation, between the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_NORMALIZATIONS = ("sqrt", "token", "sample")


def token_weights(loss_mask: jax.Array, segment_ids: jax.Array, *, normalization: str) -> jax.Array:
    """(B, L) float32 weights w_t (0 for unsupervised tokens) for loss_mask / segment_ids of shape (B, L)."""
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss_normalization {normalization!r} not in {LOSS_NORMALIZATIONS}")
    mask = loss_mask.astype(jnp.float32)
    if normalization == "token":
        return mask
    counts, example = example_totals(mask, segment_ids)
    n = jnp.maximum(counts[example], 1.0)  # the supervised-token count of each token's example
    return mask / (n if normalization == "sample" else jnp.sqrt(n))


def example_totals(values: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums of `values` (B, L) over each packed example (a row's segment): totals (B * (L + 1),) float32, and the
    index into totals of each token's example (B, L). Each row's padding (segment 0) is one more "example"."""
    batch, length = segment_ids.shape
    example = segment_ids + jnp.arange(batch)[:, None] * (length + 1)
    flat = values.reshape(-1).astype(jnp.float32)
    return jax.ops.segment_sum(flat, example.reshape(-1), num_segments=batch * (length + 1)), example
