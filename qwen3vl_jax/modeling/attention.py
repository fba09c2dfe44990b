"""Dot-product attention with segment-id masking and GQA: the single entry point for the decoder and the ViT.

Segment ids replace explicit masks: a query attends a key iff both carry the same segment id (and, when
causal, the key is not after the query). Packed examples, left padding and the ViT's block-diagonal
(image, temporal group) structure are all expressed this way; padding uses segment 0 and only ever attends
other padding, so every row has at least one key and no NaN can appear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
              *, causal: bool, impl: str = "xla") -> jax.Array:
    """q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Hq a multiple of Hkv (query head h uses kv head
    h // (Hq/Hkv), as transformers' repeat_kv); segment ids (B, Lq) / (B, Lk) int. Returns (B, Lq, Hq, D).
    Scale D^-0.5; softmax in float32."""
    if impl != "xla":
        raise ValueError(f"attention impl {impl!r} is not available; use 'xla'")
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, lq, hkv, hq // hkv, d)
    scores = jnp.einsum("bqkrd,bskd->bkrqs", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        mask &= jnp.arange(lq)[:, None] >= jnp.arange(k.shape[1])[None, :]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrqs,bskd->bqkrd", probs, v)
    return out.reshape(b, lq, hq, d)
