"""The long-video needle in a haystack of the Qwen3-VL report (its Figure 3): a needle frame showing a short code
is put at a chosen depth of a long video, the model is asked for the code, and accuracy is reported over a grid
of video lengths x needle depths. This module builds the examples, scores the answers and writes the report; the
videos themselves (haystacks, needle drawing, lazily drawn frames) are `niah_video`'s.

    examples = niah_examples(lengths=(60, 300), depths=(0.0, 0.5, 1.0), fps=2.0, haystack=None,
                             needles_per_cell=2, seed=0, image_size=64)
    # answer each example.messages with the model, then per example:
    result["metrics"] = {"needle_found": needle_found(prediction, example)}
    write_niah_report(results, directory="runs/niah")   # niah_heatmap.png, niah.md

The haystack is the built-in synthetic clip (a new scene per example, a pure function of the example's seed) or a
user's video file sampled at `fps` and looped to the length. `lengths` are in seconds (the paper's axis); a video
of `length` seconds has length * fps frames, which must be a whole even number: Qwen3-VL merges frames in temporal
pairs (`temporal_patch_size` 2), and each pair gets one `<t seconds>` text.

The needle (`needle="code"`, the default) is a white card with a 4-character code (letters and digits, at least
one letter, so no number or timestamp the model repeats can match it), asked for as free text; or
(`needle="object"`) a large object of a class the synthetic haystack never draws (a star, a cross, an arrow, a
diamond), asked as a multiple-choice question over those four classes and scored by the option letter
(`multiple_choice.choice_accuracy`). Either is drawn over *both* frames of one temporal pair. Depth d puts it on
pair round(d * (pairs - 1)): d = 0 is the first pair, d = 1 the last. An example's `meta` reports the needle's
first frame (`needle_frame`, even) and `needle_seconds`, the timestamp of its pair as the processor computes it
(`processing.video.group_timestamps`: the mean time of the pair's two frames); the model reads it as
`<{needle_seconds:.1f} seconds>`. That holds when the processor keeps every frame: its fps at least the examples'
fps and its max_frames at least their frame count (`check_processor_keeps_every_frame`; Qwen3-VL's released
processor samples 2 fps, at most 768 frames).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3vl_jax.evaluation.examples import BenchmarkExample
from qwen3vl_jax.evaluation.multiple_choice import choice_accuracy
from qwen3vl_jax.evaluation.niah_video import (
    NEEDLE_OBJECTS,
    TEMPORAL,
    Needle,
    NiahVideo,
    SyntheticHaystack,
    load_file_haystack,
)
from qwen3vl_jax.processing.processor import VisionProcessingConfig
from qwen3vl_jax.processing.video import group_timestamps, sample_indices

TASK = "video_niah"
NEEDLES = ("code", "object")
QUESTION = "What is the code written on the card that appears in the video? Answer with the code only."
OBJECT_QUESTION = "Which object appears briefly in the video?"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CODE_LENGTH = 4
# Letters and digits that the default font does not confuse (no 0/O, 1/I/L, 2/Z, 5/S, 8/B, 6/G).
CODE_LETTERS = "ACEFHKMNPRTUVWXY"
CODE_DIGITS = "3479"
MIN_IMAGE_SIZE = 32


# ------------------------------------------------------------------------------------------------ examples


def random_code(rng: np.random.Generator) -> str:
    """`CODE_LENGTH` characters of letters and digits, at least one of them a letter."""
    alphabet = CODE_LETTERS + CODE_DIGITS
    letter = int(rng.integers(CODE_LENGTH))
    pools = [CODE_LETTERS if i == letter else alphabet for i in range(CODE_LENGTH)]
    return "".join(pool[int(rng.integers(len(pool)))] for pool in pools)


def video_frames(length: float, *, fps: float) -> int:
    """The frame count of a `length`-second video at `fps`: a whole, even number of at least two temporal pairs,
    else ValueError naming the length."""
    frames = length * fps
    count = round(frames)
    if not math.isclose(frames, count, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"length {length} s at {fps} fps is {frames:g} frames, not a whole number")
    if count % TEMPORAL:
        raise ValueError(
            f"length {length} s at {fps} fps gives {count} frames, an odd count: frames are merged in temporal "
            f"pairs, so the count must be even"
        )
    if count < 2 * TEMPORAL:
        raise ValueError(f"length {length} s at {fps} fps gives {count} frames, shorter than 2 temporal pairs")
    return count


def needle_pair(depth: float, *, num_frames: int) -> int:
    """The temporal pair that holds the needle at `depth` in [0, 1]: round(depth * (pairs - 1)), halves up."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    return math.floor(depth * (num_frames // TEMPORAL - 1) + 0.5)


