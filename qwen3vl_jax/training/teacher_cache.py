"""Offline distillation: the teacher's k largest logits at every position the KL reads, computed once over a
training run's batches (`python -m experiments.cache_teacher`) and read back by student runs instead of running
the teacher (`--config.distill.teacher_cache=DIR`).

The cache follows the run's batch stream: file `step_00000012.npz` holds what the teacher gave for the 13th batch
(0-based step 12) of a run with that data config and data seed. Per file: the batch's input ids and loss mask (a
student run whose batch differs is stopped, naming the step), the flat positions (B * L) that the KL reads and, at
each, the k largest logits in float32 and their token ids. `cache.json` records the teacher, k, its vocabulary, the
KL's token set (all_text_tokens), the data and vision-processing configs and the number of steps; a student run
that differs in k (distill.top_k), vocabulary, KL token set, data or processing (or trains longer) is refused before
its first step. A file holds a whole global
batch: the processes of a multi-process writer each compute their rows and process 0 writes them all, and each
process of a student run reads its own rows. The data config is recorded as the global stream it gives (the global
batch size and data.num_shards), so that a cache written by one process reading N shards serves a student run of
N processes, and the other way round.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from qwen3vl_jax import storage
from qwen3vl_jax.inputs.batch import TrainingBatch

METADATA = "cache.json"
# the arrays a student's batches get (TrainingBatch.extra): the teacher's k largest logits and their ids, (B, L, k)
TEACHER_TOP_K = ("teacher_top_logits", "teacher_top_ids")
FORMAT = 1
# data fields that do not change which examples a step's batch holds
_DATA_FIELDS_IGNORED = ("workers",)


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, incomplete or made for other batches than the run's."""


def step_file(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:08d}.npz")


def comparable_data(data: dict[str, Any]) -> dict[str, Any]:
    """The data config as JSON would give it back, without the fields that do not change the batches."""
    return json.loads(json.dumps({k: v for k, v in data.items() if k not in _DATA_FIELDS_IGNORED}))


def stream_description(data: dict[str, Any], *, row_group_count: int, num_shards: int) -> dict[str, Any]:
    """A process's data config (`dataclasses.asdict` of its DataConfig) as the global stream of batches it belongs
    to: comparable between runs of different numbers of processes."""
    return comparable_data(dict(data, batch_size=data["batch_size"] * row_group_count, num_shards=num_shards))


def write_metadata(directory: str, **fields: Any) -> None:
    storage.path(directory).mkdir(parents=True, exist_ok=True)
    storage.write_json(os.path.join(directory, METADATA), dict(format=FORMAT, **fields))


def write_step(
    directory: str,
    step: int,
    *,
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    keep: np.ndarray,
    top_logits: np.ndarray,
    top_ids: np.ndarray,
) -> None:
    """One batch: input_ids / loss_mask (B, L); keep (B, L) the positions the KL reads; top_logits / top_ids
    (B, L, k) the teacher's. Written to a temporary name and renamed, so a file that exists is whole."""
    positions = np.flatnonzero(keep).astype(np.int32)
    k = top_logits.shape[-1]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        input_ids=input_ids.astype(np.int32),
        loss_mask=loss_mask.astype(np.float32),
        positions=positions,
        top_logits=top_logits.reshape(-1, k)[positions].astype(np.float32),
        top_ids=top_ids.reshape(-1, k)[positions].astype(np.int32),
    )
    temporary = storage.path(step_file(directory, step) + ".tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.rename(step_file(directory, step))


class TeacherCache:
    """A cache directory opened for a student run: `check` refuses a run it was not made for; `add_to` adds the
    dense (B, L, k) top-k arrays of a step to its batch (zeros where the KL does not read)."""

    def __init__(self, directory: str):
        self.directory = directory
        file = os.path.join(directory, METADATA)
        if not storage.path(file).exists():
            raise TeacherCacheError(
                f"no teacher cache at {directory} (no {METADATA}): write one with python -m experiments.cache_teacher"
            )
        self.metadata = storage.read_json(file)
        if self.metadata.get("format") != FORMAT:
            raise TeacherCacheError(f"{file}: format {self.metadata.get('format')}, this version reads {FORMAT}")
        self.top_k = int(self.metadata["top_k"])

    def check(
        self, *, data: dict[str, Any], processing: dict[str, Any], all_text_tokens: bool, steps: int, vocab_size: int
    ) -> None:
        """Refuses a student run whose batches (data config, vision processing), KL token set, length or
        vocabulary the cache does not cover."""
        meta, where = self.metadata, os.path.join(self.directory, METADATA)
        if meta["vocab_size"] != vocab_size:
            raise TeacherCacheError(f"{where}: teacher vocabulary {meta['vocab_size']}, the student's {vocab_size}")
        if meta["all_text_tokens"] != all_text_tokens:
            raise TeacherCacheError(
                f"{where}: cached for all_text_tokens={meta['all_text_tokens']}, this run has {all_text_tokens}"
            )
        for name, mine in dict(data=comparable_data(data), processing=comparable_data(processing)).items():
            cached = meta[name]
            differ = sorted(k for k in set(mine) | set(cached) if mine.get(k) != cached.get(k))
            if differ:
                raise TeacherCacheError(
                    f"{where}: cached for another {name} config (differs in {differ}): the batches would not match"
                )
        if meta["steps"] < steps:
            raise TeacherCacheError(f"{where}: {meta['steps']} steps cached, this run trains {steps}")

    def add_to(self, batch: TrainingBatch, step: int, *, first_row: int = 0) -> TrainingBatch:
        """The batch (this process's rows of the global batch, from `first_row` on) with the step's
        teacher_top_logits / teacher_top_ids (B, L, k) added."""
        file = step_file(self.directory, step)
        if not storage.path(file).exists():
            raise TeacherCacheError(f"teacher cache {self.directory}: no file for step {step} ({file})")
        rows, length = batch.input_ids.shape
        with np.load(io.BytesIO(storage.path(file).read_bytes())) as cached:
            for name in ("input_ids", "loss_mask"):
                mine = cached[name][first_row : first_row + rows]
                if mine.shape != getattr(batch, name).shape or not np.array_equal(mine, getattr(batch, name)):
                    raise TeacherCacheError(
                        f"{file}: the cached batch of step {step} differs from this run's ({name}, rows {first_row} "
                        f"to {first_row + rows - 1}): another data seed, data config or dataset version"
                    )
            positions, top_logits, top_ids = cached["positions"], cached["top_logits"], cached["top_ids"]
        mine = (positions >= first_row * length) & (positions < (first_row + rows) * length)
        positions, top_logits, top_ids = positions[mine] - first_row * length, top_logits[mine], top_ids[mine]
        shape = (rows, length, self.top_k)
        dense_logits, dense_ids = np.zeros(shape, np.float32), np.zeros(shape, np.int32)
        dense_logits.reshape(-1, self.top_k)[positions] = top_logits
        dense_ids.reshape(-1, self.top_k)[positions] = top_ids
        return batch.replace(extra=dict(batch.extra, **dict(zip(TEACHER_TOP_K, (dense_logits, dense_ids)))))
