"""Context parallelism: one sequence split over the mesh's `context` axis (the decoder, the ViT and the loss).

The decoder runs in a load-balanced causal layout (as Megatron's and MaxText's context parallelism): the L
positions are cut into 2n chunks of C = L / 2n, and context shard s holds chunks s and 2n-1-s, so every shard
has as many early (cheap) as late (expensive) causal queries. `to_load_balanced` reorders the per-token inputs
on entry, `from_load_balanced` restores the hidden states (and router logits) on exit; each is two
`ppermute`s over `context`. In between, attention (`modeling.attention`) all-gathers the keys and values over
`context`, puts them back in sequence order and masks each query by its sequence position
(`load_balanced_positions`); everything else in a layer is per token and does not care about the order.

The ViT's patch buffer is split over the same axis in its own order: `align_patches` (on the host) lays out each
row's images / video temporal groups so that none crosses a shard boundary, hence each shard runs the ViT's
block-diagonal attention on its own patches; `check_patch_layout` refuses a batch where one would cross. The
merged visual tokens reach their text positions, on whichever shard those are, by the gathers of
`modeling.deepstack` (partitioned by XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from qwen3vl_jax.inputs.model_inputs import PATCH_FIELDS

CONTEXT = "context"  # the mesh axis


def context_shards() -> int:
    """The size of the `context` axis of the current mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(CONTEXT, 1)


def check_length(length: int, shards: int, *, multiple: int = 1) -> None:
    """The load-balanced layout cuts `length` into 2 x shards chunks of a multiple of `multiple` positions."""
    if length % (2 * shards * multiple):
        raise ValueError(
            f"a sequence of {length} positions cannot be split over {shards} context shards: the length must be a "
            f"multiple of 2 x {shards}{f' x {multiple}' if multiple > 1 else ''} = {2 * shards * multiple}"
        )


def load_balanced_positions(length: int, shards: int) -> np.ndarray:
    """(length,) int32: the sequence position held by each slot of the load-balanced layout (shard s's slots
    hold chunk s, then chunk 2n-1-s)."""
    check_length(length, shards)
    chunk = length // (2 * shards)
    early, late = np.arange(shards), np.arange(2 * shards - 1, shards - 1, -1)
    chunks = np.stack([early, late], axis=1).reshape(-1)
    return (chunks[:, None] * chunk + np.arange(chunk)).reshape(-1).astype(np.int32)


def gather_in_sequence_order(arrays, *, length: int, shards: int) -> tuple:
    """Inside a shard_map over `context`: each of `arrays` (B, L / shards, ...) is this shard's part of a sequence in
    the load-balanced layout; returns the whole sequences (B, L, ...) in sequence order (attention's keys/values)."""
    in_sequence_order = np.argsort(load_balanced_positions(length, shards))
    return tuple(
        jnp.take(jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True), in_sequence_order, axis=1) for x in arrays
    )


def to_load_balanced(x: jax.Array, *, axis: int) -> jax.Array:
    """x in sequence order along `axis` (split over `context`) -> the load-balanced order."""
    return _reorder(x, axis=axis, forward=True)


def from_load_balanced(x: jax.Array, *, axis: int) -> jax.Array:
    """The inverse of `to_load_balanced`."""
    return _reorder(x, axis=axis, forward=False)


