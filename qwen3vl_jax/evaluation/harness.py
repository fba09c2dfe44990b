"""Generation-based evaluation: answers generated greedily (`predict`) and scored, for records (built-in tasks or
JSONL conversations: prompt = the conversation up to its last assistant reply, reference = that reply;
`generate_answers`) and for benchmark tasks (`evaluate_benchmark`: length-bucketed batches, resumable results)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.data.sources import make_source, split_record
from qwen3vl_jax.evaluation.benchmarks import BenchmarkTask, Skipped
from qwen3vl_jax.evaluation.examples import BenchmarkExample
from qwen3vl_jax.evaluation.lengths import length_batches, prompt_length
from qwen3vl_jax.evaluation.metrics import score
from qwen3vl_jax.evaluation.results import PredictionLog, summarize_task, write_summary
from qwen3vl_jax.evaluation.video_niah import write_niah_report
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
    prompts = [(messages, record.get("base_dir", "")) for record, messages, _ in batch]
    predictions = predict_each(model, processor, prompts=prompts, max_new_tokens=max_new_tokens)
    results = []
    for (record, _, reference), prediction in zip(batch, predictions):
        if isinstance(prediction, DataError):
            results.append(_failure(record, prediction, set_name=set_name))
            continue
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


def predict_each(
    model: Qwen3VLModel, processor: Processor, *, prompts: Sequence[tuple[list[dict], str]], max_new_tokens: int
) -> list[str | DataError]:
    """`predict` of a batch of prompts; when one of them is bad (DataError), the others answered one by one and
    the bad one's error in its place."""
    try:
        return list(predict(model, processor, prompts=prompts, max_new_tokens=max_new_tokens))
    except DataError as e:
        if len(prompts) == 1:
            return [e]
        return [
            answer
            for prompt in prompts
            for answer in predict_each(model, processor, prompts=[prompt], max_new_tokens=max_new_tokens)
        ]


def predict(
    model: Qwen3VLModel, processor: Processor, *, prompts: Sequence[tuple[list[dict], str]], max_new_tokens: int
) -> list[str]:
    """Greedy answers to a batch of prompts, each (chat messages ending with the user turn, the folder its media
    paths are relative to), decoded up to the first eos / pad token."""
    texts, images, videos, fps = [], [], [], None
    for messages, base_dir in prompts:
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        prompt_images, prompt_videos, prompt_fps = _media(messages, base_dir)
        images += prompt_images
        videos += prompt_videos
        fps = prompt_fps or fps
    inputs = processor(text=texts, images=images or None, videos=videos or None, video_fps=fps)
    tokens = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_ids=processor.eos_token_ids,
        pad_token_id=processor.pad_token_id,
    )
    stops = np.asarray([*processor.eos_token_ids, processor.pad_token_id])
    answers = []
    for row in tokens:
        end = np.flatnonzero(np.isin(row, stops))
        # keep special tokens such as <|box_start|>: they are part of grounding answers
        answers.append(processor.decode(row[: end[0] if len(end) else len(row)], skip_special_tokens=False))
    return answers


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


# ------------------------------------------------------------------------------------------------ benchmarks


