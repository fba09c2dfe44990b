"""Start a multi-process run on the local machine: N processes of one binary, each holding its own CPU devices of one
mesh, joined through a coordinator on 127.0.0.1 — a TPU pod slice in miniature (one process per host).

    python -m experiments.launch_local --processes=2 --devices_per_process=4 -- \
        experiments.train --config=configs/tiny.py --workdir=/tmp/tiny_2x4

After `--` comes the binary: a module (`experiments.train ...`, run as `python -m`), a `.py` file, or any command.
Every process gets JAX_COORDINATOR_ADDRESS (a free port), JAX_NUM_PROCESSES, JAX_PROCESS_ID and, with
--devices_per_process, that many CPU devices (JAX_PLATFORMS=cpu). Each output line is prefixed with the process's
index ("[1] ..."). When a process fails (a non-zero exit or a signal) the others are killed, since they would
wait for it in their next collective; SIGTERM or Ctrl-C to the launcher is passed on to every process (a
training run saves a checkpoint and stops). Exits with the first failure's code (128 + signal for a signal),
else 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from experiments import cli

_PROCESSES = flags.DEFINE_integer("processes", 2, "Number of processes.", lower_bound=1)
_DEVICES = flags.DEFINE_integer(
    "devices_per_process", 0, "CPU devices per process (0: leave the platform and device flags as they are)."
)
_PORT = flags.DEFINE_integer("port", 0, "The coordinator's port on 127.0.0.1 (0: a free one).")
_TIMEOUT = flags.DEFINE_integer("timeout", 300, "Seconds the processes wait for each other when joining.")

DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_of(binary: list[str]) -> list[str]:
    """`experiments.train --flags` -> python -m experiments.train --flags; `x.py --flags` -> python x.py --flags;
    anything else as given."""
    first = binary[0]
    if first.endswith(".py"):
        return [sys.executable, *binary]
    if re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", first) and not os.path.exists(first):
        return [sys.executable, "-m", *binary]
    return binary


def process_environment(index: int, *, processes: int, port: int, devices: int, timeout: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(index),
        JAX_INITIALIZATION_TIMEOUT=str(timeout),
        PYTHONUNBUFFERED="1",
    )
    if devices:
        flags_without_count = DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags_without_count} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def relay(index: int, stream, lock: threading.Lock) -> None:
    """Copies a process's output to ours line by line, each line prefixed with its index ('\\r' progress-bar
    updates count as lines)."""
    pending = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        pending += chunk
        *lines, pending = re.split(rb"\r\n|\r|\n", pending)
        with lock:
            for line in lines:
                sys.stdout.write(f"[{index}] {line.decode(errors='replace')}\n")
            sys.stdout.flush()
    if pending:
        with lock:
            sys.stdout.write(f"[{index}] {pending.decode(errors='replace')}\n")
            sys.stdout.flush()


def kill_group(process: subprocess.Popen, sig: int) -> None:
    """Sends `sig` to the process and its children (its data-loading workers), started in their own group."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def launch(binary: list[str], *, processes: int, devices: int, port: int, timeout: int) -> int:
    """Runs the processes to the end; returns the exit code (see the module docstring)."""
    port = port or free_port()
    command = command_of(binary)
    lock = threading.Lock()
    children, relays = [], []
    print(f"[launch_local] {processes} processes on 127.0.0.1:{port}: {' '.join(command)}", flush=True)
    for index in range(processes):
        env = process_environment(index, processes=processes, port=port, devices=devices, timeout=timeout)
        child = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        print(f"[launch_local] process {index} is pid {child.pid}", flush=True)
        children.append(child)
        relays.append(threading.Thread(target=relay, args=(index, child.stdout, lock), daemon=True))
        relays[-1].start()

    def forward(signum, frame):  # to the processes themselves, not their data workers, which they stop
        print(f"[launch_local] {signal.Signals(signum).name}: SIGTERM to every process", flush=True)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failure = None
    while failure is None:
        running = any(child.poll() is None for child in children)
        for index, child in enumerate(children):
            code = child.poll()
            if code not in (None, 0) and failure is None:
                failure = 128 - code if code < 0 else code
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                print(f"[launch_local] process {index} ended with {how}: stopping the others", flush=True)
                for other in children:
                    if other.poll() is None:
                        kill_group(other, signal.SIGKILL)
        if not running:
            break
        time.sleep(0.1)
    for child in children:
        child.wait()
    for thread in relays:
        thread.join(timeout=5)
    if failure is None:
        print(f"[launch_local] all {processes} processes ended with exit code 0", flush=True)
    return failure or 0


def main(argv):
    binary = argv[1:]
    if not binary:
        raise app.UsageError("give the binary after --, e.g. -- experiments.train --config=configs/tiny.py")
    sys.exit(
        launch(binary, processes=_PROCESSES.value, devices=_DEVICES.value, port=_PORT.value, timeout=_TIMEOUT.value)
    )


if __name__ == "__main__":
    cli.run(main)
