"""The compile planner's steps (experiments/compile.py is its binary): AOT-compile a config's train step, a GRPO
rollout's generation or inference for a TPU topology with libtpu, and report per-chip memory, FLOPs and the
compiler's modeled step time (training/step_time.py). No flags here: tests and other binaries import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from experiments import plan_search
from qwen3vl_jax.inference.generation import jitted_generate
from qwen3vl_jax.inference.sampling import SamplingConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.inputs.model_inputs import INPUT_FIELDS, ModelInputs
from qwen3vl_jax.modeling.loops import unrolled_loops
from qwen3vl_jax.modeling.model import abstract_params
from qwen3vl_jax.parallel.chips import TPU_CHIPS, Chip
from qwen3vl_jax.parallel.sharding import (
    BATCH_AXES,
    batch_shardings,
    make_mesh,
    model_inputs_spec,
    param_shardings,
    project_mesh,
)
from qwen3vl_jax.training.builder import StepBuilder
from qwen3vl_jax.training.hlo_flops import ProgramFlops, count_flops
from qwen3vl_jax.training.metrics import forward_flops
from qwen3vl_jax.training.objectives.grpo import PolicyOptimization
from qwen3vl_jax.training.rollouts import SlotLayout, generation_buffer_sizes
from qwen3vl_jax.training.step_time import CompilerCost, DepthProbe, StepTime, depth_probes, extrapolate

GIB = 2**30


def chip_of(device) -> Chip:
    if device.device_kind not in TPU_CHIPS:
        raise ValueError(f"unknown TPU kind {device.device_kind!r}; known: {sorted(TPU_CHIPS)}")
    return TPU_CHIPS[device.device_kind]


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


def _step_flops(builder: StepBuilder, *, outside_kernels: bool) -> float:
    """The step's model matmul FLOPs (all of them, or those XLA runs itself, not inside a Pallas kernel): 3 x forward
    for a trained part, 2 x for a frozen part whose input gradient a trained part before it needs, 1 x otherwise."""
    config, mc = builder.config, builder.model_config
    data = config.data
    forward = forward_flops(mc, batch=builder.global_batch_size(data), seq_len=data.seq_len, patches=data.max_patches)
    splash = outside_kernels and mc.attention_impl == "splash"
    megablox = outside_kernels and mc.moe_backend == "megablox"
    total = 0.0
    for part, trained_before in _parts(builder):
        trained = part.name not in config.optimizer.freeze
        flops = sum(
            getattr(forward, name)
            for name in part.flops
            if not (splash and name in _SPLASH_FLOPS) and not (megablox and name == "text_experts")
        )
        total += flops * (3 if trained else 2 if trained_before else 1)
    return total


class _Part(NamedTuple):
    name: str  # as config.optimizer.freeze names it
    flops: tuple[str, ...]  # its ForwardFlops fields


_PARTS = (
    _Part("vision", ("vit", "vit_attention")),
    _Part("mergers", ("mergers",)),
    _Part("llm", ("text_dense", "text_delta_rule", "text_experts", "text_attention")),
)
_SPLASH_FLOPS = ("vit_attention", "text_attention")


def _parts(builder: StepBuilder):
    """(part, whether a part before it is trained) in the order the forward pass runs them."""
    trained_before, frozen = False, set(builder.config.optimizer.freeze)
    for part in _PARTS:
        yield part, trained_before
        trained_before |= part.name not in frozen


def model_flops_outside_kernels(builder: StepBuilder) -> float:
    return _step_flops(builder, outside_kernels=True)


def splash_flops(builder: StepBuilder) -> float:
    """The matmul FLOPs the step's splash kernels run (0 without splash): the score and value matmuls of the
    blocks the mask keeps (half of the decoder's causal L x L, all of the ViT's P x P) in the forward kernel, again
    in its recompute (any remat policy), and 3.5 x forward in the backward kernels (dq: 3 matmuls, dk/dv: 4) where
    a gradient flows through (dq alone, 1.5 x, where only the input's gradient is needed)."""
    mc, data = builder.model_config, builder.config.data
    if mc.attention_impl != "splash":
        return 0.0
    forward = forward_flops(mc, batch=builder.global_batch_size(data), seq_len=data.seq_len, patches=data.max_patches)
    attention = {"vision": forward.vit_attention, "llm": forward.text_attention / 2}
    recompute = mc.remat != "none"
    total = 0.0
    for part, trained_before in _parts(builder):
        if part.name not in attention:
            continue
        trained = part.name not in builder.config.optimizer.freeze
        backward = 3.5 if trained else 1.5 if trained_before else 0.0
        total += attention[part.name] * (1 + (recompute and backward > 0) + backward)
    return total


def print_flops(builder: StepBuilder, hlo: str, chips: int) -> ProgramFlops:
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
    return program


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


def compile_or_report(
    lower: Callable[[], jax.stages.Lowered], *, compiler_options: dict | None = None
) -> tuple[jax.stages.Compiled | None, float]:
    """(the compiled program, seconds), or (None, seconds) after printing why when the TPU compiler ran out of HBM."""
    start = time.perf_counter()
    try:
        return lower().compile(compiler_options=compiler_options), time.perf_counter() - start
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


# The compiles for the modeled step time keep scatters (the embedding gradient) on the TensorCores: the compiler's
# cost model gives each async call of a scatter offloaded to the SparseCores -1 s (libtpu 0.0.42.1)
ESTIMATE_COMPILER_OPTIONS = {"xla_tpu_enable_offloading_scatter_to_sparsecore": False}


def compile_train_step(builder: StepBuilder, *, unrolled: bool = False):
    """(the train step compiled for the builder's mesh, or None when it ran out of HBM; seconds). `unrolled`:
    every loop unrolled (modeling/loops.py), for the compiler's cost model."""
    loops = unrolled_loops() if unrolled else contextlib.nullcontext()
    if unrolled:  # jax's trace caches know nothing of the unrolling: no program traced with loops may be reused
        jax.clear_caches()
    try:
        with jax.set_mesh(builder.mesh), nn.logical_axis_rules(builder.rules), loops:
            arguments = (builder.abstract_state(), abstract_batch(builder), *builder.abstract_frozen_params())
            options = ESTIMATE_COMPILER_OPTIONS if unrolled else None
            return compile_or_report(lambda: builder.train_step.lower(*arguments), compiler_options=options)
    finally:
        if unrolled:
            jax.clear_caches()


def probe_config(config: ConfigDict, probe: DepthProbe) -> ConfigDict:
    """`config` with the model cut to the probe's depths."""
    config = config.copy_and_resolve_references()
    overrides = config.model.overrides
    with overrides.unlocked():
        vision = dict(overrides.get("vision") or {}, depth=probe.vit_depth)
        vision.update(deepstack_visual_indexes=probe.deepstack_taps)
        text = dict(overrides.get("text") or {}, num_hidden_layers=probe.decoder_layers)
        if probe.layer_types:
            text["layer_types"] = probe.layer_types
        overrides.vision, overrides.text = ConfigDict(vision), ConfigDict(text)
    return config


def unrolled_cost(builder: StepBuilder) -> CompilerCost | None:
    """The compiler's cost of the builder's train step with every loop unrolled; None when it ran out of HBM."""
    compiled, _ = compile_train_step(builder, unrolled=True)
    return None if compiled is None else CompilerCost.of(compiled)


def modeled_step_time(builder: StepBuilder, *, chip: Chip, method: str = "extrapolated") -> StepTime | None:
    """The compiler's modeled time of the builder's train step (`training/step_time.py`): compiled with its loops
    unrolled at three small depths and extrapolated (`method="extrapolated"`), or unrolled at the full depth
    (`"unrolled"`). None (after saying why) when a compile runs out of HBM."""
    devices = builder.mesh.devices.flatten().tolist()
    start = time.perf_counter()
    if method == "extrapolated":
        try:
            probes = depth_probes(builder.model_config)
        except ValueError as e:
            print(f"  {e}: unrolling the whole depth")
            method = "unrolled"
    if method == "unrolled":
        cost = unrolled_cost(builder)
    else:
        costs = []
        for probe in (probes.base, probes.more_vit, probes.more_decoder):
            config = probe_config(builder.config, probe)
            costs.append(unrolled_cost(StepBuilder(config, make_mesh(config.mesh.to_dict(), devices))))
            if costs[-1] is None:
                return None
        cost = extrapolate(*costs, probes=probes)
    if cost is None:
        return None
    print(f"  step time modeled in {time.perf_counter() - start:.0f} s ({method})")
    data, chips = builder.config.data, len(devices)
    return StepTime(
        compiler=cost,
        kernel_flops=splash_flops(builder) / chips,
        model_flops=_step_flops(builder, outside_kernels=False) / chips,
        tokens=builder.global_batch_size(data) * data.seq_len / chips,
        chip=chip,
    )


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What planning a train step found: whether it fits, its memory per chip (None when the compiler ran out of
    HBM) and its modeled time (None when not modeled)."""

    fits: bool
    memory: ChipMemory | None
    step_time: StepTime | None
    matmul_flops: float = 0.0  # per chip: what the compiled step's dots run (loops x trip counts), kernels aside


def plan_train_step(builder: StepBuilder, *, chip: Chip, hbm: int, chips: int, step_time: str = "none") -> TrainPlan:
    """Compiles the train step, prints its memory, FLOPs and (unless `step_time="none"`) its modeled time."""
    compiled, seconds = compile_train_step(builder)
    if compiled is None:
        return TrainPlan(fits=False, memory=None, step_time=None)
    hlo = compiled.as_text()
    kernels = hlo.count('custom_call_target="tpu_custom_call"')
    print(f"  compiled in {seconds:.0f} s; Pallas (Mosaic) kernel calls: {kernels}")
    memory = ChipMemory.of(compiled)
    fits = print_memory(memory, hbm=hbm)
    program = print_flops(builder, hlo, chips=chips)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"  XLA cost analysis per chip and step (each loop body counted once, so below what runs): "
        f"{cost.get('flops', 0) / 1e12:.4g} TFLOP, {cost.get('bytes accessed', 0) / GIB:.4g} GiB accessed"
    )
    estimate = None
    if step_time != "none" and fits:
        estimate = modeled_step_time(builder, chip=chip, method=step_time)
        for line in estimate.lines() if estimate else ["  step time not modeled: an unrolled compile ran out of HBM"]:
            print(f"  {line}")
    return TrainPlan(fits=fits, memory=memory, step_time=estimate, matmul_flops=program.matmul_flops)


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


def abstract_generation_inputs(builder: StepBuilder, *, rows: int, seq_len: int, max_patches: int) -> ModelInputs:
    """ShapeDtypeStructs of generation's ModelInputs (`rows` prompts of seq_len tokens and max_patches patches),
    laid out as `Qwen3VLModel._batch_split` places them: rows over the batch axes, tokens and patches over
    `context` (on the mesh a Qwen3VLModel projects the training mesh to)."""
    mesh = project_mesh(builder.mesh)
    sizes = dict(seq_len=seq_len, max_patches=max_patches, patch_dim=builder.model_config.vision.patch_dim)
    fields = {}
    for name, field in INPUT_FIELDS.items():
        shape = field.shape(rows, **sizes)
        spec = model_inputs_spec(name, shape, mesh=mesh, rules=builder.rules)
        fields[name] = jax.ShapeDtypeStruct(shape, field.dtype, sharding=NamedSharding(mesh, spec))
    return ModelInputs(**fields)


def lower_generation(builder: StepBuilder, params, inputs: ModelInputs, *, max_new_tokens: int, sampling, config):
    """`jitted_generate` lowered for TPU, as `Qwen3VLModel.generate` runs it (the model's eos ids and pad id as
    abstract arguments: how many eos ids there are does not change the memory)."""
    replicated = NamedSharding(project_mesh(builder.mesh), PartitionSpec())
    return jitted_generate("tpu").lower(
        params,
        inputs,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
        eos_ids=jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated),
        pad_id=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        config=config,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        with_logprobs=sampling.do_sample,
    )


def plan_rollout(builder: StepBuilder, objective: PolicyOptimization, plan: RolloutPlan, *, hbm: int) -> bool:
    """Compiles the rollout's generation (`jitted_generate`, as `Qwen3VLModel.generate` runs it for
    `rollouts.sample_completions`) on the train state's parameters; prints its memory with the rest of the train
    state (and a frozen reference) held beside it; whether it fits."""
    settings = objective.rollout
    mesh = project_mesh(builder.mesh)
    state = builder.abstract_state()
    beside = (state.opt_state, state.step, state.rng, *builder.abstract_frozen_params())
    sampling = SamplingConfig(
        do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(builder.rules):
        inputs = abstract_generation_inputs(builder, rows=plan.rows, seq_len=plan.seq_len, max_patches=plan.max_patches)
        compiled, seconds = compile_or_report(
            lambda: lower_generation(
                builder,
                state.params,
                inputs,
                max_new_tokens=plan.max_new_tokens,
                sampling=sampling,
                config=builder.model_config,
            )
        )
    if compiled is None:
        return False
    print(f"  compiled in {seconds:.0f} s")
    name = "optimizer state" + (" + reference" if builder.frozen_model is not None else "")
    return print_memory(ChipMemory.of(compiled, resident=bytes_per_chip(beside)), hbm=hbm, resident_name=name)


def kv_cache_bytes_per_chip(config, *, mesh, rows: int, slots: int) -> int:
    """The KV cache one chip holds: every layer's keys and values for `rows` x `slots` tokens, split over the batch
    axes (where they divide the rows), kv heads over `tensor` (where it divides them) and the prompt over
    `context` (a lower bound for the few generated slots, which every context shard holds whole)."""
    text = config.text
    batch = math.prod(mesh.shape[a] for a in BATCH_AXES)
    batch = batch if rows % batch == 0 else 1
    tensor = mesh.shape["tensor"] if text.num_key_value_heads % mesh.shape["tensor"] == 0 else 1
    per_layer = 2 * rows * text.num_key_value_heads * slots * text.head_dim * jnp.dtype(config.dtype).itemsize
    return text.num_hidden_layers * per_layer // (batch * tensor * mesh.shape["context"])


def plan_generation(builder: StepBuilder, *, hbm: int, max_new_tokens: int) -> bool:
    """Compiles inference (`jitted_generate`: prefill of data.batch rows of data.seq_len tokens + max_patches
    patches, then greedy decoding of max_new_tokens), as `Qwen3VLModel.generate` runs it on the config's mesh, with
    the weights in the compute dtype (a checkpoint loaded for inference); prints its memory; whether it fits."""
    config = builder.model_config.replace(param_dtype=builder.model_config.dtype)
    data = builder.config.data
    rows = builder.global_batch_size(data)
    mesh = project_mesh(builder.mesh)
    params = jax.tree_util.tree_map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract_params(config),
        param_shardings(abstract_params(config, boxed=True), mesh, rules=builder.rules),
    )
    cache = kv_cache_bytes_per_chip(config, mesh=mesh, rows=rows, slots=data.seq_len + max_new_tokens)
    print(
        f"generate: {rows} x {data.seq_len} prompt tokens + {data.max_patches} patches, {max_new_tokens} new "
        f"tokens (greedy), weights in {config.dtype}; KV cache {cache / GIB:.2f} GiB per chip"
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(builder.rules):
        inputs = abstract_generation_inputs(builder, rows=rows, seq_len=data.seq_len, max_patches=data.max_patches)
        compiled, seconds = compile_or_report(
            lambda: lower_generation(
                builder, params, inputs, max_new_tokens=max_new_tokens, sampling=SamplingConfig(), config=config
            )
        )
    if compiled is None:
        return False
    kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    print(f"  compiled in {seconds:.0f} s; Pallas (Mosaic) kernel calls: {kernels}")
    return print_memory(ChipMemory.of(compiled), hbm=hbm)


def plan_memory(config: ConfigDict, *, devices, chip: Chip, hbm: int) -> plan_search.Outcome:
    """`plan_train_step` of `config` on `devices` without its step time: memory and compute floor, for the search."""
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict(), devices))
    plan = plan_train_step(builder, chip=chip, hbm=hbm, chips=len(devices), step_time="none")
    if plan.memory is None:
        return plan_search.Outcome()
    floor = (plan.matmul_flops + splash_flops(builder) / len(devices)) / chip.peak_flops
    return plan_search.Outcome(memory_bytes=plan.memory.total, floor_seconds=floor)


def model_time(config: ConfigDict, *, devices, chip: Chip, method: str) -> plan_search.Outcome:
    """The modeled step time of `config` on `devices`, for the search (printed as `plan_train_step` prints it)."""
    estimate = modeled_step_time(
        StepBuilder(config, make_mesh(config.mesh.to_dict(), devices)), chip=chip, method=method
    )
    if estimate is None:
        return plan_search.Outcome(note="not modeled: an unrolled compile ran out of HBM")
    for line in estimate.lines():
        print(f"  {line}")
    return plan_search.Outcome(seconds=estimate.seconds, tokens_per_second=estimate.tokens_per_second, mfu=estimate.mfu)
