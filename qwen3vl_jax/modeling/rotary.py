"""Rotary position embeddings shared by the decoder and the ViT: inverse frequencies (plain or YaRN-scaled, as
transformers' rope initialisation functions compute them) and the rotate-half application."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen3vl_jax.config import TextConfig


class RotaryTables(NamedTuple):
    """The cos and sin of every rotary angle, each position's angles duplicated over the two halves of head_dim
    (the rotate-half pairing of `apply_rotary`)."""

    cos: jax.Array  # (..., head_dim) float32: (B, L, head_dim) for the decoder, (B, P, head_dim) for the ViT
    sin: jax.Array  # (..., head_dim) float32


class RopeFrequencies(NamedTuple):
    """The text decoder's rotary frequencies (`text_rope`)."""

    inv_freq: np.ndarray  # (head_dim/2,) float32: the angle per position step of each frequency
    scaling: float  # the factor on cos and sin (YaRN's attention factor; 1.0 for plain RoPE)


def inverse_frequencies(theta: float, dim: int) -> np.ndarray:
    """(dim/2,) float32: 1 / theta^(2k/dim) for k < dim/2; the power is rounded from float64, which reproduces
    torch's float32 `theta ** exponent` in all but rare last-ulp cases."""
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    return np.float32(1.0) / np.power(np.float64(theta), exponent).astype(np.float32)


def text_rope(text: TextConfig) -> RopeFrequencies:
    """The text decoder's inverse frequencies (rotary_dim/2,) and cos/sin scaling (rotary_dim = head_dim but for
    Qwen3.5's partial rotary): plain RoPE, or YaRN as
    transformers computes it (NTK-by-parts interpolation between extrapolated and factor-interpolated
    frequencies, attention factor 0.1 ln(factor) + 1 unless given)."""
    if text.rope_type == "default":
        return RopeFrequencies(inv_freq=inverse_frequencies(text.rope_theta, text.rotary_dim), scaling=1.0)
    scaling = dict(text.rope_scaling)
    dim, base, factor = text.rotary_dim, text.rope_theta, scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1) - ramp).astype(np.float32)
    extrapolated = inverse_frequencies(base, dim)
    interpolated = (extrapolated / np.float32(factor)).astype(np.float32)
    inv_freq = interpolated * (np.float32(1) - extrapolation_weight) + extrapolated * extrapolation_weight
    return RopeFrequencies(inv_freq=inv_freq.astype(np.float32), scaling=float(attention_factor))


def rotate_half(x: jax.Array) -> jax.Array:
    """x (..., hd) -> (..., hd): [-x2, x1] for the halves x1, x2 of the last axis (`rotate_half` in transformers)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, *, compute_dtype=None) -> jax.Array:
    """x (B, L, heads, hd); cos/sin (B, L, r) with r <= hd -> (B, L, heads, hd) in x's dtype. Rotates the first r
    dims of each head with the rotate-half pairing (i, i + r/2) and passes the rest through (r < hd: Qwen3.5's
    partial rotary, transformers' `apply_rotary_pos_emb` in modeling_qwen3_5).

    The text decoder rotates in the activation dtype with cos/sin cast to it; the ViT rotates in float32
    (`compute_dtype=jnp.float32`), as transformers does.
    """
    dtype = compute_dtype or x.dtype
    rotary_dim = cos.shape[-1]
    cos, sin = cos[..., None, :].astype(dtype), sin[..., None, :].astype(dtype)
    xc = x.astype(dtype)
    if rotary_dim < x.shape[-1]:
        turned, passed = xc[..., :rotary_dim], xc[..., rotary_dim:]
        return jnp.concatenate([turned * cos + rotate_half(turned) * sin, passed], axis=-1).astype(x.dtype)
    return (xc * cos + rotate_half(xc) * sin).astype(x.dtype)
