"""The compile planner's modeled step time and its search for the fastest plan that fits, compiled for a v5p:2x2x1
topology with libtpu on this CPU (experiments/planner.py, experiments/plan_search.py, training/step_time.py)."""

import dataclasses
import math
import os

import pytest
from helpers import ROOT, compile_for_tpu, parse_flags
from jax.experimental import topologies

from experiments import plan_search, planner
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
    """Three unrolled compiles at small depths, extrapolated to 4 ViT blocks and 5 decoder layers, give the compiler's
    modeled time and FLOPs of the step compiled unrolled whole, within 10%; the step compiled with its loops (as it
    trains) shows the compiler a fraction of the work."""
    chip = TPU_CHIPS[devices[0].device_kind]
    builder = StepBuilder(tiny_config(vit_depth=4, layers=5), make_mesh(dict(data=2, fsdp=2), devices))
    probes = depth_probes(builder.model_config)
    assert (probes.vit_blocks, probes.decoder_periods) == (2, 3)  # blocks and layers beyond the base probe
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

    def plan_memory(planned):
        return planner.plan_memory(planned, devices=devices, chip=chip, hbm=hbm)

    def model_time(planned):
        return planner.model_time(planned, devices=devices, chip=chip, method="unrolled")

    by_hand = {}
    for plan in grid[:2]:
        planned = plan_search.apply(config, plan, fsdp=4)
        memory, timed = plan_memory(planned), model_time(planned)
        by_hand[plan] = dataclasses.replace(memory, seconds=timed.seconds, tokens_per_second=timed.tokens_per_second)
        by_hand[plan] = dataclasses.replace(by_hand[plan], mfu=timed.mfu)
        assert 0 < memory.floor_seconds < timed.seconds  # the search's pruning rests on this
    fastest = min(by_hand, key=lambda plan: by_hand[plan].seconds)
    assert by_hand[grid[0]].seconds != by_hand[grid[1]].seconds  # recomputing the forward pass costs time

    cache = plan_search.ResultCache(str(tmp_path), topology="v5p:2x2x1", method="unrolled")
    cache.put(plan_search.apply(config, grid[0], fsdp=4), by_hand[grid[0]])
    compiled = []

    def counted(step):
        def run(planned):
            compiled.append((step.__name__, planned.model.overrides.remat))
            return step(planned)

        return run

    results = plan_search.run_search(
        config,
        grid,
        plan_memory=counted(plan_memory),
        model_time=counted(model_time),
        chips=4,
        hbm=hbm,
        cache=cache,
        budget_s=math.inf,
    )
    # the other plan came from the cache; this one is timed unless its floor is above the cached plan's time
    timed = by_hand[grid[1]].floor_seconds < by_hand[grid[0]].seconds
    assert compiled == [("plan_memory", "none")] + [("model_time", "none")] * timed
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

    again = plan_search.run_search(
        config,
        grid,
        plan_memory=must_not_compile,
        model_time=must_not_compile,
        chips=4,
        hbm=less,
        cache=cache,
        budget_s=math.inf,
    )
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


def test_search_models_the_lowest_floors_first_and_skips_plans_that_cannot_win(tmp_path):
    """run_search with stand-in compiles: plans are timed in order of their compute floor, a plan whose floor is
    above the fastest time so far is not timed, a plan that does not fit is not timed, and nothing new starts once
    the budget is spent (the cache still answers)."""
    config = tiny_config()
    plans = [plan_search.Plan(remat=r, mlp_chunks=1, loss_chunk=128, tensor=1) for r in ("none", "dots", "full")]
    # remat -> (memory GiB, floor ms, modeled ms)
    figures = {"none": (9.0, 1.0, 5.0), "dots": (2.0, 2.0, 3.0), "full": (1.0, 4.0, 6.0)}
    calls = []

    def plan_memory(planned):
        remat = planned.model.overrides.remat
        calls.append(("memory", remat))
        memory, floor, _ = figures[remat]
        return plan_search.Outcome(memory_bytes=int(memory * 2**30), floor_seconds=floor / 1e3)

    def model_time(planned):
        remat = planned.model.overrides.remat
        calls.append(("time", remat))
        return plan_search.Outcome(seconds=figures[remat][2] / 1e3, tokens_per_second=1.0, mfu=0.5)

    kw = dict(plan_memory=plan_memory, model_time=model_time, chips=4, budget_s=math.inf)
    results = dict(plan_search.run_search(config, plans, hbm=8 * 2**30, cache=None, **kw))
    # "none" does not fit; "dots" (floor 2 ms) is timed at 3 ms, so "full" (floor 4 ms) cannot win
    assert calls == [("memory", "none"), ("memory", "dots"), ("memory", "full"), ("time", "dots")]
    assert results[plans[1]].seconds == 3e-3 and "compute floor 4.0 ms" in results[plans[2]].note
    assert plan_search.fastest_fitting(list(results.items()), hbm=8 * 2**30)[0] == plans[1]

    # with all the HBM: "none" (floor 1 ms) is timed first, at 5 ms; then "dots" (3 ms); "full" is skipped
    calls.clear()
    cache = plan_search.ResultCache(str(tmp_path), topology="v5p:2x2x1", method="unrolled")
    results = dict(plan_search.run_search(config, plans, hbm=16 * 2**30, cache=cache, **kw))
    assert [call for call in calls if call[0] == "time"] == [("time", "none"), ("time", "dots")]
    assert plan_search.fastest_fitting(list(results.items()), hbm=16 * 2**30)[0] == plans[1]

    # a spent budget: no compile starts; what the cache holds still answers
    calls.clear()
    spent = dict(kw, budget_s=-1.0)
    results = plan_search.run_search(
        config, [*plans, plans[0].__class__("none", 2, 128, 1)], hbm=16 * 2**30, cache=cache, **spent
    )
    assert calls == [] and results[-1][1] is None and results[1][1].seconds == 3e-3
