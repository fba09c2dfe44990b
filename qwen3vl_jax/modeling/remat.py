"""Rematerialisation of scanned layers, chosen by `ModelConfig.remat`:
"none" keeps every activation for the backward pass, "full" recomputes each layer from its input, "dots"
keeps the outputs of matmuls without batch dimensions (weights x activations) and recomputes the rest, "offload"
is "full" with each layer's input kept in the host's memory instead of the accelerator's (the layers mark it
with `layer_input`): at long sequences those inputs are the largest thing a step keeps (Qwen3-VL-8B, 32K tokens
per chip: 9 GiB)."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

LAYER_INPUT = "layer_input"

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=(LAYER_INPUT,),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def mark_layer_input(x: jax.Array) -> jax.Array:
    """Names a scanned layer's input for the "offload" policy (the identity otherwise)."""
    return checkpoint_name(x, LAYER_INPUT)


def maybe_remat(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """`layer_cls` wrapped in nn.remat with the named policy ("none": unchanged)."""
    if policy == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=_POLICIES[policy], prevent_cse=False)
