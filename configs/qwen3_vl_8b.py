"""Qwen3-VL-8B on a TPU pod slice; `:sft` (default) or `:pretrain`, as configs/released.py says, or `:grpo`.

    python -m experiments.train --config=configs/qwen3_vl_8b.py:sft --workdir=gs://bucket/run \
        --config.model.init_from=/path/to/Qwen3-VL-8B-Instruct --config.data.sources.train.path=sft.jsonl

`:grpo`: reinforcement learning (objective "grpo") from the released instruct model on prompt records (a question
with one image, the reference answer and its reward: training/prompts.py): G = 8 completions of up to 1,024 tokens
for each prompt of up to 2,048 tokens + one image of up to 1024 x 1024 px (4,096 patches). A training row of 6,144
tokens + 8,192 patches holds two such sequences, two rows per chip, so on v5p:2x2x1 (4 chips) a step's 2 prompts x
8 completions fill the update's 8 rows; on a larger slice raise grpo.prompts_per_step with the chips (2 per 4).

    python -m experiments.train --config=configs/qwen3_vl_8b.py:grpo --workdir=gs://bucket/grpo \
        --config.model.init_from=/path/to/Qwen3-VL-8B-Instruct --config.data.sources.train.path=prompts.jsonl
    python -m experiments.compile --config=configs/qwen3_vl_8b.py:grpo --topology=v5p:2x2x1  # both phases fit?
"""

from configs.released import released_config

GROUP_SIZE, MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS = 8, 2048, 1024
IMAGE_PATCHES = 1024 * 1024 // (16 * 16)  # one 1024 x 1024 px image in 16 px patches
SEQUENCES_PER_ROW, ROWS_PER_CHIP = 2, 2


def get_config(mode: str = "sft"):
    if mode != "grpo":
        return released_config("qwen3-vl-8b", mode)
    c = released_config("qwen3-vl-8b", "sft")
    c.steps = 1000
    c.objective = "grpo"
    c.data.update(
        seq_len=SEQUENCES_PER_ROW * (MAX_PROMPT_TOKENS + MAX_COMPLETION_TOKENS),
        max_patches=SEQUENCES_PER_ROW * IMAGE_PATCHES,
        rows_per_device=ROWS_PER_CHIP,
    )
    prompts = 4 * ROWS_PER_CHIP * SEQUENCES_PER_ROW // GROUP_SIZE  # fills the batch of v5p:2x2x1's 4 chips
    c.grpo.update(prompts_per_step=prompts, group_size=GROUP_SIZE)
    c.grpo.update(max_prompt_tokens=MAX_PROMPT_TOKENS, max_completion_tokens=MAX_COMPLETION_TOKENS)
    c.grpo.update(clip_low=0.2, clip_high=0.28, temperature=1.0)
    c.optimizer.update(lr=1e-6, warmup_steps=20)
    return c
