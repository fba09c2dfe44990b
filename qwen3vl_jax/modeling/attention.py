"""Dot-product attention with segment-id masking and GQA: the single entry point for the decoder and the ViT.

Segment ids replace explicit masks: a query attends a key iff both carry the same segment id (and, when
causal, the key is not after the query). Packed examples, left padding and the ViT's block-diagonal
(image, temporal group) structure are all expressed this way; padding uses segment 0 and only ever attends
other padding, so every row has at least one key and no NaN can appear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3vl_jax.kernels.splash import splash_attention

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
) -> jax.Array:
    """q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Hq a multiple of Hkv (query head h uses kv head
    h // (Hq/Hkv), as transformers' repeat_kv); segment ids (B, Lq) / (B, Lk) int. Returns (B, Lq, Hq, D).
    Scale D^-0.5; softmax in float32. When causal, query i sits at key position q_offset + i (a KV cache)
    and sees keys up to there.

    impl "xla": causal self-attention skips the key blocks after each query block (half the work of the full
    L x L product). impl "splash": the Pallas splash kernels (kernels/splash.py, `block_sizes` = (q, kv)
    blocks) for self-attention; attention over a KV cache (q_offset != 0) stays on the XLA path."""
    length = q.shape[1]
    self_attention = isinstance(q_offset, int) and q_offset == 0 and length == k.shape[1]
    segments = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    if impl == "splash" and self_attention:
        return splash_attention(q, k, v, **segments, causal=causal, block_sizes=block_sizes)
    if impl not in ("xla", "splash"):
        raise ValueError(f"attention impl {impl!r} is not available; use 'xla' or 'splash'")
    if not causal or not self_attention or length <= CAUSAL_BLOCK:
        return _attend(q, k, v, **segments, causal_offset=q_offset if causal else None)
    block = max(CAUSAL_BLOCK, -(-length // MAX_BLOCKS))
    outputs = [
        _attend(
            q[:, start : start + block],
            k[:, : start + block],
            v[:, : start + block],
            q_segment_ids=q_segment_ids[:, start : start + block],
            kv_segment_ids=kv_segment_ids[:, : start + block],
            causal_offset=start,
        )
        for start in range(0, length, block)
    ]
    return jnp.concatenate(outputs, axis=1)


def _attend(q, k, v, *, q_segment_ids, kv_segment_ids, causal_offset):
    """Attention of queries at positions causal_offset + i to keys at positions j (j <= the query's position
    unless causal_offset is None)."""
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
    if causal_offset is not None:
        mask &= (jnp.arange(lq) + causal_offset)[:, None] >= jnp.arange(lk)[None, :]
    scores = jnp.where(mask[:, None], scores.reshape(b, hq, lq, lk), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b * hkv, rep * lq, lk)
    out = jnp.matmul(probs, v)
    return out.reshape(b, hkv, rep, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d)
