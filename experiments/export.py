"""Export any saved step of a training run as an HF checkpoint directory (model + processor files).

    python -m experiments.export --workdir=/tmp/qwen3vl_runs/tiny [--step=N] --output=/tmp/tiny_step_N_hf

The model and processor are rebuilt from the run config recorded in the workdir (run.json; or --config for a
workdir from before it was recorded); the step's parameters are restored sharded over the config's mesh and
written one tensor at a time (process 0 writes; sharded safetensors with an index when large). transformers'
`from_pretrained` and `qwen3vl_jax.load_pretrained` load the result; `--config.model.init_from=<output>` starts
a new run from it.
"""

import os

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from experiments import cli
from experiments.distributed_flags import join_run
from qwen3vl_jax import storage
from qwen3vl_jax.checkpoints.hf_export import export_hf
from qwen3vl_jax.checkpoints.train_state import RUN_RECORD, Checkpointer, check_resumable
from qwen3vl_jax.parallel.sharding import make_mesh
from qwen3vl_jax.training.builder import StepBuilder, processor_from

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config (default: the one in <workdir>/run.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_STEP = flags.DEFINE_integer("step", None, "The step to export (default: the newest checkpoint).")
_OUTPUT = flags.DEFINE_string("output", None, "The HF checkpoint directory to write (local or gs://).")
_DTYPE = flags.DEFINE_string("dtype", None, "Tensor dtype in the files (default: the run's param_dtype).")
_EXPERT_LAYOUT = flags.DEFINE_enum("expert_layout", "hub", ["hub", "transposed"], "MoE expert tensor layout.")


def run_config(workdir: str) -> ConfigDict:
    """--config, else the run config recorded in the workdir."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    record_file = os.path.join(workdir, RUN_RECORD)
    if not storage.path(record_file).exists():
        raise app.UsageError(f"{workdir} has no {RUN_RECORD}: give the run's --config")
    record = storage.read_json(record_file)
    if "run_config" not in record:
        raise app.UsageError(f"{record_file} records no run config: give the run's --config")
    return ConfigDict(record["run_config"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    join_run(_CONFIG.value)
    workdir, output = _WORKDIR.value, _OUTPUT.value
    config = run_config(workdir)
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
    check_resumable(workdir, builder.model_config, config_name=str(config.get("name", "")))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep, every=1)
    steps = checkpointer.manager.all_steps()
    step = checkpointer.latest_step() if _STEP.value is None else _STEP.value
    if step is None or step not in steps:
        raise app.UsageError(f"no checkpoint of step {step} in {workdir}; saved steps: {sorted(steps)}")
    params = checkpointer.restore_state(step, builder.abstract_state()).params
    checkpointer.close()
    logging.info("exporting step %d of %s to %s", step, workdir, output)
    export_hf(
        output,
        params,
        config=builder.model_config,
        processor=processor_from(config),
        dtype=_DTYPE.value,
        expert_layout=_EXPERT_LAYOUT.value,
    )
    print(f"exported step {step} of {workdir} to {output}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "output"])
    cli.run(main)
