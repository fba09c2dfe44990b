"""Run an ablation sweep (variants x seeds), evaluate every run and write the table and plot.

    python -m experiments.ablate --config=configs/ablate_mrope.py --workdir=/tmp/ablate_mrope

Runs one after the other on this host; finished runs are skipped and an interrupted one resumes from its
newest checkpoint, so the same command continues a sweep. Across several pod slices give each slice its share:
`--shard_index=i --num_shards=n` (run i, i + n, ... of the sweep) with a shared workdir; the report is written
by whichever shard sees every run finished (or by `--report_only`). Writes <workdir>/results.md (mean ± 95% CI
per metric), results.png and results.json. A multi-process slice (--coordinator_address ... or the JAX_*
variables; experiments.launch_local) runs each run on all its processes together, process 0 deciding which runs
are finished and writing the files.
"""

import os

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from experiments import cli
from experiments.distributed_flags import join_run
from qwen3vl_jax import storage
from qwen3vl_jax.ablation.sweep import load_results, runs_of, train_and_evaluate, write_report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/ablate_*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: one subdirectory per run, the report.")
_SHARD = flags.DEFINE_integer("shard_index", 0, "This worker's share of the runs: run i, i + n, ...")
_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of workers sharing the sweep.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only (re)write the report from the finished runs.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sweep, workdir = _CONFIG.value, _WORKDIR.value
    if not 0 <= _SHARD.value < _SHARDS.value:
        raise app.UsageError(f"--shard_index {_SHARD.value} must be in [0, --num_shards={_SHARDS.value})")
    join_run(sweep)
    runs = runs_of(sweep)

    def finished(run) -> bool:  # as process 0 sees it, on every process
        return bool(multihost_utils.broadcast_one_to_all(np.bool_(load_results(workdir, run) is not None)))

    if not storage.is_remote(workdir) and not jax.config.jax_compilation_cache_dir:
        # the runs of a variant compile the same programs: compile them once per sweep
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jax_cache"))
    if not _REPORT_ONLY.value:
        mine = runs[_SHARD.value :: _SHARDS.value]
        for i, run in enumerate(mine, 1):
            if finished(run):
                print(f"[{i}/{len(mine)}] {run.name}: finished earlier, skipped", flush=True)
                continue
            print(f"[{i}/{len(mine)}] {run.name}", flush=True)
            train_and_evaluate(sweep, run, workdir=workdir)
    if (_REPORT_ONLY.value or all(finished(run) for run in runs)) and jax.process_index() == 0:
        print(write_report(sweep, workdir))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
