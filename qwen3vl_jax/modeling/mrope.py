"""MRoPE (Qwen3-VL's multimodal rotary embedding, transformers' `Qwen3VLTextRotaryEmbedding`): every token has a
(t, h, w) position (computed on the host, `qwen3vl_jax.inputs.positions`), and each of the head_dim / 2 rotary
frequencies is driven by one of the three axes: interleaved t h w t h w ... (Qwen3-VL) or in consecutive chunks
(Qwen2-VL's layout, the ablation switch `mrope_layout="chunked"`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.rotary import RotaryTables, text_rope


def mrope_axis_of_frequency(mrope_section: tuple[int, int, int], layout: str) -> np.ndarray:
    """(head_dim/2,) int: which position axis (0=t, 1=h, 2=w) drives each frequency.

    interleaved (Qwen3-VL, `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`): t h w t h w ... t t t t —
    h at i%3==1 for i < 3*sec[1], w at i%3==2 for i < 3*sec[2], t elsewhere. chunked (Qwen2-VL): t takes the
    first sec[0], h the next sec[1], w the rest.
    """
    t, h, w = mrope_section
    if layout == "chunked":
        return np.repeat(np.arange(3), (t, h, w))
    i = np.arange(t + h + w)
    axis = np.zeros_like(i)
    axis[(i % 3 == 1) & (i < 3 * h)] = 1
    axis[(i % 3 == 2) & (i < 3 * w)] = 2
    return axis


def mrope_tables(
    positions: jax.Array, *, inv_freq: np.ndarray, axis_of_frequency: np.ndarray, scaling: float = 1.0
) -> RotaryTables:
    """positions (B, 3, L) int (t, h, w rows); inv_freq and axis_of_frequency (head_dim/2,) -> cos, sin
    (B, L, head_dim) float32, times `scaling`."""
    selected = positions[:, axis_of_frequency]  # (B, hd/2, L)
    angles = jnp.swapaxes(selected, 1, 2).astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    if scaling == 1.0:
        return RotaryTables(cos=jnp.cos(emb), sin=jnp.sin(emb))
    return RotaryTables(cos=jnp.cos(emb) * scaling, sin=jnp.sin(emb) * scaling)


def text_mrope_tables(positions: jax.Array, config: ModelConfig) -> RotaryTables:
    """The decoder's cos, sin (B, L, rotary_dim) for positions (B, 3, L), with the config's rope and layout."""
    inv_freq, scaling = text_rope(config.text)
    axis_of_frequency = mrope_axis_of_frequency(config.text.mrope_section, config.mrope_layout)
    return mrope_tables(positions, inv_freq=inv_freq, axis_of_frequency=axis_of_frequency, scaling=scaling)
