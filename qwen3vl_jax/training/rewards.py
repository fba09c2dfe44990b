"""Verifiable rewards for reinforcement learning: functions that score a sampled completion against a record's
reference answer, and their weighted combination.

A reward function is `fn(completion, reference, meta) -> float`: `completion` the decoded text, `reference` the
record's `answer`, `meta` the record's other fields (e.g. a grounding task's true box). Built in (`REWARDS`):

    exact      1 when the answer equals the reference (whitespace normalised; case_sensitive=False to ignore case)
    numeric    1 when the answer's first number is within abs_tolerance + rel_tolerance * |reference| of the
               reference's ("1,234", "12.5%", "-3" parse; no number: 0)
    choice     1 when the multiple-choice letter the answer gives ("B", "(B)", "B.", "answer: B", "B) text") is the
               reference's letter
    box_iou    the IoU of the answer's first `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` box (0..1000) with the
               reference's (or meta["box"]); with `threshold`: 1 when IoU >= threshold; no or malformed box: 0
    timestamp  1 - |seconds error| / scale, floored at 0 (with `tolerance`: 1 when the error is within it)
    format     1 when the completion matches `pattern` (default: a `<think>...</think>` block, then an answer)

Every function but `format` scores the answer: the text after the last `</think>`, if there is one. A user's
own function is named by its dotted path ("my_package.rewards.length_penalty"). `Rewards` combines several with
weights; a function that raises on one completion gives that completion 0 for it, and the failure is logged and
counted (`RewardScores.failures`), never a crash mid-run.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qwen3vl_jax.processing.boxes import box_iou, parse_box

log = logging.getLogger(__name__)

RewardFunction = Callable[..., float]  # (completion, reference, meta, **options) -> float

_THINK_END = "</think>"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
# a multiple-choice answer, most explicit first: "the answer is B" / "Answer: (B)"; "(B)" anywhere; the answer
# opening with its letter ("B", "B.", "B) red", "B: red"); a lone lower-case letter ("b")
_CHOICE = (
    re.compile(r"(?i:answer)\s*(?:is\s*)?[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])"),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"^([A-Z])(?:[.):]|$)"),
    re.compile(r"^([a-z])[.)]?$"),
)
_THINK_THEN_ANSWER = r"^\s*<think>.*?</think>\s*\S"


def answer_text(completion: str) -> str:
    """The answer part of a completion: the text after the last `</think>` (the whole text without one)."""
    return completion.rsplit(_THINK_END, 1)[-1].strip()


def _normalise(text: str, *, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def exact(completion: str, reference: str, meta: Mapping[str, Any], *, case_sensitive: bool = True) -> float:
    return float(
        _normalise(answer_text(completion), case_sensitive=case_sensitive)
        == _normalise(reference, case_sensitive=case_sensitive)
    )


def first_number(text: str) -> float | None:
    """The first number written in `text` ("1,234" -> 1234, "12.5%" -> 12.5), None when there is none."""
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def numeric(
    completion: str,
    reference: str,
    meta: Mapping[str, Any],
    *,
    abs_tolerance: float = 1e-6,
    rel_tolerance: float = 0.0,
) -> float:
    value, truth = first_number(answer_text(completion)), first_number(str(reference))
    if truth is None:
        raise ValueError(f"numeric reward: the reference {reference!r} holds no number")
    if value is None:
        return 0.0
    return float(abs(value - truth) <= abs_tolerance + rel_tolerance * abs(truth))


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter an answer gives ("B", "(B)", "B.", "B) ...", "the answer is B"), upper case."""
    text = text.strip()
    for pattern in _CHOICE:
        match = pattern.search(text)
        if match is not None:
            return match.group(1).upper()
    return None


def choice(completion: str, reference: str, meta: Mapping[str, Any]) -> float:
    truth = choice_letter(str(reference))
    if truth is None:
        raise ValueError(f"choice reward: the reference {reference!r} gives no option letter")
    return float(choice_letter(answer_text(completion)) == truth)


def grounding_iou(completion: str, reference: str, meta: Mapping[str, Any], *, threshold: float | None = None) -> float:
    truth = tuple(meta["box"]) if meta.get("box") is not None else parse_box(str(reference))
    if truth is None:
        raise ValueError(f"box_iou reward: neither the reference {reference!r} nor meta['box'] holds a box")
    predicted = parse_box(answer_text(completion))
    iou = 0.0 if predicted is None else box_iou(predicted, truth)
    return iou if threshold is None else float(iou >= threshold)


