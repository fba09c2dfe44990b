"""Built-in synthetic vision-language tasks, generated on the fly with PIL/numpy.

Every example is a *record*: a plain picklable dict describing one single-turn conversation in Qwen chat format,

    {"id": "shapes/17", "task": "shapes",
     "messages": [{"role": "user", "content": [{"type": "image", "image": <PIL RGB>}, {"type": "text", "text": ...}]},
                  {"role": "assistant", "content": "red"}],
     "answer": "red", "meta": {...}}

and is a pure function of (task, index, seed, image_size, num_frames): the same inputs give a pixel-identical record.

Tasks (all images are ``image_size`` x ``image_size`` RGB):

- ``shapes``: one circle/square/triangle of one palette colour; asks its colour or its kind.
  meta ``{"colour", "shape"}``.
- ``counting``: 1..5 shapes of one kind and colour, pairwise separated by >= 2 background pixels (so connected
  components are countable); asks how many. meta ``{"count", "shape", "colour"}``.
- ``grounding``: a target shape plus 1..3 distractors, each differing from the target in colour or kind (or both;
  a distractor may share the target's colour). All shapes are separated by >= 2 background pixels, so the target's
  box contains no distractor pixels. The answer is the target's tight pixel box ``[left, top, right, bottom)``
  normalised to 0..1000, Qwen style ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``. meta ``{"box", "colour", "shape"}``.
- ``ocr``: a random 3..8 character string of [A-Z0-9] in black on a light grey background, rendered with Pillow's
  scalable default font; asks what the text says. meta ``{"text"}``.
- ``video_timestamp``: ``num_frames`` frames (or, for a tuple, a count drawn from it per example) at 2 fps of a
  square that is blue in frames [0, 2k) and red in
  [2k, num_frames). The model sees frames merged in pairs, each pair (i0, i1) preceded by ``<t seconds>`` with
  t = (i0 + i1) / 2 / fps, so the answer is the timestamp of pair k, ``f"{t:.1f} seconds"``.
  meta ``{"seconds", "frame", "num_frames"}`` (``frame`` = 2k, the first red frame).

Probe tasks for the ablations (``PROBE_TASKS``; their images ignore ``image_size``):

- ``grid_grounding``: a G x G grid of identical grey cells of 32 px (one visual token each: 16 px patches merged
  2 x 2), one of them filled with a palette colour; asks where it is; the answer is the cell's box (0..1000).
  G is drawn from ``grid_sizes``, so larger grids than in training test extrapolation. meta ``{"box", "row",
  "col", "grid", "colour"}``.
- ``small_object_grounding``: the same grid with 8 px squares: the target in its cell plus 1..3 distractors of
  other colours in other cells (a fine-grained task); the answer is the target's cell box. Same meta, plus
  ``marks``: [row, col, colour] of every square (the target first).
- ``small_object_counting``: images drawn like ``small_object_grounding``'s (2..4 squares); asks how many squares
  there are, a coarse question that needs no square's place or colour. Same meta; the answer is the count.
- ``colour_preference``: a preference pair (data.features): a ``shapes`` image asked its shape's colour; the
  record has the user turn as ``messages`` and ``chosen`` (the colour) / ``rejected`` (another palette colour)
  answers. meta ``{"colour", "shape", "rejected"}``.
- ``small_object_presence``: the same images; asks whether there is a small square of a colour, present or absent
  with equal odds; the answer is "yes" or "no" (a coarse question: which colours, not where). Same meta, plus
  ``asked`` (the colour in the question).
- ``text_reverse``: text only; reverse a string of 8..20 letters. meta ``{"text"}``.
"""

from __future__ import annotations

import string

import numpy as np
from PIL import Image, ImageDraw

from qwen3vl_jax.data.drawing import PALETTE, SHAPES, canvas, draw_shape, place_boxes, side_range, text_font
from qwen3vl_jax.processing.boxes import format_box

TASKS: tuple[str, ...] = ("shapes", "counting", "grounding", "ocr", "video_timestamp")
PROBE_TASKS: tuple[str, ...] = (
    "grid_grounding",
    "small_object_grounding",
    "text_reverse",
    "small_object_counting",
    "small_object_presence",
    "colour_preference",
)
ALL_TASKS = TASKS + PROBE_TASKS
CELL_PX = 32  # one LLM visual token: a 16 px patch merged 2 x 2
SMALL_MARK_PX = 8
VIDEO_FPS = 2.0
EVAL_SEED = 1_000_003  # held-out examples: drawn with another seed than training's (0, 1, 2, ...)
OCR_ALPHABET = string.ascii_uppercase + string.digits

