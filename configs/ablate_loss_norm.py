"""Loss normalisation: sqrt (the paper's) vs token vs sample, on a mix of text-only examples with long answers
(reverse 8-20 letters) and multimodal examples with short ones (a shape's colour or kind, a count).
3 variants x 3 seeds.

    python -m experiments.ablate --config=configs/ablate_loss_norm.py --workdir=/tmp/ablate_loss_norm

README: the measured table and the time it took.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, synthetic

EVAL_SEED = 1_000_003
TASKS = ("text_reverse", "shapes", "counting")


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "Loss normalisation: sqrt vs token vs sample"
    c.description = (
        "Trained on text-only string reversal (answers of 8-20 tokens) mixed 1:1 with 64 px shapes and "
        "counting images (answers of 1-6 tokens); the loss weighs each token by 1/sqrt(n), 1 or 1/n for "
        "an example with n supervised tokens."
    )
    c.base = base_config(
        dict(
            text=dict(synthetic(("text_reverse",)), weight=1.0),
            images=dict(synthetic(("shapes", "counting")), weight=1.0),
        ),
        steps=1000,
        seq_len=128,
        max_patches=64,
    )
    c.variants = ConfigDict(
        {name: dict(loss_normalization=name) for name in ("sqrt", "token", "sample")}, sort_keys=False
    )
    c.seeds = (0, 1, 2)
    c.eval = ConfigDict(
        dict(
            batch_size=16,
            max_new_tokens=24,
            sets={task: dict(num_examples=48, sources=[synthetic((task,), seed=EVAL_SEED)]) for task in TASKS},
        )
    )
    c.columns = [
        ("text_reverse", "exact_match"),
        ("text_reverse", "char_accuracy"),
        ("shapes", "exact_match"),
        ("counting", "exact_match"),
    ]
    return c