def evaluate_benchmark(
    model: Qwen3VLModel,
    processor: Processor,
    *,
    task: BenchmarkTask,
    examples: Iterable[BenchmarkExample | Skipped],
    output: str,
    batch_size: int,
    max_new_tokens: int,
    window_batches: int = 32,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answers a task's examples greedily and writes `<output>/<task>/` (`results`: predictions.jsonl appended
    after each batch, then summary.json and report.md; video_niah adds its heat map). Returns the summary
    (empty on processes other than 0, which take part in every batch but write nothing).

    Examples already in predictions.jsonl are not answered again. The others are read `window_batches` batches
    at a time, sorted by `prompt_length` (longest first) and cut into batches of neighbours, so that rows of a
    batch need little padding and few shapes compile; a window's last short batch is filled up with copies of its
    last example (their answers dropped). In a multi-process run every process reads the same examples and
    process 0's list of those already answered is broadcast. A tqdm bar (process 0) counts the examples handled
    per second against `total` (the rows, when known), its postfix the resumed and skipped ones."""
    writer = jax.process_index() == 0
    prediction_log = PredictionLog(os.path.join(output, task.name)) if writer else None
    answered = prediction_log.ids() if writer else set()
    skipped, run_ids, resumed, generated = [], [], 0, 0
    bar = tqdm(total=total, unit="ex", desc=task.name, disable=not (progress and writer), dynamic_ncols=True)

    def advance() -> None:  # the bar counts examples resumed, answered and skipped
        bar.set_postfix(resumed=resumed, skipped=len(skipped), refresh=False)
        bar.update(resumed + generated + len(skipped) - bar.n)

    for window in _windows(examples, size=batch_size * window_batches, skipped=skipped):
        run_ids += [example.id for example in window]
        pending = [example for example, new in zip(window, _agreed([e.id not in answered for e in window])) if new]
        resumed += len(window) - len(pending)
        lengths = {}
        for example in pending:
            try:
                lengths[example.id] = prompt_length(processor, example)
            except DataError as e:
                log.warning("skipped %s: %s", example.id, e)
                skipped.append(Skipped(example.id, str(e)))
        advance()
        pending = [example for example in pending if example.id in lengths]
        for batch in length_batches([lengths[e.id] for e in pending], batch_size=batch_size):
            answering = dict(task=task, batch_size=batch_size, max_new_tokens=max_new_tokens)
            records = _answer_examples(model, processor, batch=[pending[i] for i in batch], **answering)
            if writer:
                prediction_log.append(records)
            generated += len(batch)
            advance()
    advance()
    bar.close()
    if not writer:
        return {}
    records = [prediction_log.records[i] for i in run_ids if i in prediction_log.records]
    summary = summarize_task(
        task=task.name, headline=task.headline, group_by=task.group_by, records=records, skipped=skipped
    )
    write_summary(prediction_log, summary, title=f"{task.name}: {len(records)} examples")
    if task.name == "video_niah" and records:
        write_niah_report(records, directory=prediction_log.local)
    prediction_log.close()
    return summary


def _windows(items: Iterable[BenchmarkExample | Skipped], *, size: int, skipped: list) -> Iterator[list]:
    """Lists of up to `size` examples in order; the Skipped items go to `skipped`."""
    window = []
    for item in items:
        if isinstance(item, Skipped):
            log.warning("skipped %s: %s", item.id, item.reason)
            skipped.append(item)
            continue
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _agreed(flags: list[bool]) -> list[bool]:
    """Process 0's flags on every process (the same list where there is one process)."""
    if jax.process_count() == 1:
        return flags
    return [bool(f) for f in multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32))]


def _answer_examples(model, processor, *, task, batch, batch_size, max_new_tokens) -> list[dict]:
    """predictions.jsonl records of a batch of examples. The batch is filled up to batch_size with copies of its
    last prompt; when one of its prompts cannot be processed (DataError), the others are answered as one batch of
    the same size (no new shape to compile) and the bad ones get their error."""
    prompts = [(example.messages, example.base_dir) for example in batch]
    answering = dict(max_new_tokens=max_new_tokens)
    try:
        predictions = predict(model, processor, prompts=_filled(prompts, batch_size), **answering)
    except DataError as error:
        errors = {i: e for i, prompt in enumerate(prompts) if (e := _input_error(processor, prompt)) is not None}
        if not errors:  # the batch fails though each prompt alone processes: every example gets the error
            errors = dict.fromkeys(range(len(prompts)), error)
        good = [prompt for i, prompt in enumerate(prompts) if i not in errors]
        answers = iter(predict(model, processor, prompts=_filled(good, batch_size), **answering) if good else [])
        predictions = [errors[i] if i in errors else next(answers) for i in range(len(prompts))]
    records = []
    for example, prediction in zip(batch, predictions):
        record = dict(id=example.id, task=example.task)
        try:
            if isinstance(prediction, DataError):
                raise prediction
            record.update(prediction=prediction, metrics=task.score(example, prediction))
        except (DataError, ValueError) as e:
            log.warning("example %s: %s", example.id, e)
            record["error"] = str(e)
        record.update(references=list(example.references), meta=example.meta)
        if example.options:
            record["options"] = list(example.options)
        records.append(record)
    return records


def _filled(prompts: list, size: int) -> list:
    return prompts + [prompts[-1]] * (size - len(prompts))


def _input_error(processor: Processor, prompt: tuple[list[dict], str]) -> DataError | None:
    """The DataError that processing this one prompt raises, None when it processes."""
    messages, base_dir = prompt
    images, videos, fps = _media(messages, base_dir)
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        processor(text=[text], images=images or None, videos=videos or None, video_fps=fps)
    except DataError as e:
        return e
    return None
