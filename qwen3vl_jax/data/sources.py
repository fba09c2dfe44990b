"""Random-access record sources (len + getitem), as grain expects, and their mixture.

Source specs (dicts, e.g. from an ml_collections config):
  {"kind": "synthetic", "tasks": [...], "size": N, "seed": 0, "image_size": 64, "num_frames": 8}
  {"kind": "digits", "split": "train" | "eval", "image_size": 64}
  {"kind": "jsonl", "path": "data.jsonl"}          conversations (Qwen "messages" or LLaVA "conversations")
                                                   or documents ("document": [items]); media paths relative
                                                   to the file
  {"kind": "array_record", "paths": [...], "base_dir": "media/"}   records are JSON objects as in jsonl
  {"kind": "tfds", "name": "...", "split": "train", "data_dir": ..., <feature keys>}   a prepared TFDS dataset
                                                   (see data.tfds_source for the feature mapping)
Every spec may carry "weight" (mixture weight, default 1); a source of weight 0 is left out of the mixture (how
a config carries an optional source that a command-line flag switches on). A spec's "reward" is the reward of
its prompt records that name none (reinforcement learning, data.prompts).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from qwen3vl_jax.data.digits import DigitsSource
from qwen3vl_jax.data.synthetic import SyntheticSource
from qwen3vl_jax.data.tfds_source import TfdsSource
from qwen3vl_jax.processing import DataError

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_MEDIA = re.compile(r"<(image|video)>\n?")


def to_record(obj: Any, *, record_id: str, base_dir: str) -> dict:
    """A JSON object -> a record (see data.features); an unusable object becomes {"error": ...} so that the
    bad-input policy decides what happens to it."""
    if not isinstance(obj, dict):
        return {"id": record_id, "error": f"expected a JSON object, got {type(obj).__name__}"}
    record = {"id": record_id, "base_dir": base_dir}
    if "chosen" in obj or "rejected" in obj:  # a preference pair (data.features checks its fields)
        return {**obj, **record}
    if "messages" in obj or "prompt" in obj:  # "prompt": a question to sample answers to (data.prompts)
        return {**obj, **record}
    if "document" in obj:
        return {**obj, **record}
    if "conversations" in obj:
        try:
            return {**obj, **record, "messages": llava_to_messages(obj)}
        except ValueError as e:
            return {"id": record_id, "error": str(e)}
    return {
        "id": record_id,
        "error": "record has none of 'messages', 'conversations', 'document', 'chosen', 'prompt'",
    }


def split_record(record: dict) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of a conversation record whose last message is the answer."""
    messages = record["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"example {record.get('id')}: the last message is not an assistant answer")
    answer = messages[-1]["content"]
    if not isinstance(answer, str):
        answer = "".join(item.get("text", "") for item in answer)
    return messages[:-1], record.get("answer", answer)


def llava_to_messages(obj: dict) -> list[dict]:
    """LLaVA-style {"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]} ->
    Qwen messages. `<image>` / `<video>` markers place the media; without markers the media go before the
    first user text."""
    media = {kind: obj.get(kind) or [] for kind in ("image", "video")}
    media = {kind: [v] if isinstance(v, str) else list(v) for kind, v in media.items()}
    used = {"image": 0, "video": 0}
    messages = []
    for turn in obj["conversations"]:
        role = _LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"unknown conversation role {turn.get('from')!r}")
        content, pos = [], 0
        text = str(turn.get("value", ""))
        for m in _LLAVA_MEDIA.finditer(text):
            if text[pos : m.start()]:
                content.append({"type": "text", "text": text[pos : m.start()]})
            kind = m.group(1)
            if used[kind] >= len(media[kind]):
                raise ValueError(f"more <{kind}> markers than {kind}s")
            content.append({"type": kind, kind: media[kind][used[kind]]})
            used[kind] += 1
            pos = m.end()
        if text[pos:]:
            content.append({"type": "text", "text": text[pos:]})
        messages.append({"role": role, "content": content})
    first_user = next((m for m in messages if m["role"] == "user"), None)
    leftover = [{"type": k, k: v} for k in ("image", "video") for v in media[k][used[k] :]]
    if leftover:
        if first_user is None or any(used.values()):
            raise ValueError("the number of <image>/<video> markers does not match the media")
        first_user["content"] = leftover + first_user["content"]
    return messages


class JsonlSource:
    """One record per line of a JSONL file; lines are indexed once and parsed on access."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"JSONL file {path} does not exist")
        self.path = os.path.abspath(path)
        offsets, position = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(position)
                position += len(line)
        self._offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.readline()
        record_id = f"{os.path.basename(self.path)}:{index + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return {"id": record_id, "error": f"invalid JSON: {e}"}
        return to_record(obj, record_id=record_id, base_dir=os.path.dirname(self.path))

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r})"


class ArrayRecordJsonSource:
    """ArrayRecord files (grain's reader) whose records are UTF-8 JSON objects in the JSONL format."""

    def __init__(self, paths: Sequence[str], base_dir: str = ""):
        self._source = grain.sources.ArrayRecordDataSource(list(paths))
        self._base_dir = base_dir

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record_id = f"array_record:{index}"
        try:
            obj = json.loads(self._source[index])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {"id": record_id, "error": f"invalid JSON record: {e}"}
        return to_record(obj, record_id=record_id, base_dir=self._base_dir)

    def __repr__(self) -> str:
        return f"ArrayRecordJsonSource({self._source!r})"


def make_source(spec: dict):
    """The random-access source of one spec (see the module docstring)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    spec.pop("weight", None)
    if "reward" in spec:  # the reward of the source's prompt records that name none (data.prompts)
        reward = spec.pop("reward")
        return WithDefaults(make_source(dict(spec, kind=kind)), defaults=dict(reward=reward))
    if kind == "synthetic":
        return SyntheticSource(**spec)
    if kind == "digits":
        return DigitsSource(**spec)
    if kind == "jsonl":
        return JsonlSource(**spec)
    if kind == "array_record":
        return ArrayRecordJsonSource(**spec)
    if kind == "tfds":
        return TfdsSource(**spec)
    raise ValueError(f"unknown source kind {kind!r}; use synthetic, digits, jsonl, array_record or tfds")


class WithDefaults:
    """A source whose records get `defaults` for the fields they lack."""

    def __init__(self, source: Any, *, defaults: dict[str, Any]):
        self.source, self.defaults = source, dict(defaults)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.defaults, **self.source[index]}

    def __repr__(self) -> str:
        return f"WithDefaults({self.source!r}, defaults={self.defaults})"


def mixture(specs: Sequence[dict]) -> grain.MapDataset:
    """One MapDataset over the sources of non-zero weight, mixed by their weights."""
    for spec in specs:
        if float(spec.get("weight", 1.0)) < 0:
            raise ValueError(f"source {spec} has a negative weight")
    specs = [s for s in specs if float(s.get("weight", 1.0)) > 0]
    if not specs:
        raise ValueError("no data sources configured (or all have weight 0)")
    datasets = [grain.MapDataset.source(make_source(s)) for s in specs]
    if len(datasets) == 1:
        return datasets[0]
    return grain.MapDataset.mix(datasets, [float(s.get("weight", 1.0)) for s in specs])
