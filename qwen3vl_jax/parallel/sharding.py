"""Device mesh and logical-axis sharding: sharding is data (logical-axis rules), not code.

The mesh has five named axes, `data`, `fsdp`, `context`, `tensor` and `expert`; a config gives their sizes with
one -1 for "all remaining devices". `context` splits one sequence (parallel/context.py). Every parameter and key
activation carries logical axis names (`embed`, `mlp`, `q_heads`, ...); `rules` map each logical name to mesh
axes. A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is replicated
instead), so any rule set works on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen3vl_jax.inputs.batch import BATCH_FIELDS, TrainingBatch
from qwen3vl_jax.inputs.model_inputs import INPUT_FIELDS
from qwen3vl_jax.parallel.context import check_patch_layout

MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # the expert axis also splits the batch outside the MoE blocks
# ZeRO-3 axes of the weights' model dimension: the context and expert axes are data-parallel for the weights
# (outside the MoE blocks), so the dense weights are split over them too; an expert tensor uses `expert` for its
# expert dimension, leaving fsdp and context here.
WEIGHT_AXES = ("fsdp", "context", "expert")

# logical axis -> mesh axes. Batch over data, fsdp and expert, sequences (tokens and patches) over context;
# weights over fsdp, context and expert (ZeRO-3) on their model dimension, over tensor (Megatron) on heads / mlp /
# vocab, and MoE experts over expert.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", WEIGHT_AXES),
    ("vision_embed", WEIGHT_AXES),
    ("vision_merged", WEIGHT_AXES),
    ("patch", WEIGHT_AXES),
    ("vision_positions", None),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merged_out", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_heads", "tensor"),
    # the gated delta-net layers (modeling/gated_delta_net.py): value heads, and the q/k/v conv channels
    ("linear_v_heads", "tensor"),
    ("linear_qkv", "tensor"),
    ("linear_conv_kernel", None),
    ("expert", "expert"),
    ("expert_router", None),
    ("layers", None),
    ("head_dim", None),
    ("qkv", None),
    ("lora_rank", None),  # the adapters are sharded like the weight they adapt on its other dims
    ("length", "context"),
    ("patches", "context"),
    # the chunked loss (modeling/lm_head.py): each chunk's rows on every device of a data replica, the vocabulary
    # over all the others, so that the head weight and its gradient stay split
    ("loss_batch", "data"),
    ("loss_vocab", ("tensor", *WEIGHT_AXES)),
)


def mesh_shape(sizes: dict[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes (data, fsdp, context, tensor, expert) with the single -1 resolved; their product must be the
    number of devices."""
    if isinstance(sizes, dict):
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
        sizes = [sizes.get(axis, 1) for axis in MESH_AXES]
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(MESH_AXES) or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes} must give {len(MESH_AXES)} positive sizes, at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {sizes} do not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(sizes: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES; device order follows jax's topology-aware
    `mesh_utils.create_device_mesh` when the devices are the real ones."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    try:
        array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        array = np.asarray(devices).reshape(shape)
    return Mesh(array, MESH_AXES)


def project_mesh(mesh: Mesh) -> Mesh:
    """`mesh` as a mesh of this project's axes MESH_AXES, in that order, of the Auto axis type the sharding rules
    are written for: an axis it lacks has size 1 (e.g. `jax.make_mesh((4, 2), ("fsdp", "tensor"))` becomes data 1,
    fsdp 4, context 1, tensor 2, expert 1 over the same devices, each device at the same place along the axes
    it had). An axis the project does not know is a ValueError naming it."""
    names = tuple(mesh.axis_names)
    unknown = [name for name in names if name not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"mesh axes {unknown} are not axes of this project's sharding rules; a mesh's axes are named from "
            f"{MESH_AXES} (any may be left out: it counts as size 1), e.g. make_mesh({{'fsdp': 4, 'tensor': 2}})"
        )
    auto = all(kind == jax.sharding.AxisType.Auto for kind in mesh.axis_types)
    if names == MESH_AXES and auto:
        return mesh
    order = [names.index(axis) for axis in MESH_AXES if axis in names]
    devices = np.transpose(mesh.devices, order).reshape([mesh.shape.get(axis, 1) for axis in MESH_AXES])
    return Mesh(devices, MESH_AXES)


def spec_for(names: Sequence[str | None], shape: Sequence[int], *, mesh: Mesh, rules) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis `names`, dropping mesh axes that do not divide its dim
    or are already used by an earlier dim."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for axis in axes:
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def split_by_names(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the layout its logical axis `names` have under the current mesh and flax logical axis
    rules (mesh axes that do not divide a dimension are dropped, as `spec_for` does); `x` itself without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh=mesh, rules=rules))


def gathered_for_matmul(kernel: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """ZeRO-3 made explicit: a weight with logical axis `names` as its matmul uses it, gathered over the mesh axes
    that split the weights only for storage (WEIGHT_AXES: fsdp, context, expert) and still split over the others
    (tensor). Left to itself, XLA may instead move the activations into the weight's layout: with a sequence split
    over `context` and the weights' model dimension split over `context` too, it split the activations' hidden
    dimension over `context` (every device holding every token) and exchanged them around every matmul."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel
    spec = spec_for(names, kernel.shape, mesh=mesh, rules=nn.get_logical_axis_rules() or DEFAULT_RULES)
    gathered = []
    for axes in spec:
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in WEIGHT_AXES)
        gathered.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return jax.lax.with_sharding_constraint(kernel, PartitionSpec(*gathered))


def param_shardings(boxed_params: Any, mesh: Mesh, *, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of nn.LogicallyPartitioned leaves (e.g. `abstract_params(config, boxed=True)`
    or an optimizer state built from them); unannotated leaves are replicated."""

    def sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh=mesh, rules=rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(sharding, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _sequence_sharding(mesh: Mesh, axis: int | None) -> NamedSharding:
    """The leading (batch) axis over the data, fsdp and expert axes and `axis` (None: none) over context."""
    if axis is None or mesh.shape.get("context", 1) == 1:
        return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (axis - 1)), "context"))


