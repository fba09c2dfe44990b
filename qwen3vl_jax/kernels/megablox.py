"""The megablox grouped matmul (jax.experimental.pallas.ops.tpu.megablox.gmm) for the MoE experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import gmm

from qwen3vl_jax.kernels import interpret_kernels


def megablox_matmul(lhs: jax.Array, rhs: jax.Array, *, group_sizes: jax.Array, tiling: tuple[int, int, int]):
    """lhs (m, k) rows grouped by group_sizes (groups,), rhs (groups, k, n) -> (m, n). Tiles (m, k, n) from
    `tiling`, capped at the matrix dims; rows past sum(group_sizes) come out undefined (the caller masks them)."""
    m = lhs.shape[0]
    tm = min(tiling[0], _round_up(m, 8))
    pad = -m % tm
    lhs = jnp.pad(lhs, ((0, pad), (0, 0)))
    # one tile for k and n: the backward pass reuses the tiling with k and n swapped (on TPU the expert dims must
    # be multiples of 128, as in every released model)
    tile = min(tiling[1], tiling[2], lhs.shape[1], rhs.shape[2])
    out = gmm(
        lhs,
        rhs,
        group_sizes=group_sizes,
        preferred_element_type=lhs.dtype,
        tiling=(tm, tile, tile),
        interpret=interpret_kernels(),
    )
    return out[:m]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
