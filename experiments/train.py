"""Train a Qwen3-VL model.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/run [--config.optimizer.lr=1e-3 ...]

Running the same command again resumes from the newest checkpoint in the workdir; a workdir whose checkpoints
belong to a model of other shapes, or that another run is training in, is refused. SIGTERM saves a checkpoint and
stops. Without --workdir, the run goes to /tmp/qwen3vl_runs/<config name> (e.g. /tmp/qwen3vl_runs/qwen3_vl_8b_sft
for --config=configs/qwen3_vl_8b.py:sft).

This process is one of a multi-process run (a TPU pod slice, several machines, experiments.launch_local) when
--coordinator_address, --num_processes and --process_id or their JAX_* environment variables say so (docs/multihost.md).
"""

import os
import tempfile

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments.distributed_flags import join_run
from qwen3vl_jax.training.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, TensorBoard events, metrics.jsonl (default: /tmp/qwen3vl_runs/<config name>)."
)


def default_workdir(config_file: str) -> str:
    """<temp dir>/qwen3vl_runs/<file stem>[_<variant>] for `path/name.py[:variant]`: one folder per config,
    which never shadows the package (a folder named qwen3vl_jax in the working directory of a later Python
    would). The temp dir is /tmp unless TMPDIR says otherwise."""
    path, _, variant = config_file.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(tempfile.gettempdir(), "qwen3vl_runs", f"{name}_{variant}" if variant else name)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the progress bar, eval lines and warnings; libraries stay quiet
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    join_run(_CONFIG.value)
    Trainer(_CONFIG.value, _WORKDIR.value or default_workdir(config_file), config_name=config_file).run()


if __name__ == "__main__":
    cli.run(main)
