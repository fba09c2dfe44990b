"""Rows of benchmark datasets in the formats they are distributed in, read lazily (one record batch at a time).

    rows = read_rows("DocVQA/", split="validation")              # an HF dataset folder: its validation files
    rows = read_rows("gs://bucket/MMMU/validation-*.parquet")     # a glob, local or gs://
    rows = read_rows("questions.jsonl", media_dir="media/")        # JSONL, media paths relative to media_dir
    rows = read_rows("tfds:ref_coco/refcoco_unc:validation", tfds_data_dir="gs://bucket/tensorflow_datasets")

* Parquet and Arrow files in the Hugging Face datasets layout (`DocVQA/validation-00000-of-00002.parquet`,
  `data/test-*.parquet`, `save_to_disk`'s `data-00000-of-00001.arrow`, the cache's `name-validation.arrow`): a
  file, a folder (searched recursively, then narrowed to the files of `split` when their names carry split
  names) or a glob; local or any URI pyarrow's file systems open (gs://). An HF `Image` feature is the struct
  {bytes, path}: `image_source` turns it into encoded bytes (or a path when only the path is stored).
* JSONL: one JSON object per line with the same columns; media columns hold paths relative to `media_dir`
  (default: the JSONL file's folder).
* TFDS (`tfds:<name>[:<split>]`): a prepared dataset read as `data.tfds_source` reads one (`tfds.data_source`
  over its ArrayRecord files, no TensorFlow); texts become str, images stay uint8 arrays.

A row that cannot be read (invalid JSON) is yielded with its `error`, for the caller to count as skipped.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DATA_SUFFIXES = (".parquet", ".arrow")
# split names the HF hub and its datasets use; a folder whose files carry one of them is narrowed to a split
KNOWN_SPLITS = ("train", "validation", "val", "dev", "test", "testmini", "testA", "testB", "minival")
RECORD_BATCH_ROWS = 32  # rows decoded at a time from a parquet file (image datasets: ~MBs per batch)


class RowError(ValueError):
    """A row that cannot become an example (a missing column, an undecodable image): counted as skipped."""


@dataclasses.dataclass
class Row:
    """Row `index` (over all files, in order) of a dataset: its column values, the folder its relative media
    paths are resolved against, and the `error` that made it unreadable (values then empty)."""

    index: int
    values: dict[str, Any]
    base_dir: str
    error: str = ""


def read_rows(
    location: str, *, split: str | None = None, media_dir: str | None = None, tfds_data_dir: str | None = None
) -> Iterator[Row]:
    """The rows of a parquet/arrow file, folder or glob, a JSONL file, or a TFDS dataset (see the module
    docstring), lazily. Raises FileNotFoundError naming `location` when it holds no data files."""
    if location.startswith("tfds:"):
        yield from _tfds_rows(location, split=split, data_dir=tfds_data_dir)
        return
    if location.endswith(".jsonl"):
        yield from _jsonl_rows(location, media_dir=media_dir)
        return
    index = 0
    for path in data_files(location, split=split):
        base_dir = media_dir or _parent(path)
        reader = _parquet_batches if path.endswith(".parquet") else _arrow_batches
        for batch in reader(path):
            for values in batch.to_pylist():
                yield Row(index, values, base_dir)
                index += 1


def count_rows(location: str, *, split: str | None = None) -> int | None:
    """The number of rows `read_rows` yields, from the files' metadata (parquet footers, arrow batch lengths,
    JSONL lines); None for TFDS."""
    if location.startswith("tfds:"):
        return None
    if location.endswith(".jsonl"):
        filesystem, path = _filesystem(location)
        if filesystem.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"JSONL file {location!r} does not exist")
        with filesystem.open_input_stream(path) as f:
            return sum(1 for line in io.TextIOWrapper(f, encoding="utf-8") if line.strip())
    total = 0
    for path in data_files(location, split=split):
        filesystem, local = _filesystem(path)
        if path.endswith(".parquet"):
            with filesystem.open_input_file(local) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        else:
            total += sum(batch.num_rows for batch in _arrow_batches(path))
    return total


# ------------------------------------------------------------------------------------------------ files


def data_files(location: str, *, split: str | None = None) -> list[str]:
    """The parquet/arrow files of a file, folder (recursively; the files of `split` when names carry splits) or
    glob, sorted. FileNotFoundError naming `location` when there are none, or none of `split`."""
    filesystem, path = _filesystem(location)
    if any(c in location for c in "*?["):
        root = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0] or "/"
        files = [f for f in _listing(filesystem, root) if fnmatch.fnmatch(f, path)]
    elif filesystem.get_file_info(path).type == pafs.FileType.Directory:
        files = _listing(filesystem, path)
        if split:
            files = _of_split(files, root=path, split=split, location=location)
    elif filesystem.get_file_info(path).type == pafs.FileType.File:
        files = [path]
    else:
        raise FileNotFoundError(f"data path {location!r} does not exist")
    files = sorted(f for f in files if f.endswith(DATA_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no .parquet or .arrow data files at {location!r}")
    prefix = location[: location.index("://") + 3] if "://" in location else ""
    return [prefix + f if prefix and not f.startswith(prefix) else f for f in files]


def is_directory(location: str) -> bool:
    """Whether `location` (local or a URI) is an existing folder."""
    filesystem, path = _filesystem(location)
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def _of_split(files: list[str], *, root: str, split: str, location: str) -> list[str]:
    """The files whose name or folder names `split` (`validation-00000-of-00002.parquet`, `data/test-*`,
    `name-validation.arrow`, `validation/...`); all files when none names a known split."""

    def splits_of(file: str) -> set[str]:
        parts = file[len(root) :].strip("/").split("/")
        stem = re.sub(r"\.(parquet|arrow)$", "", parts[-1])
        words = set(re.split(r"[-_.]", stem)) | set(parts[:-1])
        return words & (set(KNOWN_SPLITS) | {split})

    named = {file: splits_of(file) for file in files if file.endswith(DATA_SUFFIXES)}
    chosen = [file for file, splits in named.items() if split in splits]
    if chosen:
        return chosen
    found = sorted(set().union(*named.values())) if named else []
    if found:
        raise FileNotFoundError(f"no {split!r} files at {location!r}: its files hold the splits {found}")
    return list(named)


def _listing(filesystem: pafs.FileSystem, directory: str) -> list[str]:
    selector = pafs.FileSelector(directory, recursive=True, allow_not_found=True)
    return [info.path for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File]


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(path)


def _parquet_batches(path: str) -> Iterator[pa.RecordBatch]:
    filesystem, local = _filesystem(path)
    with filesystem.open_input_file(local) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=RECORD_BATCH_ROWS)


def _arrow_batches(path: str) -> Iterator[pa.RecordBatch]:
    """An Arrow IPC file (random-access format) or stream (what HF datasets writes)."""
    filesystem, local = _filesystem(path)
    with filesystem.open_input_file(local) as f:
        try:
            reader = pa.ipc.open_file(f)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            f.seek(0)
            batches = iter(pa.ipc.open_stream(f))
        yield from batches


def _jsonl_rows(location: str, *, media_dir: str | None) -> Iterator[Row]:
    filesystem, path = _filesystem(location)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"JSONL file {location!r} does not exist")
    base_dir = media_dir or _parent(location if "://" in location else path)
    index = 0
    with filesystem.open_input_stream(path) as f:
        for number, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
                error = "" if isinstance(values, dict) else f"line {number}: not a JSON object"
            except json.JSONDecodeError as e:
                values, error = {}, f"line {number}: invalid JSON ({e})"
            yield Row(index, values if not error else {}, base_dir, error)
            index += 1


def _tfds_rows(location: str, *, split: str | None, data_dir: str | None) -> Iterator[Row]:
    import tensorflow_datasets as tfds  # imported here: only runs that read TFDS pay for it

    name, _, named_split = location.removeprefix("tfds:").partition(":")
    split = named_split or split or "test"
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    for index in range(len(source)):
        yield Row(index, _plain(source[index]), "")


def _plain(value: Any) -> Any:
    """TFDS values as the parquet rows hold them: texts as str, scalars as Python numbers, lists of texts as
    lists; image arrays (uint8, 2+ dimensions) as they are."""
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray) and (value.dtype == object or value.ndim == 0 or value.dtype.kind in "SU"):
        return value.item() if value.ndim == 0 else [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ media


def image_source(value: Any, *, base_dir: str, column: str) -> Any:
    """What the processor reads for one image value of a row: encoded bytes (an HF `Image` struct {bytes, path}
    or raw bytes), a uint8 array (TFDS), or a local path (a relative path joined to `base_dir`; a remote file's
    bytes). RowError naming `column` when it is empty or a file is missing."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, np.ndarray)):
        return value
    if not isinstance(value, str) or not value:
        raise RowError(f"column {column!r} holds no image")
    return _media_file(value, base_dir=base_dir, column=column)


