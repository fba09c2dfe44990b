"""Will it fit? AOT-compile a config's train step for a TPU topology with libtpu, on any machine.

    pip install -r requirements-tpu.txt
    python -m experiments.compile --config=configs/qwen3_vl_8b.py --topology=v5p:4x4x4

Prints the per-chip memory of the compiled step (arguments, outputs, temporaries; donated state is counted
once) against the chip's HBM and says `fits` or `does not fit`; exits 0 only when it fits. Then the matmul
FLOPs the compiled program runs per token (loops counted as often as they run), against the model's: their
ratio is what rematerialisation recomputes. Topology names are
`<generation>:<chip grid>` (v5p grids are 3-D; a v5p-N slice has N/2 chips, e.g. v5p:4x4x4 = v5p-128).

A GRPO config (objective "grpo") has two phases per step, planned one after the other: the update (the train step
on the packed rollout, as above) and the rollout's generation (prefill + the decode loop of
inference/generation.py, sampling with log-probabilities, for prompts_per_step x group_size rows of the largest
prompt buffers the rollout makes, on the parameters as the train state holds them); the rollout's memory counts
what the train state keeps on the chips beside it (optimizer state; the frozen reference when beta > 0). Exits 0
only when both fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices come from the topology description

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from experiments import cli
from qwen3vl_jax.inference.generation import jitted_generate
from qwen3vl_jax.inference.sampling import SamplingConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.inputs.model_inputs import INPUT_FIELDS, ModelInputs
from qwen3vl_jax.parallel.chips import TPU_CHIPS
from qwen3vl_jax.parallel.sharding import batch_shardings, make_mesh, project_mesh, spec_for
from qwen3vl_jax.training.builder import StepBuilder
from qwen3vl_jax.training.hlo_flops import count_flops
from qwen3vl_jax.training.metrics import forward_flops
from qwen3vl_jax.training.objectives.grpo import PolicyOptimization
from qwen3vl_jax.training.rollouts import SlotLayout, generation_buffer_sizes

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


@dataclasses.dataclass(frozen=True)
class ChipMemory:
    """Bytes per chip of a compiled program (its `memory_analysis()`) and of what stays on the chips beside it
    while it runs (`resident`: arrays that are not its arguments)."""

    arguments: int
    outputs: int
    aliased: int  # outputs that reuse a donated argument's buffer: counted once
    temporaries: int
    code: int
    resident: int = 0

    @classmethod
    def of(cls, compiled, *, resident: int = 0) -> ChipMemory:
        memory = compiled.memory_analysis()
        return cls(
            arguments=memory.argument_size_in_bytes,
            outputs=memory.output_size_in_bytes,
            aliased=memory.alias_size_in_bytes,
            temporaries=memory.temp_size_in_bytes,
            code=memory.generated_code_size_in_bytes,
            resident=resident,
        )

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident


def bytes_per_chip(tree) -> int:
    """The bytes one chip holds of a pytree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    return sum(
        jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape))
        for x in jax.tree_util.tree_leaves(tree)
    )


def compile_or_report(lower: Callable[[], jax.stages.Lowered]) -> tuple[jax.stages.Compiled | None, float]:
    """(the compiled program, seconds), or (None, seconds) after printing why when the TPU compiler ran out of HBM."""
    start = time.perf_counter()
    try:
        return lower().compile(), time.perf_counter() - start
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"  the TPU compiler ran out of HBM: {str(e).splitlines()[0]}\n  -> does not fit")
        return None, time.perf_counter() - start


def print_memory(memory: ChipMemory, *, hbm: int, resident_name: str = "") -> bool:
    """Prints the per-chip memory against the chip's HBM; whether it fits."""
    rows = [
        ("arguments", memory.arguments),
        ("outputs", memory.outputs),
        ("aliased (donated)", memory.aliased),
        ("temporaries", memory.temporaries),
        ("code", memory.code),
    ]
    if resident_name:
        rows.append((resident_name, memory.resident))
    for name, value in (*rows, ("total", memory.total)):
        print(f"  {name:18s} {value / GIB:8.2f} GiB per chip")
    fits = memory.total <= hbm
    print(f"  {'HBM':18s} {hbm / GIB:8.2f} GiB per chip -> {'fits' if fits else 'does not fit'}")
    return fits


def plan_train_step(builder: StepBuilder, *, hbm: int, chips: int) -> bool:
    """Compiles the train step, prints its memory, FLOPs and XLA's cost analysis; whether it fits."""
    with jax.set_mesh(builder.mesh), nn.logical_axis_rules(builder.rules):
        arguments = (builder.abstract_state(), abstract_batch(builder), *builder.abstract_frozen_params())
        compiled, seconds = compile_or_report(lambda: builder.train_step.lower(*arguments))
    if compiled is None:
        return False
    hlo = compiled.as_text()
    kernels = hlo.count('custom_call_target="tpu_custom_call"')
    print(f"  compiled in {seconds:.0f} s; Pallas (Mosaic) kernel calls: {kernels}")
    fits = print_memory(ChipMemory.of(compiled), hbm=hbm)
    print_flops(builder, hlo, chips=chips)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"  XLA cost analysis per chip and step (each loop body counted once, so below what runs): "
        f"{cost.get('flops', 0) / 1e12:.4g} TFLOP, {cost.get('bytes accessed', 0) / GIB:.4g} GiB accessed"
    )
    return fits


