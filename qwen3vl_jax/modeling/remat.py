"""Rematerialisation of scanned layers, chosen by `ModelConfig.remat`:
"none" keeps every activation for the backward pass, "full" recomputes each layer from its input, "dots"
keeps the outputs of matmuls without batch dimensions (weights x activations) and recomputes the rest."""

from __future__ import annotations

import flax.linen as nn
import jax

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """`layer_cls` wrapped in nn.remat with the named policy ("none": unchanged)."""
    if policy == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=_POLICIES[policy], prevent_cse=False)
