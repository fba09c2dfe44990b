"""Where `train_step_vs_hf.py`'s step spends its time in XLA: a `jax.profiler` trace of a few steps (after two
warm-up steps), its operations summed per step and grouped by kind (matmul library calls, XLA's own dots, each
kind of fusion), largest first.

    python benchmarks/train_step_profile.py [--remat dots] [--steps 3] [--top 25]

Operations on the two cores can overlap, so the sum may exceed the wall time of a step; the trace itself stays in
the printed directory (open it in Perfetto or TensorBoard).
"""

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from train_step_vs_hf import make_batch, make_jax_step

# runtime bookkeeping events, not operations of the program
NOT_OPERATIONS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction")


def kind(operation: str) -> str:
    """The operation's kind: its name without the numeric suffix XLA adds; library matmul fusions as one kind."""
    if operation.startswith(("ynn_fusion", "xnn_fusion", "onednn")):
        return "matmul library (YNNPACK / XNNPACK / oneDNN fusions)"
    if operation.startswith("dot"):  # dot and dot_general
        return "XLA dot"
    return re.sub(r"[._]\d+$", "", operation)


def operation_times(trace_dir: Path) -> collections.Counter:
    """Microseconds per operation name summed over the trace."""
    (trace,) = trace_dir.glob("**/*.trace.json.gz")
    with gzip.open(trace) as file:
        events = json.load(file)["traceEvents"]
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "dur" in event and not event["name"].startswith(NOT_OPERATIONS):
            times[event["name"]] += event["dur"]
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--remat", default="dots")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    step, flops = make_jax_step(make_batch(np.random.default_rng(0)), remat=args.remat)
    for _ in range(2):  # compilation, then one step on warm buffers
        step()
    trace_dir = Path(tempfile.mkdtemp(prefix="train_step_profile_"))
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    for _ in range(args.steps):
        step()
    jax.profiler.stop_trace()
    times = operation_times(trace_dir)
    kinds = collections.Counter()
    for operation, microseconds in times.items():
        kinds[kind(operation)] += microseconds
    per_step = 1e-3 / args.steps
    print(f"remat={args.remat}; {flops / 1e9:.0f} model GFLOP per step; trace in {trace_dir}")
    print(f"operations sum to {sum(times.values()) * per_step:.0f} ms per step; by kind:")
    for name, microseconds in kinds.most_common(args.top):
        print(f"  {microseconds * per_step:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
