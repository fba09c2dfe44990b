"""The pictures of the synthetic tasks (data/synthetic.py), drawn with PIL: the palette and shapes, a canvas, square
boxes placed apart from each other by rejection sampling, and the text font.

Boxes are inclusive pixel boxes (x0, y0, x1, y1), as `ImageDraw` takes them.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated colours that differ strongly from each other and from the mid-grey background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 200, 40),
    "blue": (30, 60, 240),
    "yellow": (250, 230, 20),
    "purple": (160, 40, 200),
    "white": (255, 255, 255),
}
BACKGROUND = (110, 110, 110)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, *, box, colour) -> None:
    """Draws a filled shape inside the inclusive pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    fill = PALETTE[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def _separated(a, b, *, gap: int) -> bool:
    """True when inclusive boxes a and b have at least ``gap`` background pixels between them on some axis."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def place_boxes(rng: np.random.Generator, *, count: int, sides: tuple[int, int], image_size: int, gap: int = 2) -> list:
    """Returns `count` square inclusive boxes (x0, y0, x1, y1) with sides in [lo, hi] = `sides`, fully inside the
    image and pairwise separated by >= ``gap`` pixels, by rejection sampling (restarting with smaller sizes if
    stuck)."""
    lo, hi = sides
    for _ in range(1000):
        boxes = []
        for _ in range(100 * count):
            side = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if all(_separated(box, other, gap=gap) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes
        hi = max(lo, hi - 1)
    raise RuntimeError(f"could not place {count} shapes of size {lo}..{hi} in {image_size} px")


def side_range(image_size: int, *, lo: float, hi: float, min_px: int = 4) -> tuple[int, int]:
    """Returns the (lo, hi) shape side range in pixels for fractions lo, hi of the image size."""
    smallest = max(min_px, round(lo * image_size))
    return smallest, max(smallest, round(hi * image_size))


def canvas(image_size: int, colour=BACKGROUND) -> Image.Image:
    """A square RGB image of one colour (the background by default)."""
    return Image.new("RGB", (image_size, image_size), colour)


@functools.cache
def text_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's scalable default font at `size` px."""
    return ImageFont.load_default(size=size)
