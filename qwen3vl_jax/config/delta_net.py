"""The sizes of one gated delta-net layer (Qwen3.5's linear attention, `modeling.gated_delta_net`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedDeltaNetConfig:
    """Sizes of one gated delta-net layer (transformers' `linear_*` fields of `Qwen3_5TextConfig`)."""

    hidden_size: int
    num_key_heads: int  # linear_num_key_heads
    num_value_heads: int  # linear_num_value_heads, a multiple of num_key_heads
    key_head_dim: int  # linear_key_head_dim
    value_head_dim: int  # linear_value_head_dim
    conv_kernel_size: int = 4  # linear_conv_kernel_dim
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("hidden_size", "num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"GatedDeltaNetConfig.{name} must be positive, got {getattr(self, name)}")
        if self.conv_kernel_size < 2:
            raise ValueError(f"GatedDeltaNetConfig.conv_kernel_size must be at least 2, got {self.conv_kernel_size}")
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(
                f"GatedDeltaNetConfig.num_value_heads ({self.num_value_heads}) must be a multiple of "
                f"num_key_heads ({self.num_key_heads})"
            )

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def conv_channels(self) -> int:
        """C: the q, k and v channels that the conv runs over."""
        return 2 * self.key_dim + self.num_value_heads * self.value_head_dim
