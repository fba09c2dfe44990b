"""Prompt lengths for batching benchmark examples by length: the tokens a prompt expands to, from its text and its
media's sizes (read from image headers and video stream metadata, no pixels decoded), and batches of neighbours
in length."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
import PIL.Image

from qwen3vl_jax.evaluation.examples import BenchmarkExample
from qwen3vl_jax.processing import DataError, Processor
from qwen3vl_jax.processing.image import smart_resize
from qwen3vl_jax.processing.processor import media_kind, message_items
from qwen3vl_jax.processing.video import group_timestamps, sample_indices, video_smart_resize


def length_batches(lengths: Sequence[int], *, batch_size: int) -> list[list[int]]:
    """Indices into `lengths` cut into batches of `batch_size` neighbours in length, longest first (an example
    that does not fit in memory fails in the first batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def prompt_length(processor: Processor, example: BenchmarkExample) -> int:
    """The prompt's tokens as the processor expands them, from the images' sizes and the videos' frame counts,
    rates and sizes, without decoding pixels (exact when a video file's metadata give its frame count). DataError
    when a media item cannot be read."""
    text = processor.apply_chat_template(example.messages, add_generation_prompt=True)
    tokens = len(processor.tokenizer.encode(text, add_special_tokens=False).ids)
    config = processor.config
    for item in message_items(example.messages):
        kind = media_kind(item)
        if kind == "image":
            height, width = _image_size(item["image"], example.base_dir)
            limits = dict(factor=config.factor, min_pixels=config.image_min_pixels, max_pixels=config.image_max_pixels)
            h, w = smart_resize(height, width, **limits)
            tokens += (h // config.factor) * (w // config.factor) - 1  # the pads replace the one placeholder pad
        elif kind == "video":
            tokens += _video_tokens(item, base_dir=example.base_dir, processor=processor)
    return tokens


def _image_size(source: Any, base_dir: str) -> tuple[int, int]:
    """(height, width) of an image (PIL, uint8 array, encoded bytes, path) from its header."""
    if isinstance(source, np.ndarray):
        return int(source.shape[0]), int(source.shape[1])
    if isinstance(source, PIL.Image.Image):
        return source.height, source.width
    if isinstance(source, (bytes, bytearray)):
        source, what = io.BytesIO(source), "image bytes"
    else:
        source = what = os.path.join(base_dir, os.fspath(source))
    try:
        with PIL.Image.open(source) as image:
            return image.height, image.width
    except (OSError, ValueError) as e:
        raise DataError(f"{what} cannot be read: {e}") from None


def _video_tokens(item: dict, *, base_dir: str, processor: Processor) -> int:
    """The tokens a video's placeholder (3 tokens) expands to: per temporal group of the frames sampled as the
    processor samples them (a file's frame count, rate and size from its stream metadata; a frame list's length,
    its fps and its first frame's size), its timestamp text, <|vision_start|>, its merged visual tokens and
    <|vision_end|>."""
    config, video = processor.config, item["video"]
    if isinstance(video, (str, os.PathLike)):
        path = os.path.join(base_dir, os.fspath(video))
        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                native_fps = float(stream.average_rate or 24.0)
                total = stream.frames or int(float(container.duration or 0) / av.time_base * native_fps)
                height, width = stream.height, stream.width
        except (av.error.FFmpegError, IndexError, OSError) as e:
            raise DataError(f"video file {path} cannot be read: {e}") from None
    else:
        native_fps, total = float(item.get("fps") or config.fps), len(video)
        height, width = _image_size(video[0], base_dir) if total else (0, 0)
    sampling = dict(fps=config.fps, min_frames=config.min_frames, max_frames=config.max_frames)
    indices = sample_indices(max(total, 1), native_fps=native_fps, **sampling)
    limits = dict(factor=config.factor, min_pixels=config.video_min_pixels, max_pixels=config.video_max_pixels)
    temporal = config.temporal_patch_size
    h, w = video_smart_resize(height, width, num_frames=max(len(indices), temporal), temporal=temporal, **limits)
    tokens = -3
    for seconds in group_timestamps(indices, native_fps=native_fps, temporal=temporal):
        stamp = len(processor.tokenizer.encode(f"<{seconds:.1f} seconds>", add_special_tokens=False).ids)
        tokens += (stamp if config.video_timestamps else 0) + 2 + (h // config.factor) * (w // config.factor)
    return tokens
