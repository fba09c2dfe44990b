"""Qwen3-VL: ViT -> visual tokens replace their placeholders -> decoder with MRoPE and DeepStack -> logits."""

from __future__ import annotations

from typing import Optional

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
        c = self.config
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        attention = dict(attention_impl=c.attention_impl, splash_block_sizes=c.splash_block_sizes)
        self.visual = VisionTower(c.vision, c.num_deepstack, remat=c.remat, **attention, **kw)
        self.embed_tokens = Embed(c.text.vocab_size, c.text.hidden_size, **kw)
        self.decoder = Decoder(c.text, remat=c.remat, **attention, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.text.vocab_size, ("embed", "vocab"), **kw)

    def encode_vision(self, inputs: ModelInputs):
        """Merged visual tokens (B, P/4, H) and the DeepStack features (list of the same shape)."""
        return self.visual(inputs.pixel_patches, inputs.patch_segment_ids, inputs.pos_embed_index,
                           inputs.pos_embed_weight, inputs.patch_rowcol)

    def hidden_states(self, inputs: ModelInputs, cache: Optional[KVCache] = None):
        """Final-norm hidden states (B, L, H) and the cache updated with these tokens (None without one)."""
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

    def prefill(self, inputs: ModelInputs, cache: KVCache):
        """Runs the prompt through the model, filling the cache from cache.index on. Returns the logits
        (B, vocab) after each row's last real token, and the cache."""
        x, cache = self.hidden_states(inputs, cache)
        real = inputs.segment_ids > 0
        last = x.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)
        return self._head(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]), cache

    def decode(self, token_ids: jax.Array, positions: jax.Array, kv: list, kv_segment_ids: jax.Array,
               index: jax.Array, layer_params: list):
        """One new token per row, written to cache slot `index`: token_ids (B,), positions (B,) (the same on
        the t, h and w axes, spec §4.5), kv the per-layer (k, v) caches (B, S, Hkv, D), kv_segment_ids (B, S).
        layer_params: the decoder stack's parameters sliced per layer once per generation; the layers run
        unrolled on them, since slicing the stack inside the decode loop would copy every weight at every step.
        Returns the next logits (B, vocab), the caches and their segment ids."""
        c = self.config
        x = self.embed_tokens(token_ids[:, None])
        segment_ids = jnp.ones_like(token_ids)[:, None]
        kv_segment_ids = jax.lax.dynamic_update_slice_in_dim(kv_segment_ids, segment_ids, index, axis=1)
        cos, sin = self._rope(jnp.broadcast_to(positions[:, None, None], (x.shape[0], 3, 1)))
        context = dict(segment_ids=segment_ids, cos=cos, sin=sin, deepstack=None, visual_index=None,
                       cache_index=index, kv_segment_ids=kv_segment_ids)
        layer = DecoderLayer(c.text, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), c.attention_impl, parent=None)
        new_kv = []
        for i, (params, cache) in enumerate(zip(layer_params, kv)):
            x, cache = layer.apply({"params": params}, x, (i, cache), context)
            new_kv.append(cache)
        norm = self.variables["params"]["decoder"]["norm"]
        x = RMSNorm(c.text.rms_norm_eps, parent=None).apply({"params": norm}, x)
        return self._head(x[:, 0]), new_kv, kv_segment_ids

    def _rope(self, positions: jax.Array):
        c = self.config
        inv_freq, scaling = text_rope(c.text)
        return mrope_tables(positions, inv_freq, mrope_axis_of_frequency(c.text.mrope_section, c.mrope_layout),
                            scaling)

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
