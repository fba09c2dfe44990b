"""Qwen3-VL: ViT -> visual tokens replace their placeholders -> decoder with MRoPE and DeepStack -> logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.model_inputs import ModelInputs, empty_inputs
from qwen3vl_jax.modeling.decoder import Decoder
from qwen3vl_jax.modeling.deepstack import gather_visual
from qwen3vl_jax.modeling.kv_cache import KVCache
from qwen3vl_jax.modeling.layers import Embed
from qwen3vl_jax.modeling.lm_head import LMHead, chunked_cross_entropy, cross_entropy_and_hits
from qwen3vl_jax.modeling.outputs import (
    DecoderOutputs,
    HeadInputs,
    LogitsAndRouterLogits,
    NextTokenLogits,
    TokenLosses,
    VisionOutputs,
)
from qwen3vl_jax.modeling.vision import VisionTower
from qwen3vl_jax.parallel.context import context_shards, from_load_balanced, to_load_balanced


class Qwen3VL(nn.Module):
    """`unrolled_decoder`: the decoder's layers as separate modules (decoding; see `modeling.decoder`).

    Shapes: B rows, L tokens, P patches per row (`ModelInputs`), H hidden size, V vocabulary, E experts. The
    methods return the named tuples of `modeling.outputs`."""

    config: ModelConfig
    unrolled_decoder: bool = False

    def setup(self):
        c, kw = self.config, self.config.dense_kwargs
        self.visual = VisionTower(c)
        self.embed_tokens = Embed(c.text.vocab_size, c.text.hidden_size, **kw)
        self.decoder = Decoder(c, unrolled=self.unrolled_decoder)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c.text.hidden_size, c.text.vocab_size, **kw)

    def encode_vision(self, inputs: ModelInputs) -> VisionOutputs:
        """`VisionOutputs`: merged visual tokens (B, P/4, H) and the DeepStack features (list of the same shape)."""
        return self.visual(inputs)

    def vision_hidden_states(self, inputs: ModelInputs) -> list[jax.Array]:
        """The ViT's patch features before its first block and after each block: depth + 1 arrays (B, P, D)."""
        return self.visual(inputs, return_hidden_states=True).hidden_states

    def hidden_states(self, inputs: ModelInputs, cache: KVCache | None = None) -> DecoderOutputs:
        """`DecoderOutputs`: final-norm hidden states (B, L, H), the cache updated with these tokens (None without
        one) and the router logits of the MoE layers (layers, B*L, E) (None for a dense model).

        Under a mesh with a `context` axis the decoder runs in the load-balanced layout of parallel/context.py: the
        token inputs are reordered on entry, the outputs restored on exit; a cache then keeps the tokens' keys and
        values as its prompt block, split over `context` (modeling.kv_cache)."""
        parallel = context_shards() > 1 and not self.is_initializing()
        tokens = dict(
            input_ids=inputs.input_ids,
            segment_ids=inputs.segment_ids,
            positions=inputs.positions,
            visual_index=inputs.visual_index,
        )
        if parallel:
            tokens = {name: to_load_balanced(a, axis=a.ndim - 1) for name, a in tokens.items()}
        x = self.embed_tokens(tokens["input_ids"])
        deepstack = None
        if inputs.has_vision:
            visual, levels = self.encode_vision(inputs)
            is_visual = (tokens["visual_index"] >= 0)[..., None]
            x = jnp.where(is_visual, gather_visual(visual, tokens["visual_index"]).astype(x.dtype), x)
            deepstack = jnp.stack(levels) if levels else None
        x, cache, router_logits = self.decoder(
            x,
            segment_ids=tokens["segment_ids"],
            positions=tokens["positions"],
            deepstack=deepstack,
            visual_index=tokens["visual_index"],
            cache=cache,
            context_layout="load_balanced" if parallel else None,
        )
        if parallel:
            x = from_load_balanced(x, axis=1)
            if router_logits is not None:
                layers, _, experts = router_logits.shape
                by_row = router_logits.reshape(layers, *x.shape[:2], experts)
                router_logits = from_load_balanced(by_row, axis=2).reshape(layers, -1, experts)
        return DecoderOutputs(hidden=x, cache=cache, router_logits=router_logits)

    def __call__(self, inputs: ModelInputs) -> jax.Array:
        """Logits (B, L, vocab) in the compute dtype."""
        return self._head(self.hidden_states(inputs).hidden)

    def logits_and_router_logits(self, inputs: ModelInputs) -> LogitsAndRouterLogits:
        """`LogitsAndRouterLogits`: logits (B, L, vocab) and the MoE router logits (layers, B*L, E) (None for a dense
        model)."""
        x, _, router_logits = self.hidden_states(inputs)
        return LogitsAndRouterLogits(logits=self._head(x), router_logits=router_logits)

    def token_losses(self, inputs: ModelInputs, targets: jax.Array, *, chunk: int = 0) -> TokenLosses:
        """`TokenLosses`: per token, the cross-entropy (B, L) float32 against the int `targets` (B, L) and whether
        the target has the highest logit (B, L) bool; plus the MoE router logits (None for a dense model).
        chunk > 0: the head and the loss run `chunk` positions at a time, so the whole logits never exist
        (modeling.lm_head)."""
        x, _, router_logits = self.hidden_states(inputs)
        if chunk:
            cross_entropy, correct = chunked_cross_entropy(x, self._head_weight(), targets, chunk=chunk)
        else:
            logits = self._head(x)
            cross_entropy, correct = cross_entropy_and_hits(logits, targets)
        return TokenLosses(cross_entropy=cross_entropy, correct=correct, router_logits=router_logits)

    def hidden_states_and_head(self, inputs: ModelInputs) -> HeadInputs:
        """`HeadInputs`: final-norm hidden states (B, L, H), the output head as an (H, vocab) matrix in the compute
        dtype, and the MoE router logits (None for a dense model): what a loss computed in chunks needs."""
        x, _, router_logits = self.hidden_states(inputs)
        return HeadInputs(hidden=x, head=self._head_weight(), router_logits=router_logits)

    def prefill(self, inputs: ModelInputs, cache: KVCache) -> NextTokenLogits:
        """Runs the prompt (`inputs`, B rows of L tokens, any padding) through the model, filling the cache from
        cache.index on. Returns `NextTokenLogits`: the logits (B, vocab) after each row's last real token, and
        the cache."""
        x, cache, _ = self.hidden_states(inputs, cache)
        real = inputs.segment_ids > 0
        last = x.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)
        return NextTokenLogits(
            logits=self._head(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]), cache=cache
        )

    def decode(self, token_ids: jax.Array, positions: jax.Array, cache: KVCache) -> NextTokenLogits:
        """One new token per row, written to cache slot cache.index: token_ids (B,) int32, positions (B,) int32
        (the same on the t, h and w axes). Returns `NextTokenLogits`: the next logits (B, vocab) and the cache."""
        x = self.embed_tokens(token_ids[:, None])
        positions = jnp.broadcast_to(positions[:, None, None], (x.shape[0], 3, 1))
        x, cache, _ = self.decoder(x, segment_ids=jnp.ones_like(token_ids)[:, None], positions=positions, cache=cache)
        return NextTokenLogits(logits=self._head(x[:, 0]), cache=cache)

    def _head(self, x: jax.Array) -> jax.Array:
        """x (..., H) -> logits (..., vocab) in the compute dtype."""
        return self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)

    def _head_weight(self) -> jax.Array:
        """The output head as an (H, vocab) matrix in the compute dtype (the embedding, transposed, when tied)."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding.astype(dtype).T
        return self.lm_head.kernel.astype(dtype)


def dummy_inputs(config: ModelConfig, batch: int = 1, seq_len: int = 8, patches: int = 4) -> ModelInputs:
    """All-padding inputs of `batch` rows of `seq_len` tokens and `patches` patches (for init and abstract
    evaluation)."""
    return ModelInputs(**empty_inputs(batch, seq_len=seq_len, max_patches=patches, patch_dim=config.vision.patch_dim))


def init_params(config: ModelConfig, rng: jax.Array, *, boxed: bool = False):
    """Random parameters (normal(0.02) kernels and embeddings, unit norms, zero biases); the decoder's and the
    ViT's scanned stacks have a leading layer axis. With boxed=True the leaves keep their logical-axis metadata
    (nn.LogicallyPartitioned)."""
    variables = Qwen3VL(config).init(rng, dummy_inputs(config))
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig, *, boxed: bool = False):
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct) without allocating memory."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), boxed=boxed))
