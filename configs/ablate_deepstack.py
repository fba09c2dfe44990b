"""DeepStack on vs off on fine-grained tasks: small-object grounding (8 px squares on a 6 x 6 grid of 32 px
cells, with distractors of other colours) and OCR of 3-8 small characters. 2 variants x 3 seeds.

    python -m experiments.ablate --config=configs/ablate_deepstack.py --workdir=/tmp/ablate_deepstack

README: the measured table and the time it took.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, sweep_config, synthetic
from qwen3vl_jax.data.synthetic import EVAL_SEED


def get_config() -> ConfigDict:
    objects, ocr = synthetic(("small_object_grounding",), grid_sizes=(6,)), synthetic(("ocr",))
    base = base_config(
        dict(objects=dict(objects, weight=2.0), ocr=dict(ocr, weight=1.0)), steps=1200, seq_len=120, max_patches=144
    )
    return sweep_config(
        name="DeepStack on vs off",
        description="Trained on small-object grounding (6 x 6 grid, 8 px target square among 1-3 distractors of "
        "other colours) and OCR (3-8 characters rendered small in a 64 px image); evaluated on held-out "
        "examples. `off`: no DeepStack mergers and no injection into the decoder.",
        base=base,
        variants={"on": {}, "off": dict(model=dict(overrides=dict(deepstack=False)))},
        eval_sets=dict(objects=(64, [dict(objects, seed=EVAL_SEED)]), ocr=(48, [dict(ocr, seed=EVAL_SEED)])),
        columns=[("objects", m) for m in ("box_hit", "x_accuracy", "y_accuracy")]
        + [("ocr", m) for m in ("char_accuracy", "exact_match")],
        max_new_tokens=24,
    )
