"""The typed unit of a benchmark: one question with its media, its reference answers and what its metric needs."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class BenchmarkExample:
    """One benchmark question, ready to prompt and to score.

    `messages` is the prompt as chat messages ending with the user turn, in the processor's format (media items
    {"type": "image", "image": PIL image | uint8 array | path} or {"type": "video", "video": frame list | path,
    "fps": ...}; paths resolved against `base_dir`). `references` are the accepted answers as the dataset gives
    them (ANLS and VQA accuracy take several; a multiple-choice question's is the letter of the right option).
    `options` are a multiple-choice question's option texts, lettered A, B, ... in order (empty otherwise).
    `meta` holds whatever else the task's metric or report reads (an OCRBench category, a grounding box in 0..1000
    coordinates, a needle's depth), JSON-serialisable: it is written to predictions.jsonl."""

    id: str
    task: str
    messages: list[dict]
    references: tuple[str, ...]
    options: tuple[str, ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    base_dir: str = ""

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"a benchmark example needs a non-empty string id, got {self.id!r}")
        if not self.messages or self.messages[-1].get("role") != "user":
            raise ValueError(f"example {self.id}: the prompt's messages must end with a user turn")
