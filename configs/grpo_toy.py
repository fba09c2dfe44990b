"""GRPO on the built-in grounding (IoU reward) and counting (exact-match reward) tasks, from the default run's model.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/qwen3vl_tiny      # the default run
    python -m experiments.train --config=configs/grpo_toy.py:/tmp/qwen3vl_tiny/hf --workdir=/tmp/grpo_toy

Each step samples 8 completions for each of 8 prompts (half grounding, half counting) from the current weights,
scores them (`box_iou`: the IoU of the answer's box with the true box; `exact`: the count), normalises the rewards
within each group and takes one update on the packed rollout (4 sequences of at most 80 + 32 tokens per row).
Every 50 steps the held-out sets (another seed) are answered greedily and scored: exact match, IoU >= 0.5 and mean
IoU. `:<checkpoint>,sft`: the baseline, continued SFT from the same model on the same tasks, with as many update
steps and prompts (the reference answers as targets, 64 examples a step in place of 8 prompts x 8 samples).
Without a checkpoint the tiny model starts from random weights (what the tests run). docs/results/rl.md: what it
measured.
"""

from ml_collections import ConfigDict

from configs import tiny
from qwen3vl_jax.data.synthetic import EVAL_SEED

TASKS = ("grounding", "counting")


def get_config(arg: str = "") -> ConfigDict:
    checkpoint, _, variant = arg.partition(",")
    if variant not in ("", "sft"):
        raise ValueError(f"configs/grpo_toy.py takes '<checkpoint>' or '<checkpoint>,sft', got {arg!r}")
    c = tiny.get_config()
    c.model.init_from = checkpoint
    c.steps = 200
    c.log_every = 10
    c.export_hf = False
    c.checkpoint.every = 100
    tasks = dict(kind="synthetic", tasks=TASKS, size=1_000_000, image_size=64, seed=1)
    c.data.sources = dict(tasks=tasks)
    c.data.update(seq_len=448, max_patches=64, batch_size=16)
    c.eval.update(every=50, mode="generate", batch_size=32, max_new_tokens=32)
    c.eval.sets = {task: dict(num_examples=96, sources=[dict(tasks, tasks=(task,), seed=EVAL_SEED)]) for task in TASKS}
    c.optimizer.update(lr=3e-4, warmup_steps=10, weight_decay=0.0)
    if variant == "sft":  # the baseline: the same prompts' reference answers as targets
        c.data.update(seq_len=448, max_patches=256, batch_size=16)
        return c
    c.objective = "grpo"
    c.grpo.update(prompts_per_step=8, group_size=8, max_prompt_tokens=80, max_completion_tokens=32)
    c.grpo.update(clip_low=0.2, clip_high=0.28, temperature=1.0)
    return c
