"""Qwen3-VL-8B: SFT from the released checkpoint (default) or pre-training, on a TPU pod slice.

    python -m experiments.train --config=configs/qwen3_vl_8b.py:sft --workdir=gs://bucket/run \
        --config.model.init_from=/path/to/Qwen3-VL-8B-Instruct --config.data.sources.train.path=/path/to/sft.jsonl
    python -m experiments.compile --config=configs/qwen3_vl_8b.py --topology=v5p:2x2x2   # will it fit?

See configs/released.py for the shared recipe.
"""

from configs.released import released_config


def get_config(mode: str = "sft"):
    return released_config("qwen3-vl-8b", mode)
