"""Qwen3.5-9B on a TPU pod slice; `:sft` (default), `:sft_32k` or `:pretrain`, as configs/released.py says (`:long`
is refused: the gated delta-net layers do not split a sequence over the `context` axis yet).

    python -m experiments.train --config=configs/qwen3_5_9b.py:sft --workdir=gs://bucket/run \
        --config.model.init_from=/path/to/Qwen3.5-9B --config.data.sources.train.path=sft.jsonl
    python -m experiments.compile --config=configs/qwen3_5_9b.py --topology=v5p:2x2x1  # will it fit?
"""

from configs.released import released_config


def get_config(mode: str = "sft"):
    return released_config("qwen3.5-9b", mode)
