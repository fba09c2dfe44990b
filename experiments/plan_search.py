"""`python -m experiments.compile --config=... --topology=... --search`: the fastest plan that fits.

Tries the plans a user would try by hand, the product of the `--search_*` lists: remat policy x `mlp_chunks` x
`loss_chunk` x mesh split (a `tensor` axis of each listed size, fsdp over the rest of the slice) x splash block
sizes. Each plan is compiled for the topology (memory per chip: does it fit? and its compute floor, the matmul
FLOPs the step runs at the chip's peak); then the plans that fit, lowest floor first, get their step time modeled
(training/step_time.py: three more compiles each), except those whose floor is already above the fastest time
modeled (the compiler models no program faster than the chip's peak, so they cannot win). No new compile starts
after `--search_budget_s`; each result is kept in `--search_cache` (keyed by the planned config, the topology, the
jax / libtpu versions and the package's source), so a second search over a wider grid compiles only the new plans.
Prints a table sorted by modeled step time with the fastest plan that fits marked, and its overrides as
command-line flags (also written to `--search_out`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import math
import pathlib
import time
from collections.abc import Callable

from absl import flags
from ml_collections import ConfigDict

import qwen3vl_jax

_REMAT = flags.DEFINE_list("search_remat", ["full", "dots", "offload"], "--search: remat policies to try.")
_MLP_CHUNKS = flags.DEFINE_list("search_mlp_chunks", ["1", "8"], "--search: mlp_chunks values to try.")
_LOSS_CHUNK = flags.DEFINE_list("search_loss_chunk", ["1024", "4096"], "--search: loss_chunk values to try.")
_TENSOR = flags.DEFINE_list(
    "search_tensor", ["1", "2", "4"], "--search: sizes of the mesh's tensor axis to try (fsdp takes the rest)."
)
_SPLASH_BLOCKS = flags.DEFINE_list(
    "search_splash_blocks",
    [],
    "--search: splash (q, kv) block sizes to try, e.g. 512x512,1024x1024 (empty: the config's).",
)
_BUDGET = flags.DEFINE_integer("search_budget_s", 3600, "--search: start no new compile after this many seconds.")
_CACHE = flags.DEFINE_string("search_cache", "~/.cache/qwen3vl_jax/plans", "--search: where results are kept.")
_OUT = flags.DEFINE_string("search_out", "", "--search: write the fastest fitting plan's flags to this file.")

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """One point of the grid: the settings that decide a step's speed and memory, not what it computes."""

    remat: str
    mlp_chunks: int
    loss_chunk: int
    tensor: int
    splash_blocks: tuple[int, int] | None = None  # None: the config's

    def flags(self, *, fsdp: int) -> list[str]:
        """The plan as command-line overrides of experiments.train / experiments.compile."""
        result = [
            f"--config.model.overrides.remat={self.remat}",
            f"--config.model.overrides.mlp_chunks={self.mlp_chunks}",
            f"--config.loss_chunk={self.loss_chunk}",
            "--config.mesh.data=1",
            f"--config.mesh.fsdp={fsdp}",
            f"--config.mesh.tensor={self.tensor}",
        ]
        if self.splash_blocks:
            q, kv = self.splash_blocks
            result.append(f"--config.model.overrides.splash_block_sizes='({q}, {kv})'")
        return result

    def label(self) -> str:
        blocks = f" splash {self.splash_blocks[0]}x{self.splash_blocks[1]}" if self.splash_blocks else ""
        loops = f"mlp_chunks={self.mlp_chunks} loss_chunk={self.loss_chunk}"
        return f"remat={self.remat} {loops} tensor={self.tensor}{blocks}"


def fsdp_size(config: ConfigDict, plan: Plan, *, chips: int) -> int | None:
    """The fsdp axis that fills the slice beside the plan's tensor axis and the config's context and expert axes
    (data parallelism 1), or None when they do not divide the slice."""
    fixed = plan.tensor * config.mesh.context * config.mesh.expert
    return chips // fixed if chips % fixed == 0 else None


def apply(config: ConfigDict, plan: Plan, *, fsdp: int) -> ConfigDict:
    """`config` with the plan's settings."""
    config = config.copy_and_resolve_references()
    overrides = config.model.overrides
    with overrides.unlocked():
        overrides.remat, overrides.mlp_chunks = plan.remat, plan.mlp_chunks
        if plan.splash_blocks:
            overrides.splash_block_sizes = plan.splash_blocks
    config.loss_chunk = plan.loss_chunk
    config.mesh.update(data=1, fsdp=fsdp, tensor=plan.tensor)
    return config