def niah_examples(
    *,
    lengths: Sequence[float],
    depths: Sequence[float],
    fps: float,
    haystack: str | None,
    needles_per_cell: int,
    seed: int,
    image_size: int,
    needle: str = "code",
) -> list[BenchmarkExample]:
    """len(lengths) x len(depths) x needles_per_cell examples of task "video_niah", lengths in seconds (frames =
    length * fps, a whole even number >= 4), depths in [0, 1], frames sampled at `fps`. `haystack`: None for the
    built-in synthetic clip (square frames of `image_size` px, a new scene per example), else a video file
    looped to each length (frames resized to a longer side of `image_size`). `needle`: "code" (free-text answer,
    references = (the code,)) or "object" (multiple choice, references = (the right option's letter,)). Each
    example's needle and scene are a pure function of (seed, length, depth, needle index). Raises ValueError
    naming the bad item."""
    _check_grid(lengths=lengths, depths=depths, fps=fps, needles_per_cell=needles_per_cell, seed=seed)
    if needle not in NEEDLES:
        raise ValueError(f"needle must be one of {NEEDLES}, got {needle!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px for the needle to be legible, got {image_size}")
    frame_counts = [video_frames(length, fps=fps) for length in lengths]
    file_haystack = None if haystack is None else load_file_haystack(haystack, fps=fps, image_size=image_size)
    examples = []
    for length, num_frames in zip(lengths, frame_counts):
        timestamps = group_timestamps(range(num_frames), native_fps=fps, temporal=TEMPORAL)
        for depth in depths:
            pair = needle_pair(depth, num_frames=num_frames)
            for index in range(needles_per_cell):
                rng = np.random.default_rng([seed, num_frames, round(depth * 1_000_000), index, NEEDLES.index(needle)])
                question, answer, options, shown = _needle_question(needle, rng=rng)
                scene = file_haystack or SyntheticHaystack(int(rng.integers(2**31)), image_size)
                video = NiahVideo(scene, num_frames=num_frames, needle_frame=TEMPORAL * pair, needle=shown)
                content = [{"type": "video", "video": video, "fps": fps}, {"type": "text", "text": question}]
                meta = dict(
                    length=_plain_number(length),
                    depth=float(depth),
                    needle_frame=TEMPORAL * pair,
                    needle_seconds=float(timestamps[pair]),
                    num_frames=num_frames,
                    needle=needle,
                    needle_value=shown.value,
                    haystack=haystack or "synthetic",
                )
                examples.append(
                    BenchmarkExample(
                        id=f"{TASK}/{needle}/{length:g}s/depth{depth:g}/{index}",
                        task=TASK,
                        messages=[{"role": "user", "content": content}],
                        references=(answer,),
                        options=options,
                        meta=meta,
                    )
                )
    if len({example.id for example in examples}) != len(examples):
        raise ValueError(f"lengths {list(lengths)} or depths {list(depths)} differ too little to name their cells")
    return examples


def _needle_question(kind: str, *, rng: np.random.Generator) -> tuple[str, str, tuple[str, ...], Needle]:
    """(question, reference answer, option texts, the needle drawn) of one example."""
    if kind == "code":
        code = random_code(rng)
        return QUESTION, code, (), Needle("code", code)
    names = list(NEEDLE_OBJECTS)
    options = tuple(names[int(i)] for i in rng.permutation(len(names)))
    right = int(rng.integers(len(options)))
    letters = [chr(ord("A") + i) for i in range(len(options))]
    lines = [OBJECT_QUESTION, *(f"{letter}. {option}" for letter, option in zip(letters, options)), CHOICE_INSTRUCTION]
    return "\n".join(lines), letters[right], options, Needle("object", options[right])


