"""The Qwen3 decoder (spec §3.2): pre-norm layers with per-head q/k RMSNorm, GQA with an explicit head_dim and
a SwiGLU MLP, scanned over depth with DeepStack injected inside the scan."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import TextConfig
from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.modeling.deepstack import add_deepstack
from qwen3vl_jax.modeling.kv_cache import KVCache
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
    """One decoder layer followed by its DeepStack addition. Scanned over the layers:
    (x, (layer index, this layer's cached k/v or None), shared context) -> (x, new cached k/v or None)."""

    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"
    splash_block_sizes: tuple[int, int] = (512, 512)

    @nn.compact
    def __call__(self, x, scanned, context):
        """x (B, L, H). scanned: the layer index and, when generating, this layer's cache (k, v), each
        (B, S, Hkv, D). context: segment_ids (B, L), cos / sin (B, L, hd), deepstack (K, B, N, H) or None,
        visual_index (B, L), and with a cache kv_segment_ids (B, S) and cache_index (the slot of x's first
        token)."""
        layer, kv = scanned
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
        cos, sin, segment_ids = context["cos"], context["sin"], context["segment_ids"]
        q = apply_rotary(norm("q_norm", "head_dim")(q), cos, sin)
        k = apply_rotary(norm("k_norm", "head_dim")(k), cos, sin)
        if kv is None:
            o = attention(q, k, v, segment_ids, segment_ids, causal=True, impl=self.attention_impl,
                          block_sizes=self.splash_block_sizes)
        else:
            index = context["cache_index"]
            kv = tuple(jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), index, axis=1)
                       for cached, new in zip(kv, (k, v)))
            o = attention(q, *kv, segment_ids, context["kv_segment_ids"], causal=True, q_offset=index,
                          impl=self.attention_impl)
        x = x + Dense(c.hidden_size, ("q_heads", "head_dim", "embed"), contract=2, use_bias=c.attention_bias,
                      name="o_proj", **kw)(o)
        x = x + SwiGLU(c.intermediate_size, name="mlp", **kw)(norm("post_attention_layernorm")(x))
        if context["deepstack"] is not None:
            x = add_deepstack(x, context["deepstack"], context["visual_index"], layer)
        return x, kv


class Decoder(nn.Module):
    """All decoder layers as one scanned stack (params carry a leading `layers` axis)."""

    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "xla"
    splash_block_sizes: tuple[int, int] = (512, 512)
    remat: str = "none"

    @nn.compact
    def __call__(self, x, segment_ids, cos, sin, deepstack=None, visual_index=None,
                 cache: Optional[KVCache] = None) -> tuple[jax.Array, Optional[KVCache]]:
        """Final-norm hidden states (B, L, H) and, when a cache is given, the cache with x's keys and values
        written at cache.index."""
        c = self.config
        if c.is_moe:
            raise NotImplementedError("the MoE decoder is not implemented yet; only dense Qwen3-VL models run")
        context = dict(segment_ids=segment_ids, cos=cos, sin=sin, deepstack=deepstack, visual_index=visual_index)
        kv = None
        if cache is not None:
            kv = (cache.k, cache.v)
            context.update(cache_index=cache.index, kv_segment_ids=jax.lax.dynamic_update_slice_in_dim(
                cache.segment_ids, segment_ids, cache.index, axis=1))
        layers = nn.scan(maybe_remat(DecoderLayer, self.remat), variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=c.num_hidden_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, kv = layers(c, self.dtype, self.param_dtype, self.attention_impl, self.splash_block_sizes, name="layers")(
            x, (jnp.arange(c.num_hidden_layers), kv), context)
        x = RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="norm")(x)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], segment_ids=context["kv_segment_ids"], index=cache.index + x.shape[1])
        return x, cache
