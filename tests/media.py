"""The tests' real files (tests/data, see its README for provenance and licences) and synthetic videos encoded
with PyAV at chosen frame rates, sizes and lengths."""

from __future__ import annotations

import lzma
import os
import shutil
from fractions import Fraction

import av
import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
IMAGES = ("astronaut.jpg", "chelsea.png", "coffee.jpg", "page.png", "text.png", "china.jpg", "grace_hopper.jpg")
CAMERA_CLIP = os.path.join(DATA, "videos", "bikes.mp4")  # 640x272, 25 fps, 250 frames


def image(name: str) -> str:
    """The absolute path of tests/data/images/<name>."""
    path = os.path.join(DATA, "images", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no test image {name!r} in {os.path.dirname(path)}")
    return path


def write_qwen_tokenizer_dir(directory: str) -> str:
    """A checkpoint-like directory with the real Qwen3 `tokenizer.json` (decompressed from tests/data) and the
    package's bundled Qwen3-VL chat template."""
    from qwen3vl_jax.processing.chat import load_chat_template

    os.makedirs(directory, exist_ok=True)
    with (
        lzma.open(os.path.join(DATA, "qwen3_tokenizer.json.xz"), "rb") as source,
        open(os.path.join(directory, "tokenizer.json"), "wb") as target,
    ):
        shutil.copyfileobj(source, target)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(load_chat_template(None))
    return directory


def frame_level(index: int) -> int:
    """The grey level of frame `index` in `write_video`'s clips: distinct enough to tell frames apart after lossy
    coding (16 levels apart, wrapping every 16 frames)."""
    return 8 + 16 * (index % 16)


def write_video(
    path: str, *, num_frames: int, fps: float | Fraction, height: int, width: int, codec: str = "mpeg4"
) -> str:
    """Encodes a clip whose frame i is a uniform grey of `frame_level(i)` (so decoded frames can be identified),
    with a small coloured square moving one pixel per frame (real motion for the codec)."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(100_000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for i in range(num_frames):
            frame = np.full((height, width, 3), frame_level(i), np.uint8)
            top, left = i % max(height - 4, 1), i % max(width - 4, 1)
            frame[top : top + 4, left : left + 4] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
