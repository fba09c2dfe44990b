"""One run, several processes: how a process joins a multi-process run, and what the processes of a run must agree
on so that none of them hangs or goes its own way.

A TPU pod slice runs one process per host (v5p-16: 2, v5p-128: 16); several GPU or CPU machines run one each; on
one machine `python -m experiments.launch_local --processes=N` starts N. Each process holds its own devices of
one global mesh and takes part in every collective: when one of them stops, skips a batch or chooses another
checkpoint, the others wait forever. So every decision that depends on what one process sees (a SIGTERM, the
end of its share of a finite dataset, a checkpoint file it cannot read, its config) is made by all of them
together here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
T = TypeVar("T")

# the variables that make a process one of several (the names jax's own cluster detection uses)
COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
INITIALIZATION_TIMEOUT = "JAX_INITIALIZATION_TIMEOUT"  # seconds
DEFAULT_TIMEOUT_SECONDS = 300


class DistributedSetupError(RuntimeError):
    """A process that cannot join its run: incomplete settings, or a coordinator it cannot reach."""


class ConfigMismatch(ValueError):
    """The processes of one run were started with different settings (names the fields and the processes)."""


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """Where the run's coordinator listens (process 0 starts it there), how many processes the run has and which
    one this is; `timeout_seconds` bounds the wait for the coordinator and for the other processes."""

    coordinator_address: str
    num_processes: int
    process_id: int
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS

    @classmethod
    def resolve(
        cls,
        coordinator_address: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        timeout_seconds: int | None = None,
    ) -> ProcessSettings | None:
        """The settings given as arguments (the binaries' flags), else from the environment (JAX_COORDINATOR_ADDRESS,
        JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_INITIALIZATION_TIMEOUT); None when no coordinator is named."""
        address = coordinator_address or os.environ.get(COORDINATOR_ADDRESS)
        if not address:
            return None
        values = {}
        for name, given, variable in (
            ("num_processes", num_processes, NUM_PROCESSES),
            ("process_id", process_id, PROCESS_ID),
        ):
            text = given if given is not None else os.environ.get(variable)
            if text is None or str(text).strip() == "":
                raise DistributedSetupError(
                    f"the coordinator address {address} is set, but not the {name.replace('_', ' ')}: set "
                    f"{variable} (or the --{name} flag) in every process"
                )
            try:
                values[name] = int(text)
            except ValueError:
                raise DistributedSetupError(f"{variable} (--{name}) must be an integer, got {text!r}") from None
        if not 0 <= values["process_id"] < values["num_processes"]:
            raise DistributedSetupError(
                f"process id {values['process_id']} is not in [0, {values['num_processes']}) (the number of processes)"
            )
        timeout = timeout_seconds if timeout_seconds is not None else os.environ.get(INITIALIZATION_TIMEOUT)
        return cls(address, timeout_seconds=int(timeout or DEFAULT_TIMEOUT_SECONDS), **values)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_seconds: int | None = None,
) -> None:
    """Joins this process to its multi-process run, once (`jax.distributed.initialize`), when it is one:
    - a coordinator address is given (argument or JAX_COORDINATOR_ADDRESS) with the number of processes and this
      process's id (arguments or JAX_NUM_PROCESSES / JAX_PROCESS_ID) — several GPU or CPU machines, or the
      processes experiments.launch_local starts;
    - on Cloud TPU VMs asked for with JAX_PLATFORMS=tpu (as tpu/launch.sh does) or a multi-host
      TPU_WORKER_HOSTNAMES: jax finds the slice's workers from the VM metadata.
    A process other than 0 that cannot reach the coordinator within the timeout stops with DistributedSetupError
    naming the address; a process 0 whose others do not all connect in time is stopped by jax's coordination
    service (after a line naming the address and the count)."""
    if jax.distributed.is_initialized():
        return
    settings = ProcessSettings.resolve(coordinator_address, num_processes, process_id, timeout_seconds)
    if settings is None:
        tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")
        if tpu_workers or "tpu" in os.environ.get("JAX_PLATFORMS", "").split(","):
            jax.distributed.initialize()
            log.info("process %d of %d", jax.process_index(), jax.process_count())
        return
    if settings.process_id != 0:
        wait_for_coordinator(settings.coordinator_address, timeout_seconds=settings.timeout_seconds)
    print(
        f"process {settings.process_id} of {settings.num_processes}: joining the run through the coordinator at "
        f"{settings.coordinator_address} (waiting up to {settings.timeout_seconds} s for all processes)",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=settings.timeout_seconds,
    )


def wait_for_coordinator(address: str, *, timeout_seconds: float) -> None:
    """Returns once the coordinator at `address` (host:port) accepts connections; DistributedSetupError after
    `timeout_seconds` (jax itself would abort the process without naming the address)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedSetupError(f"coordinator address {address!r} is not host:port")
    host = host.strip("[]")  # an IPv6 literal
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, max(timeout_seconds, 0.1))):
                return
        except OSError as e:
            error = e
        if time.monotonic() >= deadline:
            raise DistributedSetupError(
                f"cannot reach the coordinator at {address} within {timeout_seconds} s ({error}). Process 0 of the "
                f"run starts it: is process 0 running, and can this host reach {address}?"
            )
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ agreeing


def gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [text]
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros(int(lengths.max(initial=1)) or 1, np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.bool_(flag))).any())


def differing_fields(first: Any, second: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two JSON-like values (nested dicts)."""
    if isinstance(first, dict) and isinstance(second, dict):
        names = sorted(first.keys() | second.keys())
        return [f for k in names for f in differing_fields(first.get(k), second.get(k), f"{prefix}{k}.")]
    return [] if first == second else [prefix.rstrip(".")]


def check_same_settings(values: dict, *, what: str = "config") -> None:
    """Raises ConfigMismatch on every process when the processes' `values` (JSON-like) differ, naming each field
    that differs with its value on each process (a collective)."""
    texts = gather_text(json.dumps(values, sort_keys=True, default=str))
    if len(set(texts)) == 1:
        return
    settings = [json.loads(text) for text in texts]
    lines = []
    for index, other in enumerate(settings[1:], 1):
        for field in differing_fields(settings[0], other)[:10]:
            lines.append(
                f"  {field}: {_lookup(other, field)!r} on process {index}, {_lookup(settings[0], field)!r} on process 0"
            )
    raise ConfigMismatch(
        f"the {len(texts)} processes of this run were started with different {what}s; all of them stop:\n"
        + "\n".join(lines)
        + "\nStart every process with the same command (only the process id may differ)."
    )


def _lookup(values: Any, field: str) -> Any:
    for key in field.split("."):
        values = values.get(key) if isinstance(values, dict) else None
    return values


def in_lockstep(items: Iterable[T], *, filler: Callable[[], T]) -> Iterator[T]:
    """The items of a finite per-process stream, every process yielding equally many: a process whose stream
    ended while another's goes on yields `filler()` (e.g. a batch of padding rows, which counts for nothing),
    so that every process runs the same number of collective steps. One collective per item."""
    iterator, ended = iter(items), False
    while True:
        item = None if ended else next(iterator, None)
        ended = item is None
        if not any_process(not ended):
            return
        yield filler() if ended else item


class StopSignal:
    """SIGTERM to any process of the run (a preemption or a maintenance event on one host) -> `reached(step)` is
    true at the same step on every process. Across processes through jax's preemption sync point (its
    coordination service catches SIGTERM); in a single, uninitialised process through a signal handler, installed
    for the `with` block and then restored."""

    def __init__(self) -> None:
        self.received = False
        self._synchronised = jax.distributed.is_initialized()
        self._previous = None

    def __enter__(self) -> StopSignal:
        if not self._synchronised:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop (call once per step, on every process, with the same step)."""
        if self._synchronised:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received
