"""The decoder's dense SwiGLU MLP (transformers' `Qwen3VLTextMLP`, `Qwen3_5MLP`), whole or over slices of the
sequence."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import LoraConfig
from qwen3vl_jax.modeling.layers import Dense
from qwen3vl_jax.modeling.loops import scan_unroll


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    intermediate_size: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., H) -> (..., H) in the compute dtype."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        gate = Dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return Dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(jax.nn.silu(gate) * up)


def chunked_swiglu(
    h: jax.Array, *, chunks: int, intermediate_size: int, name: str, dtype, param_dtype, lora
) -> jax.Array:
    """A SwiGLU named `name` on h (B, L, H), over `chunks` strided slices of the sequence one at a time, each
    recomputed in the backward pass: the (B, L, intermediate) activations exist a slice at a time. Strided (slice
    c holds positions c, c + chunks, ...), so a length split over the mesh stays split."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
    batch, length, hidden = h.shape
    if chunks == 1 or length % chunks:
        return SwiGLU(intermediate_size, name=name, **kw)(h)
    sliced = nn.scan(
        nn.remat(_SwiGLUSlice, prevent_cse=False),
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=2,
        out_axes=2,
        length=chunks,
        unroll=scan_unroll(chunks),
    )
    _, out = sliced(intermediate_size, name=name, **kw)(None, h.reshape(batch, length // chunks, chunks, hidden))
    return out.reshape(batch, length, hidden)


class _SwiGLUSlice(SwiGLU):
    """SwiGLU as an nn.scan body over sequence slices (same parameters)."""

    def __call__(self, carry, x):
        return carry, super().__call__(x)
