"""The Qwen3 decoder (transformers' `Qwen3VLTextModel`): pre-norm layers with per-head q/k RMSNorm, GQA with an
explicit head_dim and a SwiGLU MLP or a sparse MoE block (`Qwen3VLMoeTextSparseMoeBlock`), scanned over depth
with DeepStack injected inside the scan. Qwen3.5's decoder (`Qwen3_5TextModel`) is the same house with gated
delta-net layers (modeling.gated_delta_net) in place of attention in three layers out of four.

The same layer code runs two ways: as scanned stacks (training, eval, prefill: parameters with a leading
`layers` axis, compile time independent of depth) or, for decoding, unrolled over per-layer parameters that
`unstack_decoder_params` slices out of the stacks once per generation (inside the decode loop, slicing the stacks
would copy every weight at every step on XLA:CPU). Layers of different kinds that repeat with a period (Qwen3.5:
linear, linear, linear, full) scan one period per step, its layers as submodules `sublayer_0`, `sublayer_1`, ...
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig, TextConfig
from qwen3vl_jax.config.model import FULL_ATTENTION, LINEAR_ATTENTION
from qwen3vl_jax.modeling.deepstack import add_deepstack
from qwen3vl_jax.modeling.gated_delta_net import DeltaNetState, GatedDeltaNet
from qwen3vl_jax.modeling.kv_cache import KVCache, LayerCache
from qwen3vl_jax.modeling.layers import RMSNorm
from qwen3vl_jax.modeling.loops import scan_unroll
from qwen3vl_jax.modeling.mlp import chunked_swiglu
from qwen3vl_jax.modeling.moe import MoeBlock
from qwen3vl_jax.modeling.mrope import text_mrope_tables
from qwen3vl_jax.modeling.outputs import DecoderOutputs
from qwen3vl_jax.modeling.remat import mark_layer_input, maybe_remat
from qwen3vl_jax.modeling.self_attention import DecoderLayerInputs, self_attention
from qwen3vl_jax.parallel.sharding import split_by_names

FULL, LINEAR = FULL_ATTENTION, LINEAR_ATTENTION
LayerState = LayerCache | DeltaNetState  # what one layer keeps while generating


class LayerKind(NamedTuple):
    """What a decoder layer is: its token mixer (FULL attention or a LINEAR gated delta-net) and its MLP."""

    mixer: str
    moe: bool  # a sparse MoE block (else a dense SwiGLU)


class LayerRun(NamedTuple):
    """Decoder layers start .. end - 1 as one scanned stack: each scan step runs the layers of `period` in turn
    (layer start + s * len(period) + j is of kind period[j])."""

    start: int
    end: int  # one past the run's last layer
    period: tuple[LayerKind, ...]

    @property
    def steps(self) -> int:
        return (self.end - self.start) // len(self.period)


def layer_kinds(text: TextConfig) -> list[LayerKind]:
    """Each decoder layer's kind (`TextConfig.layer_kinds`, `TextConfig.is_sparse_layer`)."""
    return [LayerKind(mixer, text.is_sparse_layer(i)) for i, mixer in enumerate(text.layer_kinds)]


