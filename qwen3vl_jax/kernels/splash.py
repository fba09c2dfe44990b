"""Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for the decoder and the ViT.

The kernels take one example (heads, length, head_dim) and never build an L x L mask: a static mask (causal
for the decoder, full for the ViT) is and-ed with segment ids, so packed examples, padding and the ViT's
per-(image, temporal group) blocks are isolated, and the kernels skip the blocks the mask rules out. Lengths are
padded to a multiple of 128 (padding gets a segment of its own). Under a mesh the kernel runs inside
`jax.shard_map`: batch over the data, fsdp and expert axes, heads over tensor. Off TPU it runs in interpret
mode.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from qwen3vl_jax.kernels import interpret_kernels
from qwen3vl_jax.parallel.sharding import BATCH_AXES

LANES = 128
PADDING_SEGMENT = -1  # distinct from every real segment id, padding included (0)


def splash_attention(
    q, k, v, *, q_segment_ids, kv_segment_ids, causal: bool, block_sizes: tuple[int, int]
) -> jax.Array:
    """q (B, L, Hq, D), k / v (B, L, Hkv, D) self-attention with segment ids (B, L) -> (B, L, Hq, D). Scale
    D^-0.5 (applied to q: the kernel does not scale)."""
    length, heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    pad = -length % LANES
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        q_segment_ids, kv_segment_ids = (
            jnp.pad(s, ((0, 0), (0, pad)), constant_values=PADDING_SEGMENT) for s in (q_segment_ids, kv_segment_ids)
        )
    q = (q * head_dim**-0.5).astype(q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, heads, L, D)

    def attend(q, k, v, q_segment_ids, kv_segment_ids):
        kernel = _kernel(heads=q.shape[1], length=q.shape[2], causal=causal, block_sizes=block_sizes)
        return jax.vmap(kernel)(q, k, v, kernel_lib.SegmentIds(q_segment_ids, kv_segment_ids))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.size > 1:
        batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
        batch = batch if q.shape[0] % math.prod(mesh.shape[a] for a in batch) == 0 else None
        tensor = (
            "tensor"
            if "tensor" in mesh.shape and heads % mesh.shape["tensor"] == 0 and k.shape[1] % mesh.shape["tensor"] == 0
            else None
        )
        heads_spec, segments_spec = PartitionSpec(batch, tensor), PartitionSpec(batch)
        attend = jax.shard_map(
            attend, mesh=mesh, in_specs=(heads_spec,) * 3 + (segments_spec,) * 2, out_specs=heads_spec, check_vma=False
        )
    out = attend(q, k, v, q_segment_ids, kv_segment_ids).transpose(0, 2, 1, 3)
    return out[:, :length] if pad else out


def _kernel(*, heads: int, length: int, causal: bool, block_sizes: tuple[int, int]):
    block_q, block_kv = (_divisor_block(b, length) for b in block_sizes)
    # every query block of the forward and backward kernels is block_q, every key/value block block_kv
    q_blocks = dict.fromkeys(("block_q", "block_q_dkv", "block_q_dq"), block_q)
    kv_fields = ("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq")
    blocks = kernel_lib.BlockSizes(**q_blocks, **dict.fromkeys(kv_fields, block_kv))
    one = mask_lib.CausalMask((length, length)) if causal else mask_lib.FullMask((length, length))
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([one] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret_kernels(),
    )


def _divisor_block(block: int, length: int) -> int:
    """The largest multiple of 128 that is <= block and divides length (a multiple of 128)."""
    block = min(block, length)
    while length % block:
        block -= LANES
    return block
