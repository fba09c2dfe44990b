"""The decoder's key/value cache for generation: static maximum length, one slot per token.

Under context parallelism (a mesh with a `context` axis, parallel/context.py) a long prompt is prefilled with its
tokens split over `context`, and its keys and values stay where the prefill computed them: per layer a prompt
block (B, Hkv, L, D) in the load-balanced token order, its length split over `context`, that no device ever
gathers. The generated tokens go to the ordinary slots, which every context shard holds whole (a few hundred
tokens). A decode step attends the prompt block shard by shard and combines the partial softmaxes by their
log-sum-exp (modeling.attention.cached_attention); attention does not care about the order of the keys, only about
their segment ids, so the prompt block needs no reordering.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.config.model import FULL_ATTENTION
from qwen3vl_jax.modeling.gated_delta_net import DeltaNetState
from qwen3vl_jax.parallel.sharding import split_by_names


class LayerCache(NamedTuple):
    """One full-attention layer's part of the `KVCache`: the slots' keys and values (B, Hkv, S, D) and, after a
    prefill split over `context`, the prompt block's (B, Hkv, L, D) (else None)."""

    k: jax.Array
    v: jax.Array
    prompt_k: jax.Array | None = None
    prompt_v: jax.Array | None = None


@flax.struct.dataclass
class KVCache:
    """Per full-attention decoder layer, keys and values of the filled slots; one array per layer, so that a decode
    step updates each layer's cache in place instead of slicing a stacked one. Per gated delta-net layer (Qwen3.5)
    its `DeltaNetState` (conv window and recurrent state), which replaces a cache of its keys and values."""

    # per layer (B, Hkv, S, D) in the compute dtype: heads first, so that a decode step's attention reads each kv
    # head's keys as one contiguous (S, D) matrix (no per-step transpose of the cache)
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]  # per layer (B, Hkv, S, D)
    segment_ids: jax.Array  # (B, S) int32: the segment of each filled slot; 0 = empty or padding
    index: jax.Array  # int32 scalar: the slot the next tokens are written to
    # a prompt prefilled split over `context` (else None): per layer (B, Hkv, L, D) in the load-balanced order, the
    # length split over `context`; every slot is before every token of the slots above
    prompt_k: tuple[jax.Array, ...] | None = None
    prompt_v: tuple[jax.Array, ...] | None = None
    prompt_segment_ids: jax.Array | None = None  # (B, L) int32, in the same order and split
    # per gated delta-net layer, in layer order: heads split over `tensor` as the layer computes them
    delta_net: tuple[DeltaNetState, ...] = ()

    @property
    def has_prompt_block(self) -> bool:
        return self.prompt_k is not None


def init_cache(config: ModelConfig, *, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots for the full-attention layers and zero states for the gated delta-net
    layers; under a mesh split by batch (the batch axes) and heads (`tensor`), as the layers that read it are."""
    t = config.text
    full = sum(kind == FULL_ATTENTION for kind in t.layer_kinds)
    zeros = jnp.zeros((batch, t.num_key_value_heads, length, t.head_dim), jnp.dtype(config.dtype))
    layers = (split_by_names(zeros, ("batch", "kv_heads", None, None)),) * full
    segment_ids = split_by_names(jnp.zeros((batch, length), jnp.int32), ("batch", None))
    state = DeltaNetState.zeros(t.delta_net, batch=batch, dtype=jnp.dtype(config.dtype))
    state = DeltaNetState(
        conv_window=split_by_names(state.conv_window, ("batch", None, "linear_qkv")),
        recurrent=split_by_names(state.recurrent, ("batch", "linear_v_heads", None, None)),
    )
    delta_net = (state,) * (t.num_hidden_layers - full)
    return KVCache(k=layers, v=layers, segment_ids=segment_ids, index=jnp.int32(0), delta_net=delta_net)
