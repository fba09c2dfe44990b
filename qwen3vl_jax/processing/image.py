"""Image preprocessing: smart_resize, bicubic resize, rescale/normalise, and the patch layout
shared by images and videos. Equal to transformers' `Qwen2VLImageProcessorPil` on the same PIL image."""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from qwen3vl_jax.processing.errors import DataError


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int, num_frames: int = 1, temporal: int = 1
) -> tuple[int, int]:
    """(h, w) multiples of `factor`, aspect ratio kept as well as possible, with t*h*w in [min_pixels, max_pixels]:
    transformers' smart_resize for an image (t = 1) and its video form (t = num_frames rounded to a multiple of
    `temporal`; the rescaling uses num_frames itself). Python round (banker's) as in transformers."""
    if min(height, width) <= 0:
        raise DataError(f"zero size ({height}x{width})")
    if max(height, width) / min(height, width) > 200:
        raise DataError(
            f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}"
            f" ({height}x{width})"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_image(source: Any, base_dir: str = "") -> Image.Image:
    """An RGB PIL image from a PIL image, an (H, W[, 1|3|4]) uint8 array, encoded image bytes (PNG, JPEG, ...),
    or a file path (relative paths are resolved against `base_dir`). Raises DataError naming the file when it is
    missing or unreadable."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        channels = source.shape[2] if source.ndim == 3 else 0
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or channels not in (0, 1, 3, 4):
            raise DataError(f"image array must be uint8 (H, W) or (H, W, 1|3|4), got {source.dtype} {source.shape}")
        image = Image.fromarray(source[..., 0] if channels == 1 else source)
    elif isinstance(source, (bytes, bytearray)):
        image = _decode(io.BytesIO(source), f"{len(source)} bytes of image data")
    elif isinstance(source, (str, os.PathLike)):
        path = os.path.join(base_dir, os.fspath(source))
        if not os.path.exists(path):
            raise DataError(f"image file {path} does not exist")
        image = _decode(path, f"image file {path}")
    else:
        raise DataError(f"unsupported image input of type {type(source).__name__}")
    if image.width == 0 or image.height == 0:
        raise DataError(f"image has zero size ({image.height}x{image.width})")
    return image.convert("RGB") if image.mode != "RGB" else image


def _decode(file: Any, what: str) -> Image.Image:
    try:
        with Image.open(file) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{what} is unreadable or corrupt: {e}") from None


def resize_and_normalize(image: Image.Image, *, height: int, width: int, mean, std) -> np.ndarray:
    """Bicubic resize to (height, width), x/255 (computed in float64 as transformers does), then
    (x - mean)/std in float32. Returns (3, height, width) float32."""
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    x = (np.asarray(image, np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def patchify(frames: np.ndarray, *, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """frames (F, C, H, W) -> pixel rows (gt*gh*gw, C*temporal*patch*patch) in merge-window order and the grid
    (gt, gh, gw), as `Qwen3VLVideoProcessor.patchify` (and `Qwen2VLImageProcessor.patchify` for an image). F is
    padded to a multiple of `temporal` by repeating the last frame (an image, F = 1, becomes `temporal`
    identical frames)."""
    if pad := -len(frames) % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    f, c, h, w = frames.shape
    gt, gh, gw = f // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, bh, bw, mh, mw, C, T, ph, pw)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal * patch * patch)), (gt, gh, gw)
