"""Dot-product attention with segment-id masking and GQA: the single entry point for the decoder and the ViT.

Segment ids replace explicit masks: a query attends a key iff both carry the same segment id (and, when
causal, the key is not after the query). Packed examples, left padding and the ViT's block-diagonal
(image, temporal group) structure are all expressed this way; padding uses segment 0 and only ever attends
other padding, so every row has at least one key and no NaN can appear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3vl_jax.kernels.splash import load_balanced_splash, splash_attention
from qwen3vl_jax.parallel.context import (
    CONTEXT,
    check_length,
    context_shards,
    gather_in_sequence_order,
    load_balanced_positions,
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
    context: str | None = None,
) -> jax.Array:
    """q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Hq a multiple of Hkv (query head h uses kv head
    h // (Hq/Hkv), as transformers' repeat_kv); segment ids (B, Lq) / (B, Lk) int. Returns (B, Lq, Hq, D).
    Scale D^-0.5; softmax in float32. When causal, query i sits at key position q_offset + i (a KV cache)
    and sees keys up to there.

    impl "xla": causal self-attention skips the key blocks after each query block (half the work of the full
    L x L product). impl "splash": the Pallas splash kernels (kernels/splash.py, `block_sizes` = (q, kv)
    blocks) for self-attention; attention over a KV cache (q_offset != 0) stays on the XLA path.

    `context`: how self-attention's length axis is split over the mesh's `context` axis (parallel/context.py);
    None or a mesh without that axis: it is not. "load_balanced": causal, the tokens in the load-balanced
    layout; each shard's queries attend the keys / values all-gathered over `context`. "local": every segment
    lies within one shard (the ViT's patch buffer laid out by `align_patches`); each shard attends its own."""
    if impl not in ("xla", "splash"):
        raise ValueError(f"attention impl {impl!r} is not available; use 'xla' or 'splash'")
    length = q.shape[1]
    self_attention = isinstance(q_offset, int) and q_offset == 0 and length == k.shape[1]
    segments = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    if context is not None and self_attention and context_shards() > 1:
        if context == "load_balanced" and causal:
            attend = load_balanced_splash if impl == "splash" else _load_balanced_xla
            return attend(q, k, v, segment_ids=q_segment_ids, block_sizes=block_sizes)
        if context != "local":
            raise ValueError(f"context {context!r} is not 'load_balanced' (causal attention) or 'local'")
        if impl == "xla":

            def local(q, k, v, q_segment_ids, kv_segment_ids):
                return attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)

            return _per_device(local, q, k, v, q_segment_ids, kv_segment_ids, context=True)
    if impl == "splash" and self_attention:
        local = context == "local" and context_shards() > 1
        return splash_attention(q, k, v, **segments, causal=causal, block_sizes=block_sizes, local_context=local)
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


def _per_device(fn, q, k, v, q_segment_ids, kv_segment_ids, *, context: bool):
    """fn(q, k, v, q_segment_ids, kv_segment_ids) on each device's block of the arrays (attention_specs)."""
    mesh = jax.sharding.get_abstract_mesh()
    heads, segments = attention_specs(mesh, batch=q.shape[0], heads=q.shape[2], kv_heads=k.shape[2], context=context)
    in_specs = (heads,) * 3 + (segments,) * 2
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=heads, check_vma=False)(
        q, k, v, q_segment_ids, kv_segment_ids
    )


def _load_balanced_xla(q, k, v, *, segment_ids, block_sizes):
    """Causal self-attention on tokens in the load-balanced layout, split over `context`: each shard's queries
    attend every key (all-gathered, back in sequence order), masked by the queries' sequence positions."""
    del block_sizes
    length, shards = q.shape[1], context_shards()
    check_length(length, shards)
    positions = load_balanced_positions(length, shards)

    def attend(q, k, v, q_segment_ids, kv_segment_ids):
        k, v, kv_segment_ids = gather_in_sequence_order((k, v, kv_segment_ids), length=length, shards=shards)
        local = q.shape[1]
        q_positions = jax.lax.dynamic_slice_in_dim(jnp.asarray(positions), jax.lax.axis_index(CONTEXT) * local, local)
        return _attend(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_positions=q_positions)

    return _per_device(attend, q, k, v, segment_ids, segment_ids, context=True)


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