def layer_runs(text: TextConfig) -> list[LayerRun]:
    """The scanned stacks: one run of one kind when all layers are alike; else one run over the shortest period
    that repeats through the whole depth (Qwen3.5); else maximal runs of consecutive layers of the same kind
    (a Qwen3-VL MoE with `mlp_only_layers`)."""
    kinds = layer_kinds(text)
    depth = len(kinds)
    if len(set(kinds)) > 1:
        for period in range(2, depth // 2 + 1):
            if depth % period == 0 and all(kinds[i] == kinds[i % period] for i in range(depth)):
                return [LayerRun(start=0, end=depth, period=tuple(kinds[:period]))]
    runs: list[LayerRun] = []
    for layer, kind in enumerate(kinds):
        if runs and runs[-1].period == (kind,):
            runs[-1] = runs[-1]._replace(end=layer + 1)
        else:
            runs.append(LayerRun(start=layer, end=layer + 1, period=(kind,)))
    return runs


def run_names(text: TextConfig) -> list[str]:
    """Parameter names of the runs' stacks: "layers" for a single run, else "layers_0", "layers_1", ..."""
    runs = layer_runs(text)
    return ["layers"] if len(runs) == 1 else [f"layers_{i}" for i in range(len(runs))]


class LayerParams(NamedTuple):
    """Where a decoder layer's parameters live in the scanned decoder's: under `path` (relative to the decoder's
    parameters), slice `index` of each stacked leaf."""

    path: tuple[str, ...]
    index: int


def layer_params(text: TextConfig) -> list[LayerParams]:
    """Per decoder layer, where its parameters are among the scanned decoder's (`layer_runs`)."""
    located = []
    for run, name in zip(layer_runs(text), run_names(text)):
        size = len(run.period)
        for layer in range(run.start, run.end):
            step, j = divmod(layer - run.start, size)
            located.append(LayerParams(path=(name,) if size == 1 else (name, f"sublayer_{j}"), index=step))
    return located


class DecoderLayer(nn.Module):
    """One decoder layer followed by its DeepStack addition:
    (x, (layer index, this layer's state or None), layer_inputs) ->
    (x, (the updated state or None, router logits (B*L, E) or None))."""

    config: ModelConfig
    kind: LayerKind = LayerKind(FULL, moe=False)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_and_state: tuple[jax.Array | int, LayerState | None],
        layer_inputs: DecoderLayerInputs,
    ) -> tuple[jax.Array, tuple[LayerState | None, jax.Array | None]]:
        """x (B, L, H); layer_and_state: the layer index (int, or the scan's traced int32) and, when generating,
        this layer's `LayerCache` (full attention) or `DeltaNetState` (gated delta-net). Returns x (B, L, H) and
        (the state with x's tokens taken in, None without one; router logits (B*L, E) or None), as nn.scan's
        (carry, per-layer output)."""
        layer, state = layer_and_state
        text, kw = self.config.text, self.config.dense_kwargs
        x = mark_layer_input(nn.with_logical_constraint(x, ("batch", "length", "embed")))

        def norm(name):
            return RMSNorm(text.rms_norm_eps, param_dtype=kw["param_dtype"], zero_centered=text.is_qwen3_5, name=name)

        h = norm("input_layernorm")(x)
        if self.kind.mixer == LINEAR:
            mixer = GatedDeltaNet(text.delta_net, name="linear_attn", **self.config.linear_kwargs)
            h, state = mixer(h, segment_ids=layer_inputs.segment_ids, state=state)
        else:
            h, state = self_attention(h, kv=state, layer_inputs=layer_inputs, config=self.config)
        x = x + h
        h = norm("post_attention_layernorm")(x)
        router_logits = None
        if self.kind.moe:
            dispatch = dict(backend=self.config.moe_backend, tiling=self.config.moe_tiling)
            lora = self.config.linear_kwargs["lora"]
            h, router_logits = MoeBlock(text, **dispatch, lora=lora, name="mlp", **kw)(h)
        else:
            mlp = dict(chunks=self.config.mlp_chunks, intermediate_size=text.intermediate_size)
            h = chunked_swiglu(h, **mlp, name="mlp", **self.config.linear_kwargs)
        x = x + h
        if layer_inputs.deepstack is not None:
            x = add_deepstack(x, features=layer_inputs.deepstack, visual_index=layer_inputs.visual_index, layer=layer)
        return x, (state, router_logits)


class DecoderPeriod(nn.Module):
    """The layers of one period of a `LayerRun` (`sublayer_0`, ...), one scan step:
    (x, (layer indices (period,), their states or None), layer_inputs) ->
    (x, (their updated states or None, the MoE layers' router logits (moe layers, B*L, E) or None))."""

    config: ModelConfig
    period: tuple[LayerKind, ...]

    @nn.compact
    def __call__(self, x, layers_and_states, layer_inputs: DecoderLayerInputs):
        layers, states = layers_and_states
        layer_cls = maybe_remat(DecoderLayer, self.config.remat)
        new_states, router_logits = [], []
        for j, kind in enumerate(self.period):
            state = None if states is None else states[j]
            layer = layer_cls(self.config, kind, name=f"sublayer_{j}")
            x, (state, logits) = layer(x, (layers[j], state), layer_inputs)
            new_states.append(state)
            if logits is not None:
                router_logits.append(logits)
        return x, (
            None if states is None else tuple(new_states),
            jnp.stack(router_logits) if router_logits else None,
        )


