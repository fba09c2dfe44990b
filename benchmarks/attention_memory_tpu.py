"""Per-chip memory of one decoder layer's attention, forward + backward, splash vs XLA, compiled for a TPU v5p
chip with libtpu (AOT on the devices of `jax.experimental.topologies.get_topology_desc`; runs on any machine).

    python benchmarks/attention_memory_tpu.py [--lengths 8192 32768 131072]

Shapes of Qwen3-VL-8B's attention (32 query heads, 8 kv heads, head_dim 128, bf16), one sequence of L tokens
with causal masking and segment ids, gradients with respect to q, k and v. Prints the temporary memory of each
and their ratio; where XLA does not fit the chip, the size the TPU compiler asked for.
"""

import argparse
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.parallel.sharding import MESH_AXES

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GIB = 2**30


def gib_label(size: float, fits: bool) -> str:
    return f"{size / GIB:9.3f} GiB" + ("" if fits else " (does not fit)")


def temp_bytes(impl: str, *, length: int, device) -> tuple[float, bool]:
    """(temporary bytes, fits): from memory_analysis, or the compiler's out-of-memory report."""
    mesh = Mesh(np.asarray([device]).reshape(1, 1, 1, 1), MESH_AXES)
    replicated = NamedSharding(mesh, PartitionSpec())

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    q = array((1, length, HEADS, HEAD_DIM), jnp.bfloat16)
    kv = array((1, length, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    segments = array((1, length), jnp.int32)

    def loss(q, k, v, segments):
        out = attention(
            q, k, v, q_segment_ids=segments, kv_segment_ids=segments, causal=True, impl=impl, block_sizes=(512, 512)
        )
        return out.astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
        with jax.set_mesh(mesh):
            compiled = step.lower(q, kv, kv, segments).compile()
    except jax.errors.JaxRuntimeError as e:
        match = re.search(r"HLO temporaries \(([\d.]+)([GMK])\)", str(e))
        if not match:
            raise
        return float(match.group(1)) * {"G": GIB, "M": 2**20, "K": 2**10}[match.group(2)], False
    return float(compiled.memory_analysis().temp_size_in_bytes), True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--topology", default="v5p:2x2x1")
    args = parser.parse_args()
    device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
    print(
        f"one decoder layer's attention (Qwen3-VL-8B: {HEADS} q heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
        f"bf16), forward + backward, on one {device.device_kind} chip; temporary memory per chip"
    )
    for length in args.lengths:
        (xla, xla_fits), (splash, splash_fits) = (
            temp_bytes(impl, length=length, device=device) for impl in ("xla", "splash")
        )
        print(
            f"  L = {length:6d}: xla {gib_label(xla, xla_fits)} | splash {gib_label(splash, splash_fits)} | "
            f"splash / xla = 1/{xla / splash:.0f}"
        )


if __name__ == "__main__":
    main()
