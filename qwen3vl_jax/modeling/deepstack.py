"""DeepStack (transformers' `Qwen3VLTextModel._deepstack_process`): ViT features from intermediate blocks added
to the outputs of the first decoder layers, at visual token positions only."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_visual(features: jax.Array, visual_index: jax.Array) -> jax.Array:
    """features (B, N, H) merged visual tokens; visual_index (B, L) row of each visual token, -1 for text.
    Returns (B, L, H) with the feature of each visual position (rows for text positions are arbitrary)."""
    return jnp.take_along_axis(features, jnp.maximum(visual_index, 0)[..., None], axis=1)


def add_deepstack(hidden: jax.Array, features: jax.Array, visual_index: jax.Array, layer: jax.Array) -> jax.Array:
    """hidden (B, L, H) output of decoder layer `layer` (a traced int inside the layer scan); features
    (K, B, N, H), level k belonging to layer k. Adds level `layer` at visual positions when layer < K."""
    levels = features.shape[0]
    level = jax.lax.dynamic_index_in_dim(features, jnp.minimum(layer, levels - 1), keepdims=False)
    add = (visual_index >= 0) & (layer < levels)
    return hidden + jnp.where(add[..., None], gather_visual(level, visual_index).astype(hidden.dtype), 0)
