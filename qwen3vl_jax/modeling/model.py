"""Qwen3-VL: ViT -> visual tokens replace their placeholders -> decoder with MRoPE and DeepStack -> logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.model_inputs import ModelInputs, empty_inputs
from qwen3vl_jax.modeling.decoder import Decoder, DecoderLayer
from qwen3vl_jax.modeling.deepstack import gather_visual
from qwen3vl_jax.modeling.kv_cache import KVCache
from qwen3vl_jax.modeling.layers import Dense, Embed, RMSNorm
from qwen3vl_jax.modeling.rope import mrope_axis_of_frequency, mrope_tables, text_rope
from qwen3vl_jax.modeling.vision import VisionTower


class Qwen3VL(nn.Module):
    config: ModelConfig

    def setup(self):
        c, kw = self.config, self.config.dense_kwargs
        self.visual = VisionTower(c)
        self.embed_tokens = Embed(c.text.vocab_size, c.text.hidden_size, **kw)
        self.decoder = Decoder(c)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.text.vocab_size, ("embed", "vocab"), **kw)

    def encode_vision(self, inputs: ModelInputs):
        """Merged visual tokens (B, P/4, H) and the DeepStack features (list of the same shape)."""
        return self.visual(
            inputs.pixel_patches,
            inputs.patch_segment_ids,
            inputs.pos_embed_index,
            inputs.pos_embed_weight,
            inputs.patch_rowcol,
        )

    def hidden_states(self, inputs: ModelInputs, cache: KVCache | None = None):
        """Final-norm hidden states (B, L, H), the cache updated with these tokens (None without one) and the
        router logits of the MoE layers (layers, B*L, E) (None for a dense model)."""
        x = self.embed_tokens(inputs.input_ids)
        deepstack = None
        if inputs.has_vision:
            visual, levels = self.encode_vision(inputs)
            is_visual = (inputs.visual_index >= 0)[..., None]
            x = jnp.where(is_visual, gather_visual(visual, inputs.visual_index).astype(x.dtype), x)
            deepstack = jnp.stack(levels) if levels else None
        return self._decode_layers(x, inputs.segment_ids, inputs.positions, deepstack, inputs.visual_index, cache)

    def __call__(self, inputs: ModelInputs) -> jax.Array:
        """Logits (B, L, vocab) in the compute dtype."""
        return self._head(self.hidden_states(inputs)[0])

    def logits_and_router_logits(self, inputs: ModelInputs):
        """Logits (B, L, vocab) and the MoE router logits (layers, B*L, E) (None for a dense model)."""
        x, _, router_logits = self.hidden_states(inputs)
        return self._head(x), router_logits

    def prefill(self, inputs: ModelInputs, cache: KVCache):
        """Runs the prompt through the model, filling the cache from cache.index on. Returns the logits
        (B, vocab) after each row's last real token, and the cache."""
        x, cache, _ = self.hidden_states(inputs, cache)
        real = inputs.segment_ids > 0
        last = x.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)
        return self._head(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]), cache

    def decode(
        self,
        token_ids: jax.Array,
        positions: jax.Array,
        kv: list,
        kv_segment_ids: jax.Array,
        index: jax.Array,
        layer_params: list,
    ):
        """One new token per row, written to cache slot `index`: token_ids (B,), positions (B,) (the same on
        the t, h and w axes), kv the per-layer (k, v) caches (B, S, Hkv, D), kv_segment_ids (B, S).
        layer_params: (parameters, is MoE) of each decoder layer, sliced out of the stacks once per generation
        (decoder.unstack_layers); the layers run unrolled on them, since slicing the stacks inside the decode loop
        would copy every weight at every step.
        Returns the next logits (B, vocab), the caches and their segment ids."""
        c = self.config
        x = self.embed_tokens(token_ids[:, None])
        segment_ids = jnp.ones_like(token_ids)[:, None]
        kv_segment_ids = jax.lax.dynamic_update_slice_in_dim(kv_segment_ids, segment_ids, index, axis=1)
        cos, sin = self._rope(jnp.broadcast_to(positions[:, None, None], (x.shape[0], 3, 1)))
        context = dict(
            segment_ids=segment_ids,
            cos=cos,
            sin=sin,
            deepstack=None,
            visual_index=None,
            cache_index=index,
            kv_segment_ids=kv_segment_ids,
        )
        new_kv = []
        for i, ((params, moe), cache) in enumerate(zip(layer_params, kv)):
            x, (cache, _) = DecoderLayer(c, moe, parent=None).apply({"params": params}, x, (i, cache), context)
            new_kv.append(cache)
        norm = self.variables["params"]["decoder"]["norm"]
        x = RMSNorm(c.text.rms_norm_eps, parent=None).apply({"params": norm}, x)
        return self._head(x[:, 0]), new_kv, kv_segment_ids

    def _rope(self, positions: jax.Array):
        c = self.config
        inv_freq, scaling = text_rope(c.text)
        return mrope_tables(positions, inv_freq, mrope_axis_of_frequency(c.text.mrope_section, c.mrope_layout), scaling)

    def _decode_layers(self, x, segment_ids, positions, deepstack, visual_index, cache):
        cos, sin = self._rope(positions)
        return self.decoder(x, segment_ids, cos, sin, deepstack, visual_index, cache)

    def _head(self, x: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)


def dummy_inputs(config: ModelConfig, batch: int = 1, seq_len: int = 8, patches: int = 4) -> ModelInputs:
    """All-padding inputs of the given shapes (for init and abstract evaluation)."""
    return ModelInputs(**empty_inputs(batch, seq_len, patches, config.vision.patch_dim))


def init_params(config: ModelConfig, rng: jax.Array, *, boxed: bool = False):
    """Random parameters (normal(0.02) kernels and embeddings, unit norms, zero biases). With boxed=True the
    leaves keep their logical-axis metadata (nn.LogicallyPartitioned)."""
    variables = Qwen3VL(config).init(rng, dummy_inputs(config))
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig, *, boxed: bool = False):
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct) without allocating memory."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), boxed=boxed))
