"""A sweep is a base training config x named variants x seeds. Each run trains with `Trainer`, is evaluated by
greedy generation on the sweep's eval sets, and leaves `results.json` in its directory
`<workdir>/runs/<variant>/seed_<seed>/`. A run with results is skipped; a run without them is (re)started, and
the trainer resumes it from its newest checkpoint, so an interrupted sweep continues where it stopped.

Sweep config (an ml_collections ConfigDict, see configs/ablate_*.py):

    name, description   a title and one paragraph for the report
    base                a training config (as for experiments.train)
    variants            {name: nested overrides of base}, e.g. {"chunked": {"model": {"overrides":
                        {"mrope_layout": "chunked"}}}}; every overridden key must exist in base (typos fail).
                        `{seed}` in model.init_from is the run's seed: a two-stage sweep starts every run of
                        seed s from seed s of a first sweep (`<first workdir>/runs/<variant>/seed_{seed}/hf`)
    seeds               the seeds (each sets base.seed and base.data.seed)
    eval                batch_size, max_new_tokens, sets={name: {num_examples, sources: [source specs]}}
    columns             [(eval set, metric), ...] of the report table and plot; eval set "mean_of_sets": the
                        metric averaged over the eval sets (each set weighs the same)
    paired              optional [(variant a, variant b), ...]: paired tests of a - b on every column over the
                        seeds both finished (report.paired_table)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from qwen3vl_jax import storage
from qwen3vl_jax.ablation import report
from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.evaluation.harness import eval_records, generate_answers, summarize
from qwen3vl_jax.storage import read_json, write_json, write_jsonl
from qwen3vl_jax.training.trainer import Trainer

RESULTS = "results.json"
MEAN_OF_SETS = "mean_of_sets"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class Run:
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}/seed_{self.seed}"


def runs_of(sweep: ConfigDict) -> list[Run]:
    """Every (variant, seed), variant by variant, in the config's order."""
    for variant in sweep.variants:
        if not _NAME.match(variant):
            raise ValueError(f"variant name {variant!r} may only use letters, digits, '_', '.', '-'")
    for pair in sweep.get("paired", ()):
        unknown = [v for v in pair if v not in sweep.variants]
        if len(pair) != 2 or unknown:
            raise ValueError(f"paired {tuple(pair)}: not two variants of the sweep (unknown: {unknown})")
    return [Run(variant, int(seed)) for variant in sweep.variants for seed in sweep.seeds]


def merge(config: ConfigDict, overrides: Mapping[str, Any], *, path: str = "") -> None:
    """Deep-merges `overrides` into `config` in place; a key that `config` lacks is an error naming it."""
    for key, value in overrides.items():
        where = f"{path}{key}"
        if key not in config:
            raise KeyError(f"override {where!r}: the base config has no such field")
        if isinstance(config[key], ConfigDict) and isinstance(value, Mapping):
            merge(config[key], value, path=where + ".")
        else:
            config[key] = value


def run_config(sweep: ConfigDict, run: Run) -> ConfigDict:
    """The training config of one run: base, the variant's overrides, the run's seed."""
    config = ConfigDict(sweep.base.to_dict())
    merge(config, sweep.variants[run.variant].to_dict())
    config.seed, config.data.seed = run.seed, run.seed
    # a second-stage sweep starts each seed from that seed's run of a first one: ".../seed_{seed}/hf"
    if config.model.get("init_from"):
        config.model.init_from = config.model.init_from.format(seed=run.seed)
    return config


def run_dir(workdir: str, run: Run) -> str:
    return os.path.join(workdir, "runs", run.variant, f"seed_{run.seed}")


def load_results(workdir: str, run: Run) -> dict | None:
    """The run's {eval set: {metric: mean}}, or None when it has not finished."""
    file = os.path.join(run_dir(workdir, run), RESULTS)
    return read_json(file) if storage.path(file).exists() else None


