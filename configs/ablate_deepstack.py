"""DeepStack on vs off on fine-grained tasks: small-object grounding (8 px squares on a 6 x 6 grid of 32 px
cells, with distractors of other colours) and OCR of 3-8 small characters. 2 variants x 3 seeds.

    python -m experiments.ablate --config=configs/ablate_deepstack.py --workdir=/tmp/ablate_deepstack

README: the measured table and the time it took.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, synthetic

EVAL_SEED = 1_000_003


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "DeepStack on vs off"
    c.description = (
        "Trained on small-object grounding (6 x 6 grid, 8 px target square among 1-3 distractors of "
        "other colours) and OCR (3-8 characters rendered small in a 64 px image); evaluated on held-out "
        "examples. `off`: no DeepStack mergers and no injection into the decoder."
    )
    objects = synthetic(("small_object_grounding",), grid_sizes=(6,))
    c.base = base_config(
        dict(objects=dict(objects, weight=2.0), ocr=dict(synthetic(("ocr",)), weight=1.0)),
        steps=1200,
        seq_len=120,
        max_patches=144,
    )
    c.variants = ConfigDict({"on": {}, "off": dict(model=dict(overrides=dict(deepstack=False)))}, sort_keys=False)
    c.seeds = (0, 1, 2)
    c.eval = ConfigDict(
        dict(
            batch_size=16,
            max_new_tokens=24,
            sets=dict(
                objects=dict(num_examples=64, sources=[dict(objects, seed=EVAL_SEED)]),
                ocr=dict(num_examples=48, sources=[synthetic(("ocr",), seed=EVAL_SEED)]),
            ),
        )
    )
    c.columns = [
        ("objects", "box_hit"),
        ("objects", "x_accuracy"),
        ("objects", "y_accuracy"),
        ("ocr", "char_accuracy"),
        ("ocr", "exact_match"),
    ]
    return c
