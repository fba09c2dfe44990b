"""DPO on a toy preference task: which colour a shape has (configs/tiny.py's model and images).

    python -m experiments.train --config=configs/dpo_toy.py --workdir=/tmp/dpo_toy

Each training pair is a `colour_preference` record (qwen3vl_jax/data/synthetic.py): a 64 px image of one shape,
asked its colour; chosen = the colour, rejected = another palette colour. The policy starts from the default
tiny run's random initialisation and the frozen reference is the same step-0 weights; held-out pairs (another
seed) are scored every 100 steps: preference accuracy (the policy's reward of the chosen answer above the
rejected one's) and reward margin. docs/results/training_runs.md (DPO): what it measured.
"""

from ml_collections import ConfigDict

from configs import tiny
from qwen3vl_jax.data.synthetic import EVAL_SEED


def get_config() -> ConfigDict:
    c = tiny.get_config()
    c.objective = "dpo"
    c.dpo.update(beta=0.1, variant="sigmoid")
    c.steps = 400
    c.log_every = 20
    c.export_hf = False
    pairs = dict(kind="synthetic", tasks=("colour_preference",), size=1_000_000, image_size=64)
    c.data.sources = dict(pairs=dict(pairs, weight=1.0))
    c.data.update(seq_len=256, max_patches=64)
    c.eval.sets = dict(held_out=dict(num_examples=96, sources=[dict(pairs, seed=EVAL_SEED)]))
    c.eval.every = 100
    c.optimizer.update(lr=1e-3, warmup_steps=50)
    return c
