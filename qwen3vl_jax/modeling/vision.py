"""The Qwen3-VL ViT (transformers' `Qwen3VLVisionModel`) on a packed patch buffer of static size.

Each batch row holds a buffer of P patches (several images / video temporal groups one after the other,
then padding). Everything that depends on an image's grid arrives precomputed by the host
(`qwen3vl_jax.vision_inputs`): per-patch segment ids, pos-embed interpolation taps and weights, and (row, col)
rotary ids. So one compiled ViT serves any mix of image sizes.

The blocks run as scanned stacks split at the DeepStack taps: with taps after blocks (8, 16, 24) of 27 the
stacks are blocks 0-8, 9-16, 17-24, 25-26, each scanned (`blocks_0` ... `blocks_3`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.modeling.layers import Dense, LayerNorm, default_init, param
from qwen3vl_jax.modeling.remat import maybe_remat
from qwen3vl_jax.modeling.rope import apply_rotary, vision_rotary_tables


def block_stacks(depth: int, taps: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, end) block ranges that end right after each tap index (and at `depth`)."""
    ends = sorted({i + 1 for i in taps} | {depth})
    return [(start, end) for start, end in zip([0, *ends[:-1]], ends)]


class VisionBlock(nn.Module):
    """Pre-norm ViT block (`Qwen3VLVisionBlock`): x + Attn(LN1 x), then + MLP(LN2 x) with tanh-GELU."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, segment_ids, cos, sin):
        """x (B, P, D); segment_ids (B, P); cos, sin (B, P, hd), or None without vision positions. Returns
        (x, None) for nn.scan."""
        c, kw = self.config.vision, self.config.dense_kwargs
        x = nn.with_logical_constraint(x, ("batch", "patches", "vision_embed"))
        h = LayerNorm(c.layer_norm_eps, param_dtype=kw["param_dtype"], name="norm1")(x)
        qkv = Dense(
            (3, c.num_heads, c.head_dim),
            ("vision_embed", "qkv", "vision_heads", "head_dim"),
            use_bias=True,
            name="attn_qkv",
            **kw,
        )(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cos is not None:
            q, k = (apply_rotary(t, cos, sin, jnp.float32) for t in (q, k))
        o = attention(
            q,
            k,
            v,
            segment_ids,
            segment_ids,
            causal=False,
            impl=self.config.attention_impl,
            block_sizes=self.config.splash_block_sizes,
        )
        x = x + Dense(
            c.hidden_size,
            ("vision_heads", "head_dim", "vision_embed"),
            contract=2,
            use_bias=True,
            name="attn_proj",
            **kw,
        )(o)
        h = LayerNorm(c.layer_norm_eps, param_dtype=kw["param_dtype"], name="norm2")(x)
        h = Dense(c.intermediate_size, ("vision_embed", "vision_mlp"), use_bias=True, name="mlp_fc1", **kw)(h)
        h = jax.nn.gelu(h, approximate=True)
        x = x + Dense(c.hidden_size, ("vision_mlp", "vision_embed"), use_bias=True, name="mlp_fc2", **kw)(h)
        return x, None


class PatchMerger(nn.Module):
    """2x2 merger (`Qwen3VLVisionPatchMerger`): 4 consecutive patches -> one LLM token. The main merger
    normalises each patch before the shuffle; the DeepStack mergers normalise the 4D-wide vector after it.
    erf-GELU."""

    config: ModelConfig
    postshuffle_norm: bool

    @nn.compact
    def __call__(self, x):
        """x (B, P, D) -> (B, P / m^2, out_hidden)."""
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
        x = Dense(c.merged_dim, ("vision_merged", "vision_merged_out"), use_bias=True, name="linear_fc1", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense(c.out_hidden_size, ("vision_merged", "embed"), use_bias=True, name="linear_fc2", **kw)(x)


class VisionTower(nn.Module):
    """Patch embedding + interpolated learned position embedding + blocks + mergers."""

    config: ModelConfig

    @nn.compact
    def __call__(self, pixel_patches, patch_segment_ids, pos_embed_index, pos_embed_weight, patch_rowcol):
        """pixel_patches (B, P, C*Tp*P*P); patch_segment_ids (B, P), 0 = padding; pos_embed_index /
        pos_embed_weight (B, P, 4) bilinear taps into the pos-embed table; patch_rowcol (B, P, 2).

        Returns merged tokens (B, P/m^2, out_hidden) and the DeepStack features, a list of `num_deepstack`
        arrays of the same shape (`pooler_output` and `deepstack_features` of `Qwen3VLVisionModel.forward`)."""
        c, kw = self.config.vision, self.config.dense_kwargs
        x = Dense(c.hidden_size, ("patch", "vision_embed"), use_bias=True, name="patch_embed", **kw)(pixel_patches)
        table = param(
            self,
            "pos_embed",
            default_init,
            (c.num_position_embeddings, c.hidden_size),
            kw["param_dtype"],
            ("vision_positions", "vision_embed"),
        )
        cos = sin = None
        if self.config.vision_positions:
            # As `Qwen3VLVisionModel.forward`: weighted sum of 4 table rows, in float32, cast to the hidden dtype.
            pos = jnp.sum(table[pos_embed_index].astype(jnp.float32) * pos_embed_weight[..., None], axis=-2)
            x = x + pos.astype(x.dtype)
            cos, sin = vision_rotary_tables(patch_rowcol, c.head_dim, c.rope_theta)

        taps = c.deepstack_visual_indexes[: self.config.num_deepstack]
        deepstack = []
        for stack, (start, end) in enumerate(block_stacks(c.depth, taps)):
            blocks = nn.scan(
                maybe_remat(VisionBlock, self.config.remat),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=end - start,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = blocks(self.config, name=f"blocks_{stack}")(x, patch_segment_ids, cos, sin)
            if end - 1 in taps:
                deepstack.append(PatchMerger(self.config, True, name=f"deepstack_merger_{len(deepstack)}")(x))
        return PatchMerger(self.config, False, name="merger")(x), deepstack
