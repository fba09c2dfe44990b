"""The compile planner's modeled step time and its search for the fastest plan that fits, compiled for a v5p:2x2x1
topology with libtpu on this CPU (experiments/compile.py, experiments/plan_search.py, training/step_time.py)."""

import math
import os

import pytest
from helpers import ROOT, compile_for_tpu, parse_flags
from jax.experimental import topologies

from experiments import compile as planner
from experiments import plan_search
from qwen3vl_jax.parallel.chips import TPU_CHIPS
from qwen3vl_jax.parallel.sharding import make_mesh
from qwen3vl_jax.training.builder import StepBuilder
from qwen3vl_jax.training.step_time import CompilerCost, depth_probes


@pytest.fixture(scope="module")
def devices():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu too
    return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices


# configs/tiny.py in bf16 with splash attention (as the released configs) on data 2 x fsdp 2
TINY_FLAGS = (
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.model.overrides.dtype=bfloat16",
    "--config.model.overrides.attention_impl=splash",
)


def tiny_config(*, vit_depth: int | None = None, layers: int | None = None):
    """configs/tiny.py with TINY_FLAGS, and deeper when asked."""
    config = parse_flags(f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", *TINY_FLAGS)
    if vit_depth:
        config.model.overrides.vision = dict(depth=vit_depth)
    if layers:
        config.model.overrides.text = dict(num_hidden_layers=layers)
    return config


def test_extrapolated_step_time_agrees_with_an_unrolled_compile_of_the_whole_depth(devices):
    """Three unrolled compiles at small depths, extrapolated to 5 ViT blocks and 7 decoder layers, give the compiler's
    modeled time and FLOPs of the step compiled unrolled whole, within 10%; the step compiled with its loops (as it
    trains) shows the compiler a fraction of the work."""
    chip = TPU_CHIPS[devices[0].device_kind]
    builder = StepBuilder(tiny_config(vit_depth=5, layers=7), make_mesh(dict(data=2, fsdp=2), devices))
    probes = depth_probes(builder.model_config)
    assert (probes.vit_blocks, probes.decoder_periods) == (3, 5)  # the extrapolation spans most of the depth
    extrapolated = planner.modeled_step_time(builder, chip=chip, method="extrapolated")
    unrolled = planner.modeled_step_time(builder, chip=chip, method="unrolled")
    for field in ("seconds", "flops", "bytes_accessed"):
        ratio = getattr(extrapolated.compiler, field) / getattr(unrolled.compiler, field)
        assert abs(ratio - 1) < 0.10, (field, ratio)
    assert extrapolated.kernel_flops == unrolled.kernel_flops > 0  # splash: modeled as free by the compiler
    assert unrolled.seconds == unrolled.compiler.seconds + unrolled.kernel_flops / chip.peak_flops
    assert 0 < unrolled.mfu < 1
    scanned, _ = planner.compile_train_step(builder)
    assert scanned.cost_analysis()["flops"] < 0.8 * unrolled.compiler.flops
    with pytest.raises(ValueError, match="-1 s"):  # the default compile's SparseCore scatter: no cost, -1 s
        CompilerCost.of(scanned)


def test_search_returns_the_fastest_plan_that_fits_and_reuses_its_cache(devices, tmp_path):
    """A grid of three plans, the two that can be planned also compiled by hand: the search (one result already in its
    cache, the other compiled by the search itself) picks the fastest that fits; with less HBM, so that this plan
    no longer fits, a second search compiles nothing and picks the next, and so does the binary from its flags."""
    chip = TPU_CHIPS[devices[0].device_kind]
    config = tiny_config()
    grid = [
        plan_search.Plan(remat="full", mlp_chunks=1, loss_chunk=128, tensor=1),
        plan_search.Plan(remat="none", mlp_chunks=1, loss_chunk=128, tensor=1),
        plan_search.Plan(remat="none", mlp_chunks=1, loss_chunk=128, tensor=8),  # 8 does not divide 4 chips
    ]
    hbm = chip.hbm_bytes

    def plan_one(planned):
        return planner.plan_outcome(planned, devices=devices, chip=chip, hbm=hbm, step_time="unrolled")

    by_hand = {plan: plan_one(plan_search.apply(config, plan, fsdp=4)) for plan in grid[:2]}
    fastest = min(by_hand, key=lambda plan: by_hand[plan].seconds)
    assert by_hand[grid[0]].seconds != by_hand[grid[1]].seconds  # recomputing the forward pass costs time

    cache = plan_search.ResultCache(str(tmp_path), topology="v5p:2x2x1", method="unrolled")
    cache.put(plan_search.apply(config, grid[0], fsdp=4), by_hand[grid[0]])
    compiled = []

    def search_plan_one(planned):
        compiled.append(planned)
        return plan_one(planned)

    results = plan_search.run_search(config, grid, search_plan_one, chips=4, hbm=hbm, cache=cache, budget_s=math.inf)
    assert len(compiled) == 1 and compiled[0].model.overrides.remat == "none"  # the other plan came from the cache
    assert "does not divide" in dict(results)[grid[2]].error
    best, outcome = plan_search.fastest_fitting(results, hbm=hbm)
    assert best == fastest
    assert outcome.memory_bytes == by_hand[fastest].memory_bytes
    assert outcome.seconds == pytest.approx(by_hand[fastest].seconds, rel=1e-6)

    # the fastest plan no longer fits: the other one wins, with every result read from the cache
    less = by_hand[fastest].memory_bytes - 4096  # (a margin for --hbm_gib's float below)
    other = next(plan for plan in by_hand if plan != fastest)
    assert by_hand[other].memory_bytes <= less  # recomputation saves memory: the slower plan needs less

    def must_not_compile(planned):
        raise AssertionError("a cached plan was compiled again")

    again = plan_search.run_search(config, grid, must_not_compile, chips=4, hbm=less, cache=cache, budget_s=math.inf)
    assert plan_search.fastest_fitting(again, hbm=less)[0] == other

    # the binary: the same grid from its flags, every result from the cache; the winner's flags written out
    out_file = tmp_path / "plan.txt"
    grid_flags = ["--search_remat=full,none", "--search_mlp_chunks=1", "--search_loss_chunk=128", "--search_tensor=1"]
    out = compile_for_tpu(
        "configs/tiny.py",
        *TINY_FLAGS,
        "--search",
        *grid_flags,
        f"--search_cache={tmp_path}",
        "--step_time=unrolled",
        f"--search_out={out_file}",
        f"--hbm_gib={less / 2**30}",
    )
    assert "plan remat=" not in out  # nothing compiled: all cached
    assert f"remat={other.remat} mlp_chunks=1 loss_chunk=128 tensor=1 | " in out and "**fastest that fits**" in out
    assert out_file.read_text().split() == other.flags(fsdp=4)