_COLOURS = tuple(PALETTE)

_COLOUR_QUESTIONS = (
    "What colour is the shape?",
    "What is the colour of the shape?",
    "Which colour does the shape have?",
)
_SHAPE_QUESTIONS = ("What shape is shown?", "What kind of shape is in the image?", "Which shape is this?")
_COUNT_QUESTIONS = (
    "How many {shape}s are there?",
    "How many {colour} {shape}s are in the image?",
    "Count the {shape}s in the image.",
)
_GROUND_QUESTIONS = (
    "Where is the {colour} {shape}?",
    "Locate the {colour} {shape}.",
    "Give the bounding box of the {colour} {shape}.",
)
_OCR_QUESTIONS = ("What does the text say?", "Read the text in the image.", "What is written in the image?")
_VIDEO_QUESTIONS = ("When does the square turn red?", "At what time does the square change from blue to red?")
_CELL_QUESTIONS = ("Where is the {colour} cell?", "Locate the {colour} cell.")
_MARK_QUESTIONS = ("Where is the small {colour} square?", "Locate the small {colour} square.")
_MARK_COUNT_QUESTIONS = ("How many small squares are there?", "Count the small squares.")
_MARK_PRESENCE_QUESTIONS = ("Is there a small {colour} square?", "Does the grid hold a small {colour} square?")
_REVERSE_QUESTIONS = ("Reverse the letters: {text}", "Write backwards: {text}")


def _check_task(task: str) -> None:
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {ALL_TASKS}")


def _choice(rng: np.random.Generator, options):
    """Returns one element of ``options`` chosen uniformly."""
    return options[int(rng.integers(len(options)))]


def _image_message(image: Image.Image, *, question: str, answer: str) -> list:
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]


def _one_shape(rng, image_size) -> tuple[Image.Image, str, str]:
    """An image of one shape of a palette colour: (image, colour, shape)."""
    colour, shape = _choice(rng, _COLOURS), _choice(rng, SHAPES)
    (box,) = place_boxes(rng, count=1, sides=side_range(image_size, lo=0.25, hi=0.6), image_size=image_size)
    image = canvas(image_size)
    draw_shape(ImageDraw.Draw(image), shape, box=box, colour=colour)
    return image, colour, shape


def _shapes(rng, image_size):
    image, colour, shape = _one_shape(rng, image_size)
    if rng.integers(2):
        question, answer = _choice(rng, _COLOUR_QUESTIONS), colour
    else:
        question, answer = _choice(rng, _SHAPE_QUESTIONS), shape
    return _image_message(image, question=question, answer=answer), answer, {"colour": colour, "shape": shape}


def _counting(rng, image_size):
    colour, shape = _choice(rng, _COLOURS), _choice(rng, SHAPES)
    count = int(rng.integers(1, 6))
    image = canvas(image_size)
    draw = ImageDraw.Draw(image)
    sides = side_range(image_size, lo=0.1, hi=0.22, min_px=5)
    for box in place_boxes(rng, count=count, sides=sides, image_size=image_size):
        draw_shape(draw, shape, box=box, colour=colour)
    question = _choice(rng, _COUNT_QUESTIONS).format(shape=shape, colour=colour)
    answer = str(count)
    meta = {"count": count, "shape": shape, "colour": colour}
    return _image_message(image, question=question, answer=answer), answer, meta


def _grounding(rng, image_size):
    colour, shape = _choice(rng, _COLOURS), _choice(rng, SHAPES)
    others = [(c, s) for c in _COLOURS for s in SHAPES if (c, s) != (colour, shape)]
    picks = rng.choice(len(others), size=int(rng.integers(1, 4)), replace=False)
    distractors = [others[int(j)] for j in picks]
    sides = side_range(image_size, lo=0.15, hi=0.3, min_px=5)
    boxes = place_boxes(rng, count=1 + len(distractors), sides=sides, image_size=image_size)
    image = canvas(image_size)
    draw = ImageDraw.Draw(image)
    draw_shape(draw, shape, box=boxes[0], colour=colour)
    # Tight box of the target's drawn pixels, read back before distractors (which may share its colour) are drawn.
    ys, xs = np.nonzero(np.all(np.asarray(image) == PALETTE[colour], axis=-1))
    pixel_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # [left, top, right, bottom)
    box = [round(1000 * v / image_size) for v in pixel_box]
    for (other_colour, other_shape), other_box in zip(distractors, boxes[1:]):
        draw_shape(draw, other_shape, box=other_box, colour=other_colour)
    question = _choice(rng, _GROUND_QUESTIONS).format(shape=shape, colour=colour)
    answer = format_box(box)
    meta = {"box": box, "colour": colour, "shape": shape}
    return _image_message(image, question=question, answer=answer), answer, meta


