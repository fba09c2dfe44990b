"""Reading boxes of tensors out of safetensors files, local or in a bucket, without reading the rest.

The `safetensors` library reads local files only, so a host of a pod slice could not read its part of a
checkpoint in `gs://`. A safetensors file is an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range; optional string `__metadata__`) and the row-major tensor data, so a box
of a tensor is a set of contiguous byte runs: `SafetensorsFile.read` reads those runs (through `etils.epath`,
any file system), merging runs whose gap is at most `max_gap_bytes` (fewer requests to a bucket).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
from typing import BinaryIO

import ml_dtypes
import numpy as np

from qwen3vl_jax import storage

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
REMOTE_MAX_GAP_BYTES = 1 << 20  # in a bucket a request costs more than reading a MiB


class SafetensorsFormatError(ValueError):
    """The file is not a readable safetensors file (names the file)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file


class SafetensorsFile:
    """One safetensors file opened for reading boxes of its tensors. `bytes_read` counts the bytes read from
    the file after the header. `opener` (default: `etils.epath` open for reading) may wrap the file object."""

    def __init__(self, location: str, *, max_gap_bytes: int | None = None, opener=None):
        self.location = location
        self.max_gap_bytes = (
            (REMOTE_MAX_GAP_BYTES if storage.is_remote(location) else 0) if max_gap_bytes is None else max_gap_bytes
        )
        try:
            self._file: BinaryIO = opener(location) if opener else storage.path(location).open("rb")
        except OSError as e:
            raise SafetensorsFormatError(f"cannot open safetensors file {location}: {e}") from None
        self.bytes_read = 0
        self.tensors, self.metadata = self._read_header()

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        start = self._file.read(8)
        if len(start) != 8:
            raise SafetensorsFormatError(f"{self.location} is not a safetensors file: shorter than 8 bytes")
        (length,) = struct.unpack("<Q", start)
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, MemoryError, OverflowError) as e:
            raise SafetensorsFormatError(f"{self.location} is not a safetensors file: bad header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsFormatError(f"{self.location} is not a safetensors file: its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_bytes = self._file.seek(0, 2) - 8 - length
        tensors = {}
        for key, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise SafetensorsFormatError(
                    f"{self.location}: tensor {key} has unsupported dtype {entry.get('dtype')}"
                )
            dtype, shape = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise SafetensorsFormatError(f"{self.location}: tensor {key}'s byte range does not match its shape")
            if end > data_bytes:
                raise SafetensorsFormatError(
                    f"{self.location} is truncated: tensor {key} ends past the end of the file"
                )
            tensors[key] = TensorInfo(dtype, shape, 8 + length + begin)
        return tensors, metadata

    def read(
        self, key: str, box: tuple[slice, ...] | None = None, *, as_shape: tuple[int, ...] | None = None
    ) -> np.ndarray:
        """Tensor `key`, or its box (one slice of step 1 per dimension), as a new numpy array. `as_shape`: read
        the tensor as if it had this shape (the same elements, row-major), e.g. a matrix as (out, heads, head_dim)."""
        info = self.tensors[key]
        shape = info.shape if as_shape is None else tuple(as_shape)
        if math.prod(shape) != math.prod(info.shape):
            raise ValueError(f"{self.location}: tensor {key} of shape {info.shape} cannot be read as {shape}")
        ranges = [s.indices(n)[:2] for s, n in zip(box or (), shape)]
        ranges += [(0, n) for n in shape[len(ranges) :]]
        out = np.empty([stop - start for start, stop in ranges], info.dtype)
        if out.size == 0:
            return out
        if not shape:
            self._read_runs(info, [0], 1, out.reshape(-1).view(np.uint8))
            return out
        # runs are contiguous over the dimensions after the last partly read one (`cut`) and that one's range
        cut = max((d for d, (r, n) in enumerate(zip(ranges, shape)) if r != (0, n)), default=0)
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
        run = (ranges[cut][1] - ranges[cut][0]) * strides[cut]
        starts = [
            sum(i * stride for i, stride in zip(outer, strides)) + ranges[cut][0] * strides[cut]
            for outer in itertools.product(*(range(*r) for r in ranges[:cut]))
        ]
        self._read_runs(info, starts, run, out.reshape(-1).view(np.uint8))
        return out

    def _read_runs(self, info: TensorInfo, starts: list[int], run: int, out: np.ndarray) -> None:
        """Reads the runs of `run` elements at element offsets `starts` (ascending) into `out` (bytes), one read per
        group of runs whose gaps are at most max_gap_bytes."""
        size = info.dtype.itemsize
        group = [0]
        for i in range(1, len(starts) + 1):
            if i < len(starts) and (starts[i] - starts[i - 1] - run) * size <= self.max_gap_bytes:
                group.append(i)
                continue
            first, last = starts[group[0]], starts[group[-1]]
            self._file.seek(info.offset + first * size)
            data = self._file.read((last - first + run) * size)
            self.bytes_read += len(data)
            if len(data) != (last - first + run) * size:
                raise SafetensorsFormatError(f"{self.location} is truncated: the tensor data ends early")
            for j in group:
                offset = (starts[j] - first) * size
                out[j * run * size : (j + 1) * run * size] = np.frombuffer(data, np.uint8, run * size, offset)
            group = [i]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_streamed(location: str, tensors: list[tuple[str, np.dtype, tuple[int, ...]]], produce, *, metadata=None):
    """Writes a safetensors file of `tensors` (name, dtype, shape), asking `produce(name)` for each tensor's
    values one at a time, in order, so that only one tensor is in memory while writing (local or gs://)."""
    codes = {np.dtype(dtype): code for code, dtype in DTYPES.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = dict(dtype=codes[np.dtype(dtype)], shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the safetensors library writes
    with storage.path(location).open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, dtype, shape in tensors:
            value = np.ascontiguousarray(produce(name), dtype=dtype)
            if value.shape != tuple(shape):
                raise ValueError(f"{location}: tensor {name} has shape {value.shape}, the header says {tuple(shape)}")
            f.write(value.tobytes())
