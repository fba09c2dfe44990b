"""Host-side (numpy) ViT inputs that depend on an image's grid, as transformers' `Qwen3VLVisionModel.forward`
computes them with `vision_utils.get_vision_interpolation_indices_and_weights` and `get_vision_position_ids`.

Patches of an image arrive in merge-window order (block_row, block_col, in_row, in_col), repeated for each
temporal group (the row order of `Qwen2VLImageProcessor.patchify` / `Qwen3VLVideoProcessor.patchify`). For
each patch we compute its (row, col) in the full-resolution patch grid, the 4 bilinear taps into the learned
`side x side` position table (align_corners=True) and their weights, in float32 exactly as transformers does.
"""

from __future__ import annotations

import numpy as np


def merge_window_rowcol(h: int, w: int, *, merge: int) -> np.ndarray:
    """(h*w, 2) (row, col) of each patch of one temporal group, in merge-window order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1)


def _axis_taps(index: np.ndarray, *, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear align_corners taps along one axis: (n, 2) table indices and (n, 2) weights."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor[:, None].astype(np.int64) + np.arange(2), 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), np.float32(0))
    return taps, weights.astype(np.float32)


def patch_geometry(grid: tuple[int, int, int], *, merge: int, side: int):
    """For one image / video block with grid (t, h, w): pos-embed taps (t*h*w, 4) int32, their weights
    (t*h*w, 4) float32, and rotary (row, col) ids (t*h*w, 2) int32."""
    t, h, w = grid
    rowcol = merge_window_rowcol(h, w, merge=merge)
    row_taps, row_weights = _axis_taps(rowcol[:, 0], size=h, side=side)
    col_taps, col_weights = _axis_taps(rowcol[:, 1], size=w, side=side)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)

    def tile(a, dtype):  # the same taps for every temporal group
        return np.tile(a, (t, 1)).astype(dtype)

    return tile(index, np.int32), tile(weight, np.float32), tile(rowcol, np.int32)
