"""Dot-product attention with segment-id masking and GQA: the single entry point for the decoder and the ViT.

Segment ids replace explicit masks: a query attends a key iff both carry the same segment id (and, when
causal, the key is not after the query). Packed examples, left padding and the ViT's block-diagonal
(image, temporal group) structure are all expressed this way; padding uses segment 0 and only ever attends
other padding, so every row has at least one key and no NaN can appear.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qwen3vl_jax.kernels.splash import load_balanced_splash, splash_attention
from qwen3vl_jax.parallel.context import (
    CONTEXT,
    check_length,
    context_shards,
    gather_in_sequence_order,
)
from qwen3vl_jax.parallel.sharding import attention_specs

CAUSAL_BLOCK = 128  # causal self-attention runs per query block over the keys up to that block
MAX_BLOCKS = 16  # ... with at most this many blocks (longer sequences get longer blocks)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    causal: bool,
    q_offset: int | jax.Array = 0,
    impl: str = "xla",
    block_sizes: tuple[int, int] = (512, 512),
    context_layout: str | None = None,
) -> jax.Array:
    """q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Hq a multiple of Hkv (query head h uses kv head
    h // (Hq/Hkv), as transformers' repeat_kv); segment ids (B, Lq) / (B, Lk) int. Returns (B, Lq, Hq, D).
    Scale D^-0.5; softmax in float32. When causal, query i sits at key position q_offset + i and sees keys up
    to there.

    impl "xla": causal self-attention skips the key blocks after each query block (half the work of the full
    L x L product). impl "splash": the Pallas splash kernels (kernels/splash.py, `block_sizes` = (q, kv)
    blocks) for self-attention; attention over a KV cache (q_offset != 0) stays on the XLA path.

    `context_layout`: how self-attention's length axis is split over the mesh's `context` axis (parallel/context.py);
    None or a mesh without that axis: it is not. "load_balanced": causal, the tokens in the load-balanced
    layout; each shard's queries attend the keys / values all-gathered over `context`. "local": every segment
    lies within one shard (the ViT's patch buffer laid out by `align_patches`); each shard attends its own."""
    if impl not in ("xla", "splash"):
        raise ValueError(f"attention impl {impl!r} is not available; use 'xla' or 'splash'")
    length = q.shape[1]
    self_attention = isinstance(q_offset, int) and q_offset == 0 and length == k.shape[1]
    segments = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    if context_layout is not None and self_attention and context_shards() > 1:
        if context_layout == "load_balanced" and causal:
            attend = load_balanced_splash if impl == "splash" else _load_balanced_xla
            return attend(q, k, v, segment_ids=q_segment_ids, block_sizes=block_sizes)
        if context_layout != "local":
            raise ValueError(f"context_layout {context_layout!r} is not 'load_balanced' (causal attention) or 'local'")
        if impl == "xla":

            def local(q, k, v, q_segment_ids, kv_segment_ids):
                return attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)

            return _per_device(local, q, k, v, q_segment_ids, kv_segment_ids, split_over_context=True)
    if impl == "splash" and self_attention:
        local = context_layout == "local" and context_shards() > 1
        return splash_attention(q, k, v, **segments, causal=causal, block_sizes=block_sizes, split_over_context=local)
    if not causal or not self_attention or length <= CAUSAL_BLOCK:
        return _attend(q, k, v, **segments, q_positions=jnp.arange(length) + q_offset if causal else None)
    block = max(CAUSAL_BLOCK, -(-length // MAX_BLOCKS))
    outputs = [
        _attend(
            q[:, start : start + block],
            k[:, : start + block],
            v[:, : start + block],
            q_segment_ids=q_segment_ids[:, start : start + block],
            kv_segment_ids=kv_segment_ids[:, : start + block],
            q_positions=jnp.arange(start, min(start + block, length)),
        )
        for start in range(0, length, block)
    ]
    return jnp.concatenate(outputs, axis=1)


def _per_device(fn, q, k, v, q_segment_ids, kv_segment_ids, *, split_over_context: bool):
    """fn(q, k, v, q_segment_ids, kv_segment_ids) on each device's block of the arrays (attention_specs)."""
    mesh = jax.sharding.get_abstract_mesh()
    heads, segments = attention_specs(
        mesh, batch=q.shape[0], heads=q.shape[2], kv_heads=k.shape[2], split_over_context=split_over_context
    )
    in_specs = (heads,) * 3 + (segments,) * 2
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=heads, check_vma=False)(
        q, k, v, q_segment_ids, kv_segment_ids
    )


def _load_balanced_xla(q, k, v, *, segment_ids, block_sizes):
    """Causal self-attention on tokens in the load-balanced layout, split over `context`. Shard s of n holds
    query chunks s and 2n-1-s (each of L / 2n positions); with the keys / values all-gathered back in sequence
    order, its early chunk attends key chunks 0..s and its late chunk key chunks 0..2n-1-s: 2n+1 (query chunk,
    key chunk) pairs on every shard, which is all that causal attention needs and the same on every shard. The
    pairs run as one batched product whose partial softmaxes are combined per query chunk (as in flash
    attention), so the work is that of the unsplit causal attention, not of the full L x L product."""
    del block_sizes
    length, shards = q.shape[1], context_shards()
    check_length(length, shards)
    chunk = length // (2 * shards)

    def attend(q, k, v, q_segment_ids, kv_segment_ids):
        k, v, kv_segment_ids = gather_in_sequence_order((k, v, kv_segment_ids), length=length, shards=shards)
        shard = jax.lax.axis_index(CONTEXT)
        pair = jnp.arange(2 * shards + 1)
        early = pair <= shard  # pairs 0..s: the early query chunk with key chunks 0..s; then the late one
        query_side = jnp.where(early, 0, 1)  # which of this shard's two query chunks
        query_chunk = jnp.where(early, shard, 2 * shards - 1 - shard)
        key_chunk = jnp.where(early, pair, pair - shard - 1)

        def chunks(x, index):  # (B, m * chunk, ...) -> (B, pairs, chunk, ...): chunk index[p] for pair p
            return jnp.take(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), index, axis=1)

        query_positions = query_chunk[:, None] * chunk + jnp.arange(chunk)  # (pairs, chunk) sequence positions
        key_positions = key_chunk[:, None] * chunk + jnp.arange(chunk)
        out = _attend_chunk_pairs(
            chunks(q, query_side),
            chunks(k, key_chunk),
            chunks(v, key_chunk),
            q_segment_ids=chunks(q_segment_ids, query_side),
            kv_segment_ids=chunks(kv_segment_ids, key_chunk),
            causal=query_positions[:, :, None] >= key_positions[:, None, :],
            query_side=query_side,
        )
        return out.reshape(q.shape)

    return _per_device(attend, q, k, v, segment_ids, segment_ids, split_over_context=True)


def _attend_chunk_pairs(q, k, v, *, q_segment_ids, kv_segment_ids, causal, query_side):
    """Attention of two query chunks, each spread over several (query chunk, key chunk) pairs. q (B, P, C, Hq, D)
    holds pair p's query chunk (one of two: query_side[p] in {0, 1}); k, v (B, P, C, Hkv, D) its key chunk;
    segment ids (B, P, C); causal (P, C, C) whether each query position may see each key position. Returns
    (B, 2, C, Hq, D): the two query chunks' outputs, each a softmax over the keys of all its pairs."""
    b, pairs, c, hq, d = q.shape
    hkv = k.shape[3]
    rep = hq // hkv
    # one batched matmul per (pair, kv head), its query heads stacked, as in _attend
    q = q.reshape(b, pairs, c, hkv, rep, d).transpose(0, 1, 3, 4, 2, 5).reshape(b * pairs * hkv, rep * c, d)
    k = k.transpose(0, 1, 3, 2, 4).reshape(b * pairs * hkv, c, d)
    v = v.transpose(0, 1, 3, 2, 4).reshape(b * pairs * hkv, c, d)
    scores = jnp.matmul(q, k.transpose(0, 2, 1), preferred_element_type=jnp.float32) * (d**-0.5)
    mask = (q_segment_ids[:, :, :, None] == kv_segment_ids[:, :, None, :]) & causal[None]
    scores = jnp.where(mask[:, :, None], scores.reshape(b, pairs, hq, c, c), jnp.finfo(jnp.float32).min)
    # each query row's maximum over all the pairs of its chunk (every row sees its own position in the diagonal
    # pair, so the maximum is finite); the partial sums then share one reference and simply add up
    member = (query_side[:, None] == jnp.arange(2)).astype(jnp.float32)  # (P, 2)
    row_max = jax.lax.stop_gradient(scores.max(axis=-1))  # (B, P, Hq, C)
    side_max = jnp.where(member.T[None, :, :, None, None] > 0, row_max[:, None], jnp.finfo(jnp.float32).min).max(2)
    weights = jnp.exp(scores - jnp.take(side_max, query_side, axis=1)[..., None])
    totals = jnp.einsum("bphc,ps->bshc", weights.sum(axis=-1), member)
    values = jnp.matmul(weights.astype(v.dtype).reshape(b * pairs * hkv, rep * c, c), v)
    values = jnp.einsum("bphcd,ps->bshcd", values.reshape(b, pairs, hq, c, d).astype(jnp.float32), member)
    out = values / totals[..., None]
    return out.transpose(0, 1, 3, 2, 4).astype(v.dtype)


def cached_attention(
    q,
    *,
    cache_k,
    cache_v,
    q_segment_ids,
    kv_segment_ids,
    cache_index,
    prompt_k=None,
    prompt_v=None,
    prompt_segment_ids=None,
):
    """Causal attention of new tokens at cache slots cache_index .. cache_index + L - 1 over a KV cache that
    already holds them: q (B, L, Hq, D); cache_k, cache_v (B, Hkv, S, D) with segment ids kv_segment_ids (B, S);
    q_segment_ids (B, L). Query i sees the slots up to cache_index + i of its segment. Returns (B, L, Hq, D).

    With a prompt block (modeling.kv_cache: prompt_k, prompt_v (B, Hkv, Lp, D), prompt_segment_ids (B, Lp), the
    length split over the mesh's `context` axis) the queries also see every prompt key of their segment, all of
    which come before the slots: each context shard attends its part of the block, and the partial softmaxes are
    combined by their log-sum-exp (`_prompt_block_softmax_parts`), so the block is never gathered.

    The products are 4-D (batch and kv head as batch dimensions) on the cache as it is: reshaping the updated
    cache to (B * Hkv, S, D) first made XLA:CPU fuse the cache update into that reshape too, copying every
    layer's cache twice per decode step."""
    b, lq, hq, d = q.shape
    hkv, slots = cache_k.shape[1], cache_k.shape[2]
    rep = hq // hkv
    q = q.reshape(b, lq, hkv, rep, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rep * lq, d)
    scores = jnp.einsum("bhqd,bhsd->bhqs", q, cache_k, preferred_element_type=jnp.float32) * (d**-0.5)
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        (jnp.arange(lq) + cache_index)[:, None] >= jnp.arange(slots)[None, :]
    )
    scores = jnp.where(mask[:, None], scores.reshape(b, hq, lq, slots), jnp.finfo(jnp.float32).min)
    if prompt_k is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(cache_v.dtype).reshape(b, hkv, rep * lq, slots)
        out = jnp.einsum("bhqs,bhsd->bhqd", probs, cache_v)
    else:
        slot_parts = _softmax_parts(scores.reshape(b, hkv, rep * lq, slots), mask=mask, rep=rep, v=cache_v)
        prompt_parts = _prompt_block_softmax_parts(
            q, k=prompt_k, v=prompt_v, q_segment_ids=q_segment_ids, kv_segment_ids=prompt_segment_ids
        )
        out = _combine_softmax_parts(slot_parts, prompt_parts).astype(cache_v.dtype)
    return out.reshape(b, hkv, rep, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d)


