"""The output head and the token cross-entropy, whole or in sequence chunks.

Chunked, the head matmul, the float32 log-sum-exp, the target logit and the argmax run on `chunk` positions at a
time inside a rematerialised scan: neither the (B, L, vocab) logits nor their gradient ever exists whole (at
151,936 tokens of vocabulary and 32K positions they would be 18.5 GiB in float32, their gradient as much again).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.modeling.layers import default_init, param
from qwen3vl_jax.modeling.loops import scan_unroll


class CrossEntropyAndHits(NamedTuple):
    """Per token losses against integer targets (`cross_entropy_and_hits`, `chunked_cross_entropy`)."""

    cross_entropy: jax.Array  # (B, L) float32
    correct: jax.Array  # (B, L) bool: the target has the highest logit (ties count as correct)


class LMHead(nn.Module):
    """The untied output head: kernel (hidden, vocab), as transformers' `lm_head` transposed."""

    hidden_size: int
    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        shape = (self.hidden_size, self.vocab_size)
        self.kernel = param(
            self, "kernel", init=default_init, shape=shape, dtype=self.param_dtype, axes=("embed", "vocab")
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., hidden) -> logits (..., vocab) in the compute dtype."""
        return project(x, self.kernel.astype(self.dtype))


def project(x: jax.Array, head_weight: jax.Array) -> jax.Array:
    """x (..., H) @ head_weight (H, V) as one 2-D matmul (XLA:CPU runs multi-dimensional dot_generals slower)."""
    flat = x.astype(head_weight.dtype).reshape(-1, x.shape[-1])
    return (flat @ head_weight).reshape(*x.shape[:-1], head_weight.shape[-1])


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(B, L) cross-entropy in float32 of logits (B, L, V) against integer targets (B, L)."""
    return cross_entropy_and_hits(logits, targets).cross_entropy


def cross_entropy_and_hits(logits: jax.Array, targets: jax.Array) -> CrossEntropyAndHits:
    """logits (B, L, V), integer targets (B, L) -> `CrossEntropyAndHits`: float32 cross-entropy (B, L) and whether
    the target has the highest logit (B, L) (argmax == target, ties counted as hits). The target logit is a masked
    sum and the hit a comparison with the max, not a gather and an argmax: both fuse into reductions over the
    vocabulary, where an argmax or a gather over a split vocabulary keeps int32 buffers as large as the logits."""
    logits = logits.astype(jnp.float32)
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    target_logits = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    return CrossEntropyAndHits(
        cross_entropy=jax.nn.logsumexp(logits, axis=-1) - target_logits,
        correct=target_logits >= jnp.max(logits, axis=-1),
    )


def chunked_cross_entropy(
    hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, *, chunk: int
) -> CrossEntropyAndHits:
    """hidden (B, L, H) final-norm states, head_weight (H, V) in the compute dtype, targets (B, L) ->
    `CrossEntropyAndHits` (cross-entropy (B, L) float32, target has the highest logit (B, L) bool), `chunk`
    positions at a time (L is padded up to a multiple of it). The backward pass recomputes each chunk's logits."""
    # vocabulary-parallel: the head weight (and so its gradient, accumulated over the chunks) stays split over the
    # devices by vocabulary; each chunk's hidden states (a few MB) are gathered instead
    head_weight = nn.with_logical_constraint(head_weight, (None, "loss_vocab"))

    def one_chunk(x, chunk_targets):
        return cross_entropy_and_hits(chunk_logits(x, head_weight), chunk_targets)

    return over_position_chunks(one_chunk, (hidden, targets), chunk=chunk)


def chunk_logits(x: jax.Array, head_weight: jax.Array) -> jax.Array:
    """x (B, chunk, H) hidden states, head_weight (H, V) -> the chunk's logits (B, chunk, V) in head_weight's dtype,
    laid out vocabulary-parallel (rows on each data replica)."""
    x = nn.with_logical_constraint(x, ("loss_batch", None, None))
    return nn.with_logical_constraint(project(x, head_weight), ("loss_batch", None, "loss_vocab"))


def over_position_chunks(per_chunk, arrays: tuple[jax.Array, ...], *, chunk: int):
    """per_chunk(*chunk_arrays) -> outputs (each (B, chunk, ...)), over `chunk` positions of `arrays` (each
    (B, L, ...)) at a time in a rematerialised scan; returns the outputs as (B, L, ...) arrays. L is padded up to
    a multiple of `chunk`. The chunks are strided (chunk c holds positions c, c + L/chunk, c + 2L/chunk, ...):
    when the length is split over a mesh axis (context parallelism), every device has its share of every chunk."""
    batch, length = arrays[0].shape[:2]
    pad = -length % chunk
    chunks = (length + pad) // chunk
    # (B, chunk, chunks, ...): chunk c is [:, :, c]; read in place (a transposed copy would be one more buffer)
    arrays = tuple(
        jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)).reshape(batch, chunk, chunks, *a.shape[2:])
        for a in arrays
    )

    @jax.checkpoint
    def one_chunk(carry, c):
        return carry, per_chunk(*(jax.lax.dynamic_index_in_dim(a, c, axis=2, keepdims=False) for a in arrays))

    _, outputs = jax.lax.scan(one_chunk, None, jnp.arange(chunks), unroll=scan_unroll(chunks))

    def unchunk(values):  # (chunks, B, chunk, ...) -> (B, L, ...)
        return jnp.moveaxis(values, 0, 2).reshape(batch, chunks * chunk, *values.shape[3:])[:, :length]

    return jax.tree_util.tree_map(unchunk, outputs)
