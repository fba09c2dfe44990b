"""Qwen3-VL-4B on a TPU pod slice; `:sft` (default) or `:pretrain`, as configs/released.py says.

    python -m experiments.train --config=configs/qwen3_vl_4b.py:sft --workdir=gs://bucket/run \
        --config.model.init_from=/path/to/Qwen3-VL-4B-Instruct --config.data.sources.train.path=sft.jsonl
"""

from configs.released import released_config


def get_config(mode: str = "sft"):
    return released_config("qwen3-vl-4b", mode)
