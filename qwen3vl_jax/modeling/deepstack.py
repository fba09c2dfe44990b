"""DeepStack: the ViT is tapped after the blocks `deepstack_visual_indexes` (the ViT's scanned stacks end at the
taps, `block_stacks`); each tap's features go through a DeepStack merger (`PatchMerger` with
postshuffle_norm=True, in the ViT) and are added to the outputs of the first decoder layers, tap k after layer k,
at visual token positions only (transformers' `Qwen3VLTextModel._deepstack_process`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_stacks(depth: int, taps: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, end) block ranges that end right after each tap index (and at `depth`): with taps after blocks
    (8, 16, 24) of 27, blocks 0-8, 9-16, 17-24, 25-26."""
    ends = sorted({i + 1 for i in taps} | {depth})
    return [(start, end) for start, end in zip([0, *ends[:-1]], ends)]


def gather_visual(features: jax.Array, visual_index: jax.Array) -> jax.Array:
    """features (B, N, H) merged visual tokens; visual_index (B, L) row of each visual token, -1 for text.
    Returns (B, L, H) with the feature of each visual position (rows for text positions are arbitrary)."""
    return jnp.take_along_axis(features, jnp.maximum(visual_index, 0)[..., None], axis=1)


def add_deepstack(
    hidden: jax.Array, *, features: jax.Array, visual_index: jax.Array, layer: jax.Array | int
) -> jax.Array:
    """hidden (B, L, H) output of decoder layer `layer` (a traced int inside the layer scan); features
    (K, B, N, H), level k belonging to layer k. Adds level `layer` at visual positions when layer < K."""
    levels = features.shape[0]
    level = jax.lax.dynamic_index_in_dim(features, jnp.minimum(layer, levels - 1), keepdims=False)
    add = (visual_index >= 0) & (layer < levels)
    return hidden + jnp.where(add[..., None], gather_visual(level, visual_index).astype(hidden.dtype), 0)