def _grid_grounding(rng, grid_sizes, *, small: bool, count: bool = False):
    grid = int(_choice(rng, grid_sizes))
    row, col = (int(v) for v in rng.integers(grid, size=2))
    colour = _choice(rng, _COLOURS)
    image = canvas(grid * CELL_PX)
    draw = ImageDraw.Draw(image)
    box = [round(1000 * v / grid) for v in (col, row, col + 1, row + 1)]
    meta = {"box": box, "row": row, "col": col, "grid": grid, "colour": colour}
    if small:
        others = [c for c in _COLOURS if c != colour]
        empty = [i for i in range(grid * grid) if i != row * grid + col]
        distractors = rng.choice(empty, size=min(int(rng.integers(1, 4)), len(empty)), replace=False)
        cells = [(row, col)] + [divmod(int(i), grid) for i in distractors]
        meta["marks"] = []
        for k, (cell_row, cell_col) in enumerate(cells):
            x, y = (int(v) for v in rng.integers(0, CELL_PX - SMALL_MARK_PX + 1, size=2))
            x0, y0 = cell_col * CELL_PX + x, cell_row * CELL_PX + y
            fill = colour if k == 0 else _choice(rng, others)
            draw_shape(draw, "square", box=(x0, y0, x0 + SMALL_MARK_PX - 1, y0 + SMALL_MARK_PX - 1), colour=fill)
            meta["marks"].append([cell_row, cell_col, fill])
        question = _choice(rng, _MARK_COUNT_QUESTIONS if count else _MARK_QUESTIONS)
    else:
        x0, y0 = col * CELL_PX, row * CELL_PX
        draw_shape(draw, "square", box=(x0, y0, x0 + CELL_PX - 1, y0 + CELL_PX - 1), colour=colour)
        question = _choice(rng, _CELL_QUESTIONS)
    answer = str(len(meta["marks"])) if count else format_box(box)
    message = _image_message(image, question=question.format(colour=colour), answer=answer)
    return message, answer, meta


def _small_object_presence(rng, grid_sizes):
    (image_item, _), _, meta = _grid_grounding(rng, grid_sizes, small=True)
    image = image_item["content"][0]["image"]
    present = sorted({colour for _, _, colour in meta["marks"]})
    absent = [c for c in _COLOURS if c not in present]
    asked = _choice(rng, present) if rng.random() < 0.5 or not absent else _choice(rng, absent)
    answer = "yes" if asked in present else "no"
    question = _choice(rng, _MARK_PRESENCE_QUESTIONS).format(colour=asked)
    return _image_message(image, question=question, answer=answer), answer, {**meta, "asked": asked}


def _text_reverse(rng):
    text = "".join(_choice(rng, string.ascii_uppercase) for _ in range(int(rng.integers(8, 21))))
    question = _choice(rng, _REVERSE_QUESTIONS).format(text=text)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": question}]},
        {"role": "assistant", "content": text[::-1]},
    ]
    return messages, text[::-1], {"text": text}


def _ocr(rng, image_size):
    text = "".join(_choice(rng, OCR_ALPHABET) for _ in range(int(rng.integers(3, 9))))
    room = image_size - 4  # keep a 2 px margin on each side
    size = max(4, round(0.4 * image_size))
    while True:
        font = text_font(size)
        left, top, right, bottom = font.getbbox(text)
        if (right - left <= room and bottom - top <= room) or size <= 4:
            break
        size = max(4, min(size - 1, int(size * room / (right - left))))
    grey = int(rng.integers(215, 256))
    image = canvas(image_size, (grey, grey, grey))
    x = int(rng.integers(2, max(2, image_size - 2 - (right - left)) + 1)) - left
    y = int(rng.integers(2, max(2, image_size - 2 - (bottom - top)) + 1)) - top
    ImageDraw.Draw(image).text((x, y), text, fill=(0, 0, 0), font=font)
    return _image_message(image, question=_choice(rng, _OCR_QUESTIONS), answer=text), text, {"text": text}