def batch_sharding(mesh: Mesh, name: str = "") -> NamedSharding:
    """The sharding of training-batch array `name` (inputs.batch.BATCH_FIELDS; other names: batch axis only): its
    leading (batch) axis over the data, fsdp and expert axes and, for the token and patch arrays, the sequence
    axis over context."""
    field = BATCH_FIELDS.get(name)
    return _sequence_sharding(mesh, None if field is None else field.sequence_axis)


def model_inputs_spec(name: str, shape: Sequence[int], *, mesh: Mesh, rules) -> PartitionSpec:
    """The layout of ModelInputs array `name` (inputs.model_inputs.INPUT_FIELDS) of `shape` for inference: rows over
    the batch axes and the tokens or patches over `context`, where those divide them (the rest replicated)."""
    names = [None] * len(shape)
    names[0] = "batch"
    sequence_axis = INPUT_FIELDS[name].sequence_axis
    if sequence_axis is not None:
        names[sequence_axis] = "length"
    return spec_for(names, shape, mesh=mesh, rules=rules)


def batch_shardings(mesh: Mesh, extra: tuple[str, ...] = ()) -> TrainingBatch:
    """The NamedShardings of a TrainingBatch's arrays, with `extra` the names of an objective's extra arrays
    ((B, L, ...): split like the tokens)."""
    return TrainingBatch.from_arrays(
        {name: batch_sharding(mesh, name) for name in BATCH_FIELDS},
        extra={name: _sequence_sharding(mesh, 1) for name in extra},
    )


def row_groups(mesh: Mesh, *, process_of=lambda device: device.process_index) -> tuple[int, int]:
    """(index, count): which of the `count` distinct sets of batch rows this process's devices hold. Each group
    of processes holding the same rows (a context axis across hosts splits rows between them) reads the same
    shard of the data; without a context axis across hosts every process is a group of its own."""
    sharding = batch_sharding(mesh, "input_ids")
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
    ranges = _process_ranges(sharding.devices_indices_map((rows, 2 * mesh.shape["context"])), 0, process_of)
    distinct = sorted(set(ranges.values()))
    return distinct.index(ranges[process_of(jax.local_devices()[0])]), len(distinct)


def _process_ranges(index_map, axis: int, process_of) -> dict[int, tuple[int, int]]:
    """{process: (start, stop)} of the part of `axis` that its devices hold (index_map: device -> slices)."""
    ranges: dict[int, tuple[int, int]] = {}
    for device, index in index_map.items():
        start, stop, _ = index[axis].indices(10**12)
        old = ranges.get(process_of(device), (start, stop))
        ranges[process_of(device)] = (min(old[0], start), max(old[1], stop))
    return ranges


def global_batch(batch: TrainingBatch, mesh: Mesh, *, row_group_count: int | None = None) -> TrainingBatch:
    """Assembles each host's local batch (whole rows: those of its row group, `row_groups`) into global arrays
    sharded like `batch_shardings` (multi-host safe; a host passes on the part of the sequence its devices hold).
    With a context axis, a ViT segment must not cross a context shard's slot of the patch buffer
    (parallel.context.check_patch_layout). `row_group_count`: `row_groups(mesh)[1]`, when the caller knows it."""
    check_patch_layout(np.asarray(batch.patch_segment_ids), shards=mesh.shape.get("context", 1))
    groups = row_groups(mesh)[1] if row_group_count is None else row_group_count
    assembled = {}
    for name, value in batch.arrays.items():
        axis = BATCH_FIELDS[name].sequence_axis if name in BATCH_FIELDS else 1  # an objective's (B, L, ...) arrays
        value, sharding = np.asarray(value), _sequence_sharding(mesh, axis)
        global_shape = (value.shape[0] * groups, *value.shape[1:])
        if axis is not None and jax.process_count() > groups:  # the sequence is split between hosts
            index_map = sharding.devices_indices_map(global_shape)
            start, stop = _process_ranges(index_map, axis, lambda d: d.process_index)[jax.process_index()]
            value = np.take(value, np.arange(start, stop), axis=axis)
        assembled[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return TrainingBatch.from_arrays(
        {name: assembled[name] for name in BATCH_FIELDS}, extra={name: assembled[name] for name in batch.extra}
    )


def attention_specs(mesh, *, batch: int, heads: int, kv_heads: int, split_over_context: bool) -> tuple:
    """shard_map specs of attention's (B, L, heads, D) arrays and (B, L) segment ids: batch over the batch axes
    (when they divide it), the length over `context` (when `split_over_context`), heads over tensor (when it
    divides both the query and the key/value heads)."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    batch_axes = axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    heads_axis = "tensor" if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None
    length_axis = "context" if split_over_context else None
    return PartitionSpec(batch_axes, length_axis, heads_axis), PartitionSpec(batch_axes, length_axis)