def with_mean_of_sets(results: dict) -> dict:
    """results plus a pseudo eval set MEAN_OF_SETS: each metric averaged over the eval sets that have it (the
    sets weigh equally), for a report column such as (MEAN_OF_SETS, "exact_match")."""
    if MEAN_OF_SETS in results:
        raise ValueError(f"an eval set may not be named {MEAN_OF_SETS!r}: the report's mean over the sets")
    metrics = sorted({name for values in results.values() for name in values} - {"examples"})
    mean = {m: float(np.mean([values[m] for values in results.values() if m in values])) for m in metrics}
    return {**results, MEAN_OF_SETS: mean}


def train_and_evaluate(sweep: ConfigDict, run: Run, *, workdir: str) -> dict:
    """Trains the run (resuming it from its newest checkpoint if it was interrupted), evaluates it on the
    sweep's eval sets and writes predictions.jsonl and then results.json; returns the results."""
    directory = run_dir(workdir, run)
    trainer = Trainer(run_config(sweep, run), directory, config_name=f"sweep {sweep.name!r}, run {run.name}")
    trainer.run()
    model = Qwen3VLModel(trainer.model_config, trainer.state.params, mesh=trainer.mesh, rules=trainer.rules)
    predictions = []
    for name, eval_set in sweep.eval.sets.items():
        records = eval_records(eval_set.sources, eval_set.num_examples)
        predictions += generate_answers(
            model,
            trainer.processor,
            records=records,
            set_name=name,
            batch_size=sweep.eval.batch_size,
            max_new_tokens=sweep.eval.max_new_tokens,
        )
    results = summarize(predictions)
    if jax.process_index() == 0:
        write_jsonl(os.path.join(directory, "predictions.jsonl"), predictions)
        write_json(os.path.join(directory, RESULTS + ".tmp"), results)
        out = storage.path(directory)
        (out / (RESULTS + ".tmp")).replace(out / RESULTS)  # the run counts as finished once this exists
    return results


def write_report(sweep: ConfigDict, workdir: str) -> str:
    """results.md (table), results.png (plot) and results.json (per-seed values) in `workdir` over the
    finished runs; unfinished runs are listed, not guessed. Returns the markdown."""
    finished: dict[str, list] = {}
    seeds: dict[str, list] = {}
    per_seed: dict[str, dict] = {}
    missing = []
    for run in runs_of(sweep):
        results = load_results(workdir, run)
        if results is None:
            missing.append(run.name)
            continue
        results = with_mean_of_sets(results)
        finished.setdefault(run.variant, []).append(results)
        seeds.setdefault(run.variant, []).append(run.seed)
        per_seed.setdefault(run.variant, {})[run.seed] = results
    columns = [tuple(column) for column in sweep.columns]
    table = report.aggregate(finished, columns)
    text = (
        f"# {sweep.name}\n\n{sweep.description}\n\n"
        + report.markdown_table(table, columns=columns, seeds=seeds)
        + f"\nEach cell: mean ± half-width of the 95% confidence interval (Student t) over the seeds; "
        f"{sweep.eval.max_new_tokens} greedy tokens per answer.\n"
    )
    pairs = [tuple(pair) for pair in sweep.get("paired", ())]
    if pairs:
        text += "\nPaired by seed (same data order and initialisation):\n\n" + report.paired_table(
            per_seed, pairs=pairs, columns=columns
        )
    if missing:
        text += f"\nNot finished yet: {', '.join(missing)}.\n"
    with storage.local_dir(workdir) as local:
        with open(os.path.join(local, "results.md"), "w") as f:
            f.write(text)
        if table:
            report.plot(table, columns=columns, path=os.path.join(local, "results.png"), title=sweep.name)
        write_json(
            os.path.join(local, RESULTS),
            {variant: {f"{s}/{m}": cell[2] for (s, m), cell in cells.items()} for variant, cells in table.items()},
        )
    return text
