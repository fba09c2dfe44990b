"""MoE layer: forward + backward tokens/s of each dispatch backend on this CPU against transformers'
Qwen3VLMoeTextSparseMoeBlock on the same weights (its "grouped_mm" experts, the 5.x default, and the "eager"
per-expert loop), and the per-chip memory of one Qwen3-VL-235B-A22B MoE layer compiled for TPU v5p with the
megablox kernels (AOT with libtpu).

    python benchmarks/moe_layer.py
    python benchmarks/moe_layer.py --tiles    # the blocked backend's tile rows; blocked vs dense at 8 experts

CPU part: one MoE block (hidden 512, 32 experts, top-8, expert width 256: 30B-A3B proportions scaled down),
2048 tokens, fp32, loss = sum(y^2); median of 5 timed steps after a warm-up. megablox runs in Pallas interpret
mode off TPU (correct, not a speed path). TPU part: hidden 4096, 128 experts, top-8, expert width 1536, bf16,
8192 tokens per chip, experts split over an expert axis of 8 chips (v5p:2x2x2), weights also FSDP-sharded.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

from qwen3vl_jax.config import TextConfig
from qwen3vl_jax.modeling import moe
from qwen3vl_jax.modeling.moe import MoeBlock
from qwen3vl_jax.parallel.sharding import BATCH_AXES, DEFAULT_RULES, make_mesh, param_shardings

TILING = (512, 1024, 1024)
CPU_SHAPE = dict(hidden=512, experts=32, inter=256)
TOKENS = 2048


def moe_text(*, hidden, experts, inter) -> TextConfig:
    return TextConfig(
        hidden_size=hidden,
        num_experts=experts,
        num_experts_per_tok=8,
        moe_intermediate_size=inter,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        mrope_section=(12, 10, 10),
    )


def median_seconds(step, repeats: int = 5) -> float:
    step()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(backend: str, *, params, x, shape=CPU_SHAPE):
    module = MoeBlock(moe_text(**shape), backend=backend, tiling=TILING, dtype=jnp.float32, param_dtype=jnp.float32)
    grad = jax.jit(jax.value_and_grad(lambda p, x: (module.apply(p, x)[0] ** 2).sum(), argnums=(0, 1)))
    return median_seconds(lambda: jax.block_until_ready(grad(params, x))), float(grad(params, x)[0])


def transformers_block(implementation: str, *, params, x, shape=CPU_SHAPE):
    c = shape
    config = transformers.Qwen3VLMoeTextConfig(
        hidden_size=c["hidden"], num_experts=c["experts"], num_experts_per_tok=8, moe_intermediate_size=c["inter"]
    )
    config._experts_implementation = implementation
    block = Qwen3VLMoeTextSparseMoeBlock(config)
    p = jax.tree_util.tree_map(lambda a: torch.from_numpy(np.asarray(a).copy()), params["params"])
    with torch.no_grad():  # ours (in, out) -> transformers' in-memory (out, in) layout, as F.linear takes it
        block.gate.weight.copy_(p["gate"]["kernel"].T)
        block.experts.gate_up_proj.copy_(p["experts_gate_up"].transpose(1, 2))
        block.experts.down_proj.copy_(p["experts_down"].transpose(1, 2))
    x = torch.from_numpy(np.asarray(x)).requires_grad_(True)

    def step():
        block.zero_grad()
        x.grad = None
        loss = (block(x) ** 2).sum()
        loss.backward()
        return float(loss)

    return median_seconds(step), step()


def cpu_table():
    module = MoeBlock(moe_text(**CPU_SHAPE), backend="dense", tiling=TILING, dtype=jnp.float32, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, TOKENS, CPU_SHAPE["hidden"]))
    params = nn.meta.unbox(module.init(jax.random.PRNGKey(1), x))
    params = jax.tree_util.tree_map(lambda a: a * 4, params)  # spread the router logits: uneven expert loads
    weights = dict(params=params, x=x)
    rows = [(f"transformers {impl}", *transformers_block(impl, **weights)) for impl in ("grouped_mm", "eager")]
    backends = ("blocked", "ragged_dot", "megablox", "dense")
    rows += [(f"qwen3vl_jax {backend}", *ours(backend, **weights)) for backend in backends]
    baseline = rows[0][1]
    print(
        f"CPU ({os.cpu_count()} cores), one MoE block (hidden {CPU_SHAPE['hidden']}, {CPU_SHAPE['experts']} "
        f"experts, top-8, width {CPU_SHAPE['inter']}), {TOKENS} tokens, fp32, forward + backward:"
    )
    print(f"  {'':26s} {'s/step':>8s} {'tokens/s':>9s} {'vs transformers grouped_mm':>27s} {'loss':>12s}")
    for name, seconds, loss in rows:
        print(f"  {name:26s} {seconds:8.3f} {TOKENS / seconds:9.0f} {baseline / seconds:26.2f}x {loss:12.2f}")


def tpu_layer_memory(backend: str, topology: str = "v5p:2x2x2", tokens_per_chip: int = 8192):
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = make_mesh({"fsdp": -1, "expert": 8}, devices)
    text = moe_text(hidden=4096, experts=128, inter=1536)
    module = MoeBlock(text, backend=backend, tiling=TILING, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 4096), jnp.bfloat16)))
    params = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        param_shardings(boxed, mesh, rules=DEFAULT_RULES),
    )
    x = jax.ShapeDtypeStruct(
        (len(devices), tokens_per_chip, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    )
    step = jax.jit(jax.grad(lambda p, x: module.apply(p, x)[0].astype(jnp.float32).sum(), argnums=(0, 1)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        compiled = step.lower(params, x).compile()
    kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    return devices[0].device_kind, len(devices), compiled.memory_analysis(), kernels


def tpu_table():
    gib = 2**30
    print(
        "one Qwen3-VL-235B-A22B MoE layer (hidden 4096, 128 experts, top-8, width 1536, bf16), forward + backward, "
        "8192 tokens per chip, experts over an expert axis of 8, AOT-compiled for v5p:2x2x2, per chip:"
    )
    rows = [(backend, *tpu_layer_memory(backend)) for backend in ("ragged_dot", "megablox")]
    baseline = rows[0][3].temp_size_in_bytes
    for backend, kind, chips, memory, kernels in rows:
        print(
            f"  {backend:10s} on {chips} x {kind}: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, "
            f"temporaries {memory.temp_size_in_bytes / gib:.2f} GiB ({memory.temp_size_in_bytes / baseline:.2f}x "
            f"ragged_dot), {kernels} Mosaic kernel calls"
        )


def tile_table():
    """The blocked backend's tile rows against transformers' grouped_mm, and blocked vs dense at 8 experts."""
    for shape in (CPU_SHAPE, dict(CPU_SHAPE, experts=8)):
        module = MoeBlock(moe_text(**shape), backend="dense", tiling=TILING, dtype=jnp.float32, param_dtype=jnp.float32)
        x = jax.random.normal(jax.random.PRNGKey(0), (1, TOKENS, shape["hidden"]))
        params = jax.tree_util.tree_map(lambda a: a * 4, nn.meta.unbox(module.init(jax.random.PRNGKey(1), x)))
        rows = [("transformers grouped_mm", *transformers_block("grouped_mm", params=params, x=x, shape=shape))]
        rows.append(("qwen3vl_jax dense", *ours("dense", params=params, x=x, shape=shape)))
        for tile in (64, 128, 256, 512):
            moe.BLOCKED_TILE_ROWS = tile
            rows.append((f"qwen3vl_jax blocked {tile}", *ours("blocked", params=params, x=x, shape=shape)))
        print(f"{shape['experts']} experts, {TOKENS} tokens, fp32, forward + backward:")
        for name, seconds, _ in rows:
            print(f"  {name:26s} {seconds:8.3f} s {TOKENS / seconds:9.0f} tokens/s {rows[0][1] / seconds:6.2f}x")


def main():
    if "--tiles" in sys.argv:
        tile_table()
        return
    cpu_table()
    tpu_table()


if __name__ == "__main__":
    main()
