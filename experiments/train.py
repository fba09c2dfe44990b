"""Train a Qwen3-VL model.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/run [--config.optimizer.lr=1e-3 ...]

Running the same command again resumes from the newest checkpoint in the workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from qwen3vl_jax.training.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/qwen3vl_jax", "Checkpoints, TensorBoard events, metrics.jsonl.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the progress bar, eval lines and warnings; libraries stay quiet
    Trainer(_CONFIG.value, _WORKDIR.value).run()


if __name__ == "__main__":
    app.run(main)
