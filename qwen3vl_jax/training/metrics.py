"""Metrics: FLOPs of a train step (for MFU), a measured matmul peak, and writers (TensorBoard + JSONL)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter

from qwen3vl_jax import storage
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.config.model import LINEAR_ATTENTION
from qwen3vl_jax.parallel.chips import TPU_CHIPS


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """Matmul FLOPs of one forward pass over the padded shapes that are computed, by where they run: 2 FLOPs
    per multiply-add with every weight matrix for each token / patch (MoE: the weights it is routed through),
    the attention score and value matmuls over the full (masked) L x L and P x P blocks, and (Qwen3.5) the gated
    delta rule's matmuls over whole chunks (`modeling.gated_delta_net.chunked_gated_delta_rule`)."""

    text_dense: float  # attention and delta-net projections, dense MLPs, shared experts, routers and the LM head
    text_experts: float  # the routed experts of MoE layers
    text_attention: float
    vit: float  # patch embedding and blocks
    vit_attention: float
    mergers: float  # the merger and the DeepStack mergers
    text_delta_rule: float = 0.0  # the chunked gated delta rule of Qwen3.5's linear-attention layers


def forward_flops(config: ModelConfig, *, batch: int, seq_len: int, patches: int, chunk: int = 64) -> ForwardFlops:
    """`ForwardFlops` of `batch` rows of seq_len tokens and `patches` patches; `chunk`: the delta rule's chunk."""
    vision, text = config.vision, config.text
    d_attn = text.num_attention_heads * text.head_dim
    d_kv = text.num_key_value_heads * text.head_dim
    delta = text.delta_net
    d_values = delta.num_value_heads * delta.value_head_dim
    # per token and layer, the widths of the weight matrices it multiplies (times hidden_size)
    widths, full_layers, linear_layers, sparse_layers = 0, 0, 0, 0
    for layer, mixer in enumerate(text.layer_kinds):
        if mixer == LINEAR_ATTENTION:
            linear_layers += 1
            widths += delta.conv_channels + 2 * d_values + 2 * delta.num_value_heads  # in_proj_qkv, z, a, b; out
        else:
            full_layers += 1
            widths += (2 if text.is_qwen3_5 else 1) * d_attn + 2 * d_kv + d_attn  # q (and its gate), k, v, o
        if text.is_sparse_layer(layer):
            sparse_layers += 1
            widths += text.num_experts + (3 * text.shared_expert_intermediate_size + 1 if text.is_qwen3_5 else 0)
        else:
            widths += 3 * text.intermediate_size
    experts = sparse_layers * 3 * text.num_experts_per_tok * text.moe_intermediate_size
    # per token and value head: k k^T and q k^T over its chunk, the unit-triangular solve for the new values and
    # the decayed keys (counted whole), the intra-chunk attention times the values, and three state products
    per_head = (
        2 * chunk * delta.key_head_dim
        + chunk * (delta.value_head_dim + delta.key_head_dim)
        + chunk * delta.value_head_dim
        + 3 * delta.key_head_dim * delta.value_head_dim
    )
    tokens = batch * seq_len
    vit_block = 4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size
    mergers = (1 + config.num_deepstack) * (vision.merged_dim**2 + vision.merged_dim * vision.out_hidden_size)
    images = patches > 0
    return ForwardFlops(
        text_dense=2 * tokens * text.hidden_size * (widths + text.vocab_size),
        text_experts=2 * tokens * text.hidden_size * experts,
        text_attention=4 * batch * seq_len**2 * d_attn * full_layers,
        vit=images * 2 * batch * patches * (vision.patch_dim * vision.hidden_size + vision.depth * vit_block),
        vit_attention=images * 4 * batch * patches**2 * vision.hidden_size * vision.depth,
        mergers=images * 2 * batch * patches // vision.spatial_merge_size**2 * mergers,
        text_delta_rule=2 * tokens * linear_layers * delta.num_value_heads * per_head,
    )


def train_flops(config: ModelConfig, *, batch: int, seq_len: int, patches: int) -> float:
    """Matmul FLOPs of one forward + backward pass (3 x forward, `forward_flops`)."""
    return 3.0 * sum(dataclasses.astuple(forward_flops(config, batch=batch, seq_len=seq_len, patches=patches)))


@functools.cache
def device_peak_flops(measure_seconds: float = 1.0) -> float:
    """Peak FLOP/s of one device: the public bf16 figure for known TPUs, else a measured fp32 matmul rate
    (2048^3, repeated for `measure_seconds`; once per process)."""
    kind = jax.devices()[0].device_kind
    if kind in TPU_CHIPS:
        return TPU_CHIPS[kind].peak_flops
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
