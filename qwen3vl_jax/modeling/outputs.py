"""What the model's methods return: named tuples: results unpack by position and read by name.

Shapes: B batch rows, L tokens per row, P patches per row, m the spatial merge size (P / m^2 merged visual tokens),
H the decoder's hidden size, V the vocabulary, E the experts of an MoE layer, K the DeepStack levels. "Compute
dtype" is `ModelConfig.dtype`. Each is a pytree (jit, scan, remat and grad see its fields as leaves).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from qwen3vl_jax.modeling.kv_cache import KVCache


class VisionOutputs(NamedTuple):
    """The ViT's tokens for the decoder (`VisionTower`, `Qwen3VL.encode_vision`); transformers'
    `Qwen3VLVisionModel.forward` returns them as `pooler_output` and `deepstack_features`."""

    merged: jax.Array  # (B, P/m^2, H) compute dtype: merged visual tokens, in patch-buffer order
    deepstack: list[jax.Array]  # num_deepstack arrays (B, P/m^2, H) compute dtype, one per DeepStack tap


class VisionOutputsWithHiddenStates(NamedTuple):
    """`VisionOutputs` and the ViT's per-block patch features (`VisionTower(..., return_hidden_states=True)`)."""

    merged: jax.Array  # (B, P/m^2, H) compute dtype
    deepstack: list[jax.Array]  # num_deepstack arrays (B, P/m^2, H) compute dtype
    # depth + 1 arrays (B, P, vision hidden) compute dtype: before the first block (patch embedding plus position
    # embedding) and after each block
    hidden_states: list[jax.Array]


class DecoderOutputs(NamedTuple):
    """The decoder's results (`Decoder`, `Qwen3VL.hidden_states`)."""

    hidden: jax.Array  # (B, L, H) compute dtype: the final-norm hidden states
    cache: KVCache | None  # the cache with these tokens' keys and values written; None when called without one
    router_logits: jax.Array | None  # (MoE layers, B*L, E) compute dtype; None for a dense model


class LogitsAndRouterLogits(NamedTuple):
    """`Qwen3VL.logits_and_router_logits`: what the MoE load-balancing loss needs besides the logits."""

    logits: jax.Array  # (B, L, V) compute dtype
    router_logits: jax.Array | None  # (MoE layers, B*L, E) compute dtype; None for a dense model


class TokenLosses(NamedTuple):
    """`Qwen3VL.token_losses`: per token losses against the targets, and the router logits for the aux losses."""

    cross_entropy: jax.Array  # (B, L) float32
    correct: jax.Array  # (B, L) bool: the target has the highest logit (ties count as correct)
    router_logits: jax.Array | None  # (MoE layers, B*L, E) compute dtype; None for a dense model


class HeadInputs(NamedTuple):
    """`Qwen3VL.hidden_states_and_head`: what a loss computed in position chunks needs (modeling.lm_head)."""

    hidden: jax.Array  # (B, L, H) compute dtype: the final-norm hidden states
    head: jax.Array  # (H, V) compute dtype: the output head (the transposed embedding when tied)
    router_logits: jax.Array | None  # (MoE layers, B*L, E) compute dtype; None for a dense model


class NextTokenLogits(NamedTuple):
    """`Qwen3VL.prefill` and `Qwen3VL.decode`: each row's logits for its next token, and the updated cache."""

    logits: jax.Array  # (B, V) compute dtype
    cache: KVCache  # with the new tokens' keys and values written, its index past them
