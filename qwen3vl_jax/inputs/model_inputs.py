"""The model's static-shape input contract, and how token sequences with their images become its arrays.

Every array has the batch on axis 0, so a batch shards over the data axes as one pytree. Text is a fixed
length-L buffer; vision is a fixed buffer of P patches per row holding that row's images and video temporal
groups in order of appearance, then padding (segment id 0). P is a multiple of 4: the 2x2 merge windows of
an image never straddle a block boundary because every block has an even h and w. Because patches are stored
in the order their placeholder tokens appear, a row's k-th visual token is its k-th merged token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import flax.struct
import jax
import numpy as np

from qwen3vl_jax.config import ModelConfig, VisionConfig
from qwen3vl_jax.inputs.patch_geometry import patch_geometry
from qwen3vl_jax.inputs.positions import (
    IMAGE,
    VIDEO,
    VisualBlock,
    layout_sequence,
    rope_delta,
    sequence_positions,
    visual_blocks,
)

PATCH_FIELDS = ("pixel_patches", "pos_embed_index", "pos_embed_weight", "patch_rowcol")


@dataclasses.dataclass(frozen=True)
class ArrayField:
    """A batch array's dimensions after the batch axis ("L": the row's tokens, "P": its patches, "D": a patch's
    pixel values, or a size), its dtype and the value of padding."""

    dims: tuple[str | int, ...]
    dtype: type = np.int32
    fill: int = 0

    def shape(self, batch: int, *, seq_len: int, max_patches: int, patch_dim: int) -> tuple[int, ...]:
        sizes = dict(L=seq_len, P=max_patches, D=patch_dim)
        return (batch, *(sizes.get(d, d) for d in self.dims))

    @property
    def sequence_axis(self) -> int | None:
        """The axis a context-parallel mesh splits (tokens or patches), counting the batch axis; None: none."""
        return next((i + 1 for i, d in enumerate(self.dims) if d in ("L", "P")), None)


# every ModelInputs field's shape, dtype and padding
INPUT_FIELDS = dict(
    input_ids=ArrayField(("L",)),
    segment_ids=ArrayField(("L",)),
    positions=ArrayField((3, "L")),
    visual_index=ArrayField(("L",), fill=-1),
    pixel_patches=ArrayField(("P", "D"), np.float32),
    patch_segment_ids=ArrayField(("P",)),
    pos_embed_index=ArrayField(("P", 4)),
    pos_embed_weight=ArrayField(("P", 4), np.float32),
    patch_rowcol=ArrayField(("P", 2)),
)


@flax.struct.dataclass
class ModelInputs:
    input_ids: jax.Array  # (B, L) int32
    segment_ids: jax.Array  # (B, L) int32: example id within the row (packing); 0 = padding
    positions: jax.Array  # (B, 3, L) int32: t, h, w MRoPE positions (`Qwen3VLModel.get_rope_index`)
    visual_index: jax.Array  # (B, L) int32: merged-token row in this row's patch buffer; -1 = text
    pixel_patches: jax.Array  # (B, P, C*Tp*P*P) float32
    patch_segment_ids: jax.Array  # (B, P) int32: one id per (image, temporal group); 0 = padding
    pos_embed_index: jax.Array  # (B, P, 4) int32: bilinear taps into the learned position table
    pos_embed_weight: jax.Array  # (B, P, 4) float32
    patch_rowcol: jax.Array  # (B, P, 2) int32: rotary (row, col) ids

    @property
    def has_vision(self) -> bool:
        return self.pixel_patches.shape[1] > 0


def patch_features(blocks: list[VisualBlock], *, pixels: dict[int, np.ndarray], vision: VisionConfig) -> dict:
    """Per-patch arrays for `blocks` one after the other: `pixel_patches` (rows of pixels[block.kind]),
    `patch_group` (1, 2, ... one id per temporal group), `pos_embed_index`, `pos_embed_weight`, `patch_rowcol`."""
    columns = {name: [] for name in (*PATCH_FIELDS, "patch_group")}
    groups = 0
    for block in blocks:
        t, h, w = block.grid
        columns["pixel_patches"].append(pixels[block.kind][block.first_row : block.first_row + block.num_patches])
        columns["patch_group"].append(groups + 1 + np.repeat(np.arange(t, dtype=np.int32), h * w))
        geometry = patch_geometry(block.grid, merge=vision.spatial_merge_size, side=vision.grid_per_side)
        for name, value in zip(("pos_embed_index", "pos_embed_weight", "patch_rowcol"), geometry):
            columns[name].append(value)
        groups += t
    empty = dict(
        pixel_patches=np.zeros((0, vision.patch_dim), np.float32),
        patch_group=np.zeros(0, np.int32),
        pos_embed_index=np.zeros((0, 4), np.int32),
        pos_embed_weight=np.zeros((0, 4), np.float32),
        patch_rowcol=np.zeros((0, 2), np.int32),
    )
    return {
        name: np.concatenate(parts).astype(empty[name].dtype) if parts else empty[name]
        for name, parts in columns.items()
    }


def sequence_features(
    config: ModelConfig,
    ids: np.ndarray,
    *,
    images: Iterator[VisualBlock],
    videos: Iterator[VisualBlock],
    pixels: dict[int, np.ndarray],
    where: str,
) -> dict:
    """Arrays of one unpadded token sequence: `positions` (n, 3) plus the `patch_features` of its visual blocks
    in order of appearance. Blocks are taken from the iterators. Raises ValueError naming `where` when
    placeholders and grids disagree."""
    merge = config.vision.spatial_merge_size
    pieces = layout_sequence(
        ids,
        images=images,
        videos=videos,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        merge=merge,
        where=where,
    )
    blocks = [piece.block for piece in pieces if piece.block is not None]
    features = patch_features(blocks, pixels=pixels, vision=config.vision)
    features["positions"] = sequence_positions(pieces, merge).T.astype(np.int32)
    return features


def visual_index(input_ids: np.ndarray, segment_ids: np.ndarray, *, config: ModelConfig) -> np.ndarray:
    """(B, L): the k-th visual token of a row -> k; text and padding -> -1."""
    visual = ((input_ids == config.image_token_id) | (input_ids == config.video_token_id)) & (segment_ids > 0)
    return np.where(visual, np.cumsum(visual, axis=-1) - 1, -1).astype(np.int32)


def empty_inputs(batch: int, *, seq_len: int, max_patches: int, patch_dim: int) -> dict[str, np.ndarray]:
    """All-padding ModelInputs fields as writable numpy arrays."""
    sizes = dict(seq_len=seq_len, max_patches=max_patches, patch_dim=patch_dim)
    return {name: np.full(field.shape(batch, **sizes), field.fill, field.dtype) for name, field in INPUT_FIELDS.items()}


# the smallest buckets `from_hf_batch` pads a batch's tokens and patches to
MIN_TOKEN_BUCKET, MIN_PATCH_BUCKET = 64, 256


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum): few distinct shapes, hence few compiles."""
    return 1 << (max(n, minimum) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ProcessorOutputs:
    """The arrays an HF Qwen3-VL processor returns (numpy arrays or torch tensors); any visual input may be
    absent. `mm_token_type_ids` is accepted and not needed: token types follow from the image / video token ids."""

    input_ids: Any  # (B, L)
    attention_mask: Any = None  # (B, L), 1 = real token (padding on either side)
    pixel_values: Any = None  # (image patches, C*Tp*P*P)
    image_grid_thw: Any = None  # (images, 3)
    pixel_values_videos: Any = None  # (video patches, C*Tp*P*P)
    video_grid_thw: Any = None  # (videos, 3)
    mm_token_type_ids: Any = None


def from_hf_batch(
    config: ModelConfig, outputs: ProcessorOutputs, *, seq_len: int | None = None, max_patches: int | None = None
) -> tuple[ModelInputs, np.ndarray]:
    """Numpy ModelInputs (padded to `seq_len` / `max_patches`, or to power-of-two buckets when None) and the
    rope_deltas (B, 1) from the arrays an HF Qwen3-VL processor returns. Each row holds one sequence
    (padding on either side)."""
    vision, merge = config.vision, config.vision.spatial_merge_size
    input_ids, attention_mask = np.asarray(outputs.input_ids), outputs.attention_mask
    pixel_values, pixel_values_videos = outputs.pixel_values, outputs.pixel_values_videos
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")

    images, videos = visual_blocks(outputs.image_grid_thw, outputs.video_grid_thw, merge=merge)
    pixels = {
        IMAGE: _pixel_rows(
            pixel_values, images, patch_dim=vision.patch_dim, name="pixel_values", grid_name="image_grid_thw"
        ),
        VIDEO: _pixel_rows(
            pixel_values_videos,
            videos,
            patch_dim=vision.patch_dim,
            name="pixel_values_videos",
            grid_name="video_grid_thw",
        ),
    }
    image_iter, video_iter = iter(images), iter(videos)
    visuals = dict(images=image_iter, videos=video_iter, pixels=pixels)
    rows = [sequence_features(config, input_ids[b, mask[b]], **visuals, where=f"batch row {b}") for b in range(batch)]
    for leftover in (image_iter, video_iter):
        if (block := next(leftover, None)) is not None:
            raise ValueError(f"{block.describe()} has no placeholder tokens in input_ids")

    row_patches = max(len(r["pixel_patches"]) for r in rows)
    seq_len = _fit("seq_len", needed=length, given=seq_len, default=bucket(length, MIN_TOKEN_BUCKET))
    patch_bucket = bucket(row_patches, MIN_PATCH_BUCKET) if row_patches else 0
    max_patches = _fit("max_patches", needed=row_patches, given=max_patches, default=patch_bucket)
    if max_patches % merge**2:
        raise ValueError(f"max_patches {max_patches} must be a multiple of {merge**2}")

    out = empty_inputs(batch, seq_len=seq_len, max_patches=max_patches, patch_dim=vision.patch_dim)
    out["input_ids"][:, :length] = input_ids
    out["segment_ids"][:, :length] = mask
    deltas = np.zeros((batch, 1), np.int64)
    for b, row in enumerate(rows):
        out["positions"][b][:, np.flatnonzero(mask[b])] = row["positions"].T
        deltas[b] = rope_delta(row["positions"].T)
        n = len(row["pixel_patches"])
        for name in PATCH_FIELDS:
            out[name][b, :n] = row[name]
        out["patch_segment_ids"][b, :n] = row["patch_group"]
    out["visual_index"] = visual_index(out["input_ids"], out["segment_ids"], config=config)
    return ModelInputs(**out), deltas


def _pixel_rows(pixels, blocks, *, patch_dim: int, name: str, grid_name: str) -> np.ndarray:
    needed = sum(b.num_patches for b in blocks)
    if pixels is None:
        if needed:
            raise ValueError(f"{grid_name} is given but {name} is missing")
        return np.zeros((0, patch_dim), np.float32)
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim != 2 or pixels.shape[1] != patch_dim:
        raise ValueError(f"{name} must be (patches, {patch_dim}) for this model, got shape {pixels.shape}")
    if pixels.shape[0] != needed:
        raise ValueError(f"{name} has {pixels.shape[0]} patch rows but {grid_name} describes {needed}")
    return pixels


def _fit(name: str, *, needed: int, given: int | None, default: int) -> int:
    if given is None:
        return default
    if needed > given:
        raise ValueError(f"the batch needs {name} >= {needed}, but {name} = {given}")
    return given
