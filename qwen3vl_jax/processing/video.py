"""Video preprocessing as transformers' `Qwen3VLVideoProcessor`: decode with PyAV, sample frames at the configured
fps, resize with the video smart_resize (pixel limits on the whole clip), and the text timestamps of each temporal
group (`Qwen3VLProcessor._calculate_timestamps`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
from PIL import Image

from qwen3vl_jax.processing.errors import DataError
from qwen3vl_jax.processing.image import load_image, smart_resize


def sample_indices(total_frames: int, *, native_fps: float, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """Frame indices sampled at `fps`: n = int(total / native_fps * fps) clamped to [min_frames, max_frames]
    and to total, then round(linspace(0, total - 1, n))."""
    if total_frames < 1:
        raise DataError("video has no frames")
    n = int(total_frames / native_fps * fps)
    n = min(max(n, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int)


def video_smart_resize(
    height: int, width: int, *, num_frames: int, factor: int, temporal: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """transformers' video smart_resize: `smart_resize` with the pixel limits on the whole clip; frames smaller
    than `factor` are first scaled up."""
    if num_frames < temporal:
        raise DataError(f"a video needs at least {temporal} frames, got {num_frames}")
    if min(height, width) <= 0:
        raise DataError(f"video frames have zero size ({height}x{width})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    limits = dict(factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return smart_resize(height, width, num_frames=num_frames, temporal=temporal, **limits)


def group_timestamps(indices: Sequence[int], *, native_fps: float, temporal: int) -> list[float]:
    """Seconds of each temporal group: the index list is padded to a multiple of `temporal` with its last
    entry, and each group gets the mean time of its first and last frame."""
    indices = list(indices)
    indices += [indices[-1]] * (-len(indices) % temporal)
    seconds = [i / native_fps for i in indices]
    return [(seconds[i] + seconds[i + temporal - 1]) / 2 for i in range(0, len(seconds), temporal)]


def decode_video(
    path: str, *, fps: float, min_frames: int, max_frames: int
) -> tuple[list[Image.Image], np.ndarray, float]:
    """Decodes the frames of `path` sampled at `fps` with PyAV. Returns (RGB frames, their indices in the
    file, native fps). Raises DataError naming the file when it is missing, unreadable or has no frames."""
    if not os.path.exists(path):
        raise DataError(f"video file {path} does not exist")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"video file {path} has no video stream")
            stream = container.streams.video[0]
            native_fps = float(stream.average_rate or 24.0)
            total = stream.frames or sum(1 for _ in container.decode(video=0))
            sampling = dict(fps=fps, min_frames=min_frames, max_frames=max_frames)
            indices = sample_indices(total, native_fps=native_fps, **sampling)
            wanted = set(indices.tolist())
            container.seek(0)
            frames = {}
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_image()
                if i >= indices[-1]:
                    break
    except av.error.FFmpegError as e:
        raise DataError(f"video file {path} is unreadable or corrupt: {e}") from None
    if len(frames) != len(wanted):
        raise DataError(
            f"video file {path}: its metadata promise {total} frames but decoding stopped after "
            f"{len(frames)} of the {len(wanted)} sampled ones (truncated or corrupt file)"
        )
    return [frames[i].convert("RGB") for i in indices.tolist()], indices, native_fps


def frames_as_video(
    frames: Sequence[Any], *, native_fps: float, fps: float, min_frames: int, max_frames: int
) -> tuple[list[Image.Image], np.ndarray, float]:
    """The same sampling for a list of frames (PIL images or uint8 arrays) recorded at `native_fps`."""
    if not native_fps or native_fps <= 0:
        raise DataError("a video given as a list of frames needs its frame rate ('fps' > 0)")
    sampling = dict(fps=fps, min_frames=min_frames, max_frames=max_frames)
    indices = sample_indices(len(frames), native_fps=native_fps, **sampling)
    return [load_image(frames[i]) for i in indices.tolist()], indices, float(native_fps)
