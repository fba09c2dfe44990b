"""Per-example answer metrics: exact match, OCR character accuracy, grounding IoU >= 0.5, timestamp error."""

from __future__ import annotations

import re
from typing import Any

from qwen3vl_jax.processing.boxes import box_iou, parse_box

_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def character_accuracy(prediction: str, reference: str) -> float:
    """1 - Levenshtein distance / reference length, floored at 0."""
    a, b = normalize(prediction), normalize(reference)
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return max(0.0, 1.0 - row[-1] / max(len(b), 1))


def parse_seconds(text: str) -> float | None:
    match = _SECONDS.search(text)
    return float(match.group()) if match else None


BOX_TASKS = ("grounding", "grid_grounding", "small_object_grounding")


def box_metrics(box, truth) -> dict[str, float]:
    """iou, box_hit (IoU >= 0.5) and per-axis accuracy: x_accuracy (y_accuracy) is 1 when the predicted box's
    centre lies inside the true box horizontally (vertically). All 0 when no box parses."""
    if not box or not truth:
        return dict(iou=0.0, box_hit=0.0, x_accuracy=0.0, y_accuracy=0.0)
    iou = box_iou(box, truth)
    inside = lambda axis: float(truth[axis] <= (box[axis] + box[axis + 2]) / 2 < truth[axis + 2])  # noqa: E731
    return dict(iou=iou, box_hit=float(iou >= 0.5), x_accuracy=inside(0), y_accuracy=inside(1))


def score(task: str, prediction: str, *, reference: str, meta: dict[str, Any]) -> dict[str, float]:
    """The metrics of one answer. Every task gets exact_match; the grounding tasks add box_metrics;
    video_timestamp adds abs_error_seconds (absent when no number parses); ocr and text_reverse add
    char_accuracy."""
    metrics = {"exact_match": exact_match(prediction, reference)}
    if task in BOX_TASKS:
        truth = tuple(meta["box"]) if "box" in meta else parse_box(reference)
        metrics.update(box_metrics(parse_box(prediction), truth))
    elif task == "video_timestamp":
        seconds = parse_seconds(prediction)
        truth = parse_seconds(reference)  # the timestamp as written in the prompt, not the unrounded meta
        truth = meta.get("seconds") if truth is None else truth
        if seconds is not None and truth is not None:
            metrics["abs_error_seconds"] = abs(seconds - truth)
    elif task in ("ocr", "text_reverse"):
        metrics["char_accuracy"] = character_accuracy(prediction, reference)
    return metrics
