"""DeepStack on vs off in the paper's setting: a pretrained ViT, frozen, under an LLM trained on a fine-grained task.

    # stage 1: ViT + LLM (no DeepStack) on a coarse question; exports each seed's model
    python -m experiments.ablate --config=configs/ablate_deepstack.py:pretrain --workdir=/tmp/ablate_deepstack_stage1
    # the linear probe on every ViT layer of the stage-1 models
    python -m experiments.probe_vit --checkpoint='/tmp/ablate_deepstack_stage1/runs/coarse/seed_{seed}/hf' \
        --seeds=0,1,2 --output=/tmp/ablate_deepstack_stage1/probe.md
    # stage 2: each seed from its stage-1 model, ViT frozen, mergers + LLM trained; DeepStack on vs off
    python -m experiments.ablate --config=configs/ablate_deepstack.py:finetune,/tmp/ablate_deepstack_stage1 \
        --workdir=/tmp/ablate_deepstack_stage2

Stage 1 asks the colour or the kind of one large shape in a 96 px image: a coarse question (what, not where), so
the ViT's last layer is free to keep only what it needs. (Questions about the stage-2 grids themselves were not
learned at this size: counting the small squares stayed at chance, 1/3, after 1200 steps at 3e-3 and reached 0.39
for one seed after 2000 at 1e-3; "is there a small <colour> square?" 0.42 after 1500 at 1e-3, chance 0.5.) Stage
2 asks where the small square of a given colour is (small-object grounding: 6 x 6 grids of 32 px cells, one
visual token per cell, an 8 px target among 1-3 distractors of other colours): which cell holds which colour, the
fine detail. Both variants of a seed start from the same stage-1 weights; `on` adds DeepStack mergers (fresh
weights) after ViT blocks 0 and 1 of 4 and injects them into decoder layers 0 and 1, `off` reads the last layer
only. Chance: 1/6 per axis. `end_to_end`: the same model and fine task without stage 1 (ViT, mergers and
LLM trained together from random weights). docs/results/ablations.md: the measured tables and the time they took.
"""

from ml_collections import ConfigDict

from configs.ablation_base import base_config, sweep_config, synthetic
from qwen3vl_jax.data.synthetic import EVAL_SEED

MODES = ("pretrain", "finetune", "end_to_end")
VIT = dict(depth=4, deepstack_visual_indexes=(0, 1))
STAGE_1_IMAGE_PX = 96  # 9 visual tokens  # taps after blocks 0 and 1; the last layer is block 3
OBJECT_COLUMNS = [("objects", m) for m in ("box_hit", "x_accuracy", "y_accuracy")]


def get_config(arg: str = "pretrain") -> ConfigDict:
    mode, *rest = arg.split(",")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {MODES}")
    if mode == "finetune" and len(rest) != 1:
        raise ValueError("finetune needs the stage-1 workdir: configs/ablate_deepstack.py:finetune,<stage-1 workdir>")
    objects = synthetic(("small_object_grounding",), grid_sizes=(6,))
    if mode == "pretrain":
        shapes = synthetic(("shapes",), image_size=STAGE_1_IMAGE_PX)
        base = base_config(dict(shapes=dict(shapes, weight=1.0)), steps=1500, seq_len=120, max_patches=144)
        base.optimizer.update(lr=1e-3, warmup_steps=200)
        base.model.overrides.vision.update(VIT)
        base.model.overrides.deepstack = False  # a ViT pretrained on its own, as released ViTs are
        base.export_hf = True  # stage 2 starts from <workdir>/runs/coarse/seed_<s>/hf
        return sweep_config(
            name="DeepStack stage 1: ViT + LLM pretrained on the colour or kind of one large shape",
            description=f"{STAGE_1_IMAGE_PX} px images of one shape (a quarter to 60% of the side) of 6 colours and "
            "3 kinds; asked its colour or its kind. No DeepStack. Evaluated on held-out images (exact match; "
            "chance 1/6 or 1/3).",
            base=base,
            variants={"coarse": {}},
            eval_sets=dict(shapes=(96, [dict(shapes, seed=EVAL_SEED)])),
            columns=[("shapes", "exact_match")],
            max_new_tokens=8,
        )
    base = base_config(dict(objects=dict(objects, weight=1.0)), steps=1200, seq_len=120, max_patches=144)
    base.optimizer.update(lr=1e-3, warmup_steps=200)
    base.model.overrides.vision.update(VIT)
    variants = {"on": {}, "off": dict(model=dict(overrides=dict(deepstack=False)))}
    if mode == "finetune":
        base.model.init_from = rest[0].rstrip("/") + "/runs/coarse/seed_{seed}/hf"
        base.model.init_fresh = ("visual/deepstack_merger",)  # stage 1 had none
        base.optimizer.freeze = ("vision",)
    return sweep_config(
        name="DeepStack on vs off"
        + (" over a frozen pretrained ViT (stage 2)" if mode == "finetune" else ", trained end to end"),
        description="Small-object grounding: where is the small square of a given colour (6 x 6 grid of 32 px "
        "cells, 8 px target among 1-3 distractors of other colours); evaluated on held-out grids. "
        + (
            "Each seed starts from its stage-1 model (colour or kind of a large shape), the ViT frozen; DeepStack "
            "mergers start fresh."
            if mode == "finetune"
            else "ViT, mergers and LLM trained together from random weights."
        ),
        base=base,
        variants=variants,
        eval_sets=dict(objects=(64, [dict(objects, seed=EVAL_SEED)])),
        columns=OBJECT_COLUMNS,
        max_new_tokens=24,
        paired=(("on", "off"),),
    )
