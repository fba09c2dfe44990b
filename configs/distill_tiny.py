"""Strong-to-weak distillation at laptop scale: a student half the default model's width and depth, trained on the
default run's data either with the cross-entropy alone or distilled from the default run's model, 3 seeds each.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/distill/teacher
    python -m experiments.ablate --config=configs/distill_tiny.py:/tmp/distill/teacher/hf --workdir=/tmp/distill/sweep
    # a shorter budget for the students (the schedule scaled to it): ",<steps>" after the teacher
    python -m experiments.ablate --config=configs/distill_tiny.py:/tmp/distill/teacher/hf,400 \
        --workdir=/tmp/distill/sweep_400

Teacher: the default run's model (configs/tiny.py: decoder hidden 128, 4 layers). Student: decoder hidden 64,
MLP 192, 2 layers, the same ViT with a 64-wide output. Both student variants see the same batches (data seed =
run seed), steps and optimizer as the default run; `distilled` adds the teacher's KL (alpha 0.5, temperature 1,
over the supervised tokens: the `distill` defaults). Evaluated by greedy decoding on the default run's held-out
sets where the teacher answers (digits, shapes, counting, video timestamps; OCR and exact boxes stay at 0 for both
sizes). README: the measured table and time.
"""

from ml_collections import ConfigDict

from configs import tiny
from configs.ablation_base import sweep_config

EVAL_SETS = ("digits", "shapes", "counting", "video_timestamp")


def get_config(arg: str = "") -> ConfigDict:
    teacher, _, steps = arg.partition(",")
    if not teacher:
        raise ValueError("give the teacher's HF directory: --config=configs/distill_tiny.py:/path/to/teacher/hf")
    base = tiny.get_config()
    base.steps = int(steps or base.steps)
    base.export_hf = False
    base.model.overrides.text.update(hidden_size=64, intermediate_size=192, num_hidden_layers=2)
    base.model.overrides.vision.update(out_hidden_size=64)
    base.eval = ConfigDict(dict(every=0, batch_size=8, sets={}))
    base.checkpoint.keep = 1
    held_out = tiny.get_config().eval.sets
    return sweep_config(
        name="Strong-to-weak distillation: a half-size student, CE only vs distilled from the default model",
        description=f"Student (decoder hidden 64, 2 layers) trained {base.steps} steps on the default run's data; "
        "`distilled`: loss 0.5 KL(teacher || student) + 0.5 CE over the answer tokens, teacher = the default "
        "run's model (hidden 128, 4 layers). Exact match of greedy answers on held-out examples.",
        base=base,
        variants={"ce_only": dict(), "distilled": dict(distill=dict(teacher=teacher))},
        eval_sets={name: (96, list(held_out[name].sources)) for name in EVAL_SETS},
        columns=[(name, "exact_match") for name in (*EVAL_SETS, "mean_of_sets")],
        max_new_tokens=16,
        seeds=(0, 1, 2),
        paired=(("distilled", "ce_only"),),
    )