def _reorder(x: jax.Array, *, axis: int, forward: bool) -> jax.Array:
    shards = context_shards()
    if shards == 1:
        return x
    check_length(x.shape[axis], shards)

    def chunk_home(chunk):  # the shard that holds sequence chunk `chunk` in the load-balanced layout
        return chunk if chunk < shards else 2 * shards - 1 - chunk

    def exchange(local):
        # local: this shard's two chunks along `axis`; exactly one of the two chunks a shard holds (in either
        # layout) is even, so one ppermute moves the even chunks and one the odd ones
        first, second = jnp.split(local, 2, axis=axis)
        even_shard = jax.lax.axis_index(CONTEXT) % 2 == 0
        if forward:  # shard t holds chunks 2t, 2t+1 -> shard chunk_home(c) takes chunk c
            even = jax.lax.ppermute(first, CONTEXT, [(t, chunk_home(2 * t)) for t in range(shards)])
            odd = jax.lax.ppermute(second, CONTEXT, [(t, chunk_home(2 * t + 1)) for t in range(shards)])
            return jnp.where(even_shard, jnp.concatenate([even, odd], axis), jnp.concatenate([odd, even], axis))
        # shard s holds chunks s, 2n-1-s -> shard c // 2 takes chunk c
        even = jnp.where(even_shard, first, second)
        odd = jnp.where(even_shard, second, first)
        even_chunk = [s if s % 2 == 0 else 2 * shards - 1 - s for s in range(shards)]
        even = jax.lax.ppermute(even, CONTEXT, [(s, even_chunk[s] // 2) for s in range(shards)])
        odd = jax.lax.ppermute(odd, CONTEXT, [(s, (2 * shards - 1 - even_chunk[s]) // 2) for s in range(shards)])
        return jnp.concatenate([even, odd], axis)

    spec = PartitionSpec(*([None] * axis), CONTEXT)
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(exchange, mesh=mesh, in_specs=spec, out_specs=spec, axis_names={CONTEXT})(x)


def _place_in_slots(lengths: list[int], *, slot: int, shards: int) -> list[int] | None:
    """Start of each segment in a buffer of `shards` slots of `slot` patches such that none crosses a slot
    boundary: one after the other where that fits (each segment that would cross moves to the next slot), else
    first-fit decreasing into the slots; None when neither fits."""
    starts, cursor = [], 0
    for length in lengths:
        if cursor // slot != (cursor + length - 1) // slot:
            cursor = (cursor // slot + 1) * slot
        starts.append(cursor)
        cursor += length
    if cursor <= slot * shards:
        return starts
    fill = [0] * shards
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        free = next((s for s in range(shards) if fill[s] + lengths[i] <= slot), None)
        if free is None:
            return None
        starts[i] = free * slot + fill[free]
        fill[free] += lengths[i]
    return starts


def align_patches(row: dict[str, np.ndarray], *, shards: int) -> dict[str, np.ndarray]:
    """One packed row (no batch axis) with its patch buffer re-laid out so that no ViT segment (image or video
    temporal group) crosses the boundary between two context shards' slots of P / shards patches (`_place_in_slots`;
    gaps are padding), and `visual_index` follows the merged tokens it points at. Raises ValueError when a
    segment is longer than a slot or the segments cannot be placed in the slots."""
    segments = row["patch_segment_ids"]
    patches = len(segments)
    if shards == 1 or not (segments > 0).any():
        return row
    if patches % (4 * shards):
        raise ValueError(f"max_patches {patches} must be a multiple of 4 x {shards} context shards")
    slot = patches // shards
    starts = np.flatnonzero(np.diff(segments, prepend=-1) != 0)
    ends = np.append(starts[1:], patches)
    real = [(int(start), int(end - start)) for start, end in zip(starts, ends) if segments[start] != 0]
    for _, length in real:
        if length > slot:
            raise ValueError(
                f"a ViT segment of {length} patches (image or video temporal group) is longer than a context "
                f"shard's slot of {slot} patches (max_patches {patches} / {shards} shards); raise max_patches"
            )
    lengths = [length for _, length in real]
    new_starts = _place_in_slots(lengths, slot=slot, shards=shards)
    if new_starts is None:
        raise ValueError(
            f"the row's {sum(lengths)} patches in ViT segments of {sorted(lengths, reverse=True)} patches do not fit "
            f"in {shards} context shards' slots of {slot} patches without one crossing a slot; raise max_patches"
        )
    moves = [(old, new, length) for (old, length), new in zip(real, new_starts)]  # (old start, new start, length)
    aligned = dict(row)
    merged_rows = np.arange(patches // 4)  # old merged-token row -> new one
    for name in (*PATCH_FIELDS, "patch_segment_ids"):
        aligned[name] = np.zeros_like(row[name])
        for old, new, length in moves:
            aligned[name][new : new + length] = row[name][old : old + length]
    for old, new, length in moves:
        merged_rows[old // 4 : (old + length) // 4] = np.arange(new // 4, (new + length) // 4)
    index = row["visual_index"]
    aligned["visual_index"] = np.where(index >= 0, merged_rows[np.maximum(index, 0)], -1).astype(index.dtype)
    return aligned


def check_patch_layout(patch_segment_ids: np.ndarray, *, shards: int) -> None:
    """patch_segment_ids (B, P): raises ValueError naming the row when a ViT segment crosses the boundary between
    two context shards' slots (each shard runs the ViT on its own patches only)."""
    if shards == 1:
        return
    patches = patch_segment_ids.shape[1]
    if patches % (4 * shards):
        raise ValueError(f"max_patches {patches} must be a multiple of 4 x {shards} context shards")
    boundaries = np.arange(1, shards) * (patches // shards)
    before, after = patch_segment_ids[:, boundaries - 1], patch_segment_ids[:, boundaries]
    crossing = (before == after) & (after > 0)
    if crossing.any():
        row, which = np.argwhere(crossing)[0]
        raise ValueError(
            f"batch row {row}: ViT segment {after[row, which]} crosses the boundary at patch {boundaries[which]} "
            f"between context shards {which} and {which + 1}; lay the patches out with "
            "qwen3vl_jax.parallel.context.align_patches (the data pipeline does when data.context_shards is set)"
        )
