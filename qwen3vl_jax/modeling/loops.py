"""How the train step's loops lower: as XLA while loops (the default: one loop body per layer kind, so compile
time does not grow with depth) or unrolled into straight-line code.

The TPU compiler's cost model (`compiled.cost_analysis()`: FLOPs, bytes and its modeled `optimal_seconds`) counts
a while loop's body once, however often it runs; with every loop unrolled it sees the whole step. The compile
planner (experiments/planner.py) lowers the step inside `unrolled_loops()` for its modeled step time. Every
`scan` of the model and the train step takes its `unroll` from `scan_unroll`: the layer stacks of the ViT and the
decoder, the MLP's sequence slices, the loss chunks, the MoE dispatch over source devices, the delta rule's chunks
and gradient accumulation. What the step computes is the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_UNROLLED = contextvars.ContextVar("qwen3vl_jax_unrolled_loops", default=False)


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
    """Within this context, the loops of everything traced are unrolled (see the module docstring)."""
    token = _UNROLLED.set(True)
    try:
        yield
    finally:
        _UNROLLED.reset(token)


def scan_unroll(length: int) -> int:
    """The `unroll` argument for a scan of `length` steps: all of them inside `unrolled_loops()`, else 1."""
    return max(length, 1) if _UNROLLED.get() else 1