def grid_from_flags() -> list[Plan]:
    blocks = [tuple(int(b) for b in value.split("x")) for value in _SPLASH_BLOCKS.value] or [None]
    return [
        Plan(remat=remat, mlp_chunks=int(mlp), loss_chunk=int(loss), tensor=int(tensor), splash_blocks=block)
        for remat, mlp, loss, tensor, block in itertools.product(
            _REMAT.value, _MLP_CHUNKS.value, _LOSS_CHUNK.value, _TENSOR.value, blocks
        )
    ]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A plan's result: memory per chip (None: the compiler ran out of HBM); its compute floor (the matmul FLOPs the
    compiled step runs per chip, at the chip's peak: no modeled time can be below it); the modeled step time in
    seconds, tokens/s per chip and MFU (None: not modeled); why it could not be planned or was not modeled."""

    memory_bytes: int | None = None
    floor_seconds: float | None = None
    seconds: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    error: str = ""
    note: str = ""

    def fits(self, hbm: int) -> bool:
        return self.memory_bytes is not None and self.memory_bytes <= hbm and not self.error


def source_digest() -> str:
    """A digest of the package's source and the compiler's versions: a cached result is reused only for the same."""
    digest = hashlib.sha256()
    for name in ("jax", "jaxlib", "libtpu"):
        try:
            digest.update(f"{name}={importlib.metadata.version(name)};".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=none;".encode())
    package = pathlib.Path(qwen3vl_jax.__file__).parent
    for file in sorted(package.rglob("*.py")):
        digest.update(str(file.relative_to(package)).encode() + file.read_bytes())
    return digest.hexdigest()


class ResultCache:
    """One JSON file per planned (config, topology, step-time method), under `directory`."""

    def __init__(self, directory: str, *, topology: str, method: str):
        self.directory = pathlib.Path(directory).expanduser()
        self.context = f"{topology};{method};{source_digest()}"

    def _path(self, config: ConfigDict) -> pathlib.Path:
        key = hashlib.sha256((self.context + config.to_json(sort_keys=True)).encode()).hexdigest()[:32]
        return self.directory / f"{key}.json"

    def get(self, config: ConfigDict) -> Outcome | None:
        path = self._path(config)
        return Outcome(**json.loads(path.read_text())) if path.exists() else None

    def put(self, config: ConfigDict, outcome: Outcome) -> None:
        path = self._path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(outcome)))
        temporary.replace(path)


def run_search(
    config: ConfigDict,
    grid: list[Plan],
    *,
    plan_memory: Callable[[ConfigDict], Outcome],
    model_time: Callable[[ConfigDict], Outcome],
    chips: int,
    hbm: int,
    cache: ResultCache | None,
    budget_s: float,
) -> list[tuple[Plan, Outcome | None]]:
    """Each plan's outcome (None: not compiled, the budget was spent). First every plan's memory and compute floor
    (`plan_memory`: one compile each); then, in order of their floors, the modeled time of the plans that fit
    (`model_time`: the step-time compiles), skipping a plan whose floor is already above the fastest time modeled.
    Results come from the cache where it has them and go into it."""
    start = time.perf_counter()
    outcomes: dict[Plan, Outcome | None] = {}
    planned: dict[Plan, ConfigDict] = {}
    for plan in grid:
        fsdp = fsdp_size(config, plan, chips=chips)
        if fsdp is None:
            outcomes[plan] = Outcome(error=f"tensor {plan.tensor} x context x expert does not divide {chips}")
            continue
        planned[plan] = apply(config, plan, fsdp=fsdp)
        outcome = cache.get(planned[plan]) if cache else None
        if outcome is None and time.perf_counter() - start <= budget_s:
            print(f"plan {plan.label()}:")
            try:
                outcome = plan_memory(planned[plan])
            except ValueError as e:  # a plan the config refuses, e.g. a tensor axis that does not divide the heads
                outcome = Outcome(error=str(e).splitlines()[0])
            if cache:
                cache.put(planned[plan], outcome)
        outcomes[plan] = outcome

    fitting = sorted(
        (plan for plan, outcome in outcomes.items() if outcome is not None and outcome.fits(hbm)),
        key=lambda plan: outcomes[plan].floor_seconds or 0.0,
    )
    times = [outcomes[plan].seconds for plan in fitting if outcomes[plan].seconds is not None]
    fastest = min(times, default=math.inf)
    for plan in fitting:
        outcome = outcomes[plan]
        if outcome.seconds is not None:
            continue
        if (outcome.floor_seconds or 0.0) >= fastest:
            note = f"not modeled: its compute floor {outcome.floor_seconds * 1e3:.1f} ms >= the fastest modeled step"
            outcomes[plan] = dataclasses.replace(outcome, note=note)
        elif time.perf_counter() - start > budget_s:
            outcomes[plan] = dataclasses.replace(outcome, note="not modeled: search budget spent")
        else:
            print(f"step time of plan {plan.label()}:")
            timed = model_time(planned[plan])
            outcomes[plan] = outcome = dataclasses.replace(
                outcome, seconds=timed.seconds, tokens_per_second=timed.tokens_per_second, mfu=timed.mfu
            )
            if cache:
                cache.put(planned[plan], outcome)
            if outcome.seconds is not None:
                fastest = min(fastest, outcome.seconds)
    return [(plan, outcomes[plan]) for plan in grid]


def fastest_fitting(results: list[tuple[Plan, Outcome | None]], *, hbm: int) -> tuple[Plan, Outcome] | None:
    fitting = [(p, o) for p, o in results if o is not None and o.fits(hbm) and o.seconds is not None]
    return min(fitting, key=lambda pair: pair[1].seconds, default=None)


def print_table(results: list[tuple[Plan, Outcome | None]], *, hbm: int) -> None:
    def order(pair):
        _, outcome = pair
        if outcome is None or outcome.seconds is None:
            return (1, math.inf)
        return (0, outcome.seconds)

    best = fastest_fitting(results, hbm=hbm)
    print(f"| plan | per chip (HBM {hbm / GIB:.1f} GiB) | modeled step | tokens/s per chip | modeled MFU | |")
    print("|---|---|---|---|---|---|")
    for plan, outcome in sorted(results, key=order):
        if outcome is None:
            print(f"| {plan.label()} | not compiled (search budget spent) | | | | |")
            continue
        if outcome.error:
            print(f"| {plan.label()} | {outcome.error} | | | | |")
            continue
        memory = "out of HBM" if outcome.memory_bytes is None else f"{outcome.memory_bytes / GIB:.2f} GiB"
        fits = "fits" if outcome.fits(hbm) else "does not fit"
        time_ = outcome.note if outcome.seconds is None else f"{outcome.seconds * 1e3:.1f} ms"
        rate = "" if outcome.tokens_per_second is None else f"{outcome.tokens_per_second:,.0f}"
        mfu = "" if outcome.mfu is None else f"{outcome.mfu:.1%}"
        mark = "**fastest that fits**" if best and plan == best[0] else fits
        print(f"| {plan.label()} | {memory} | {time_} | {rate} | {mfu} | {mark} |")


def search(
    config: ConfigDict,
    *,
    plan_memory: Callable[[ConfigDict], Outcome],
    model_time: Callable[[ConfigDict], Outcome],
    topology: str,
    chips: int,
    hbm: int,
    method: str,
) -> Plan | None:
    """The search the flags describe; prints the table and returns the fastest plan that fits (None if none)."""
    grid = grid_from_flags()
    cache = ResultCache(_CACHE.value, topology=topology, method=method) if _CACHE.value else None
    print(f"search: {len(grid)} plans on {topology}, budget {_BUDGET.value} s, cache {_CACHE.value or 'none'}")
    results = run_search(
        config,
        grid,
        plan_memory=plan_memory,
        model_time=model_time,
        chips=chips,
        hbm=hbm,
        cache=cache,
        budget_s=_BUDGET.value,
    )
    print_table(results, hbm=hbm)
    best = fastest_fitting(results, hbm=hbm)
    if best is None:
        print("no plan of the grid fits")
        return None
    plan, outcome = best
    command = " ".join(plan.flags(fsdp=fsdp_size(config, plan, chips=chips)))
    print(f"fastest plan that fits ({outcome.seconds * 1e3:.1f} ms modeled per step): {command}")
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(command + "\n")
        print(f"written to {_OUT.value}")
    return plan
