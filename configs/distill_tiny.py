"""Strong-to-weak distillation at laptop scale: a student half the default model's width and depth (by default),
trained on the default run's data (or a slice of it) either with the cross-entropy alone or distilled from the
default run's model, 3 seeds each unless `--config.seeds` says otherwise.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/distill/teacher
    python -m experiments.ablate --config=configs/distill_tiny.py:/tmp/distill/teacher/hf --workdir=/tmp/distill/sweep
    # options after the teacher, comma-separated: steps=N (the students' budget, the schedule scaled to it),
    # hidden=W (the student's decoder width), examples=N (the students see only the first N synthetic examples;
    # the teacher drew from the whole stream)
    python -m experiments.ablate --config=configs/distill_tiny.py:/tmp/distill/teacher/hf,steps=400 \
        --workdir=/tmp/distill/sweep_400
    # students that see 2,000 synthetic examples (the teacher drew from all 1,000,000), 6 seeds
    python -m experiments.ablate --config=configs/distill_tiny.py:/tmp/distill/teacher/hf,examples=2000 \
        "--config.seeds=(0,1,2,3,4,5)" --workdir=/tmp/distill/sweep_2000

Teacher: the default run's model (configs/tiny.py: decoder hidden 128, 4 layers). Student: decoder hidden 64 (or
the given width), MLP 3x the width, 2 layers, the same ViT with an output as wide as the decoder. Both student
variants see the same batches (data seed = run seed), steps and optimizer as the default run; `distilled` adds the
teacher's KL (alpha 0.5, temperature 1, over the supervised tokens: the `distill` defaults). Evaluated by greedy
decoding on the default run's held-out sets where the teacher answers (digits, shapes, counting, video timestamps;
OCR and exact boxes stay at 0 for both sizes). docs/results/training_runs.md (distillation): the measured tables and
times.
"""

from ml_collections import ConfigDict

from configs import tiny
from configs.ablation_base import sweep_config

EVAL_SETS = ("digits", "shapes", "counting", "video_timestamp")


def get_config(arg: str = "") -> ConfigDict:
    teacher, *options = arg.split(",")
    if not teacher:
        raise ValueError("give the teacher's HF directory: --config=configs/distill_tiny.py:/path/to/teacher/hf")
    base = tiny.get_config()
    settings = dict(steps=base.steps, hidden=64, examples=base.data.sources.synthetic.size)
    for option in options:
        key, _, value = option.partition("=")
        if key not in settings or not value.isdigit():
            raise ValueError(f"option {option!r}: expected one of steps=N, hidden=N, examples=N")
        settings[key] = int(value)
    base.steps, hidden = settings["steps"], settings["hidden"]
    base.data.sources.synthetic.size = settings["examples"]
    base.export_hf = False
    base.model.overrides.text.update(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2)
    base.model.overrides.vision.update(out_hidden_size=hidden)
    base.eval = ConfigDict(dict(every=0, batch_size=8, sets={}))
    base.checkpoint.keep = 1
    held_out = tiny.get_config().eval.sets
    return sweep_config(
        name=f"Strong-to-weak distillation: a student of width {hidden}, CE only vs distilled from the default model",
        description=f"Student (decoder hidden {hidden}, 2 layers) trained {base.steps} steps on the default run's data "
        f"({settings['examples']:,} synthetic examples); "
        "`distilled`: loss 0.5 KL(teacher || student) + 0.5 CE over the answer tokens, teacher = the default "
        "run's model (hidden 128, 4 layers). Exact match of greedy answers on held-out examples.",
        base=base,
        variants={"ce_only": dict(), "distilled": dict(objective="distill", distill=dict(teacher=teacher))},
        eval_sets={name: (96, list(held_out[name].sources)) for name in EVAL_SETS},
        columns=[(name, "exact_match") for name in (*EVAL_SETS, "mean_of_sets")],
        max_new_tokens=16,
        seeds=(0, 1, 2),
        paired=(("distilled", "ce_only"),),
    )
