"""The Qwen3 decoder (transformers' `Qwen3VLTextModel`): pre-norm layers with per-head q/k RMSNorm, GQA with an
explicit head_dim and a SwiGLU MLP or a sparse MoE block (`Qwen3VLMoeTextSparseMoeBlock`), scanned over depth
with DeepStack injected inside the scan.

The same layer code runs two ways: as scanned stacks (training, eval, prefill: parameters with a leading
`layers` axis, compile time independent of depth) or, for decoding, unrolled over per-layer parameters that
`unstack_decoder_params` slices out of the stacks once per generation (inside the decode loop, slicing the stacks
would copy every weight at every step on XLA:CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import LoraConfig, ModelConfig, TextConfig
from qwen3vl_jax.modeling.attention import attention, cached_attention
from qwen3vl_jax.modeling.deepstack import add_deepstack
from qwen3vl_jax.modeling.kv_cache import KVCache
from qwen3vl_jax.modeling.layers import Dense, RMSNorm
from qwen3vl_jax.modeling.moe import MoeBlock
from qwen3vl_jax.modeling.mrope import text_mrope_tables
from qwen3vl_jax.modeling.outputs import DecoderOutputs
from qwen3vl_jax.modeling.remat import mark_layer_input, maybe_remat
from qwen3vl_jax.modeling.rotary import apply_rotary
from qwen3vl_jax.parallel.sharding import split_by_names


class LayerCache(NamedTuple):
    """One decoder layer's part of the `KVCache`: the slots' keys and values (B, Hkv, S, D) and, after a prefill split
    over `context`, the prompt block's (B, Hkv, L, D) (else None)."""

    k: jax.Array
    v: jax.Array
    prompt_k: jax.Array | None = None
    prompt_v: jax.Array | None = None


@flax.struct.dataclass
class DecoderLayerInputs:
    """What every decoder layer reads besides its hidden states x; built once per call by `Decoder`."""

    segment_ids: jax.Array  # (B, L) int32: packed example of each token, 0 = padding
    cos: jax.Array  # (B, L, head_dim) float32 MRoPE tables
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


class SwiGLU(nn.Module):
    """The dense MLP (`Qwen3VLTextMLP`): down(silu(gate(x)) * up(x))."""

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


def _swiglu(h: jax.Array, *, chunks: int, intermediate_size: int, dtype, param_dtype, lora) -> jax.Array:
    """The dense MLP on h (B, L, H), over `chunks` strided slices of the sequence one at a time, each recomputed in
    the backward pass: the (B, L, intermediate) activations exist a slice at a time. Strided (slice c holds
    positions c, c + chunks, ...), so a length split over the mesh stays split."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
    batch, length, hidden = h.shape
    if chunks == 1 or length % chunks:
        return SwiGLU(intermediate_size, name="mlp", **kw)(h)
    sliced = nn.scan(
        nn.remat(_SwiGLUSlice, prevent_cse=False),
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=2,
        out_axes=2,
        length=chunks,
    )
    _, out = sliced(intermediate_size, name="mlp", **kw)(None, h.reshape(batch, length // chunks, chunks, hidden))
    return out.reshape(batch, length, hidden)


class _SwiGLUSlice(SwiGLU):
    """SwiGLU as an nn.scan body over sequence slices (same parameters)."""

    def __call__(self, carry, x):
        return carry, super().__call__(x)


class LayerRun(NamedTuple):
    """Decoder layers start .. end - 1, all of one kind: one scanned stack (`layer_runs`)."""

    start: int
    end: int  # one past the run's last layer
    moe: bool  # sparse MoE layers (else dense SwiGLU ones)


def layer_runs(text: TextConfig) -> list[LayerRun]:
    """Maximal runs [start, end) of consecutive decoder layers of the same kind (MoE or dense, as
    `TextConfig.is_sparse_layer` says); each run is one scanned stack. Dense models and the released MoE models
    are a single run."""
    runs: list[LayerRun] = []
    for layer in range(text.num_hidden_layers):
        moe = text.is_sparse_layer(layer)
        if runs and runs[-1].moe == moe:
            runs[-1] = runs[-1]._replace(end=layer + 1)
        else:
            runs.append(LayerRun(start=layer, end=layer + 1, moe=moe))
    return runs


def run_names(text: TextConfig) -> list[str]:
    """Parameter names of the runs' stacks: "layers" for a single run, else "layers_0", "layers_1", ..."""
    runs = layer_runs(text)
    return ["layers"] if len(runs) == 1 else [f"layers_{i}" for i in range(len(runs))]