def video_file(name: str, *, media_dir: str, column: str, suffixes: tuple[str, ...] = ("",)) -> str:
    """The local path of a video named `name` (+ one of `suffixes`) in `media_dir`: the first that exists.
    RowError naming the candidates when none does (videos are decoded from local files)."""
    candidates = [_join(media_dir, name + suffix) for suffix in suffixes]
    for candidate in candidates:
        if "://" not in candidate and os.path.isfile(candidate):
            return candidate
    raise RowError(f"column {column!r}: no video file {' or '.join(candidates)} (videos must be local files)")


def _media_file(value: str, *, base_dir: str, column: str) -> bytes | str:
    """A local media file's path, or a remote one's bytes."""
    path = _join(base_dir, value)
    if "://" in path:
        filesystem, remote = _filesystem(path)
        if filesystem.get_file_info(remote).type != pafs.FileType.File:
            raise RowError(f"column {column!r}: media file {path} does not exist")
        with filesystem.open_input_stream(remote) as f:
            return f.read()
    if not os.path.isfile(path):
        raise RowError(f"column {column!r}: media file {path} does not exist")
    return path


def _join(base_dir: str, name: str) -> str:
    if "://" in name or os.path.isabs(name) or not base_dir:
        return name
    return f"{base_dir.rstrip('/')}/{name}" if "://" in base_dir else os.path.join(base_dir, name)
