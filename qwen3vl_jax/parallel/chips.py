"""TPU chips by jax `device_kind`: the peak FLOP/s that MFU is measured against and the HBM the compile planner
fits a program into."""

# Public per-chip figures by jax device_kind: dense bf16 peak FLOP/s and HBM bytes.
TPU_CHIPS = {
    "TPU v4": (275e12, 32 * 2**30),
    "TPU v5 lite": (197e12, 16 * 2**30),
    "TPU v5": (459e12, 95 * 2**30),
    "TPU v6 lite": (918e12, 32 * 2**30),
}
