"""The results of one benchmark task in `<output>/<task>/`, written so that a run can be killed and rerun:

* predictions.jsonl: one JSON object per answered example ({id, task, prediction, references, metrics, meta}, or
  {id, task, error, ...} when its inputs could not be processed), appended and flushed after each batch. A rerun
  reads the ids already there — a torn last line (a kill mid-write) is dropped and the file truncated to its
  complete lines — and answers only the others.
* summary.json: per-metric means over the run's answered examples, their count, the headline metric, the means
  per value of the task's `group_by` meta keys, and the skipped rows and examples with their reasons.
* report.md: the same as tables.

A gs:// output is worked on in a local copy (predictions.jsonl downloaded first) that is uploaded after a batch
when `upload_every_s` seconds have passed since the last upload, and when the run finishes: a kill loses at most
that long of answers there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3vl_jax import storage

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"


class PredictionLog:
    """predictions.jsonl of `directory` (local or gs://), read once and then appended to."""

    def __init__(self, directory: str, *, upload_every_s: float = 30.0):
        self.directory, self.upload_every_s = directory, upload_every_s
        self.remote = storage.is_remote(directory)
        self.local = tempfile.mkdtemp(prefix="qwen3vl_eval_") if self.remote else directory
        os.makedirs(self.local, exist_ok=True)
        self.path = os.path.join(self.local, PREDICTIONS)
        if self.remote and (remote := storage.path(directory) / PREDICTIONS).exists():
            with open(self.path, "wb") as f:
                f.write(remote.read_bytes())
        self.records: dict[str, dict] = self._read()
        self._uploaded = time.monotonic()

    def _read(self) -> dict[str, dict]:
        """The complete records of the file; a torn last line is cut off the file. A bad line elsewhere raises
        ValueError naming it (the file is not ours to repair)."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # the part after the last newline: empty unless a write was torn
        records = {}
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number == len(complete) and not tail:
                    tail = line  # a torn line that happened to end in a newline
                    break
                message = f"{self.path}: line {number} is not JSON ({e}); move the file away to start over"
                raise ValueError(message) from None
            records[record["id"]] = record
        if tail:
            log.warning("%s: dropping a torn last line (%d bytes)", self.path, len(tail))
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values())
        return records

    def ids(self) -> set[str]:
        return set(self.records)

    def append(self, records: Sequence[dict]) -> None:
        """Appends the records as lines, flushed to disk (and uploaded when due)."""
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        self.records.update({r["id"]: r for r in records})
        if self.remote and time.monotonic() - self._uploaded >= self.upload_every_s:
            self.upload()

    def upload(self) -> None:
        """Copies the local files to a gs:// directory (nothing to do for a local one)."""
        if not self.remote:
            return
        target = storage.path(self.directory)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(self.local)):
            with open(os.path.join(self.local, name), "rb") as f:
                (target / name).write_bytes(f.read())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        self.upload()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def summarize_task(
    *, task: str, headline: str, group_by: Sequence[str], records: Sequence[dict], skipped: Sequence[Any]
) -> dict[str, Any]:
    """summary.json's content: `records` are the run's predictions (those with an `error` count as skipped, with
    the read-time `skipped` items, which have `id` and `reason`)."""
    answered = [r for r in records if "error" not in r]
    left_out = [{"id": s.id, "reason": s.reason} for s in skipped]
    left_out += [{"id": r["id"], "reason": r["error"]} for r in records if "error" in r]
    summary = {
        "task": task,
        "examples": len(answered),
        "headline": headline,
        "metrics": _means(answered),
        "skipped": {"count": len(left_out), "items": left_out},
    }
    groups = {}
    for key in group_by:
        values = sorted({json.dumps(r["meta"].get(key)) for r in answered if key in r.get("meta", {})})
        groups[key] = {}
        for value in values:
            members = [r for r in answered if json.dumps(r["meta"].get(key)) == value]
            groups[key][str(json.loads(value))] = {"examples": len(members), **_means(members)}
    if groups:
        summary["groups"] = groups
    return summary


def _means(records: Sequence[dict]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for record in records:
        for name, value in record["metrics"].items():
            values.setdefault(name, []).append(value)
    return {name: float(np.mean(v)) for name, v in values.items()}


def report_markdown(summary: dict[str, Any], *, title: str) -> str:
    """report.md: the headline, every metric, the per-group tables and the skip reasons."""
    metrics = summary["metrics"]
    headline = summary["headline"]
    lines = [f"# {title}", ""]
    if headline in metrics:
        lines.append(f"**{summary['task']}: {headline} {metrics[headline]:.4f}** over {summary['examples']} examples")
    else:
        lines.append(f"**{summary['task']}: no example answered**")
    lines += ["", "| metric | mean |", "|---|---|", *(f"| {name} | {value:.4f} |" for name, value in metrics.items())]
    for key, groups in summary.get("groups", {}).items():
        names = sorted({name for group in groups.values() for name in group} - {"examples"})
        lines += ["", f"## By {key}", "", f"| {key} | examples | " + " | ".join(names) + " |"]
        lines.append("|---|---|" + "---|" * len(names))
        for value, group in groups.items():
            cells = [f"{group[n]:.4f}" if n in group else "" for n in names]
            lines.append(f"| {value} | {group['examples']} | " + " | ".join(cells) + " |")
    skipped = summary["skipped"]
    if skipped["count"]:
        lines += ["", f"## Skipped: {skipped['count']}", ""]
        lines += [f"- {item['id']}: {item['reason']}" for item in skipped["items"][:50]]
        if skipped["count"] > 50:
            lines.append(f"- ... and {skipped['count'] - 50} more (summary.json lists them all)")
    return "\n".join(lines) + "\n"


def write_summary(prediction_log: PredictionLog, summary: dict[str, Any], *, title: str) -> None:
    """summary.json and report.md beside predictions.jsonl (in the local copy; `close` uploads them)."""
    storage.write_json(os.path.join(prediction_log.local, "summary.json"), summary)
    with open(os.path.join(prediction_log.local, "report.md"), "w") as f:
        f.write(report_markdown(summary, title=title))
