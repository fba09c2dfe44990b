"""The patch merger (transformers' `Qwen3VLVisionPatchMerger`): each 2x2 window of ViT patches becomes one LLM
token. The main merger normalises each patch before the shuffle; the DeepStack mergers normalise the 4D-wide
vector after it."""

from __future__ import annotations

import flax.linen as nn
import jax

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.layers import Dense, LayerNorm


class PatchMerger(nn.Module):
    """4 consecutive patches (one merge window) -> one LLM token, through LayerNorm, fc1, erf-GELU, fc2."""

    config: ModelConfig
    postshuffle_norm: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, P, D) -> (B, P / m^2, out_hidden) in the compute dtype (m = spatial_merge_size)."""
        c, kw = self.config.vision, self.config.dense_kwargs
        norm = LayerNorm(
            c.layer_norm_eps,
            axis_name="vision_merged" if self.postshuffle_norm else "vision_embed",
            param_dtype=kw["param_dtype"],
            name="norm",
        )
        if not self.postshuffle_norm:
            x = norm(x)
        x = x.reshape(x.shape[0], x.shape[1] // c.spatial_merge_size**2, c.merged_dim)
        if self.postshuffle_norm:
            x = norm(x)
        linear = dict(use_bias=True, **self.config.linear_kwargs)
        x = Dense(c.merged_dim, ("vision_merged", "vision_merged_out"), name="linear_fc1", **linear)(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense(c.out_hidden_size, ("vision_merged", "embed"), name="linear_fc2", **linear)(x)
