"""Context parallelism's cost on fake CPU devices: the train step of one packed batch on one device against the
same step with every row split over a `context` mesh axis (same batch, same total tokens), and where the extra
time goes. In the same run:

    python benchmarks/context_parallel.py [--seq-len 4096] [--rows 2] [--steps 3]

Each step is also profiled (jax.profiler): XLA:CPU records every executed HLO op (thunk) with its device. The
step's device time is split into the time during which at least one device runs a computation ("compute": the
union of the non-collective ops' intervals over all devices) and the rest, during which every device is inside a
collective (all-gather, reduce-scatter, all-reduce, collective-permute, all-to-all) or waiting at one. If the
sharded step's compute equals the unsharded step's and its extra time is the collective time, the overhead is
the collectives and nothing else.

The fake devices share the local machine's cores (`--xla_force_host_platform_device_count=8`): the sharded steps do
the same arithmetic as the unsharded one, spread over 8 threads instead of the intra-op thread pool, and their
collectives are memory copies between threads. On a TPU slice each chip has its own compute, so the same
program runs ~8x faster per step; what this benchmark shows is that context parallelism adds no work besides
its collectives.

Model: configs/tiny.py with a wider decoder (4 layers, hidden 256, 4 query / 2 kv heads of dim 64; the mergers
output 256), remat
"dots", fp32, XLA attention; data: the built-in synthetic tasks (images, 8-frame videos, text) packed into
rows of `--seq-len` tokens, the patch buffers laid out for 8 context shards.
"""

