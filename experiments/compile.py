"""Will it fit? AOT-compile a config's train step for a TPU topology with libtpu, on any machine.

    pip install -r requirements-tpu.txt
    python -m experiments.compile --config=configs/qwen3_vl_8b.py --topology=v5p:4x4x4

Prints the per-chip memory of the compiled step (arguments, outputs, temporaries; donated state is counted
once) against the chip's HBM and says `fits` or `does not fit`; exits 0 only when it fits. Then the matmul
FLOPs the compiled program runs per token (loops counted as often as they run), against the model's: their
ratio is what rematerialisation recomputes. Topology names are
`<generation>:<chip grid>` (v5p grids are 3-D; a v5p-N slice has N/2 chips, e.g. v5p:4x4x4 = v5p-128).
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices come from the topology description

import flax.linen as nn
import jax
from absl import flags
from jax.experimental import topologies
from ml_collections import config_flags

from experiments import cli
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.parallel.chips import TPU_CHIPS
from qwen3vl_jax.parallel.sharding import batch_shardings, make_mesh
from qwen3vl_jax.training.builder import StepBuilder
from qwen3vl_jax.training.hlo_flops import count_flops
from qwen3vl_jax.training.metrics import forward_flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:4x4x4 or v6e:16x16.")

GIB = 2**30


def hbm_per_chip(device) -> int:
    if device.device_kind not in TPU_CHIPS:
        raise ValueError(f"unknown HBM size for TPU kind {device.device_kind!r}; known: {sorted(TPU_CHIPS)}")
    return TPU_CHIPS[device.device_kind][1]


def abstract_batch(builder: StepBuilder) -> TrainingBatch:
    """ShapeDtypeStructs of one global batch, sharded like the real batches (with the arrays the objective adds,
    e.g. offline distillation's cached top-k logits)."""
    data = builder.config.data
    b, length = builder.global_batch_size(data), data.seq_len
    batch = TrainingBatch.abstract(
        b,
        seq_len=length,
        max_patches=data.max_patches,
        patch_dim=builder.model_config.vision.patch_dim,
        extra=builder.objective.extra_batch_shapes(batch_size=b, seq_len=length),
    )
    shardings = batch_shardings(builder.mesh, extra=builder.objective.batch_fields)
    return jax.tree_util.tree_map(
        lambda array, sharding: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding), batch, shardings
    )


def model_flops_outside_kernels(builder: StepBuilder) -> float:
    """The step's model matmul FLOPs that XLA runs itself (not inside a Pallas kernel): 3 x forward for a
    trained part, 2 x for a frozen part whose input gradient a trained part before it needs, 1 x otherwise."""
    config, mc = builder.config, builder.model_config
    data = config.data
    forward = forward_flops(mc, batch=builder.global_batch_size(data), seq_len=data.seq_len, patches=data.max_patches)
    splash, megablox = mc.attention_impl == "splash", mc.moe_backend == "megablox"
    frozen = set(config.optimizer.freeze)
    total, trained_before = 0.0, False
    for part, flops in (
        ("vision", forward.vit + (not splash) * forward.vit_attention),
        ("mergers", forward.mergers),
        ("llm", forward.text_dense + (not megablox) * forward.text_experts + (not splash) * forward.text_attention),
    ):
        trained = part not in frozen
        total += flops * (3 if trained else 2 if trained_before else 1)
        trained_before |= trained
    return total


def print_flops(builder: StepBuilder, hlo: str, chips: int) -> None:
    program = count_flops(hlo)
    tokens = builder.global_batch_size(builder.config.data) * builder.config.data.seq_len
    executed, model = program.matmul_flops * chips / tokens, model_flops_outside_kernels(builder) / tokens
    print(
        f"  matmul FLOPs per token outside Pallas kernels: {executed / 1e9:.4g} GFLOP run by XLA (loops x trip "
        f"count), {model / 1e9:.4g} GFLOP in the model -> {executed / model:.2f}x (rematerialisation)"
    )
    if program.unknown_trip_counts:
        loops = program.unknown_trip_counts
        print(
            f"  warning: {len(loops)} loops ({', '.join(loops[:3])}, ...) have trip counts this cannot read; "
            "their bodies are counted once"
        )
    if program.kernel_calls:
        calls = ", ".join(f"{name} {count}" for name, count in sorted(program.kernel_calls.items()))
        print(f"  Pallas kernel calls per step per chip: {calls}")


def main(argv):
    del argv
    config = _CONFIG.value
    topology = topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGY.value)
    devices = topology.devices
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict(), devices))
    hbm = hbm_per_chip(devices[0])
    mc = builder.model_config
    params = sum(x.size for x in jax.tree_util.tree_leaves(builder.abstract_state().params))
    print(
        f"config: {mc.model_type} {params / 1e6:,.1f}M parameters, {mc.dtype} compute / {mc.param_dtype} weights, "
        f"remat={mc.remat}; batch {builder.global_batch_size(config.data)} x {config.data.seq_len} tokens + "
        f"{config.data.max_patches} patches per row"
    )
    print(f"topology: {_TOPOLOGY.value} ({len(devices)} x {devices[0].device_kind}), mesh {dict(builder.mesh.shape)}")
    start = time.perf_counter()
    try:
        with jax.set_mesh(builder.mesh), nn.logical_axis_rules(builder.rules):
            arguments = (builder.abstract_state(), abstract_batch(builder), *builder.abstract_frozen_params())
            compiled = builder.train_step.lower(*arguments).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"  the TPU compiler ran out of HBM: {str(e).splitlines()[0]}\n  -> does not fit")
        sys.exit(1)
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    hlo = compiled.as_text()
    kernels = hlo.count('custom_call_target="tpu_custom_call"')
    print(f"  compiled in {time.perf_counter() - start:.0f} s; Pallas (Mosaic) kernel calls: {kernels}")
    for name, value in (
        ("arguments", memory.argument_size_in_bytes),
        ("outputs", memory.output_size_in_bytes),
        ("aliased (donated)", memory.alias_size_in_bytes),
        ("temporaries", memory.temp_size_in_bytes),
        ("code", memory.generated_code_size_in_bytes),
        ("total", total),
    ):
        print(f"  {name:18s} {value / GIB:8.2f} GiB per chip")
    fits = total <= hbm
    print(f"  {'HBM':18s} {hbm / GIB:8.2f} GiB per chip -> {'fits' if fits else 'does not fit'}")
    print_flops(builder, hlo, chips=len(devices))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"  XLA cost analysis per chip and step (each loop body counted once, so below what runs): "
        f"{cost.get('flops', 0) / 1e12:.4g} TFLOP, {cost.get('bytes accessed', 0) / GIB:.4g} GiB accessed"
    )
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