class Decoder(nn.Module):
    """The decoder layers, then the final norm. Scanned: one stack per `LayerRun` (params `layers` / `layers_0`,
    ... with a leading axis of scan steps); unrolled: `layer_0`, `layer_1`, ... (decoding)."""

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
        final-norm hidden states (B, L, H); the cache with x's tokens taken in (keys and values written at
        cache.index, delta-net states advanced; None without a cache); the router logits of the MoE layers
        (num MoE layers, B*L, E) or None.

        With a cache and a context_layout (a prompt prefilled split over `context`), x's keys and values become the
        cache's prompt block (kv_cache.py) and its slots stay empty for the tokens to come."""
        text = self.config.text
        if context_layout is not None and LINEAR in text.layer_kinds:
            raise ValueError(
                "the gated delta-net layers of Qwen3.5 do not split the sequence over the mesh's `context` axis: "
                "run Qwen3.5 on a mesh with context = 1"
            )
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
        states = None if cache is None else _layer_states(cache, text)
        run = self._unrolled if self.unrolled else self._scanned
        x, states, router_logits = run(x, layer_inputs, states=states)
        x = RMSNorm(
            text.rms_norm_eps,
            param_dtype=jnp.dtype(self.config.param_dtype),
            zero_centered=text.is_qwen3_5,
            name="norm",
        )(x)
        if cache is not None:
            full = [state for state in states if isinstance(state, LayerCache)]
            cache = KVCache(
                k=tuple(layer.k for layer in full),
                v=tuple(layer.v for layer in full),
                segment_ids=kv_segment_ids,
                index=cache.index + (0 if fills_prompt_block else x.shape[1]),
                prompt_k=tuple(layer.prompt_k for layer in full) if full and full[0].prompt_k is not None else None,
                prompt_v=tuple(layer.prompt_v for layer in full) if full and full[0].prompt_v is not None else None,
                prompt_segment_ids=prompt_segment_ids,
                delta_net=tuple(state for state in states if isinstance(state, DeltaNetState)),
            )
        return DecoderOutputs(
            hidden=x, cache=cache, router_logits=jnp.concatenate(router_logits) if router_logits else None
        )

    def _scanned(self, x, layer_inputs: DecoderLayerInputs, *, states: list[LayerState] | None):
        text = self.config.text
        new_states, router_logits = [], []
        for run, name in zip(layer_runs(text), run_names(text)):
            size = len(run.period)
            if size == 1:
                body, kwargs = maybe_remat(DecoderLayer, self.config.remat), dict(kind=run.period[0])
            else:
                body, kwargs = DecoderPeriod, dict(period=run.period)
            layers = nn.scan(
                body,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=run.steps,
                unroll=scan_unroll(run.steps),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            # per scan step: the layer indices and states of its layers, stacked over the steps
            indices = jnp.arange(run.start, run.end).reshape(run.steps, size)
            run_states = None
            if states is not None:
                by_position = [states[run.start + j : run.end : size] for j in range(size)]
                run_states = tuple(jax.tree_util.tree_map(lambda *s: jnp.stack(s), *same) for same in by_position)
            if size == 1:
                indices, run_states = indices[:, 0], None if run_states is None else run_states[0]
            x, (run_states, logits) = layers(self.config, **kwargs, name=name)(x, (indices, run_states), layer_inputs)
            if run_states is not None:
                per_position = [run_states] if size == 1 else list(run_states)
                new_states += [
                    jax.tree_util.tree_map(lambda a, s=s: a[s], per_position[j])
                    for s in range(run.steps)
                    for j in range(size)
                ]
            if logits is not None:  # (steps, E-layers per step, T, E) for a period, (steps, T, E) otherwise
                router_logits.append(logits.reshape(-1, *logits.shape[-2:]))
        return x, new_states or None, router_logits

    def _unrolled(self, x, layer_inputs: DecoderLayerInputs, *, states: list[LayerState] | None):
        new_states, router_logits = [], []
        for i, kind in enumerate(layer_kinds(self.config.text)):
            state = None if states is None else states[i]
            x, (state, logits) = DecoderLayer(self.config, kind, name=f"layer_{i}")(x, (i, state), layer_inputs)
            new_states.append(state)
            if logits is not None:
                router_logits.append(logits[None])
        return x, new_states if states is not None else None, router_logits


def _layer_states(cache: KVCache, text: TextConfig) -> list[LayerState]:
    """The cache as one state per decoder layer: a `LayerCache` for a full-attention layer, a `DeltaNetState` for
    a gated delta-net layer."""
    full = len(cache.k)
    blocks = zip(cache.prompt_k, cache.prompt_v) if cache.has_prompt_block else [(None, None)] * full
    attention = iter([LayerCache(k, v, *block) for k, v, block in zip(cache.k, cache.v, blocks)])
    delta_net = iter(cache.delta_net)
    states = [next(attention) if mixer == FULL else next(delta_net) for mixer in text.layer_kinds]
    if next(attention, None) is not None or next(delta_net, None) is not None:
        raise ValueError("the cache was made for a model with other layer kinds (kv_cache.init_cache)")
    return states


def unstack_decoder_params(decoder_params: dict, text: TextConfig) -> dict:
    """The parameters of `Decoder(unrolled=True)` (`layer_0`, `layer_1`, ... and `norm`) sliced out of those of
    the scanned decoder (`layer_params`): each stacked leaf (steps, ...) becomes one (...) leaf per layer."""
    unrolled = {"norm": decoder_params["norm"]}
    for layer, (path, index) in enumerate(layer_params(text)):
        stacked = decoder_params
        for key in path:
            stacked = stacked[key]
        unrolled[f"layer_{layer}"] = jax.tree_util.tree_map(lambda p, i=index: p[i], stacked)
    return unrolled
