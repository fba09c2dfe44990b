"""The Qwen3 decoder (transformers' `Qwen3VLTextModel`): pre-norm layers with per-head q/k RMSNorm, GQA with an
explicit head_dim and a SwiGLU MLP or a sparse MoE block (`Qwen3VLMoeTextSparseMoeBlock`), scanned over depth
with DeepStack injected inside the scan."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig, TextConfig
from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.modeling.deepstack import add_deepstack
from qwen3vl_jax.modeling.kv_cache import KVCache
from qwen3vl_jax.modeling.layers import Dense, RMSNorm
from qwen3vl_jax.modeling.moe import MoeBlock
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


def layer_runs(text: TextConfig) -> list[tuple[int, int, bool]]:
    """Maximal runs [start, end) of consecutive decoder layers of the same kind (MoE or dense, as
    `TextConfig.is_sparse_layer` says); each run is one scanned stack. Dense models and the released MoE models
    are a single run."""
    runs: list[tuple[int, int, bool]] = []
    for layer in range(text.num_hidden_layers):
        moe = text.is_sparse_layer(layer)
        if runs and runs[-1][2] == moe:
            runs[-1] = (runs[-1][0], layer + 1, moe)
        else:
            runs.append((layer, layer + 1, moe))
    return runs


def run_names(text: TextConfig) -> list[str]:
    """Parameter names of the runs' stacks: "layers" for a single run, else "layers_0", "layers_1", ..."""
    runs = layer_runs(text)
    return ["layers"] if len(runs) == 1 else [f"layers_{i}" for i in range(len(runs))]


class DecoderLayer(nn.Module):
    """One decoder layer followed by its DeepStack addition. Scanned over the layers:
    (x, (layer index, this layer's cached k/v or None), shared context) ->
    (x, (new cached k/v or None, router logits (B*L, E) or None))."""

    config: ModelConfig
    moe: bool = False

    @nn.compact
    def __call__(self, x, scanned, context):
        """x (B, L, H). scanned: the layer index and, when generating, this layer's cache (k, v), each
        (B, S, Hkv, D). context: segment_ids (B, L), cos / sin (B, L, hd), deepstack (K, B, N, H) or None,
        visual_index (B, L), and with a cache kv_segment_ids (B, S) and cache_index (the slot of x's first
        token)."""
        layer, kv = scanned
        c, kw = self.config.text, self.config.dense_kwargs
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        def norm(name, axis="embed"):
            return RMSNorm(c.rms_norm_eps, axis, kw["param_dtype"], name=name)

        h = norm("input_layernorm")(x)
        q = Dense(
            (c.num_attention_heads, c.head_dim),
            ("embed", "q_heads", "head_dim"),
            use_bias=c.attention_bias,
            name="q_proj",
            **kw,
        )(h)
        k = Dense(
            (c.num_key_value_heads, c.head_dim),
            ("embed", "kv_heads", "head_dim"),
            use_bias=c.attention_bias,
            name="k_proj",
            **kw,
        )(h)
        v = Dense(
            (c.num_key_value_heads, c.head_dim),
            ("embed", "kv_heads", "head_dim"),
            use_bias=c.attention_bias,
            name="v_proj",
            **kw,
        )(h)
        cos, sin, segment_ids = context["cos"], context["sin"], context["segment_ids"]
        q = apply_rotary(norm("q_norm", "head_dim")(q), cos, sin)
        k = apply_rotary(norm("k_norm", "head_dim")(k), cos, sin)
        impl = dict(impl=self.config.attention_impl, block_sizes=self.config.splash_block_sizes)
        if kv is None:
            o = attention(q, k, v, segment_ids, segment_ids, causal=True, **impl)
        else:
            index = context["cache_index"]
            kv = tuple(
                jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), index, axis=1)
                for cached, new in zip(kv, (k, v))
            )
            o = attention(q, *kv, segment_ids, context["kv_segment_ids"], causal=True, q_offset=index, **impl)
        x = x + Dense(
            c.hidden_size, ("q_heads", "head_dim", "embed"), contract=2, use_bias=c.attention_bias, name="o_proj", **kw
        )(o)
        h = norm("post_attention_layernorm")(x)
        router_logits = None
        if self.moe:
            h, router_logits = MoeBlock(c, self.config.moe_backend, self.config.moe_tiling, name="mlp", **kw)(h)
        else:
            h = SwiGLU(c.intermediate_size, name="mlp", **kw)(h)
        x = x + h
        if context["deepstack"] is not None:
            x = add_deepstack(x, context["deepstack"], context["visual_index"], layer)
        return x, (kv, router_logits)


class Decoder(nn.Module):
    """The decoder layers as scanned stacks, one per run of layers of the same kind (params carry a leading
    `layers` axis), then the final norm."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, segment_ids, cos, sin, deepstack=None, visual_index=None, cache: KVCache | None = None):
        """Final-norm hidden states (B, L, H); the cache with x's keys and values written at cache.index (None
        without a cache); the router logits of the MoE layers (num MoE layers, B*L, E) or None."""
        c = self.config.text
        context = dict(segment_ids=segment_ids, cos=cos, sin=sin, deepstack=deepstack, visual_index=visual_index)
        if cache is not None:
            context.update(
                cache_index=cache.index,
                kv_segment_ids=jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index, axis=1),
            )
        new_kv, router_logits = [], []
        for (start, end, moe), name in zip(layer_runs(c), run_names(c)):
            layers = nn.scan(
                maybe_remat(DecoderLayer, self.config.remat),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast),
                length=end - start,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            kv = None if cache is None else (cache.k[start:end], cache.v[start:end])
            x, (kv, logits) = layers(self.config, moe, name=name)(x, (jnp.arange(start, end), kv), context)
            new_kv.append(kv)
            if logits is not None:
                router_logits.append(logits)
        x = RMSNorm(c.rms_norm_eps, param_dtype=jnp.dtype(self.config.param_dtype), name="norm")(x)
        if cache is not None:
            cache = KVCache(
                k=jnp.concatenate([kv[0] for kv in new_kv]),
                v=jnp.concatenate([kv[1] for kv in new_kv]),
                segment_ids=context["kv_segment_ids"],
                index=cache.index + x.shape[1],
            )
        return x, cache, (jnp.concatenate(router_logits) if router_logits else None)


def unstack_layers(decoder_params: dict, text: TextConfig) -> list[tuple[dict, bool]]:
    """(parameters, is MoE) of every decoder layer, sliced out of the scanned stacks."""
    layers = []
    for (start, end, moe), name in zip(layer_runs(text), run_names(text)):
        for i in range(end - start):
            layers.append((jax.tree_util.tree_map(lambda p, i=i: p[i], decoder_params[name]), moe))
    return layers