import argparse
import glob
import gzip
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.parallel.sharding import batch_shardings, make_mesh
from qwen3vl_jax.training.builder import StepBuilder, processor_from
from qwen3vl_jax.training.run_config import config_from_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"unsharded (1 device)": {}, "context 8": {"context": 8}, "context 4 x fsdp 2": {"context": 4, "fsdp": 2}}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def tiny_config(*, seq_len: int, rows: int) -> ConfigDict:
    config = config_from_file(os.path.join(ROOT, "configs", "tiny.py"))
    config.model.overrides.text.update(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, head_dim=64
    )
    config.model.overrides.text.update(num_key_value_heads=2, mrope_section=(12, 10, 10))
    config.model.overrides.vision.out_hidden_size = 256
    config.data.sources = {"synthetic": config.data.sources.synthetic}
    config.data.update(seq_len=seq_len, max_patches=seq_len // 2, batch_size=rows)
    return config


def one_batch(config: ConfigDict, builder: StepBuilder) -> TrainingBatch:
    values = dict(config.data.to_dict(), context_shards=8)
    values.pop("rows_per_device", None)
    data = DataConfig.from_dict(values)
    return next(iter(build_dataset(data, processor_from(config), model_config=builder.model_config)))


def thunk_events(trace_dir: str) -> list[dict]:
    """The executed HLO ops of a jax.profiler trace: {device, op, run (one per program execution), start, end}, in
    microseconds."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    ops = []
    for event in events:
        args = event.get("args", {})
        if event.get("ph") == "X" and "hlo_op" in args and "device_ordinal" in args:
            start = float(event["ts"])
            end = start + event["dur"]
            device, run = int(args["device_ordinal"]), args.get("run_id")
            ops.append(dict(device=device, op=args["hlo_op"], run=run, start=start, end=end))
    return ops


def leaf_ops(ops: list[dict]) -> list[dict]:
    """Drops the control-flow ops (a while loop's thunk spans the ops of its body) so that no interval is counted
    twice: an op that encloses another op of the same device is a container."""
    leaves = []
    for device in {op["device"] for op in ops}:
        mine = sorted((op for op in ops if op["device"] == device), key=lambda op: (op["start"], -op["end"]))
        containers = set()
        stack: list[int] = []
        for i, op in enumerate(mine):
            while stack and mine[stack[-1]]["end"] <= op["start"]:
                stack.pop()
            if stack and op["end"] <= mine[stack[-1]]["end"]:
                containers.add(stack[-1])
            stack.append(i)
        leaves += [op for i, op in enumerate(mine) if i not in containers]
    return leaves


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, -np.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_step(run_step, steps: int) -> dict:
    """Seconds per step of device time (first op to last op), split into compute, collectives and idle time."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(steps):
            run_step()
        jax.profiler.stop_trace()
        ops = leaf_ops(thunk_events(trace_dir))
    compute = [(op["start"], op["end"]) for op in ops if not op["op"].startswith(COLLECTIVES)]
    collective = [(op["start"], op["end"]) for op in ops if op["op"].startswith(COLLECTIVES)]
    # device time: from the first op to the last of each execution of the step (the steps run one after another)
    runs = {}
    for op in ops:
        first, last = runs.get(op["run"], (np.inf, -np.inf))
        runs[op["run"]] = (min(first, op["start"]), max(last, op["end"]))
    assert len(runs) == steps, f"{len(runs)} program executions profiled in {steps} steps"
    device = sum(last - first for first, last in runs.values())
    busy = union_length(compute)
    communicating = union_length(compute + collective) - busy
    return dict(
        device=device / steps / 1e6,
        compute=busy / steps / 1e6,
        collectives=communicating / steps / 1e6,
        idle=(device - busy - communicating) / steps / 1e6,
        collective_ops=len(collective) // steps,
    )


def measure(name: str, sizes: dict, config: ConfigDict, steps: int) -> dict:
    devices = jax.devices()[: int(np.prod(list(sizes.values()))) if sizes else 1]
    mesh = make_mesh({"data": 1, "fsdp": 1, "context": 1, "tensor": 1, "expert": 1, **sizes}, devices)
    config.mesh = ConfigDict({axis: int(mesh.shape[axis]) for axis in mesh.axis_names})
    builder = StepBuilder(config, mesh)
    batch = one_batch(config, builder)
    with jax.set_mesh(mesh), nn.logical_axis_rules(builder.rules):
        state = [builder.initial_state()]  # config.seed 0
        arrays = jax.device_put(batch, batch_shardings(mesh))
        losses = []

        def run_step():
            state[0], metrics = builder.train_step(state[0], arrays)
            losses.append(float(metrics["loss"]))
            jax.block_until_ready(state[0])  # the optimizer update finishes after the loss is known

        run_step()  # compiles
        cost = builder.train_step.lower(state[0], arrays).compile().cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost)["flops"] * len(devices)
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        seconds = (time.perf_counter() - start) / steps
        profile = profile_step(run_step, steps)
    tokens = int((batch.segment_ids > 0).sum())
    return dict(name=name, seconds=seconds, tokens=tokens, flops=flops, loss=losses[0], **profile)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = [
        measure(name, sizes, tiny_config(seq_len=args.seq_len, rows=args.rows), args.steps)
        for name, sizes in MESHES.items()
    ]
    base = results[0]
    print(
        f"train step, batch {args.rows} rows x {args.seq_len} tokens ({base['tokens']} real), fp32, remat dots; "
        f"{len(jax.devices())} fake CPU devices on {os.cpu_count()} cores; {args.steps} steps after warm-up"
    )
    print(
        "  work: XLA's cost analysis of the step's FLOPs, summed over the devices, against the unsharded step's; "
        "device time per step = compute (some device runs an op) + collectives (every device in or waiting at "
        "one) + idle (no op runs)"
    )
    for r in results:
        print(
            f"  {r['name']:22s} {r['seconds']:6.2f} s/step  {r['tokens'] / r['seconds']:6.0f} tokens/s  "
            f"{base['seconds'] / r['seconds']:.2f}x unsharded | work {r['flops'] / base['flops']:.2f}x | "
            f"device {r['device']:.2f} s = compute {r['compute']:.2f}"
            f" + collectives {r['collectives']:.2f} ({r['collective_ops']} ops) + idle {r['idle']:.2f}  "
            f"loss {r['loss']:.5f}"
        )
    for r in results[1:]:
        print(
            f"  {r['name']} against unsharded: compute {r['compute'] - base['compute']:+.2f} s, collectives "
            f"{r['collectives']:+.2f} s, idle {r['idle'] - base['idle']:+.2f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
