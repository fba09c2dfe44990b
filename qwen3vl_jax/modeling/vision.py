"""The Qwen3-VL ViT (transformers' `Qwen3VLVisionModel`) on a packed patch buffer of static size.

Each batch row holds a buffer of P patches (several images / video temporal groups one after the other,
then padding). Everything that depends on an image's grid arrives precomputed by the host
(`qwen3vl_jax.inputs.patch_geometry`): per-patch segment ids, pos-embed interpolation taps and weights, and (row, col)
rotary ids. So one compiled ViT serves any mix of image sizes.

The blocks run as scanned stacks split at the DeepStack taps (`deepstack.block_stacks`), each tap's features
through its own DeepStack merger.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.model_inputs import ModelInputs
from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.modeling.deepstack import block_stacks
from qwen3vl_jax.modeling.layers import Dense, LayerNorm, default_init, param
from qwen3vl_jax.modeling.loops import scan_unroll
from qwen3vl_jax.modeling.merger import PatchMerger
from qwen3vl_jax.modeling.outputs import VisionOutputs, VisionOutputsWithHiddenStates
from qwen3vl_jax.modeling.remat import mark_layer_input, maybe_remat
from qwen3vl_jax.modeling.rotary import RotaryTables, apply_rotary, inverse_frequencies
from qwen3vl_jax.parallel.context import context_shards


def vision_rotary_tables(rowcol: jax.Array, *, head_dim: int, theta: float) -> RotaryTables:
    """rowcol (..., 2) int patch coordinates -> cos, sin (..., head_dim) float32.

    Angles are [row * f, col * f] over hd/4 frequencies of a rotary dim hd/2, duplicated to hd, as in
    `Qwen3VLVisionRotaryEmbedding`.
    """
    inv_freq = inverse_frequencies(theta, head_dim // 2)
    angles = rowcol[..., :, None].astype(jnp.float32) * inv_freq  # (..., 2, hd/4)
    angles = angles.reshape(*rowcol.shape[:-1], -1)  # [row freqs | col freqs]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return RotaryTables(cos=jnp.cos(emb), sin=jnp.sin(emb))


@flax.struct.dataclass
class VisionBlockInputs:
    """What every ViT block reads besides its hidden states x; built once per call by `VisionTower`."""

    segment_ids: jax.Array  # (B, P) int32: one id per (image, temporal group), 0 = padding
    cos: jax.Array | None  # (B, P, head_dim) float32 2-D rotary tables; None without vision positions
    sin: jax.Array | None
    # "local" when the patch buffer is split over the mesh's `context` axis (parallel/context.py), else None
    context_layout: str | None = flax.struct.field(pytree_node=False, default=None)


class VisionBlock(nn.Module):
    """Pre-norm ViT block (`Qwen3VLVisionBlock`): x + Attn(LN1 x), then + MLP(LN2 x) with tanh-GELU."""

    config: ModelConfig
    keep_output: bool = False  # also return x as the scan's per-block output (VisionTower's hidden states)

    @nn.compact
    def __call__(self, x: jax.Array, block_inputs: VisionBlockInputs) -> tuple[jax.Array, jax.Array | None]:
        """x (B, P, D) -> (x (B, P, D), None) as nn.scan's (carry, output), or (x, x) with keep_output."""
        c, kw = self.config.vision, self.config.linear_kwargs
        x = mark_layer_input(nn.with_logical_constraint(x, ("batch", "patches", "vision_embed")))
        h = LayerNorm(c.layer_norm_eps, param_dtype=kw["param_dtype"], name="norm1")(x)
        qkv = Dense(
            (3, c.num_heads, c.head_dim),
            ("vision_embed", "qkv", "vision_heads", "head_dim"),
            use_bias=True,
            name="attn_qkv",
            **kw,
        )(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if block_inputs.cos is not None:
            q, k = (apply_rotary(t, block_inputs.cos, block_inputs.sin, compute_dtype=jnp.float32) for t in (q, k))
        o = attention(
            q,
            k,
            v,
            q_segment_ids=block_inputs.segment_ids,
            kv_segment_ids=block_inputs.segment_ids,
            causal=False,
            impl=self.config.attention_impl,
            block_sizes=self.config.splash_block_sizes,
            context_layout=block_inputs.context_layout,
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
        return x, (x if self.keep_output else None)


class VisionTower(nn.Module):
    """Patch embedding + interpolated learned position embedding + blocks + mergers."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, inputs: ModelInputs, *, return_hidden_states: bool = False
    ) -> VisionOutputs | VisionOutputsWithHiddenStates:
        """The patch fields of `inputs`: pixel_patches (B, P, C*Tp*P*P); patch_segment_ids (B, P), 0 = padding;
        pos_embed_index / pos_embed_weight (B, P, 4) bilinear taps into the pos-embed table; patch_rowcol (B, P, 2).

        Returns `VisionOutputs`: merged tokens (B, P/m^2, out_hidden) and the DeepStack features, a list of
        `num_deepstack` arrays of the same shape (`pooler_output` and `deepstack_features` of
        `Qwen3VLVisionModel.forward`). With return_hidden_states, `VisionOutputsWithHiddenStates`: also the patch
        features before the first block and after each block, a list of depth + 1 arrays (B, P, hidden) (what
        forward hooks on transformers' `patch_embed` (+ position embedding) and `blocks[i]` see)."""
        vision, kw = self.config.vision, self.config.dense_kwargs
        x = Dense(vision.hidden_size, ("patch", "vision_embed"), use_bias=True, name="patch_embed", **kw)(
            inputs.pixel_patches
        )
        table = param(
            self,
            "pos_embed",
            init=default_init,
            shape=(vision.num_position_embeddings, vision.hidden_size),
            dtype=kw["param_dtype"],
            axes=("vision_positions", "vision_embed"),
        )
        cos = sin = None
        if self.config.vision_positions:
            # As `Qwen3VLVisionModel.forward`: weighted sum of 4 table rows, in float32, cast to the hidden dtype.
            # the table (a few MB) whole on every device, so that each gathers its own patches' rows locally
            table = nn.with_logical_constraint(table, (None, None))
            taps = table[inputs.pos_embed_index].astype(jnp.float32)
            pos = jnp.sum(taps * inputs.pos_embed_weight[..., None], axis=-2)
            x = x + pos.astype(x.dtype)
            cos, sin = vision_rotary_tables(inputs.patch_rowcol, head_dim=vision.head_dim, theta=vision.rope_theta)
        # each context shard runs the ViT on its own images (parallel/context.py's `align_patches`)
        split = "local" if context_shards() > 1 and not self.is_initializing() else None
        block_inputs = VisionBlockInputs(segment_ids=inputs.patch_segment_ids, cos=cos, sin=sin, context_layout=split)

        taps = vision.deepstack_visual_indexes[: self.config.num_deepstack]
        deepstack, hidden_states = [], [x]
        for stack, (start, end) in enumerate(block_stacks(vision.depth, taps)):
            blocks = nn.scan(
                maybe_remat(VisionBlock, self.config.remat),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=end - start,
                unroll=scan_unroll(end - start),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, outputs = blocks(self.config, keep_output=return_hidden_states, name=f"blocks_{stack}")(x, block_inputs)
            if return_hidden_states:
                hidden_states += list(outputs)  # (blocks of this stack, B, P, hidden)
            if end - 1 in taps:
                merger = PatchMerger(self.config, postshuffle_norm=True, name=f"deepstack_merger_{len(deepstack)}")
                deepstack.append(merger(x))
        merged = PatchMerger(self.config, postshuffle_norm=False, name="merger")(x)
        if return_hidden_states:
            return VisionOutputsWithHiddenStates(merged=merged, deepstack=deepstack, hidden_states=hidden_states)
        return VisionOutputs(merged=merged, deepstack=deepstack)
