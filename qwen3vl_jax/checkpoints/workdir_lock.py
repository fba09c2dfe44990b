"""One training run per workdir at a time: two runs writing the same checkpoints and metrics would corrupt each
other's. Process 0 of a run holds `<workdir>/run.lock` while it trains; a second run is refused, naming the
holder.

On a local (or network) file system the lock is an `fcntl.flock` on the file, which the kernel releases when the
holder ends in any way (kill -9 included), so a relaunch after a crash is never refused. A bucket (gs://) has no
locks: there the file is a lease that the holder renews every `LEASE_RENEW_SECONDS`; a lease not renewed for
`LEASE_EXPIRY_SECONDS` (its holder is gone) is taken over.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid

import jax

from qwen3vl_jax import storage
from qwen3vl_jax.parallel.multihost import gather_text

LOCK_FILE = "run.lock"
LEASE_RENEW_SECONDS = 30.0
LEASE_EXPIRY_SECONDS = 180.0


class WorkdirInUse(RuntimeError):
    """Another run is training in this workdir (names its host, process id and start time)."""


class WorkdirLock:
    """`acquire()` on every process of a run (process 0 takes the lock, all of them learn the outcome and raise
    WorkdirInUse together); `release()` at the end of the run."""

    def __init__(self, workdir: str, *, lease: bool | None = None):
        self.file = os.path.join(workdir, LOCK_FILE)
        self.lease = storage.is_remote(workdir) if lease is None else lease
        self.owner = dict(
            host=socket.gethostname(),
            pid=os.getpid(),
            processes=jax.process_count(),
            started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            id=uuid.uuid4().hex,
        )
        self._handle = None
        self._renewal: threading.Thread | None = None
        self._released = threading.Event()

    def acquire(self) -> None:
        refusal = ""
        if jax.process_index() == 0:
            storage.path(os.path.dirname(self.file)).mkdir(parents=True, exist_ok=True)
            refusal = self._take_lease() if self.lease else self._take_flock()
        refusal = gather_text(refusal)[0]  # process 0's verdict, on every process
        if refusal:
            raise WorkdirInUse(refusal)

    def release(self) -> None:
        if jax.process_index() != 0:
            return
        self._released.set()
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
        elif self._renewal is not None:
            self._renewal.join()
            if self._read_lease().get("id") == self.owner["id"]:
                storage.path(self.file).unlink()

    def _refusal(self, holder: dict, detail: str = "") -> str:
        who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, {holder.get('processes', '?')} process(es)"
        return (
            f"{os.path.dirname(self.file)} is in use by another run ({who}, started {holder.get('started', '?')})"
            f"{detail}: two runs in one workdir would overwrite each other's checkpoints and metrics. Wait for it "
            f"to end, stop it, or give another --workdir."
        )

    def _take_flock(self) -> str:
        handle = open(self.file, "a+")  # noqa: SIM115 (held open for the run: closing it releases the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            handle.close()
            return self._refusal(holder)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self.owner))
        handle.flush()
        self._handle = handle
        return ""

    def _read_lease(self) -> dict:
        try:
            return json.loads(storage.path(self.file).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _take_lease(self) -> str:
        holder = self._read_lease()
        age = time.time() - float(holder.get("renewed", 0.0))
        if holder and holder.get("id") != self.owner["id"] and age < LEASE_EXPIRY_SECONDS:
            return self._refusal(
                holder, f"; its lease was renewed {age:.0f} s ago and expires {LEASE_EXPIRY_SECONDS - age:.0f} s after"
            )
        self._write_lease()
        time.sleep(1.0)  # two runs that wrote at once: the later write wins, the other one sees it and backs off
        holder = self._read_lease()
        if holder.get("id") != self.owner["id"]:
            return self._refusal(holder)
        self._renewal = threading.Thread(target=self._renew, daemon=True)
        self._renewal.start()
        return ""

    def _write_lease(self) -> None:
        storage.path(self.file).write_text(json.dumps(dict(self.owner, renewed=time.time())))

    def _renew(self) -> None:
        while not self._released.wait(LEASE_RENEW_SECONDS):
            self._write_lease()
