"""A decoder layer's full (softmax) attention: q/k/v projections, per-head q/k RMSNorm, MRoPE, grouped-query
attention over the packed segments (or the KV cache), the output projection (transformers' `Qwen3VLTextAttention`);
for Qwen3.5 (`Qwen3_5Attention`) with an output gate and zero-centred q/k norms.

Qwen3.5's q_proj gives each head 2 * head_dim outputs, [query | gate] (transformers views them as
(..., heads, 2 * head_dim) and chunks the last axis), and the attention output is multiplied by sigmoid(gate)
before o_proj; our q_proj kernel is (H, heads, 2 * head_dim) in that order."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.attention import attention, cached_attention
from qwen3vl_jax.modeling.kv_cache import LayerCache
from qwen3vl_jax.modeling.layers import Dense, RMSNorm
from qwen3vl_jax.modeling.rotary import apply_rotary
from qwen3vl_jax.parallel.sharding import split_by_names


@flax.struct.dataclass
class DecoderLayerInputs:
    """What every decoder layer reads besides its hidden states x; built once per call by `Decoder`."""

    segment_ids: jax.Array  # (B, L) int32: packed example of each token, 0 = padding
    cos: jax.Array  # (B, L, rotary_dim) float32 MRoPE tables
    sin: jax.Array
    deepstack: jax.Array | None  # (K, B, N, H) DeepStack features, None without vision
    visual_index: jax.Array | None  # (B, L) merged-token row of each visual token, -1 for text
    cache_index: jax.Array | None  # with a KV cache: the slot of the first token of x
    kv_segment_ids: jax.Array | None  # with a KV cache: (B, S) segment ids of the cache slots, x's included
    # with a KV cache holding a prompt block (kv_cache.py): its segment ids (B, L_prompt), split over `context`
    prompt_segment_ids: jax.Array | None = None
    # modeling.attention's `context_layout`: "load_balanced" when the tokens are split over the `context` axis
    context_layout: str | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def fills_prompt_block(self) -> bool:
        """A prefill with the tokens split over `context`: x's keys and values become the cache's prompt block."""
        return self.cache_index is not None and self.context_layout is not None


def self_attention(
    h: jax.Array, *, kv: LayerCache | None, layer_inputs: DecoderLayerInputs, config: ModelConfig
) -> tuple[jax.Array, LayerCache | None]:
    """h (B, L, H) normalised hidden states -> (the attention's output after o_proj (B, L, H), the LayerCache with
    h's keys and values written to its slots, or as its prompt block for a prefill split over `context`; None
    without a cache). Called inside a decoder layer's compact method: the projections and norms are that layer's
    submodules (q_proj, k_proj, v_proj, q_norm, k_norm, o_proj)."""
    text, linear = config.text, config.linear_kwargs
    gated = text.is_qwen3_5

    def norm(name):
        return RMSNorm(
            text.rms_norm_eps,
            axis_name="head_dim",
            param_dtype=jnp.dtype(config.param_dtype),
            zero_centered=text.is_qwen3_5,
            name=name,
        )

    def projection(heads, *, axis, name, width=text.head_dim):
        return Dense((heads, width), ("embed", axis, "head_dim"), use_bias=text.attention_bias, name=name, **linear)

    q = projection(text.num_attention_heads, axis="q_heads", name="q_proj", width=text.head_dim * (2 if gated else 1))(
        h
    )
    gate = None
    if gated:
        q, gate = jnp.split(q, 2, axis=-1)
    k = projection(text.num_key_value_heads, axis="kv_heads", name="k_proj")(h)
    v = projection(text.num_key_value_heads, axis="kv_heads", name="v_proj")(h)
    q = apply_rotary(norm("q_norm")(q), layer_inputs.cos, layer_inputs.sin)
    k = apply_rotary(norm("k_norm")(k), layer_inputs.cos, layer_inputs.sin)
    impl = dict(impl=config.attention_impl, block_sizes=config.splash_block_sizes)
    if kv is None or layer_inputs.fills_prompt_block:
        segments = dict(q_segment_ids=layer_inputs.segment_ids, kv_segment_ids=layer_inputs.segment_ids)
        o = attention(q, k, v, **segments, causal=True, context_layout=layer_inputs.context_layout, **impl)
        if kv is not None:  # the prompt's keys and values stay split over `context` where they are
            block = [split_by_names(new.swapaxes(1, 2), ("batch", "kv_heads", "length", None)) for new in (k, v)]
            kv = kv._replace(prompt_k=block[0].astype(kv.k.dtype), prompt_v=block[1].astype(kv.v.dtype))
    else:
        new_k, new_v = (
            jax.lax.dynamic_update_slice_in_dim(
                cached, new.swapaxes(1, 2).astype(cached.dtype), layer_inputs.cache_index, axis=2
            )
            for cached, new in ((kv.k, k), (kv.v, v))
        )
        kv = kv._replace(k=new_k, v=new_v)
        o = cached_attention(
            q,
            cache_k=kv.k,
            cache_v=kv.v,
            q_segment_ids=layer_inputs.segment_ids,
            kv_segment_ids=layer_inputs.kv_segment_ids,
            cache_index=layer_inputs.cache_index,
            prompt_k=kv.prompt_k,
            prompt_v=kv.prompt_v,
            prompt_segment_ids=layer_inputs.prompt_segment_ids,
        )
    if gate is not None:
        o = o * jax.nn.sigmoid(gate.astype(o.dtype))
    o_proj = Dense(
        text.hidden_size,
        ("q_heads", "head_dim", "embed"),
        contract=2,
        use_bias=text.attention_bias,
        name="o_proj",
        **linear,
    )
    return o_proj(o), kv
