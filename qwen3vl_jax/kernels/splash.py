"""Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for the decoder and the ViT.

The kernels take one example (heads, length, head_dim) and never build an L x L mask: a static mask (causal
for the decoder, full for the ViT) is and-ed with segment ids, so packed examples, padding and the ViT's
per-(image, temporal group) blocks are isolated, and the kernels skip the blocks the mask rules out. Lengths are
padded to a multiple of 128 (padding gets a segment of its own). Under a mesh the kernel runs inside
`jax.shard_map`: batch over the data, fsdp and expert axes, heads over tensor, and under context parallelism
(parallel/context.py) the queries over context. Off TPU it runs in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import NamedSharding, PartitionSpec

from qwen3vl_jax.kernels import interpret_kernels
from qwen3vl_jax.parallel.context import (
    CONTEXT,
    check_length,
    context_shards,
    gather_in_sequence_order,
    load_balanced_positions,
)
from qwen3vl_jax.parallel.sharding import attention_specs

LANES = 128
PADDING_SEGMENT = -1  # distinct from every real segment id, padding included (0)


def splash_attention(
    q,
    k,
    v,
    *,
    q_segment_ids,
    kv_segment_ids,
    causal: bool,
    block_sizes: tuple[int, int],
    split_over_context: bool = False,
) -> jax.Array:
    """q (B, L, Hq, D), k / v (B, L, Hkv, D) self-attention with segment ids (B, L) -> (B, L, Hq, D). Scale
    D^-0.5 (applied to q: the kernel does not scale). split_over_context: the length is split over the mesh's
    `context` axis and no segment crosses a shard boundary: each shard attends its own tokens."""

    def attend(q, k, v, q_segment_ids, kv_segment_ids):
        length, head_dim = q.shape[1], q.shape[3]
        pad = -length % LANES
        if pad:
            q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
            q_segment_ids, kv_segment_ids = (
                jnp.pad(s, ((0, 0), (0, pad)), constant_values=PADDING_SEGMENT) for s in (q_segment_ids, kv_segment_ids)
            )
        q = (q * head_dim**-0.5).astype(q.dtype)
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, heads, L, D)
        mask = mask_lib.CausalMask if causal else mask_lib.FullMask
        kernel = _kernel(mask((q.shape[2], q.shape[2])), heads=q.shape[1], block_sizes=block_sizes)
        out = jax.vmap(kernel)(q, k, v, kernel_lib.SegmentIds(q_segment_ids, kv_segment_ids)).transpose(0, 2, 1, 3)
        return out[:, :length] if pad else out

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.size > 1:
        heads, segments = attention_specs(
            mesh, batch=q.shape[0], heads=q.shape[2], kv_heads=k.shape[2], split_over_context=split_over_context
        )
        in_specs = (heads,) * 3 + (segments,) * 2
        attend = jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=heads, check_vma=False)
    return attend(q, k, v, q_segment_ids, kv_segment_ids)


class LoadBalancedCausalMask(mask_lib._ComputableMask):
    """The causal mask of queries in the load-balanced layout (parallel/context.py) against keys in sequence
    order: query row r sits at sequence position `positions[r]`. The kernel computes it from `q_sequence`, the
    rows' positions, which it shards over the queries like the rest of the mask information."""

    def __init__(self, positions: np.ndarray):
        length = len(positions)
        super().__init__(shape=(length, length), mask_function=lambda q_ids, kv_ids: q_ids >= kv_ids)
        self.q_sequence = np.asarray(positions, np.int32)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and np.array_equal(self.q_sequence, other.q_sequence)

    def __hash__(self) -> int:
        return hash((type(self), self.q_sequence.tobytes()))


def load_balanced_splash(q, k, v, *, segment_ids, block_sizes: tuple[int, int]) -> jax.Array:
    """Causal self-attention of q (B, L, Hq, D), k / v (B, L, Hkv, D) in the load-balanced layout, the length
    split over the mesh's `context` axis: each shard all-gathers the keys and values, puts them in sequence order
    and runs the splash kernel on its queries (the kernel's mask information split over `context` with them)."""
    mesh = jax.sharding.get_abstract_mesh()
    length, shards = q.shape[1], context_shards()
    check_length(length, shards, multiple=LANES)
    positions = load_balanced_positions(length, shards)
    heads, segments = attention_specs(
        mesh, batch=q.shape[0], heads=q.shape[2], kv_heads=k.shape[2], split_over_context=True
    )
    local_heads = q.shape[2] // (mesh.shape["tensor"] if heads[2] else 1)
    kernel = _kernel(LoadBalancedCausalMask(positions), heads=local_heads, block_sizes=block_sizes, q_seq_shards=shards)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, CONTEXT)))

    def attend(kernel, q, k, v, q_segment_ids, kv_segment_ids):
        k, v, kv_segment_ids = gather_in_sequence_order((k, v, kv_segment_ids), length=length, shards=shards)
        q = (q * q.shape[3] ** -0.5).astype(q.dtype)
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, heads, L, D)
        out = jax.vmap(kernel, in_axes=(0, 0, 0, 0))(q, k, v, kernel_lib.SegmentIds(q_segment_ids, kv_segment_ids))
        return out.transpose(0, 2, 1, 3)

    in_specs = (kernel_spec,) + (heads,) * 3 + (segments,) * 2
    attend = jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=heads, check_vma=False)
    return attend(kernel, q, k, v, segment_ids, segment_ids)


def _kernel(mask: mask_lib.Mask, *, heads: int, block_sizes: tuple[int, int], q_seq_shards: int = 1):
    """The splash kernel for `mask` (L, L) on every head; with q_seq_shards > 1, for one of that many query
    shards (its mask information split accordingly, `manual_sharding_spec`)."""
    length = mask.shape[0]
    block_q, block_kv = _divisor_block(block_sizes[0], length // q_seq_shards), _divisor_block(block_sizes[1], length)
    # every query block of the forward and backward kernels is block_q, every key/value block block_kv
    q_blocks = dict.fromkeys(("block_q", "block_q_dkv", "block_q_dq"), block_q)
    kv_fields = ("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq")
    blocks = kernel_lib.BlockSizes(**q_blocks, **dict.fromkeys(kv_fields, block_kv))
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=q_seq_shards,
        interpret=interpret_kernels(),
    )


def _divisor_block(block: int, length: int) -> int:
    """The largest multiple of 128 that is <= block and divides length (a multiple of 128)."""
    block = min(block, length)
    while length % block:
        block -= LANES
    return block
