"""Grounding boxes in Qwen's text form ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (coordinates normalised to
0..1000), written by the grounding tasks and read back by the eval metrics."""

from __future__ import annotations

import re

_BOX = re.compile(r"<\|box_start\|>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*<\|box_end\|>")


def format_box(box) -> str:
    """Returns the Qwen grounding string ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` for a 0..1000 box."""
    x1, y1, x2, y2 = box
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    """Returns (x1, y1, x2, y2) from the first ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in text, else None."""
    match = _BOX.search(text)
    return None if match is None else tuple(int(v) for v in match.groups())


def box_iou(a, b) -> float:
    """Returns the intersection-over-union of boxes (x1, y1, x2, y2); 0.0 when disjoint or both have zero area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = _area(a) + _area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
