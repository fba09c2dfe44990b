"""LoRA's configuration: which linear layers get low-rank adapters, their rank, scale and dropout."""

from __future__ import annotations

import dataclasses
import difflib
import math


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


LORA_TARGETS = (
    # decoder (transformers' module names)
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    # Qwen3.5's gated delta-net layers (transformers' linear_attn.*)
    "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
    # ViT blocks (ours: transformers' attn.qkv, attn.proj, mlp.linear_fc1, mlp.linear_fc2) and the patch mergers
    "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "linear_fc1", "linear_fc2",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on the named linear layers: y = x W + (alpha / rank) dropout(x) A B
    with A (in, rank), B (rank, out) in float32 (B starts at zero), W frozen. rank 0: no adapters (and then alpha,
    dropout and targets must keep their defaults: a config that sets them with rank 0 is refused, since it would
    train the whole model). The routed MoE experts are never adapted (they are not among the targets; a Qwen3.5
    shared expert is, as a gate_proj / up_proj / down_proj). Dropout applies only when the model is applied with a
    "dropout" rng (the train step; never in eval or generation)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        if isinstance(self.targets, str):  # one layer name, not its characters
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        _check(
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 0,
            f"lora rank must be an integer >= 0 (0: no adapters), got {self.rank!r}",
        )
        _check(
            isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 < self.alpha < math.inf,
            f"lora alpha must be a number > 0 (the adapters' scale is alpha / rank), got {self.alpha!r}",
        )
        _check(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            f"lora dropout must be in [0, 1), got {self.dropout!r}",
        )
        unknown = [name for name in self.targets if name not in LORA_TARGETS]
        if unknown:
            guesses = {name: difflib.get_close_matches(str(name), LORA_TARGETS, n=2) for name in unknown}
            hints = "; ".join(
                f"{name!r}: did you mean {' or '.join(close)}?" for name, close in guesses.items() if close
            )
            _check(
                False,
                f"lora targets {unknown} are not adaptable layers ({hints or 'no close name'}); "
                f"the adaptable layers are {', '.join(LORA_TARGETS)}",
            )
        if self.rank == 0:
            given = [
                f"{field.name}={getattr(self, field.name)!r}"
                for field in dataclasses.fields(self)
                if field.name != "rank" and getattr(self, field.name) != field.default
            ]
            _check(
                not given,
                f"lora rank is 0, which turns the adapters off (the whole model trains), but {', '.join(given)} "
                "is set: give lora.rank > 0 for adapters, or leave alpha, dropout and targets at their defaults",
            )
        else:
            _check(bool(self.targets), "lora targets are empty: name the layers to adapt (or set lora rank 0)")

    def adapts(self, layer_name: str) -> bool:
        return self.rank > 0 and layer_name in self.targets
