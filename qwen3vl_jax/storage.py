"""Workdirs on local disk or in a bucket (`gs://...`, what every host of a TPU pod slice can reach), and the
JSON files of checkpoints, runs and reports.

orbax writes checkpoints to either directly; the small files (metrics, reports, HF exports) are written
through `etils.epath`, which needs `gcsfs` for `gs://` (requirements-tpu.txt). Local paths take the plain
file-system route, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from etils import epath


def is_remote(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """An absolute local path; a bucket URL as it is (os.path.abspath would turn gs://b/x into ./gs:/b/x)."""
    return path if is_remote(path) else os.path.abspath(path)


def path(location: str) -> epath.Path:
    return epath.Path(location)


@contextlib.contextmanager
def local_dir(location: str) -> Iterator[str]:
    """A local directory to write into whose files end up in `location`: `location` itself when local, else
    a temporary directory copied there (recursively) on exit."""
    if not is_remote(location):
        os.makedirs(location, exist_ok=True)
        yield location
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        for root, _, files in os.walk(tmp):
            target = path(location) / os.path.relpath(root, tmp)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    (target / name).write_bytes(f.read())


def read_json(location: str) -> Any:
    """The JSON value of a local or gs:// file."""
    return json.loads(path(location).read_text())


def write_json(location: str, value: Any) -> None:
    """Writes `value` as indented JSON to a local or gs:// file."""
    path(location).write_text(json.dumps(value, indent=2))


def write_jsonl(location: str, rows: Any) -> None:
    """Writes one JSON object per line (non-ASCII text kept as it is) to a local or gs:// file."""
    path(location).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