def _video_timestamp(rng, *, image_size, num_frames):
    choices = num_frames if isinstance(num_frames, tuple) else (num_frames,)
    if not choices or any(n < 4 or n % 2 for n in choices):
        raise ValueError(f"video_timestamp needs even frame counts >= 4, got num_frames={num_frames}")
    if isinstance(num_frames, tuple):  # mixed lengths: this example's count (an int keeps its records unchanged)
        num_frames = int(_choice(rng, num_frames))
    k = int(rng.integers(1, num_frames // 2))
    (box,) = place_boxes(rng, count=1, sides=side_range(image_size, lo=0.2, hi=0.5), image_size=image_size)
    frames = {}
    for colour in ("blue", "red"):
        frames[colour] = canvas(image_size)
        draw_shape(ImageDraw.Draw(frames[colour]), "square", box=box, colour=colour)
    video = [frames["blue" if i < 2 * k else "red"].copy() for i in range(num_frames)]
    seconds = (2 * k + 2 * k + 1) / 2 / VIDEO_FPS
    answer = f"{seconds:.1f} seconds"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": video, "fps": VIDEO_FPS},
                {"type": "text", "text": _choice(rng, _VIDEO_QUESTIONS)},
            ],
        },
        {"role": "assistant", "content": answer},
    ]
    return messages, answer, {"seconds": seconds, "frame": 2 * k, "num_frames": num_frames}


def make_record(
    task: str,
    index: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_frames: int | tuple[int, ...] = 8,
    grid_sizes: tuple[int, ...] = (8,),
) -> dict:
    """Returns example ``index`` of ``task`` as a record dict (see module docstring); deterministic in all arguments."""
    _check_task(task)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if not grid_sizes or min(grid_sizes) < 2:
        raise ValueError(f"grid_sizes must be sizes >= 2, got {grid_sizes}")
    rng = np.random.default_rng([seed, ALL_TASKS.index(task), index])
    if task in ("grid_grounding", "small_object_grounding", "small_object_counting"):
        small, count = task != "grid_grounding", task == "small_object_counting"
        messages, answer, meta = _grid_grounding(rng, grid_sizes, small=small, count=count)
    elif task == "colour_preference":
        image, colour, shape = _one_shape(rng, image_size)
        (user, _) = _image_message(image, question=_choice(rng, _COLOUR_QUESTIONS), answer=colour)
        rejected = _choice(rng, [c for c in _COLOURS if c != colour])
        meta = {"colour": colour, "shape": shape, "rejected": rejected}
        record = {"id": f"{task}/{index}", "task": task, "messages": [user], "answer": colour, "meta": meta}
        return {**record, "chosen": colour, "rejected": rejected}
    elif task == "small_object_presence":
        messages, answer, meta = _small_object_presence(rng, grid_sizes)
    elif task == "text_reverse":
        messages, answer, meta = _text_reverse(rng)
    elif task == "video_timestamp":
        frames = num_frames if isinstance(num_frames, int) else tuple(num_frames)
        messages, answer, meta = _video_timestamp(rng, image_size=image_size, num_frames=frames)
    else:
        messages, answer, meta = {"shapes": _shapes, "counting": _counting, "grounding": _grounding, "ocr": _ocr}[task](
            rng, image_size
        )
    return {"id": f"{task}/{index}", "task": task, "messages": messages, "answer": answer, "meta": meta}


class SyntheticSource:
    """A grain-compatible random-access source of synthetic records: ``len()`` and ``__getitem__(i) -> record``.

    Record i is example ``i // len(tasks)`` of task ``tasks[i % len(tasks)]``."""

    def __init__(
        self,
        tasks=TASKS,
        size: int = 100_000,
        seed: int = 0,
        image_size: int = 64,
        num_frames: int | tuple[int, ...] = 8,
        grid_sizes: tuple[int, ...] = (8,),
    ):
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if not tasks:
            raise ValueError("tasks must not be empty")
        for task in tasks:
            _check_task(task)
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        self.tasks, self.size, self.seed = tasks, int(size), int(seed)
        self.image_size = int(image_size)
        self.num_frames = int(num_frames) if isinstance(num_frames, int) else tuple(int(n) for n in num_frames)
        self.grid_sizes = tuple(int(g) for g in grid_sizes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        """Returns record i; raises IndexError outside [0, len)."""
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self!r}")
        n = len(self.tasks)
        return make_record(
            self.tasks[i % n],
            i // n,
            seed=self.seed,
            image_size=self.image_size,
            num_frames=self.num_frames,
            grid_sizes=self.grid_sizes,
        )

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(tasks={self.tasks}, size={self.size}, seed={self.seed}, "
            f"image_size={self.image_size}, num_frames={self.num_frames}, grid_sizes={self.grid_sizes})"
        )
