"""Text MRoPE tables against transformers, and the chunked layout of the ablation switch."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from qwen3vl_jax.config import to_hf
from qwen3vl_jax.modeling.mrope import mrope_axis_of_frequency, mrope_tables
from qwen3vl_jax.modeling.rotary import inverse_frequencies


def test_interleaved_tables_equal_transformers(tiny, rng):
    c = tiny.config
    positions = rng.integers(0, 5000, (2, 3, 17))
    hf_rotary = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(
        transformers.Qwen3VLConfig(**to_hf(c)).text_config
    )
    with torch.no_grad():
        ref_cos, ref_sin = hf_rotary(
            torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions.transpose(1, 0, 2))
        )
    cos, sin = mrope_tables(
        jnp.asarray(positions),
        inv_freq=inverse_frequencies(c.text.rope_theta, c.text.head_dim),
        axis_of_frequency=mrope_axis_of_frequency(c.text.mrope_section, "interleaved"),
    )
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=2e-6, rtol=0)


def test_layouts():
    """interleaved (`Qwen3VLTextRotaryEmbedding.recomposition_frequencies`): t h w t h w ... t t t t; chunked:
    consecutive blocks t | h | w."""
    np.testing.assert_array_equal(mrope_axis_of_frequency((24, 20, 20), "interleaved"), [0, 1, 2] * 20 + [0] * 4)
    np.testing.assert_array_equal(mrope_axis_of_frequency((6, 5, 5), "chunked"), [0] * 6 + [1] * 5 + [2] * 5)
