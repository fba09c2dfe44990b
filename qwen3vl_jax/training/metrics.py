"""Metrics: FLOPs of a train step (for MFU), a measured matmul peak, and writers (TensorBoard + JSONL)."""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter

from qwen3vl_jax.checkpoints import storage
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.parallel.chips import TPU_CHIPS


def train_flops(config: ModelConfig, *, batch: int, seq_len: int, patches: int) -> float:
    """Matmul FLOPs of one forward + backward pass (3 x forward) over the padded shapes that are computed:
    2 FLOPs per multiply-add with every weight matrix for each token / patch (MoE: the weights it is routed
    through), plus the attention score and
    value matmuls over the full (masked) L x L and P x P blocks."""
    vision, text = config.vision, config.text
    d_attn = text.num_attention_heads * text.head_dim
    d_kv = text.num_key_value_heads * text.head_dim
    # MoE layers: the router and the k experts each token is routed to (the active weights)
    mlp = [
        text.num_experts + 3 * text.num_experts_per_tok * text.moe_intermediate_size
        if text.is_sparse_layer(layer)
        else 3 * text.intermediate_size
        for layer in range(text.num_hidden_layers)
    ]
    text_weights = text.hidden_size * (text.num_hidden_layers * (2 * d_attn + 2 * d_kv) + sum(mlp))
    text_flops = 2 * batch * seq_len * (text_weights + text.hidden_size * text.vocab_size)
    text_flops += 4 * batch * seq_len**2 * d_attn * text.num_hidden_layers
    vit_block = 4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size
    vit_weights = vision.patch_dim * vision.hidden_size + vision.depth * vit_block
    mergers = (1 + config.num_deepstack) * (vision.merged_dim**2 + vision.merged_dim * vision.out_hidden_size)
    vision_flops = 2 * batch * (patches * vit_weights + patches // vision.spatial_merge_size**2 * mergers)
    vision_flops += 4 * batch * patches**2 * vision.hidden_size * vision.depth
    return 3.0 * (text_flops + vision_flops * (patches > 0))


@functools.cache
def device_peak_flops(measure_seconds: float = 1.0) -> float:
    """Peak FLOP/s of one device: the public bf16 figure for known TPUs, else a measured fp32 matmul rate
    (2048^3, repeated for `measure_seconds`; once per process)."""
    kind = jax.devices()[0].device_kind
    if kind in TPU_CHIPS:
        return TPU_CHIPS[kind][0]
    x = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < measure_seconds:
        matmul(x).block_until_ready()
        runs += 1
    return runs * 2 * 2048**3 / (time.perf_counter() - start)


class MetricWriter:
    """Scalars to TensorBoard (workdir/tensorboard) and to workdir/metrics.jsonl, on process 0 only. In a
    bucket, which cannot append, metrics.jsonl is rewritten whole at each write (tensorboardX writes gs://
    itself, with google-cloud-storage)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.remote = storage.path(workdir) / "metrics.jsonl" if storage.is_remote(workdir) else None
        if self.remote is None:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        else:
            self.lines = self.remote.read_text() if self.remote.exists() else ""

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        line = json.dumps({"step": step, "split": prefix, **scalars}) + "\n"
        if self.remote is None:
            with open(self.jsonl_path, "a") as f:  # appended and closed at once: whole lines survive a kill
                f.write(line)
        else:
            self.lines += line
            self.remote.write_text(self.lines)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
