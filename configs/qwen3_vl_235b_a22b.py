"""Qwen3-VL-235B-A22B (MoE): SFT from the released checkpoint (default) or pre-training, on a TPU pod slice,
experts split over an expert mesh axis of 8.

    python -m experiments.train --config=configs/qwen3_vl_235b_a22b.py:sft --workdir=gs://bucket/run \
        --config.model.init_from=/path/to/Qwen3-VL-235B-A22B-Instruct \
        --config.data.sources.train.path=/path/to/sft.jsonl
    python -m experiments.compile --config=configs/qwen3_vl_235b_a22b.py --topology=v5p:4x4x4   # will it fit?

See configs/released.py for the shared recipe.
"""

from configs.released import released_config


def get_config(mode: str = "sft"):
    return released_config("qwen3-vl-235b-a22b", mode, expert_parallel=8)