class DecoderLayer(nn.Module):
    """One decoder layer followed by its DeepStack addition:
    (x, (layer index, this layer's LayerCache or None), layer_inputs) ->
    (x, (the updated LayerCache or None, router logits (B*L, E) or None))."""

    config: ModelConfig
    moe: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_and_kv: tuple[jax.Array | int, LayerCache | None],
        layer_inputs: DecoderLayerInputs,
    ) -> tuple[jax.Array, tuple[LayerCache | None, jax.Array | None]]:
        """x (B, L, H); layer_and_kv: the layer index (int, or the scan's traced int32) and, when generating, this
        layer's `LayerCache`. Returns x (B, L, H) and (the LayerCache with x's keys and values written to its slots
        or, for a prefill split over `context`, as its prompt block; None without a cache; router logits (B*L, E)
        or None), as nn.scan's (carry, per-layer output)."""
        layer, kv = layer_and_kv
        text, kw, linear = self.config.text, self.config.dense_kwargs, self.config.linear_kwargs
        x = mark_layer_input(nn.with_logical_constraint(x, ("batch", "length", "embed")))

        def norm(name, axis="embed"):
            return RMSNorm(text.rms_norm_eps, axis_name=axis, param_dtype=kw["param_dtype"], name=name)

        def projection(heads, *, axis, name):
            return Dense(
                (heads, text.head_dim), ("embed", axis, "head_dim"), use_bias=text.attention_bias, name=name, **linear
            )

        h = norm("input_layernorm")(x)
        q = projection(text.num_attention_heads, axis="q_heads", name="q_proj")(h)
        k = projection(text.num_key_value_heads, axis="kv_heads", name="k_proj")(h)
        v = projection(text.num_key_value_heads, axis="kv_heads", name="v_proj")(h)
        q = apply_rotary(norm("q_norm", "head_dim")(q), layer_inputs.cos, layer_inputs.sin)
        k = apply_rotary(norm("k_norm", "head_dim")(k), layer_inputs.cos, layer_inputs.sin)
        impl = dict(impl=self.config.attention_impl, block_sizes=self.config.splash_block_sizes)
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
        o_proj = Dense(
            text.hidden_size,
            ("q_heads", "head_dim", "embed"),
            contract=2,
            use_bias=text.attention_bias,
            name="o_proj",
            **linear,
        )
        x = x + o_proj(o)
        h = norm("post_attention_layernorm")(x)
        router_logits = None
        if self.moe:
            dispatch = dict(backend=self.config.moe_backend, tiling=self.config.moe_tiling)
            h, router_logits = MoeBlock(text, **dispatch, name="mlp", **kw)(h)
        else:
            h = _swiglu(h, chunks=self.config.mlp_chunks, intermediate_size=text.intermediate_size, **linear)
        x = x + h
        if layer_inputs.deepstack is not None:
            x = add_deepstack(x, features=layer_inputs.deepstack, visual_index=layer_inputs.visual_index, layer=layer)
        return x, (kv, router_logits)