class SoftmaxParts(NamedTuple):
    """A softmax over part of the keys, to be combined with the other parts' (flash attention's bookkeeping):
    row_max (B, Hkv, rep * Lq) the largest visible score (float32 min when none is visible), total the sum of
    exp(score - row_max) over the visible keys, weighted (B, Hkv, rep * Lq, D) float32 the values summed with those
    weights."""

    row_max: jax.Array
    total: jax.Array
    weighted: jax.Array


def _softmax_parts(scores, *, mask, rep: int, v) -> SoftmaxParts:
    """scores (B, Hkv, rep * Lq, S) float32, mask (B, Lq, S) the visible keys, v (B, Hkv, S, D)."""
    b, hkv, rows, keys = scores.shape
    visible = jnp.broadcast_to(mask[:, None, None], (b, hkv, rep, rows // rep, keys)).reshape(scores.shape)
    row_max = jnp.where(visible, scores, jnp.finfo(jnp.float32).min).max(axis=-1)
    weights = jnp.where(visible, jnp.exp(scores - row_max[..., None]), 0.0)
    weighted = jnp.einsum("bhqs,bhsd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return SoftmaxParts(row_max=row_max, total=weights.sum(axis=-1), weighted=weighted)


def _combine_softmax_parts(*parts: SoftmaxParts) -> jax.Array:
    """The softmax-weighted values (B, Hkv, rep * Lq, D) float32 over the keys of all `parts`: each part's sums
    rescaled by exp(its max - the overall max)."""
    row_max = functools.reduce(jnp.maximum, [part.row_max for part in parts])
    scales = [jnp.exp(part.row_max - row_max) for part in parts]
    total = sum(scale * part.total for scale, part in zip(scales, parts))
    weighted = sum(scale[..., None] * part.weighted for scale, part in zip(scales, parts))
    return weighted / total[..., None]


def _prompt_block_softmax_parts(q, *, k, v, q_segment_ids, kv_segment_ids) -> SoftmaxParts:
    """The `SoftmaxParts` of queries q (B, Hkv, rep * Lq, D) over a prompt block k, v (B, Hkv, Lp, D) with segment
    ids kv_segment_ids (B, Lp), the block's length split over `context` (no causal mask: every prompt key precedes
    the queries). Each context shard computes its part; the parts' maxima and sums are combined across `context`
    by pmax / psum, as in `_combine_softmax_parts`. The result is the same on every context shard."""
    b, hkv, rows, d = q.shape
    rep = rows // q_segment_ids.shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    context = CONTEXT if not mesh.empty and mesh.shape.get(CONTEXT, 1) > 1 else None

    def attend(q, k, v, q_segment_ids, kv_segment_ids):
        scores = jnp.einsum("bhqd,bhsd->bhqs", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
        mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        local = _softmax_parts(scores, mask=mask, rep=rep, v=v)
        if context is None:
            return local
        row_max = jax.lax.pmax(local.row_max, context)
        scale = jnp.exp(local.row_max - row_max)
        return SoftmaxParts(
            row_max=row_max,
            total=jax.lax.psum(scale * local.total, context),
            weighted=jax.lax.psum(scale[..., None] * local.weighted, context),
        )

    if mesh.empty:
        return attend(q, k, v, q_segment_ids, kv_segment_ids)
    heads, segments = attention_specs(
        mesh, batch=b, heads=rows // q_segment_ids.shape[1] * hkv, kv_heads=hkv, split_over_context=False
    )
    batch_axes, heads_axis = heads[0], heads[2]
    block = PartitionSpec(batch_axes, heads_axis, context, None)
    queries = PartitionSpec(batch_axes, heads_axis, None, None)
    in_specs = (queries, block, block, segments, PartitionSpec(batch_axes, context))
    out_specs = SoftmaxParts(
        row_max=PartitionSpec(batch_axes, heads_axis, None),
        total=PartitionSpec(batch_axes, heads_axis, None),
        weighted=queries,
    )
    return jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        q, k, v, q_segment_ids, kv_segment_ids
    )


def _attend(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions=None):
    """Attention of queries at sequence positions q_positions (Lq,) to the keys at positions 0 .. Lk-1 that are
    not after them (every key when q_positions is None)."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    # (B * Hkv, rep * Lq, D) x (B * Hkv, Lk, D): one batched matmul per kv head with its query heads stacked
    # (XLA:CPU runs this layout much faster than a 5-D einsum).
    q = q.reshape(b, lq, hkv, rep, d).transpose(0, 2, 3, 1, 4).reshape(b * hkv, rep * lq, d)
    k = k.transpose(0, 2, 1, 3).reshape(b * hkv, lk, d)
    v = v.transpose(0, 2, 1, 3).reshape(b * hkv, lk, d)
    scores = jnp.matmul(q, k.transpose(0, 2, 1), preferred_element_type=jnp.float32) * (d**-0.5)
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if q_positions is not None:
        mask &= q_positions[:, None] >= jnp.arange(lk)[None, :]
    scores = jnp.where(mask[:, None], scores.reshape(b, hq, lq, lk), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b * hkv, rep * lq, lk)
    out = jnp.matmul(probs, v)
    return out.reshape(b, hkv, rep, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d)
