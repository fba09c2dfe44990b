"""The Qwen3 decoder (spec §3.2): pre-norm layers with per-head q/k RMSNorm, GQA with an explicit head_dim and
a SwiGLU MLP, scanned over depth with DeepStack injected inside the scan."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import TextConfig
from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.modeling.deepstack import add_deepstack
from qwen3vl_jax.modeling.layers import Dense, RMSNorm
from qwen3vl_jax.modeling.remat import maybe_remat
from qwen3vl_jax.modeling.rope import apply_rotary


class SwiGLU(nn.Module):
    intermediate_size: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return Dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One decoder layer followed by its DeepStack addition. Scanned: (x, layer) -> (x, None)."""

    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, layer, segment_ids, cos, sin, deepstack, visual_index):
        """x (B, L, H); layer: this layer's index; segment_ids (B, L); cos, sin (B, L, hd);
        deepstack (K, B, N, H) or None; visual_index (B, L)."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        norm = lambda name, axis="embed": RMSNorm(c.rms_norm_eps, axis, self.param_dtype, name=name)
        h = norm("input_layernorm")(x)
        q = Dense((c.num_attention_heads, c.head_dim), ("embed", "q_heads", "head_dim"), use_bias=c.attention_bias,
                  name="q_proj", **kw)(h)
        k = Dense((c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                  use_bias=c.attention_bias, name="k_proj", **kw)(h)
        v = Dense((c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                  use_bias=c.attention_bias, name="v_proj", **kw)(h)
        q = apply_rotary(norm("q_norm", "head_dim")(q), cos, sin)
        k = apply_rotary(norm("k_norm", "head_dim")(k), cos, sin)
        o = attention(q, k, v, segment_ids, segment_ids, causal=True, impl=self.attention_impl)
        x = x + Dense(c.hidden_size, ("q_heads", "head_dim", "embed"), contract=2, use_bias=c.attention_bias,
                      name="o_proj", **kw)(o)
        x = x + SwiGLU(c.intermediate_size, name="mlp", **kw)(norm("post_attention_layernorm")(x))
        if deepstack is not None:
            x = add_deepstack(x, deepstack, visual_index, layer)
        return x, None


class Decoder(nn.Module):
    """All decoder layers as one scanned stack (params carry a leading `layers` axis)."""

    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"
    remat: str = "none"

    @nn.compact
    def __call__(self, x, segment_ids, cos, sin, deepstack=None, visual_index=None):
        c = self.config
        if c.is_moe:
            raise NotImplementedError("the MoE decoder is not implemented yet; only dense Qwen3-VL models run")
        layers = nn.scan(maybe_remat(DecoderLayer, self.remat), variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0,) + (nn.broadcast,) * 5, length=c.num_hidden_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(c, self.dtype, self.param_dtype, self.attention_impl, name="layers")(
            x, jnp.arange(c.num_hidden_layers), segment_ids, cos, sin, deepstack, visual_index)
        return RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="norm")(x)
