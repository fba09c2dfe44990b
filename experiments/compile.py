"""Will it fit? AOT-compile a config's train step for a TPU topology with libtpu, on any machine.

    pip install -r requirements-tpu.txt
    python -m experiments.compile --config=configs/qwen3_vl_8b.py --topology=v5p:4x4x4

    python -m experiments.compile --config=configs/qwen3_vl_8b.py:long --topology=v5p:2x2x2 --mode=generate

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

`--mode=generate` plans inference instead: the config's rows (data.seq_len prompt tokens + data.max_patches patches
each, e.g. `:long`'s one 262,144-token row per 8 chips) prefilled on its mesh (with a `context` axis: split over it,
inference/generation.py) and --max_new_tokens decoded greedily, the weights in the compute dtype.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices come from the topology description
# the planner only compiles: it may share libtpu with another process (a second planner, a test run)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
from absl import app, flags
from jax.experimental import topologies
from ml_collections import ConfigDict, config_flags

from experiments import cli, plan_search
from experiments.planner import (
    GIB,
    chip_of,
    model_time,
    plan_generation,
    plan_memory,
    plan_rollout,
    plan_train_step,
    rollout_plan,
)
from qwen3vl_jax.parallel.chips import Chip
from qwen3vl_jax.parallel.sharding import make_mesh
from qwen3vl_jax.training.builder import StepBuilder
from qwen3vl_jax.training.objectives.grpo import PolicyOptimization

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:4x4x4 or v6e:16x16.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "generate"],
    "train: the config's train step (GRPO: both phases); generate: inference of the config's rows (data.seq_len "
    "prompt tokens + data.max_patches patches each) on its mesh, prefill + decode.",
)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "--mode=generate: new tokens per row.")
_STEP_TIME = flags.DEFINE_enum(
    "step_time",
    "extrapolated",
    ["extrapolated", "unrolled", "none"],
    "The train step's modeled time (the TPU compiler's estimate): extrapolated from three unrolled compiles at small "
    "depths, from one unrolled compile of the whole depth (its size grows with the depth), or none.",
)
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Plan against this much HBM per chip (GiB; 0: the chip's).")
_SEARCH = flags.DEFINE_bool(
    "search", False, "Search for the fastest plan that fits (experiments/plan_search.py; its --search_* flags)."
)


def search(config: ConfigDict, *, devices, chip: Chip, hbm: int) -> plan_search.Plan | None:
    """`--search`: the plans of the grid, each compiled as `plan_train_step` compiles the config
    (experiments/plan_search.py)."""
    return plan_search.search(
        config,
        plan_memory=functools.partial(plan_memory, devices=devices, chip=chip, hbm=hbm),
        model_time=functools.partial(model_time, devices=devices, chip=chip, method=_STEP_TIME.value),
        topology=_TOPOLOGY.value,
        chips=len(devices),
        hbm=hbm,
        method=_STEP_TIME.value,
    )


def main(argv):
    del argv
    config = _CONFIG.value
    topology = topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGY.value)
    devices = topology.devices
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict(), devices))
    chip = chip_of(devices[0])
    hbm = int(_HBM_GIB.value * GIB) or chip.hbm_bytes
    mc = builder.model_config
    params = sum(x.size for x in jax.tree_util.tree_leaves(builder.abstract_state().params))
    print(
        f"config: {mc.model_type} {params / 1e6:,.1f}M parameters, {mc.dtype} compute / {mc.param_dtype} weights, "
        f"remat={mc.remat}; batch {builder.global_batch_size(config.data)} x {config.data.seq_len} tokens + "
        f"{config.data.max_patches} patches per row"
    )
    print(f"topology: {_TOPOLOGY.value} ({len(devices)} x {devices[0].device_kind}), mesh {dict(builder.mesh.shape)}")
    objective = builder.objective
    if _SEARCH.value and (_MODE.value == "generate" or isinstance(objective, PolicyOptimization)):
        raise app.UsageError("--search plans the train step of a config, not --mode=generate or a GRPO config")
    if _MODE.value == "generate":
        sys.exit(0 if plan_generation(builder, hbm=hbm, max_new_tokens=_MAX_NEW_TOKENS.value) else 1)
    if not isinstance(objective, PolicyOptimization):
        if _SEARCH.value:
            sys.exit(0 if search(config, devices=devices, chip=chip, hbm=hbm) else 1)
        plan = plan_train_step(builder, chip=chip, hbm=hbm, chips=len(devices), step_time=_STEP_TIME.value)
        sys.exit(0 if plan.fits else 1)
    settings, plan = objective.rollout, rollout_plan(builder, objective)
    layout = plan.layout
    print(
        f"grpo: {objective.prompts_per_step} prompts x {settings.group_size} completions = {plan.rows} sequences of "
        f"<= {settings.max_prompt_tokens} + {settings.max_completion_tokens} tokens and <= {layout.slot_patches} "
        f"patches, in {layout.rows} rows x {layout.slots_per_row} slots ({plan.rows / layout.capacity:.0%} full)"
    )
    print("update: the train step on the packed rollout")
    update_fits = plan_train_step(builder, chip=chip, hbm=hbm, chips=len(devices), step_time=_STEP_TIME.value).fits
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
