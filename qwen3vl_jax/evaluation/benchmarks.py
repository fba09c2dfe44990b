"""The benchmarks of the Qwen3-VL report as typed tasks: how a row of the dataset (in its Hugging Face layout, read
by `readers`) becomes `BenchmarkExample`s, the prompt the Qwen3-VL evaluation phrases, the metric(s) of
`benchmark_metrics`, the headline metric, the split read by default and the default answer length.

    task = get_task("docvqa")
    for item in read_examples(task, "DocVQA/", split="validation"):   # BenchmarkExample or Skipped
        ...
    task.score(example, prediction)                                     # {"anls": 0.93}

The builders (`benchmark_tasks`) follow lmms-eval's task definitions (EvolvingLMMs-Lab/lmms-eval,
lmms_eval/tasks/<set>/: the dataset's columns as its `doc_to_visual` / `doc_to_text` read them, with its
`qwen3_vl` prompt kwargs where the task has them, which follow the Qwen3-VL technical report via VLMEvalKit's
`Qwen3VLPromptMixin`: images before the text, "Question: ... Options: ... Answer with the option letter only." for
multiple choice). Each builder's docstring names its dataset, split, columns and prompt. A row that lacks a
column, holds an unreadable image or whose references the metric refuses becomes a `Skipped` item.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from qwen3vl_jax.evaluation import benchmark_metrics as metrics
from qwen3vl_jax.evaluation.benchmark_tasks import (
    chartqa_examples,
    countbench_examples,
    docvqa_examples,
    infovqa_examples,
    mathvista_examples,
    mmmu_examples,
    ocrbench_examples,
    refcoco_examples,
    textvqa_examples,
    videomme_examples,
)
from qwen3vl_jax.evaluation.examples import BenchmarkExample
from qwen3vl_jax.evaluation.readers import Row, RowError, is_directory, read_rows
from qwen3vl_jax.evaluation.video_niah import needle_found


@dataclasses.dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark: `examples` turns a dataset row into its examples (RowError when it cannot), `score` gives
    an answer's metrics {name: value in [0, 1]}, `headline` names the metric the report leads with. `split` is
    read by default; `group_by` are `meta` keys the summary also breaks the metrics down by. A task without
    `examples` (video_niah) builds its examples itself. `config`: a data folder holding a subfolder of that
    name (an HF dataset with several configs) is read from that subfolder."""

    name: str
    examples: Callable[[Row], list[BenchmarkExample]] | None
    score: Callable[[BenchmarkExample, str], dict[str, float]]
    headline: str
    max_new_tokens: int
    split: str = "test"
    group_by: tuple[str, ...] = ()
    one_example_per_row: bool = True
    config: str = ""  # the dataset's config folder (lmms-lab/DocVQA: DocVQA, InfographicVQA), read when present


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A row (or example) left out of a benchmark, and why."""

    id: str
    reason: str


def get_task(name: str) -> BenchmarkTask:
    """The task called `name`; ValueError naming it and the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown benchmark task {name!r}; the tasks are {sorted(TASKS)}")
    return TASKS[name]


def data_location(task: BenchmarkTask, location: str) -> str:
    """`location`, or its subfolder named after the task's dataset config when it has one."""
    if task.config and not location.startswith("tfds:") and is_directory(location):
        subfolder = f"{location.rstrip('/')}/{task.config}"
        return subfolder if is_directory(subfolder) else location
    return location


def read_examples(
    task: BenchmarkTask,
    location: str,
    *,
    split: str | None = None,
    media_dir: str | None = None,
    tfds_data_dir: str | None = None,
    limit: int = 0,
) -> Iterator[BenchmarkExample | Skipped]:
    """The examples of `task` from the dataset at `location` (`readers.read_rows`; `split` defaults to the
    task's), in row order, with a `Skipped` for each row that cannot be used (and for an id seen before); at most
    `limit` examples when limit > 0. Each example is scored once on an empty answer here, so that references a
    metric refuses skip the row instead of failing later."""
    if task.examples is None:
        raise ValueError(f"task {task.name!r} does not read a dataset")
    seen, count = set(), 0
    location = data_location(task, location)
    for row in read_rows(location, split=split or task.split, media_dir=media_dir, tfds_data_dir=tfds_data_dir):
        where = f"{task.name}:row{row.index}"
        if row.error:
            yield Skipped(where, row.error)
            continue
        try:
            examples = task.examples(row)
            for example in examples:
                task.score(example, "")
        except (RowError, KeyError, TypeError, ValueError, SyntaxError) as e:
            yield Skipped(where, f"{type(e).__name__}: {e}" if not isinstance(e, RowError) else str(e))
            continue
        for example in examples:
            if example.id in seen:
                yield Skipped(example.id, f"row {row.index}: the id {example.id!r} of an earlier example")
                continue
            seen.add(example.id)
            yield example
            count += 1
            if limit and count >= limit:
                return


