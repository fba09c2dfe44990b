"""GRPO against continued SFT from the default run's model, on the built-in grounding and counting tasks: the same
update steps, the same prompts in the same order, 3 seeds each unless `--config.seeds` says otherwise.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/qwen3vl_tiny      # the default run
    python -m experiments.ablate --config=configs/grpo_vs_sft.py:/tmp/qwen3vl_tiny/hf --workdir=/tmp/grpo_vs_sft
    # options after the checkpoint, comma-separated: steps=N (update steps of both variants)

`grpo`: configs/grpo_toy.py (8 prompts a step, 8 completions each, IoU reward for grounding and exact match for
counting, one update per rollout). `sft`: the same 8 prompts a step with their reference answers as targets (rows
of 104 tokens hold exactly one example: the examples have 55 to 94 tokens), the same optimizer and schedule. Both
are evaluated by greedy decoding on the held-out sets of the two tasks (another seed): IoU >= 0.5 (box_hit), mean
IoU and counting exact match. docs/results/rl.md: the measured table and the time per phase.
"""

from ml_collections import ConfigDict

from configs import grpo_toy
from configs.ablation_base import sweep_config


def get_config(arg: str = "") -> ConfigDict:
    checkpoint, *options = arg.split(",")
    if not checkpoint:
        raise ValueError("give the default run's HF directory: --config=configs/grpo_vs_sft.py:/tmp/qwen3vl_tiny/hf")
    grpo = grpo_toy.get_config(checkpoint)
    for option in options:
        key, _, value = option.partition("=")
        if key != "steps" or not value.isdigit():
            raise ValueError(f"option {option!r}: expected steps=N")
        grpo.steps = int(value)
    base = grpo_toy.get_config(f"{checkpoint},sft")
    base.steps = grpo.steps
    base.data.update(seq_len=104, max_patches=16, batch_size=8)  # one example per row: 8 prompts a step
    base.eval = ConfigDict(dict(every=0, batch_size=8, sets={}, mode="teacher_forced", max_new_tokens=32))
    base.checkpoint.keep = 1
    eval_sets = {name: (96, list(eval_set.sources)) for name, eval_set in grpo.eval.sets.items()}
    return sweep_config(
        name="GRPO against continued SFT from the default run's model (grounding and counting)",
        description=f"From the default run's model, {grpo.steps} update steps of 8 prompts each (half grounding, "
        "half counting, the same prompts in the same order in both variants). `grpo`: 8 completions per prompt "
        "sampled at temperature 1, rewards IoU (grounding) and exact match (counting), group-normalised "
        "advantages, clip 0.2 / 0.28, one update per rollout. `sft`: the prompts' reference answers as targets. "
        "Greedy answers on held-out examples.",
        base=base,
        variants={
            "sft": dict(),
            "grpo": dict(objective="grpo", grpo=grpo.grpo.to_dict(), data=grpo.data.to_dict()),
        },
        eval_sets=eval_sets,
        columns=[("grounding", "box_hit"), ("grounding", "iou"), ("counting", "exact_match")],
        max_new_tokens=32,
        seeds=(0, 1, 2),
        paired=(("grpo", "sft"),),
    )
