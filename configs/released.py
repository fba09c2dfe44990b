"""Shared recipe of the released-size configs (qwen3_vl_{2b,4b,8b,32b,30b_a3b,235b_a22b}.py, qwen3_5_{2b,9b}.py):
TPU pod training in bf16 with fp32 master weights, FSDP over all chips (MoE: experts over an expert axis, megablox
dispatch), full rematerialisation (or the searched plan's policy, SEARCHED_PLANS), splash attention, one packed row
of 8192 tokens and 4096 patches per chip.

Modes, chosen after the file name: `--config=configs/qwen3_vl_8b.py:sft` (default) fine-tunes a released
checkpoint (set --config.model.init_from=/path/to/Qwen3-VL-8B-Instruct and
--config.data.sources.train.path=/path/to/sft.jsonl); `:pretrain` trains from scratch on interleaved documents
(--config.data.sources.train.path=/path/to/documents.jsonl); the paper's long-context stages: `:sft_32k` fine-tunes
on rows of 32,768 tokens (+ 16,384 patches) per chip, `:long` on one 262,144-token sequence (e.g. a long video with
timestamps, + 262,144 patches) per 8 chips, split over the mesh's `context` axis (qwen3vl_jax/parallel/context.py).
Will it fit a TPU slice:

    python -m experiments.compile --config=configs/qwen3_vl_8b.py --topology=v5p:2x2x2
"""

from ml_collections import ConfigDict

from qwen3vl_jax.training.run_config import run_config

MODES = ("sft", "pretrain", "sft_32k", "long")
LONG_CONTEXT_SHARDS = 8  # `:long` splits each sequence over 8 chips

# (preset, mode) -> the model overrides of the fastest plan that fits its smallest slice, as
# `python -m experiments.compile --search` found it (the grid and the figures: docs/results/step_time.md); the
# sizes and modes not listed keep the recipe below
SEARCHED_PLANS = {
    ("qwen3-vl-2b", "sft"): dict(remat="dots"),  # v5p:2x2x1: 494 ms modeled against 541 ms with "full"
}


def released_config(preset: str, mode: str, expert_parallel: int = 1) -> ConfigDict:
    """The recipe for `preset`; MoE sizes split their experts over an `expert` mesh axis of `expert_parallel`
    devices (the rest of the slice is fsdp) and dispatch them with the megablox kernels."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {MODES}")
    if preset.startswith("qwen3.5") and mode == "long":
        raise ValueError(
            f"{preset}: `:long` splits a sequence over the mesh's `context` axis, which Qwen3.5's gated delta-net "
            "layers do not do yet; `:sft_32k` trains on 32,768 tokens per chip"
        )
    sft = mode != "pretrain"
    c = run_config()
    c.steps = 10_000 if sft else 200_000
    c.model.preset = preset
    c.model.overrides.update(dtype="bfloat16", param_dtype="float32", remat="full", attention_impl="splash")
    c.model.overrides.moe_backend = "megablox"
    # images up to 1024 x 1024 px (4096 patches); the packed row holds 4096 patches of ViT input
    c.processing = ConfigDict(dict(image_max_pixels=1024 * 1024, video_max_pixels=4096 * 16 * 16))
    c.data.sources = dict(train=dict(kind="jsonl", path="/path/to/train.jsonl"))
    c.data.update(seq_len=8192, max_patches=4096, rows_per_device=1, batch_size=0, workers=8, on_bad_input="skip")
    c.eval.batch_size = 0
    c.loss_chunk = 1024  # the logits of 1,024 positions at a time, not of a whole row
    c.optimizer.update(lr=1e-5 if sft else 3e-4, warmup_steps=200 if sft else 2000)
    c.mesh.update(data=1, fsdp=-1, expert=expert_parallel)
    if mode in ("sft_32k", "long"):
        # at these lengths each layer's input (32K tokens x hidden) is the largest thing kept for the backward
        # pass: it waits in host memory (qwen3vl_jax/modeling/remat.py)
        c.model.overrides.remat = "offload"
        c.model.overrides.mlp_chunks = 8  # and a layer's MLP activations exist an eighth of the sequence at a time
    if mode == "sft_32k":
        c.data.update(seq_len=32_768, max_patches=16_384)
    elif mode == "long":
        # one 262,144-token row per 8 chips: its tokens, its patches and the loss split over `context`
        c.data.update(seq_len=262_144, max_patches=262_144)
        c.mesh.update(fsdp=-1, context=LONG_CONTEXT_SHARDS)
        c.processing.video_max_pixels = 262_144 * 16 * 16
    c.model.overrides.update(SEARCHED_PLANS.get((preset, mode), {}))
    return c
