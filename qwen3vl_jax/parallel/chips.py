"""TPU chips by jax `device_kind`: the peak FLOP/s that MFU is measured against, the HBM the compile planner fits a
program into, and the bandwidths its step-time floors divide by."""

from typing import NamedTuple


class Chip(NamedTuple):
    """Public per-chip figures (Cloud TPU system-architecture pages)."""

    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s, bidirectional, all of the chip's inter-chip links together


TPU_CHIPS = {
    "TPU v4": Chip(275e12, 32 * 2**30, hbm_bandwidth=1200e9, ici_bandwidth=2400e9 / 8),
    "TPU v5 lite": Chip(197e12, 16 * 2**30, hbm_bandwidth=819e9, ici_bandwidth=1600e9 / 8),
    "TPU v5": Chip(459e12, 95 * 2**30, hbm_bandwidth=2765e9, ici_bandwidth=1200e9),
    "TPU v6 lite": Chip(918e12, 32 * 2**30, hbm_bandwidth=1640e9, ici_bandwidth=3584e9 / 8),
}