def _plain_number(value: float) -> int | float:
    """A JSON-ready int or float (flags may give numpy numbers)."""
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def _check_grid(*, lengths, depths, fps, needles_per_cell, seed) -> None:
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    for name, values in (("lengths", lengths), ("depths", depths)):
        if not len(values):
            raise ValueError(f"{name} must not be empty")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} must be distinct, got {list(values)}")
    for length in lengths:
        if length <= 0:
            raise ValueError(f"length {length} s must be > 0")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is outside [0, 1]")
    if needles_per_cell < 1:
        raise ValueError(f"needles_per_cell must be >= 1, got {needles_per_cell}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def check_processor_keeps_every_frame(config: VisionProcessingConfig, *, fps: float, num_frames: int) -> None:
    """Raises ValueError when the processor would resample a `num_frames` video recorded at `fps` (its own fps
    lower, or max_frames smaller): the needle would share a temporal pair with haystack frames, or be dropped,
    and `needle_seconds` would not be the time the model reads."""
    sampling = dict(fps=config.fps, min_frames=config.min_frames, max_frames=config.max_frames)
    kept = sample_indices(num_frames, native_fps=fps, **sampling)
    if not np.array_equal(kept, np.arange(num_frames)):
        raise ValueError(
            f"the processor (fps {config.fps}, max_frames {config.max_frames}) keeps {len(kept)} of a "
            f"{num_frames}-frame video at {fps} fps: the needle-in-a-haystack needs every frame (processor fps >= "
            f"{fps} and max_frames >= {num_frames})"
        )


# ------------------------------------------------------------------------------------------------ scoring


def needle_found(prediction: str, example: BenchmarkExample) -> float:
    """1.0 when the prediction finds the needle, else 0.0. A code needle: the prediction contains the code as a
    word of its own (case-insensitive; whitespace between the code's characters and around it ignored). An
    object needle: the option letter the prediction picks is the right one (`choice_accuracy`)."""
    (code,) = example.references
    if example.options:
        return choice_accuracy(prediction, options=example.options, answer=code)
    text = " ".join(prediction.lower().split())
    pattern = r"(?<![a-z0-9])" + r"\s?".join(re.escape(c) for c in code.lower()) + r"(?![a-z0-9])"
    return float(re.search(pattern, text) is not None)


# ------------------------------------------------------------------------------------------------ the report


def summarize_grid(results: Sequence[dict]) -> dict[str, Any]:
    """Mean needle_found per (length, depth) cell of the harness's per-example results (those of task
    "video_niah"; an example reported with an `error` counts as not found). Returns JSON-ready
    {"lengths": sorted lengths (s), "depths": sorted depths, "accuracy": [depth][length] mean or None (no
    example), "examples": [depth][length] count, "overall": mean over all examples, "total": count}."""
    cells: dict[tuple[float, float], list[float]] = {}
    for result in results:
        if result.get("task", TASK) != TASK:
            continue
        meta = result.get("meta") or {}
        if "length" not in meta or "depth" not in meta:
            raise ValueError(f"result {result.get('id')!r} has no meta length/depth to place it in the grid")
        metrics = result.get("metrics") or {}
        if "needle_found" in metrics:
            found = float(metrics["needle_found"])
        elif "error" in result:
            found = 0.0
        else:
            raise ValueError(f"result {result.get('id')!r} has neither a needle_found metric nor an error")
        cells.setdefault((meta["length"], meta["depth"]), []).append(found)
    if not cells:
        raise ValueError(f"no {TASK} results to summarise")
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    accuracy = [
        [float(np.mean(cells[length, depth])) if (length, depth) in cells else None for length in lengths]
        for depth in depths
    ]
    counts = [[len(cells.get((length, depth), [])) for length in lengths] for depth in depths]
    total = sum(map(sum, counts))
    return dict(
        lengths=lengths,
        depths=depths,
        accuracy=accuracy,
        examples=counts,
        overall=float(sum(map(sum, cells.values())) / total),
        total=total,
    )


def format_length(seconds: float) -> str:
    """'45 s', '2.5 min', '1.5 h'."""
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def write_niah_report(results: Sequence[dict], *, directory: str) -> None:
    """niah_heatmap.png (accuracy per cell, depth down the y axis from 0 at the top, length along x, as the
    Qwen3-VL report's Figure 3) and niah.md (the same grid as a markdown table) in `directory`."""
    grid = summarize_grid(results)
    os.makedirs(directory, exist_ok=True)
    _plot_heatmap(grid, path=os.path.join(directory, "niah_heatmap.png"))
    with open(os.path.join(directory, "niah.md"), "w") as f:
        f.write(niah_table(grid))


def niah_table(grid: dict[str, Any]) -> str:
    """The markdown of `summarize_grid`'s grid: one row per depth, one column per length; a cell is the
    fraction of its needles found and, in brackets, its number of examples (a dash when it has none)."""
    lengths, depths = grid["lengths"], grid["depths"]
    lines = [
        "# Video needle in a haystack",
        "",
        f"Needles found in {100 * grid['overall']:.1f}% of {grid['total']} examples. Rows: the needle's depth in the "
        "video (0 = first frames, 1 = last); columns: the video's length.",
        "",
        "| depth \\ length | " + " | ".join(format_length(length) for length in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for depth, accuracies, counts in zip(depths, grid["accuracy"], grid["examples"]):
        cells = ["–" if a is None else f"{a:.3f} ({n})" for a, n in zip(accuracies, counts)]
        lines.append(f"| {depth:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_heatmap(grid: dict[str, Any], *, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = grid["lengths"], grid["depths"]
    values = np.array([[np.nan if a is None else a for a in row] for row in grid["accuracy"]], float)
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 + 0.8 * len(lengths)), max(3.0, 1.5 + 0.4 * len(depths))))
    colours = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=0.0, vmax=1.0, aspect="auto")
    for row, col in np.ndindex(values.shape):
        if not np.isnan(values[row, col]):
            ax.text(col, row, f"{100 * values[row, col]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [format_length(length) for length in lengths], rotation=45, ha="right")
    ax.set_yticks(range(len(depths)), [f"{100 * depth:.0f}%" for depth in depths])
    ax.set_xlabel("video length")
    ax.set_ylabel("needle depth")
    ax.set_title(f"Video needle in a haystack: {100 * grid['overall']:.1f}% found", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
