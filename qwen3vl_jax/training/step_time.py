"""The TPU compiler's modeled time of a train step, per chip, and what it implies (tokens/s, MFU).

An AOT compile for a TPU topology carries the compiler's cost analysis (`compiled.cost_analysis()`): the
program's FLOPs, the bytes it moves through HBM, and `optimal_seconds`, the compiler's own estimate of its run
time. It counts a while loop's body once, so the step is compiled with every loop unrolled
(`modeling.loops.unrolled_loops`). The layer stacks are the only loops whose length grows with the model, and an
unrolled compile of every layer grows with the depth (in size and in the compiling machine's memory), so by
default the step is compiled unrolled at three small depths that differ by one ViT block and by one period of
decoder layers; the cost is linear in the number of identical layers, so the whole depth's follows from the
differences (`DepthProbes`, `extrapolate`). The test suite checks the extrapolation against an unrolled compile of
the full depth.

Two things the compiler does not model are added or reported beside it: Pallas kernels that carry no cost
estimate (splash attention) count as free in `optimal_seconds`, so their matmul FLOPs are added at the chip's
peak (a lower bound of their time); and the compiler gives no collective time, so the bytes the step's
collectives return, over the chip's inter-chip bandwidth, are printed as a floor of their own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.decoder import layer_runs
from qwen3vl_jax.parallel.chips import Chip
from qwen3vl_jax.training.hlo_flops import count_flops


@dataclasses.dataclass(frozen=True)
class CompilerCost:
    """One chip's share of a compiled program, as the TPU compiler models it (`seconds`: its `optimal_seconds`;
    `flops`, `bytes_accessed`: its cost analysis) plus the result bytes of its collectives, read from the HLO."""

    seconds: float
    flops: float
    bytes_accessed: float
    collective_bytes: float

    @classmethod
    def of(cls, compiled) -> CompilerCost:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if "optimal_seconds" not in cost:
            raise ValueError(
                "the compiler's cost analysis has no `optimal_seconds` (a TPU compile has it; "
                f"this one has {sorted(k for k in cost if '{' not in k)})"
            )
        if cost["optimal_seconds"] < 0:
            raise ValueError(
                f"the compiler's modeled time is {cost['optimal_seconds']:.4g} s: the program holds an operation it "
                "gives no cost (e.g. a scatter offloaded to the SparseCores, which it counts as -1 s)"
            )
        return cls(
            seconds=cost["optimal_seconds"],
            flops=cost.get("flops", 0.0),
            bytes_accessed=cost.get("bytes accessed", 0.0),
            collective_bytes=count_flops(compiled.as_text()).collective_bytes,
        )

    def _combine(self, other: CompilerCost, scale: float) -> CompilerCost:
        return CompilerCost(
            **{
                field.name: getattr(self, field.name) + scale * getattr(other, field.name)
                for field in dataclasses.fields(self)
            }
        )


class DepthProbe(NamedTuple):
    """The model cut to a small depth for one unrolled compile."""

    vit_depth: int
    deepstack_taps: tuple[int, ...]  # the ViT blocks the DeepStack mergers read
    decoder_layers: int
    layer_types: tuple[str, ...]  # the decoder's first `decoder_layers` layer types, or () where it has none


@dataclasses.dataclass(frozen=True)
class DepthProbes:
    """Three small depths to compile unrolled: `base`, then one more ViT block, then one more period of decoder
    layers; `vit_blocks` and `decoder_periods` are how many blocks and periods the full model has beyond `base`."""

    base: DepthProbe
    more_vit: DepthProbe
    more_decoder: DepthProbe
    vit_blocks: int
    decoder_periods: int


def depth_probes(config: ModelConfig) -> DepthProbes:
    """The probes for `config`: the decoder at its repeating period (one layer for Qwen3-VL, 3 delta-net + 1 full
    attention for Qwen3.5), at least as deep as its DeepStack levels; the ViT as deep as its DeepStack taps, with
    the taps on its first blocks (a tap's merger costs the same wherever it taps)."""
    text, vision = config.text, config.vision
    runs = layer_runs(text)
    if len(runs) != 1:
        raise ValueError(
            f"the decoder's layers are {len(runs)} runs of different kinds, not one repeating period: its depth "
            "cannot be extrapolated (plan it with the layers unrolled whole)"
        )
    period = len(runs[0].period)
    levels = config.num_deepstack
    decoder = max(period * math.ceil(levels / period), period)
    vit = max(levels, 1)
    taps = tuple(range(levels))

    def probe(vit_depth: int, layers: int) -> DepthProbe:
        return DepthProbe(vit_depth, taps, decoder_layers=layers, layer_types=text.layer_types[:layers])

    if vision.depth < vit + 1 or text.num_hidden_layers < decoder + period:
        raise ValueError(
            f"ViT depth {vision.depth} / {text.num_hidden_layers} decoder layers: too shallow to extrapolate from "
            f"{vit + 1} blocks and {decoder + period} layers (plan it with the layers unrolled whole)"
        )
    return DepthProbes(
        base=probe(vit, decoder),
        more_vit=probe(vit + 1, decoder),
        more_decoder=probe(vit, decoder + period),
        vit_blocks=vision.depth - vit,
        decoder_periods=(text.num_hidden_layers - decoder) // period,
    )


def extrapolate(
    base: CompilerCost, more_vit: CompilerCost, more_decoder: CompilerCost, *, probes: DepthProbes
) -> CompilerCost:
    """The full depth's cost: base + blocks x (one block's cost) + periods x (one period's cost)."""
    per_block = more_vit._combine(base, -1.0)
    per_period = more_decoder._combine(base, -1.0)
    return base._combine(per_block, probes.vit_blocks)._combine(per_period, probes.decoder_periods)


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A train step's modeled time on one chip: the compiler's `optimal_seconds` of the whole step plus the Pallas
    kernels it models as free at the chip's peak (`kernel_flops`), with the model FLOPs and tokens each chip
    contributes per step."""

    compiler: CompilerCost
    kernel_flops: float  # per chip: matmul FLOPs of Pallas kernels without a cost estimate (splash attention)
    model_flops: float  # per chip: the model's FLOPs of one step (what MFU divides)
    tokens: float  # per chip and step
    chip: Chip

    @property
    def kernel_seconds(self) -> float:
        return self.kernel_flops / self.chip.peak_flops

    @property
    def seconds(self) -> float:
        return self.compiler.seconds + self.kernel_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.seconds * self.chip.peak_flops)

    def lines(self) -> list[str]:
        """The estimate as the planner prints it."""
        c, chip = self.compiler, self.chip
        floors = (
            f"compute {(c.flops + self.kernel_flops) / chip.peak_flops * 1e3:.4g} ms (FLOPs / peak), HBM "
            f"{c.bytes_accessed / chip.hbm_bandwidth * 1e3:.4g} ms (bytes accessed / bandwidth), collectives "
            f"{c.collective_bytes / chip.ici_bandwidth * 1e3:.4g} ms (their result bytes / inter-chip bandwidth)"
        )
        return [
            f"modeled step time per chip (the TPU compiler's estimate): {self.seconds * 1e3:.4g} ms = "
            f"{c.seconds * 1e3:.4g} ms modeled by the compiler + {self.kernel_seconds * 1e3:.4g} ms of splash "
            "kernels at peak (the compiler models them as free)",
            f"  -> {self.tokens_per_second:,.0f} tokens/s per chip, modeled MFU {self.mfu:.1%} "
            f"({self.model_flops / 1e12:.4g} model TFLOP per chip and step, peak {chip.peak_flops / 1e12:.0f} "
            "TFLOP/s)",
            f"  floors per chip: {floors}",
        ]
