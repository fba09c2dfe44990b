"""A model and its processor as an HF checkpoint directory: what the trainer writes at the end of a run and
`experiments.export` writes for any saved step."""

from __future__ import annotations

import os
from typing import Any

import jax

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.processing import Processor
from qwen3vl_jax.storage import local_dir, write_json


def export_hf(
    path: str, params: Any, *, config: ModelConfig, processor: Processor, dtype: str | None = None, expert_layout="hub"
) -> None:
    """Writes `params` (numpy or sharded jax.Arrays) as safetensors gathered one tensor at a time
    (`hf_io.save_params`), config.json, the processor's files and generation_config.json (its eos / pad ids) to
    `path` (local or gs://). Every process calls this; process 0 writes."""
    hf_io.save_params(path, params, config=config, dtype=dtype, expert_layout=expert_layout)
    if jax.process_index() == 0:
        with local_dir(path) as local:
            processor.save_pretrained(local)
            write_json(
                os.path.join(local, hf_io.GENERATION_CONFIG),
                dict(eos_token_id=list(processor.eos_token_ids), pad_token_id=processor.pad_token_id),
            )
