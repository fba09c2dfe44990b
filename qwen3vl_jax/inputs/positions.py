"""3-D MRoPE position ids on the host, equal to transformers' `Qwen3VLModel.get_rope_index`.

A sequence is cut into pieces: text runs and visual blocks. A visual block is one image or one temporal
group of a video (each group is its own `<t seconds><vision_start>...<vision_end>` block in the prompt).
Images and video groups are consumed in order from iterators that run across the whole batch, as in
transformers. The same pieces drive the packing of pixel patches (`qwen3vl_jax.inputs.model_inputs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2
_KIND_NAME = {IMAGE: "image", VIDEO: "video"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisualBlock:
    """One image, or one temporal group of a video, as it appears in the token sequence."""

    kind: int  # IMAGE or VIDEO
    source: int  # index of the image / video in its grid_thw list
    grid: tuple[int, int, int]  # (t, h, w) in patches; video groups have t = 1
    first_row: int  # first row of this block in pixel_values / pixel_values_videos

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def num_tokens(self, merge: int) -> int:
        return self.num_patches // merge**2

    def describe(self) -> str:
        return f"{_KIND_NAME[self.kind]} {self.source} (grid t,h,w = {self.grid})"


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of `length` tokens starting at `start`: text (block None) or the tokens of one visual block."""

    start: int
    length: int
    block: VisualBlock | None = dataclasses.field(default=None, kw_only=True)


def visual_blocks(image_grid_thw, video_grid_thw, *, merge: int) -> tuple[list[VisualBlock], list[VisualBlock]]:
    """Blocks for all images and all video temporal groups, with their rows in the pixel arrays."""

    def grids(grid_thw, name):
        grid_thw = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw).reshape(-1, 3)
        for i, (t, h, w) in enumerate(grid_thw.tolist()):
            if min(t, h, w) < 1 or h % merge or w % merge:
                raise ValueError(
                    f"{name}[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples of "
                    f"the spatial merge size {merge}"
                )
            yield i, (t, h, w)

    images, row = [], 0
    for i, (t, h, w) in grids(image_grid_thw, "image_grid_thw"):
        images.append(VisualBlock(kind=IMAGE, source=i, grid=(t, h, w), first_row=row))
        row += t * h * w
    videos, row = [], 0
    for i, (t, h, w) in grids(video_grid_thw, "video_grid_thw"):
        for _ in range(t):  # each temporal group is a block of its own
            videos.append(VisualBlock(kind=VIDEO, source=i, grid=(1, h, w), first_row=row))
            row += h * w
    return images, videos


def layout_sequence(
    ids: np.ndarray,
    *,
    images: Iterator[VisualBlock],
    videos: Iterator[VisualBlock],
    image_token_id: int,
    video_token_id: int,
    merge: int,
    where: str = "sequence",
) -> list[Piece]:
    """Cuts the unpadded token sequence `ids` into pieces, taking one block from `images` / `videos` for each
    image / video placeholder block. Raises ValueError naming `where` and the block when the placeholder
    tokens do not match the grids."""
    kinds = np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT))
    pieces: list[Piece] = []
    start = 0
    while start < len(ids):
        kind = kinds[start]
        end = start + 1
        while end < len(ids) and kinds[end] == kind:
            end += 1
        if kind == TEXT:
            pieces.append(Piece(start, end - start))
        else:
            pos = start
            while pos < end:  # a run of placeholders may hold several adjacent blocks
                block = next(images if kind == IMAGE else videos, None)
                if block is None:
                    raise ValueError(
                        f"{where}: {_KIND_NAME[kind]} placeholder tokens at position {pos} have no "
                        f"{_KIND_NAME[kind]} left in the grid_thw list"
                    )
                n = block.num_tokens(merge)
                if pos + n > end:
                    raise ValueError(
                        f"{where}: {end - pos} {_KIND_NAME[kind]} placeholder tokens at position {pos} "
                        f"but {block.describe()} needs {n}"
                    )
                pieces.append(Piece(pos, n, block=block))
                pos += n
        start = end
    return pieces


def sequence_positions(pieces: list[Piece], merge: int) -> np.ndarray:
    """(3, n) t/h/w positions of a sequence from its pieces, as in `Qwen3VLModel.get_rope_index`. A visual
    block with grid (t, h, w) starting at counter `cur` gets t = cur + frame, h = cur + row, w = cur + col
    (merged units), after which the counter advances by max(h, w) / merge."""
    out, cur = [], 0
    for piece in pieces:
        if piece.block is None:
            out.append(np.broadcast_to(np.arange(cur, cur + piece.length), (3, piece.length)))
            cur += piece.length
        else:
            t, h, w = piece.block.grid
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
            out.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w) // merge
    return np.concatenate(out, axis=1) if out else np.zeros((3, 0), np.int64)


def rope_delta(positions: np.ndarray) -> int:
    """max position + 1 - sequence length for positions (3, n) (a rope delta of `Qwen3VLModel.get_rope_index`);
    0 for an empty sequence."""
    return int(positions.max()) + 1 - positions.shape[1] if positions.size else 0


def rope_index(
    input_ids,
    attention_mask=None,
    *,
    image_grid_thw=None,
    video_grid_thw=None,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `get_rope_index`: positions (3, B, L) int64 (padding slots 0) and rope_deltas (B, 1)."""
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    blocks = visual_blocks(image_grid_thw, video_grid_thw, merge=spatial_merge_size)
    images, videos = (iter(kind_blocks) for kind_blocks in blocks)
    positions = np.zeros((3, *input_ids.shape), np.int64)
    deltas = np.zeros((input_ids.shape[0], 1), np.int64)
    for b in range(input_ids.shape[0]):
        pieces = layout_sequence(
            input_ids[b, mask[b]],
            images=images,
            videos=videos,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            merge=spatial_merge_size,
            where=f"batch row {b}",
        )
        positions[:, b, mask[b]] = sequence_positions(pieces, spatial_merge_size)
        deltas[b] = rope_delta(positions[:, b, mask[b]])
    return positions, deltas