@dataclasses.dataclass(frozen=True)
class RolloutPlan:
    """What a GRPO rollout generates: `rows` = prompts_per_step x group_size sequences of prompt buffers of
    seq_len tokens and max_patches patches (training.rollouts.generation_buffer_sizes), max_new_tokens each, into
    the update's `layout` of slots."""

    rows: int
    seq_len: int
    max_patches: int
    max_new_tokens: int
    layout: SlotLayout


def rollout_plan(builder: StepBuilder, objective: PolicyOptimization) -> RolloutPlan:
    """The rollout's sizes, or a ValueError when its sequences do not fit the update's batch (as the run says)."""
    data, settings = builder.config.data, objective.rollout
    layout = SlotLayout(
        rows=builder.global_batch_size(data),
        seq_len=data.seq_len,
        max_patches=data.max_patches,
        slot_tokens=settings.max_prompt_tokens + settings.max_completion_tokens,
        patch_multiple=builder.model_config.vision.spatial_merge_size**2,
    )
    rows = objective.prompts_per_step * settings.group_size
    if rows > layout.capacity:
        raise ValueError(
            f"grpo.prompts_per_step x group_size = {rows} sequences do not fit the update's batch of {layout.rows} "
            f"rows x {layout.slots_per_row} slots of {layout.slot_tokens} tokens: raise data.batch_size (or "
            "rows_per_device) or data.seq_len, or lower prompts_per_step, group_size or the token limits"
        )
    seq_len, max_patches = generation_buffer_sizes(layout, settings)
    return RolloutPlan(
        rows=rows,
        seq_len=seq_len,
        max_patches=max_patches,
        max_new_tokens=settings.max_completion_tokens,
        layout=layout,
    )


def abstract_generation_inputs(builder: StepBuilder, plan: RolloutPlan) -> ModelInputs:
    """ShapeDtypeStructs of the rollout's ModelInputs, rows split over the batch axes as `Qwen3VLModel._batch_split`
    places them (on the mesh the rollout's Qwen3VLModel projects the training mesh to)."""
    mesh = project_mesh(builder.mesh)
    sizes = dict(seq_len=plan.seq_len, max_patches=plan.max_patches, patch_dim=builder.model_config.vision.patch_dim)
    fields = {}
    for name, field in INPUT_FIELDS.items():
        shape = field.shape(plan.rows, **sizes)
        spec = spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh=mesh, rules=builder.rules)
        fields[name] = jax.ShapeDtypeStruct(shape, field.dtype, sharding=NamedSharding(mesh, spec))
    return ModelInputs(**fields)


def plan_rollout(builder: StepBuilder, objective: PolicyOptimization, plan: RolloutPlan, *, hbm: int) -> bool:
    """Compiles the rollout's generation (`jitted_generate`, as `Qwen3VLModel.generate` runs it for
    `rollouts.sample_completions`) on the train state's parameters; prints its memory with the rest of the train
    state (and a frozen reference) held beside it; whether it fits."""
    settings = objective.rollout
    mesh = project_mesh(builder.mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = builder.abstract_state()
    beside = (state.opt_state, state.step, state.rng, *builder.abstract_frozen_params())
    sampling = SamplingConfig(
        do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(builder.rules):
        inputs = abstract_generation_inputs(builder, plan)
        compiled, seconds = compile_or_report(
            lambda: jitted_generate("tpu").lower(
                state.params,
                inputs,
                rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                # the processor's end tokens (how many does not change the memory)
                eos_ids=jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated),
                pad_id=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                config=builder.model_config,
                max_new_tokens=plan.max_new_tokens,
                sampling=sampling,
                with_logprobs=True,
            )
        )
    if compiled is None:
        return False
    print(f"  compiled in {seconds:.0f} s")
    name = "optimizer state" + (" + reference" if builder.frozen_model is not None else "")
    return print_memory(ChipMemory.of(compiled, resident=bytes_per_chip(beside)), hbm=hbm, resident_name=name)


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
    objective = builder.objective
    if not isinstance(objective, PolicyOptimization):
        sys.exit(0 if plan_train_step(builder, hbm=hbm, chips=len(devices)) else 1)
    settings, plan = objective.rollout, rollout_plan(builder, objective)
    layout = plan.layout
    print(
        f"grpo: {objective.prompts_per_step} prompts x {settings.group_size} completions = {plan.rows} sequences of "
        f"<= {settings.max_prompt_tokens} + {settings.max_completion_tokens} tokens and <= {layout.slot_patches} "
        f"patches, in {layout.rows} rows x {layout.slots_per_row} slots ({plan.rows / layout.capacity:.0%} full)"
    )
    print("update: the train step on the packed rollout")
    update_fits = plan_train_step(builder, hbm=hbm, chips=len(devices))
    print(
        f"rollout: generation of {plan.rows} rows x {plan.seq_len} prompt tokens + {plan.max_patches} patches, "
        f"{plan.max_new_tokens} new tokens (prefill + decode loop; KV cache of {plan.seq_len + plan.max_new_tokens} "
        "slots)"
    )
    rollout_fits = plan_rollout(builder, objective, plan, hbm=hbm)
    verdict = {
        (True, True): "both phases fit",
        (True, False): "the rollout does not fit",
        (False, True): "the update does not fit",
        (False, False): "neither phase fits",
    }[update_fits, rollout_fits]
    print(f"GRPO step: {verdict}")
    sys.exit(0 if update_fits and rollout_fits else 1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