def timestamp(
    completion: str,
    reference: str,
    meta: Mapping[str, Any],
    *,
    scale: float = 1.0,
    tolerance: float | None = None,
) -> float:
    truth = first_number(str(reference))
    truth = meta.get("seconds") if truth is None else truth
    if truth is None:
        raise ValueError(f"timestamp reward: the reference {reference!r} holds no time")
    seconds = first_number(answer_text(completion))
    if seconds is None:
        return 0.0
    error = abs(seconds - float(truth))
    if tolerance is not None:
        return float(error <= tolerance)
    return max(0.0, 1.0 - error / scale)


def format_reward(
    completion: str, reference: str, meta: Mapping[str, Any], *, pattern: str = _THINK_THEN_ANSWER
) -> float:
    return float(re.search(pattern, completion, flags=re.DOTALL) is not None)


REWARDS: dict[str, RewardFunction] = dict(
    exact=exact, numeric=numeric, choice=choice, box_iou=grounding_iou, timestamp=timestamp, format=format_reward
)


def reward_function(name: str) -> RewardFunction:
    """A built-in reward (REWARDS) by name, or a user's function by its dotted path ("package.module.function")."""
    if name in REWARDS:
        return REWARDS[name]
    module, _, attribute = name.rpartition(".")
    if not module:
        raise ValueError(f"reward {name!r} is neither a built-in one {sorted(REWARDS)} nor a dotted path to a function")
    try:
        function = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {name!r}: cannot import it ({error})") from None
    if not callable(function):
        raise ValueError(f"reward {name!r} is not a function")
    return function


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward of a combination: a function (REWARDS name or dotted path), its weight and its options."""

    name: str
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | str) -> RewardSpec:
        """From "exact" or {"name": "box_iou", "weight": 2.0, "threshold": 0.5} (the rest are options)."""
        if isinstance(values, str):
            return cls(values)
        values = dict(values)
        if "name" not in values:
            raise ValueError(f"a reward spec needs a 'name': {values}")
        return cls(values.pop("name"), float(values.pop("weight", 1.0)), values)


@dataclasses.dataclass(frozen=True)
class RewardScores:
    """The scores of N completions: `total` (N,) the weighted sum, `per_reward` {name: (N,)} each function's own
    score (0 where it raised), `failures` {name: number of completions it raised on}."""

    total: np.ndarray
    per_reward: dict[str, np.ndarray]
    failures: dict[str, int]


class Rewards:
    """A weighted combination of reward functions (RewardSpec), each resolved once."""

    def __init__(self, specs: Sequence[RewardSpec | Mapping[str, Any] | str]):
        self.specs = [spec if isinstance(spec, RewardSpec) else RewardSpec.from_dict(spec) for spec in specs]
        if not self.specs:
            raise ValueError("no reward functions given")
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"a reward is given twice: {names}")
        for spec in self.specs:
            if not math.isfinite(spec.weight):
                raise ValueError(f"reward {spec.name}: weight {spec.weight} is not finite")
        self.functions = {spec.name: reward_function(spec.name) for spec in self.specs}

    def __call__(
        self, completions: Sequence[str], references: Sequence[str], metas: Sequence[Mapping[str, Any]]
    ) -> RewardScores:
        if not len(completions) == len(references) == len(metas):
            raise ValueError(
                f"{len(completions)} completions, {len(references)} references and {len(metas)} metas: one each"
            )
        per_reward, failures = {}, {}
        for spec in self.specs:
            function, scores, failed = self.functions[spec.name], np.zeros(len(completions)), 0
            for i, (completion, reference, meta) in enumerate(zip(completions, references, metas)):
                try:
                    value = float(function(completion, reference, meta, **spec.options))
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}")
                    scores[i] = value
                except Exception as error:  # a reward never stops a run: 0 for this completion, logged and counted
                    failed += 1
                    log.warning("reward %s failed on completion %d (%r): %s", spec.name, i, completion[:80], error)
            per_reward[spec.name], failures[spec.name] = scores, failed
        total = sum(spec.weight * per_reward[spec.name] for spec in self.specs)
        return RewardScores(total=np.asarray(total, np.float64), per_reward=per_reward, failures=failures)