def _multiple_choice_score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
    answer = example.references[0]
    return {"accuracy": metrics.choice_accuracy(prediction, options=example.options, answer=answer)}


def _mmmu_score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
    if example.options:
        return _multiple_choice_score(example, prediction)
    return {"accuracy": metrics.short_answer_match(prediction, example.references)}


def _mathvista_score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
    if example.options:
        return _multiple_choice_score(example, prediction)
    kind, precision = example.meta["answer_type"], example.meta["precision"]
    return {
        "accuracy": metrics.short_answer_match(prediction, example.references, answer_type=kind, precision=precision)
    }


def _score_with(metric: Callable[..., float], name: str):
    """The score of a metric of (prediction, references)."""

    def score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
        return {name: metric(prediction, example.references)}

    return score


def _ocrbench_score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
    category = example.meta["category"]
    return {"accuracy": metrics.ocrbench_match(prediction, example.references, category=category)}


def _refcoco_score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
    return metrics.grounding_metrics(prediction, example.meta["box"])


def _countbench_score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
    return {"accuracy": metrics.count_match(prediction, example.meta["count"])}


def _niah_score(example: BenchmarkExample, prediction: str) -> dict[str, float]:
    return {"needle_found": needle_found(prediction, example)}


def _task(name: str, examples, score, **fields) -> BenchmarkTask:
    return BenchmarkTask(name=name, examples=examples, score=score, **fields)


TASKS: dict[str, BenchmarkTask] = {
    task.name: task
    for task in (
        _task(
            "mmmu", mmmu_examples, _mmmu_score, headline="accuracy", max_new_tokens=128, split="validation",
            group_by=("question_type",),
        ),
        _task(
            "mathvista", mathvista_examples, _mathvista_score, headline="accuracy", max_new_tokens=64,
            split="testmini", group_by=("question_type",),
        ),
        _task(
            "docvqa", docvqa_examples, _score_with(metrics.anls, "anls"), headline="anls", max_new_tokens=32,
            split="validation", config="DocVQA",
        ),
        _task(
            "infovqa", infovqa_examples, _score_with(metrics.anls, "anls"), headline="anls", max_new_tokens=32,
            split="validation", config="InfographicVQA",
        ),
        _task(
            "chartqa", chartqa_examples, _score_with(metrics.relaxed_accuracy, "relaxed_accuracy"),
            headline="relaxed_accuracy", max_new_tokens=16, split="test", group_by=("type",),
        ),
        _task(
            "textvqa", textvqa_examples, _score_with(metrics.vqa_accuracy, "vqa_accuracy"), headline="vqa_accuracy",
            max_new_tokens=16, split="validation",
        ),
        _task(
            "ocrbench", ocrbench_examples, _ocrbench_score, headline="accuracy", max_new_tokens=128, split="test",
            group_by=("category",),
        ),
        _task(
            "refcoco", refcoco_examples, _refcoco_score, headline="iou_0.5", max_new_tokens=64, split="val",
            one_example_per_row=False,
        ),
        _task(
            "countbench", countbench_examples, _countbench_score, headline="accuracy", max_new_tokens=16,
            split="test",
        ),
        _task(
            "videomme", videomme_examples, _multiple_choice_score, headline="accuracy", max_new_tokens=16,
            split="test", group_by=("duration",),
        ),
        _task(
            "video_niah", None, _niah_score, headline="needle_found", max_new_tokens=16, group_by=("length", "depth"),
        ),
    )
}  # fmt: skip