class Decoder(nn.Module):
    """The decoder layers, then the final norm. Scanned: one stack per run of layers of the same kind (params
    `layers` / `layers_0`, ... with a leading layer axis); unrolled: `layer_0`, `layer_1`, ... (decoding)."""

    config: ModelConfig
    unrolled: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array,
        positions: jax.Array,
        deepstack: jax.Array | None = None,
        visual_index: jax.Array | None = None,
        cache: KVCache | None = None,
        context_layout: str | None = None,
    ) -> DecoderOutputs:
        """x (B, L, H) embeddings; segment_ids (B, L) int32; positions (B, 3, L) int32 MRoPE positions; deepstack
        (K, B, N, H) and visual_index (B, L) int32 with vision; context_layout: "load_balanced" when the tokens are
        in parallel/context.py's layout, split over the mesh's `context` axis. Returns `DecoderOutputs`: the
        final-norm hidden states (B, L, H); the cache with x's keys and values written at cache.index (None
        without a cache); the router logits of the MoE layers (num MoE layers, B*L, E) or None.

        With a cache and a context_layout (a prompt prefilled split over `context`), x's keys and values become the
        cache's prompt block (kv_cache.py) and its slots stay empty for the tokens to come."""
        text = self.config.text
        cos, sin = text_mrope_tables(positions, self.config)
        fills_prompt_block = cache is not None and context_layout is not None
        if fills_prompt_block and cache.has_prompt_block:
            raise ValueError("the cache already holds a prompt block: a prompt split over `context` is prefilled once")
        kv_segment_ids = None
        if cache is not None:
            kv_segment_ids = cache.segment_ids
            if not fills_prompt_block:
                kv_segment_ids = jax.lax.dynamic_update_slice_in_dim(kv_segment_ids, segment_ids, cache.index, axis=1)
        prompt_segment_ids = None if cache is None else cache.prompt_segment_ids
        if fills_prompt_block:
            prompt_segment_ids = split_by_names(segment_ids, ("batch", "length"))
        layer_inputs = DecoderLayerInputs(
            segment_ids=segment_ids,
            cos=cos,
            sin=sin,
            deepstack=deepstack,
            visual_index=visual_index,
            cache_index=None if cache is None else cache.index,
            kv_segment_ids=kv_segment_ids,
            prompt_segment_ids=prompt_segment_ids,
            context_layout=context_layout,
        )
        run = self._unrolled if self.unrolled else self._scanned
        x, new_kv, router_logits = run(x, layer_inputs, cache=cache)
        x = RMSNorm(text.rms_norm_eps, param_dtype=jnp.dtype(self.config.param_dtype), name="norm")(x)
        if cache is not None:
            cache = KVCache(
                k=tuple(layer.k for layer in new_kv),
                v=tuple(layer.v for layer in new_kv),
                segment_ids=kv_segment_ids,
                index=cache.index + (0 if fills_prompt_block else x.shape[1]),
                prompt_k=tuple(layer.prompt_k for layer in new_kv) if new_kv[0].prompt_k is not None else None,
                prompt_v=tuple(layer.prompt_v for layer in new_kv) if new_kv[0].prompt_v is not None else None,
                prompt_segment_ids=prompt_segment_ids,
            )
        return DecoderOutputs(
            hidden=x, cache=cache, router_logits=jnp.concatenate(router_logits) if router_logits else None
        )

    def _scanned(self, x, layer_inputs: DecoderLayerInputs, *, cache: KVCache | None):
        text = self.config.text
        new_kv, router_logits = [], []
        for (start, end, moe), name in zip(layer_runs(text), run_names(text)):
            layers = nn.scan(
                maybe_remat(DecoderLayer, self.config.remat),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=end - start,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            kv = None
            if cache is not None:
                kv = jax.tree_util.tree_map(lambda *layers: jnp.stack(layers), *_layer_caches(cache)[start:end])
            x, (kv, logits) = layers(self.config, moe=moe, name=name)(x, (jnp.arange(start, end), kv), layer_inputs)
            if kv is not None:
                new_kv += [jax.tree_util.tree_map(lambda a, i=i: a[i], kv) for i in range(end - start)]
            if logits is not None:
                router_logits.append(logits)
        return x, new_kv, router_logits

    def _unrolled(self, x, layer_inputs: DecoderLayerInputs, *, cache: KVCache | None):
        text = self.config.text
        new_kv, router_logits = [], []
        for i in range(text.num_hidden_layers):
            kv = None if cache is None else _layer_caches(cache)[i]
            layer = DecoderLayer(self.config, moe=text.is_sparse_layer(i), name=f"layer_{i}")
            x, (kv, logits) = layer(x, (i, kv), layer_inputs)
            new_kv.append(kv)
            if logits is not None:
                router_logits.append(logits[None])
        return x, new_kv, router_logits


def _layer_caches(cache: KVCache) -> list[LayerCache]:
    """The cache as one `LayerCache` per decoder layer."""
    blocks = zip(cache.prompt_k, cache.prompt_v) if cache.has_prompt_block else [(None, None)] * len(cache.k)
    return [LayerCache(k, v, *block) for k, v, block in zip(cache.k, cache.v, blocks)]


def unstack_decoder_params(decoder_params: dict, text: TextConfig) -> dict:
    """The parameters of `Decoder(unrolled=True)` (`layer_0`, `layer_1`, ... and `norm`) sliced out of those of
    the scanned decoder (`layers` or `layers_0`, ... and `norm`): each stacked leaf (layers of the run, ...)
    becomes one (...) leaf per layer."""
    unrolled = {"norm": decoder_params["norm"]}
    for (start, end, _), name in zip(layer_runs(text), run_names(text)):
        for i in range(end - start):
            unrolled[f"layer_{start + i}"] = jax.tree_util.tree_map(lambda p, i=i: p[i], decoder_params[name])
    return unrolled
