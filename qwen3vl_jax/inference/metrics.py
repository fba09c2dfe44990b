"""Per-example answer metrics: exact match, OCR character accuracy, grounding IoU >= 0.5, timestamp error."""

from __future__ import annotations

import re
from typing import Any, Optional

from qwen3vl_jax.data.synthetic import box_iou, parse_box

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


def parse_seconds(text: str) -> Optional[float]:
    match = _SECONDS.search(text)
    return float(match.group()) if match else None


def score(task: str, prediction: str, reference: str, meta: dict[str, Any]) -> dict[str, float]:
    """The metrics of one answer. Every task gets exact_match; grounding adds iou and box_hit (IoU >= 0.5,
    0 when no box parses); video_timestamp adds abs_error_seconds (absent when no number parses); ocr adds
    char_accuracy."""
    metrics = {"exact_match": exact_match(prediction, reference)}
    if task == "grounding":
        truth = tuple(meta["box"]) if "box" in meta else parse_box(reference)
        box = parse_box(prediction)
        metrics["iou"] = box_iou(box, truth) if box and truth else 0.0
        metrics["box_hit"] = float(metrics["iou"] >= 0.5)
    elif task == "video_timestamp":
        seconds = parse_seconds(prediction)
        truth = meta.get("seconds", parse_seconds(reference))
        if seconds is not None and truth is not None:
            metrics["abs_error_seconds"] = abs(seconds - truth)
    elif task == "ocr":
        metrics["char_accuracy"] = character_accuracy(prediction, reference)
    return metrics
