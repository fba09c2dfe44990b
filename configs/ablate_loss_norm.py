"""Loss normalisation: sqrt (the paper's) vs token vs sample, on a mix of text-only examples with long answers
(reverse 8-20 letters) and multimodal examples with short ones (a shape's colour or kind, a count).
3 variants x 3 seeds.

    python -m experiments.ablate --config=configs/ablate_loss_norm.py --workdir=/tmp/ablate_loss_norm

docs/results/ablations.md: the measured table and the time it took.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, sweep_config, synthetic
from qwen3vl_jax.data.synthetic import EVAL_SEED

TASKS = ("text_reverse", "shapes", "counting")


def get_config() -> ConfigDict:
    text, images = synthetic(("text_reverse",)), synthetic(("shapes", "counting"))
    sources = dict(text=dict(text, weight=1.0), images=dict(images, weight=1.0))
    return sweep_config(
        name="Loss normalisation: sqrt vs token vs sample",
        description="Trained on text-only string reversal (answers of 8-20 tokens) mixed 1:1 with 64 px shapes and "
        "counting images (answers of 1-6 tokens); the loss weighs each token by 1/sqrt(n), 1 or 1/n for "
        "an example with n supervised tokens.",
        base=base_config(sources, steps=1000, seq_len=128, max_patches=64),
        variants={name: dict(loss_normalization=name) for name in ("sqrt", "token", "sample")},
        eval_sets={task: (48, [synthetic((task,), seed=EVAL_SEED)]) for task in TASKS},
        columns=[("text_reverse", "exact_match"), ("text_reverse", "char_accuracy")]
        + [(task, "exact_match") for task in ("shapes", "counting")],
        max_new_tokens=24,
    )
