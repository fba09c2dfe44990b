"""The videos of the needle-in-a-haystack evaluation (`video_niah`): a haystack of frames and a needle drawn over
one temporal pair of them.

The haystack is a built-in synthetic clip (`SyntheticHaystack`: shapes that move and change colour over a grey
background, drawn with data/drawing.py, frame i a pure function of the seed and i) or a user's video file
(`load_file_haystack`) decoded with the processor's PyAV reader (`processing.video.decode_video`) at the examples'
fps and looped to the length.

A needle (`Needle`) is a white card showing a short code (`draw_code`) or a large white, black-outlined object of
a class the synthetic haystack never draws (`draw_object`, `NEEDLE_OBJECTS`: a star, a cross, an arrow, a
diamond). `NiahVideo` draws it over *both* frames of one temporal pair (`TEMPORAL` frames, Qwen3-VL's
`temporal_patch_size`), so the pair's merged visual tokens see only needle frames.

Frames are drawn when the processor reads them (`NiahVideo` is a lazy sequence of PIL images), so a grid of long
videos holds only its codes and seeds, plus, for a file haystack, its decoded frames once, resized so their longer
side is `image_size`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from qwen3vl_jax.data.drawing import BACKGROUND, PALETTE, SHAPES, canvas, draw_shape, text_font
from qwen3vl_jax.processing.processor import VisionProcessingConfig
from qwen3vl_jax.processing.video import decode_video

TEMPORAL = VisionProcessingConfig.temporal_patch_size  # frames merged into one group of visual tokens
CARD_COLOUR = PALETTE["white"]  # never drawn by the synthetic haystack
CODE_COLOUR = (0, 0, 0)


def _cross(lo: float = 0.35, hi: float = 0.65) -> tuple[tuple[float, float], ...]:
    """A plus sign in [0, 1]^2 whose arms span [lo, hi]: the top arm's three corners, turned 90 degrees at a
    time about the centre."""
    arm, points = ((lo, 0.0), (hi, 0.0), (hi, lo)), []
    for _ in range(4):
        points += arm
        arm = tuple((1 - y, x) for x, y in arm)
    return tuple(points)


# Object classes that the synthetic haystack (circles, squares, triangles) never draws: unit polygons in [0, 1]^2.
NEEDLE_OBJECTS: dict[str, tuple[tuple[float, float], ...]] = {
    "star": tuple(
        (0.5 + r * math.sin(math.pi * k / 5), 0.53 - r * math.cos(math.pi * k / 5))
        for k in range(10)
        for r in [0.5 if k % 2 == 0 else 0.2]
    ),
    "cross": _cross(),
    "arrow": ((0.0, 0.35), (0.55, 0.35), (0.55, 0.1), (1.0, 0.5), (0.55, 0.9), (0.55, 0.65), (0.0, 0.65)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
}
HAYSTACK_COLOURS = tuple(name for name in PALETTE if PALETTE[name] != CARD_COLOUR)


# ------------------------------------------------------------------------------------------------ haystacks


@dataclasses.dataclass(frozen=True)
class SyntheticHaystack:
    """Shapes bouncing around a grey square frame of `image_size` px and cycling through palette colours (never
    white, the needle card's colour); frame i is a pure function of (seed, image_size, i)."""

    seed: int
    image_size: int
    shapes: int = 3

    def frame(self, index: int) -> Image.Image:
        rng = np.random.default_rng(self.seed)  # the scene: drawn again for each frame, so frames are independent
        image = canvas(self.image_size, BACKGROUND)
        draw = ImageDraw.Draw(image)
        for _ in range(self.shapes):
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            side = int(rng.integers(self.image_size // 6, self.image_size // 3 + 1))
            start = rng.integers(0, self.image_size - side + 1, size=2)
            velocity = rng.choice([-3, -2, -1, 1, 2, 3], size=2)
            colours = [HAYSTACK_COLOURS[int(c)] for c in rng.choice(len(HAYSTACK_COLOURS), size=3, replace=False)]
            period = int(rng.integers(4, 16))  # frames between colour changes
            x, y = (_bounce(int(p + v * index), room=self.image_size - side) for p, v in zip(start, velocity))
            colour = colours[(index // period) % len(colours)]
            draw_shape(draw, kind, box=(x, y, x + side - 1, y + side - 1), colour=colour)
        return image


def _bounce(position: int, *, room: int) -> int:
    """A coordinate moving along [0, room] and reflected at both ends (a triangle wave)."""
    if room == 0:
        return 0
    phase = position % (2 * room)
    return phase if phase <= room else 2 * room - phase


@dataclasses.dataclass(frozen=True)
class FileHaystack:
    """A video file's frames sampled at `fps` (decoded once) and looped: frame i is frames[i % len(frames)]."""

    path: str
    frames: tuple[Image.Image, ...]

    def frame(self, index: int) -> Image.Image:
        return self.frames[index % len(self.frames)]


def load_file_haystack(path: str, *, fps: float, image_size: int) -> FileHaystack:
    """Decodes `path` with the processor's reader (PyAV), sampled at `fps` as the processor samples a file, and
    resizes its frames so their longer side is `image_size`. Raises ValueError naming the file when it is
    missing or unreadable."""
    if not os.path.isfile(path):
        raise ValueError(f"haystack video file {path!r} does not exist")
    frames, _, _ = decode_video(path, fps=fps, min_frames=1, max_frames=2**31 - 1)
    width, height = frames[0].size
    scale = image_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return FileHaystack(path, tuple(frame.resize(size, Image.Resampling.BICUBIC) for frame in frames))


# ------------------------------------------------------------------------------------------------ the needle


def draw_code(frame: Image.Image, code: str) -> Image.Image:
    """A copy of `frame` with a white card over its middle (80% of the width, 60% of the height) showing `code`
    in black, as large as fits the card."""
    image = frame.copy()
    width, height = image.size
    card = (round(0.1 * width), round(0.2 * height), round(0.9 * width) - 1, round(0.8 * height) - 1)
    draw = ImageDraw.Draw(image)
    draw.rectangle(card, fill=CARD_COLOUR)
    room_x, room_y = 0.85 * (card[2] - card[0]), 0.8 * (card[3] - card[1])
    size = max(4, int(room_y))
    while size > 4:
        left, top, right, bottom = text_font(size).getbbox(code)
        if right - left <= room_x and bottom - top <= room_y:
            break
        size -= 1
    font = text_font(size)
    left, top, right, bottom = font.getbbox(code)
    x = (card[0] + card[2] + 1 - (right - left)) / 2 - left
    y = (card[1] + card[3] + 1 - (bottom - top)) / 2 - top
    draw.text((x, y), code, fill=CODE_COLOUR, font=font)
    return image


def draw_object(frame: Image.Image, name: str) -> Image.Image:
    """A copy of `frame` with the object `name` of `NEEDLE_OBJECTS` drawn white with a black outline, centred,
    its side 70% of the frame's shorter side."""
    image = frame.copy()
    width, height = image.size
    side = 0.7 * min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    outline = max(1, round(side / 24))
    points = [(x0 + u * side, y0 + v * side) for u, v in NEEDLE_OBJECTS[name]]
    ImageDraw.Draw(image).polygon(points, fill=CARD_COLOUR, outline=CODE_COLOUR, width=outline)
    return image


@dataclasses.dataclass(frozen=True)
class Needle:
    """What the needle frames show: a code on a card (kind "code") or an object of `NEEDLE_OBJECTS` ("object")."""

    kind: str
    value: str

    def draw(self, frame: Image.Image) -> Image.Image:
        return draw_code(frame, self.value) if self.kind == "code" else draw_object(frame, self.value)


class NiahVideo(Sequence):
    """The frames of one example, drawn on access: the haystack's frames with the needle drawn over frames
    [needle_frame, needle_frame + TEMPORAL). A sequence of (H, W) RGB PIL images, as the processor takes a
    frame list."""

    def __init__(
        self, haystack: SyntheticHaystack | FileHaystack, *, num_frames: int, needle_frame: int, needle: Needle
    ):
        self.haystack, self.num_frames, self.needle_frame, self.needle = haystack, num_frames, needle_frame, needle

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.num_frames))]
        index = int(index)
        if index < 0:
            index += self.num_frames
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} of a {self.num_frames}-frame video")
        frame = self.haystack.frame(index)
        if self.needle_frame <= index < self.needle_frame + TEMPORAL:
            return self.needle.draw(frame)
        return frame

    def __repr__(self) -> str:
        return f"NiahVideo({self.num_frames} frames, {self.needle} at frame {self.needle_frame})"
