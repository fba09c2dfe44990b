"""Generation-based evaluation of records (built-in tasks or JSONL conversations): prompt = the conversation
up to its last assistant reply, reference = that reply; answers are generated greedily and scored per task."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.data.sources import make_source, split_record
from qwen3vl_jax.evaluation.metrics import score
from qwen3vl_jax.processing import DataError, Processor
from qwen3vl_jax.processing.processor import media_kind, message_items
from qwen3vl_jax.storage import write_json, write_jsonl

log = logging.getLogger(__name__)


def eval_records(sources: Any, limit: int) -> list[dict]:
    """The first `limit` records of an eval set: its source specs (a list, or a dict of named specs) read in
    order, each up to the limit."""
    sources = sources.values() if hasattr(sources, "values") else sources
    records = [
        source[i] for spec in sources for source in [make_source(dict(spec))] for i in range(min(limit, len(source)))
    ]
    return records[:limit]


def _media(messages: list[dict], base_dir: str):
    """The images and videos of a prompt (paths resolved against base_dir) and the frame rate of frame lists."""
    media, fps = {"image": [], "video": []}, None
    for item in message_items(messages):
        if (kind := media_kind(item)) is not None:
            value = item[kind]
            media[kind].append(os.path.join(base_dir, value) if isinstance(value, str) else value)
            fps = item.get("fps", fps) if kind == "video" else fps
    return media["image"], media["video"], fps


def generate_answers(
    model: Qwen3VLModel,
    processor: Processor,
    *,
    records: Iterable[dict],
    set_name: str,
    batch_size: int,
    max_new_tokens: int,
) -> list[dict]:
    """Per example: set, id, task, prediction, reference and its metrics. An example whose inputs are bad is
    reported with an `error` instead and counts as wrong."""
    results, pending = [], []
    answering = dict(set_name=set_name, max_new_tokens=max_new_tokens)
    for record in records:
        try:
            if "error" in record:
                raise DataError(record["error"])
            messages, reference = split_record(record)
        except DataError as e:
            results.append(_failure(record, e, set_name=set_name))
            continue
        pending.append((record, messages, reference))
        if len(pending) == batch_size:
            results += _answer(model, processor, batch=pending, **answering)
            pending = []
    if pending:
        results += _answer(model, processor, batch=pending, **answering)
    return results


def _answer(model, processor, *, batch, set_name, max_new_tokens) -> list[dict]:
    """Generates a batch; when one of its examples is bad, answers the others one by one."""
    answering = dict(set_name=set_name, max_new_tokens=max_new_tokens)
    try:
        return _generate(model, processor, batch=batch, **answering)
    except DataError as e:
        if len(batch) == 1:
            return [_failure(batch[0][0], e, set_name=set_name)]
        return [result for item in batch for result in _answer(model, processor, batch=[item], **answering)]


def _generate(model, processor, *, batch, set_name, max_new_tokens) -> list[dict]:
    prompts, images, videos, fps = [], [], [], None
    for record, messages, _ in batch:
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        record_images, record_videos, record_fps = _media(messages, record.get("base_dir", ""))
        images += record_images
        videos += record_videos
        fps = record_fps or fps
    inputs = processor(text=prompts, images=images or None, videos=videos or None, video_fps=fps)
    tokens = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_ids=processor.eos_token_ids,
        pad_token_id=processor.pad_token_id,
    )
    results = []
    stops = np.asarray([*processor.eos_token_ids, processor.pad_token_id])
    for (record, _, reference), row in zip(batch, tokens):
        end = np.flatnonzero(np.isin(row, stops))
        # keep special tokens such as <|box_start|>: they are part of grounding answers
        prediction = processor.decode(row[: end[0] if len(end) else len(row)], skip_special_tokens=False)
        task = record.get("task", "qa")
        results.append(
            dict(
                set=set_name,
                id=record.get("id"),
                task=task,
                prediction=prediction,
                reference=reference,
                metrics=score(task, prediction, reference=reference, meta=record.get("meta", {})),
            )
        )
    return results


def _failure(record: dict, error: Exception, *, set_name: str) -> dict:
    log.warning("example %s: %s", record.get("id"), error)
    return dict(
        set=set_name, id=record.get("id"), task=record.get("task", "qa"), error=str(error), metrics={"exact_match": 0.0}
    )


def summarize(results: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of each metric per eval set (and the number of examples)."""
    tasks: dict[str, dict[str, list[float]]] = {}
    for result in results:
        per_task = tasks.setdefault(result["set"], {"examples": []})
        per_task["examples"].append(1)
        for name, value in result["metrics"].items():
            per_task.setdefault(name, []).append(value)
    return {
        task: {name: float(np.sum(v)) if name == "examples" else float(np.mean(v)) for name, v in metrics.items()}
        for task, metrics in tasks.items()
    }


def write_report(summary: dict, results: list[dict], *, directory: str, title: str) -> None:
    """summary.json, predictions.jsonl and report.md in `directory`."""
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "summary.json"), summary)
    write_jsonl(os.path.join(directory, "predictions.jsonl"), results)
    names = sorted({name for metrics in summary.values() for name in metrics} - {"examples"})
    lines = [f"# {title}", "", "| set | examples | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, metrics in sorted(summary.items()):
        cells = [f"{metrics[n]:.3f}" if n in metrics else "" for n in names]
        lines.append(f"| {task} | {metrics['examples']:.0f} | " + " | ".join(cells) + " |")
    with open(os.path.join(directory, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
