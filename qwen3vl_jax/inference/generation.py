"""Prefill + decode with a static-size KV cache, the decode loop compiled as one `lax.while_loop`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inference.sampling import SamplingConfig, next_token
from qwen3vl_jax.inputs.model_inputs import ModelInputs
from qwen3vl_jax.modeling.decoder import unstack_decoder_params
from qwen3vl_jax.modeling.kv_cache import init_cache
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.parallel.context import context_shards

# XLA:CPU hands matmuls to YNNPACK by default. With the few rows of a decode step (one per sequence) its kernels ran
# 2.3-2.7x slower than XLA's own (Eigen) matmuls on a 2-core x86 machine (chains of (8, 512) x (512, 512) products),
# while at training sizes the two were within 10%; so generation compiles without it on CPU.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _prefill_and_decode(
    params: Any,
    inputs: ModelInputs,
    *,
    rng: jax.Array,
    eos_ids: jax.Array,
    pad_id: jax.Array,
    config: ModelConfig,
    max_new_tokens: int,
    sampling: SamplingConfig,
    with_logprobs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """New token ids (B, max_new_tokens) for the prompts in `inputs` (any padding): each row stops at its
    first token in `eos_ids` (included) and is `pad_id` after it. New tokens take MRoPE position
    max(prompt positions) + 1 + step on all three axes (the `rope_deltas` rule of
    `Qwen3VLModel.compute_3d_position_ids`). Under a mesh with a `context` axis the prompt is prefilled split over
    it (its length a multiple of 2 x the axis size, its patches laid out by parallel/context.align_patches) and
    decoding attends its keys and values where the prefill left them (modeling.kv_cache). with_logprobs: also each
    new token's log-probability under the model's own distribution, log softmax(logits) before temperature and
    filters (B, max_new_tokens) float32, 0 after a row's end (what a policy-gradient update recomputes). Compiled
    once per config, length and sampling setting."""
    batch, length = inputs.input_ids.shape
    # under context parallelism the prompt's keys and values stay split over `context` as the cache's prompt block
    # and the slots hold only the new tokens (modeling.kv_cache)
    slots = max_new_tokens if context_shards() > 1 else length + max_new_tokens
    cache = init_cache(config, batch=batch, length=slots)
    logits, cache = Qwen3VL(config).apply({"params": params}, inputs, cache, method=Qwen3VL.prefill)
    first_position = inputs.positions.max(axis=(1, 2)) + 1
    # the decoder's layers sliced out of the stacks once; the barrier keeps XLA from sinking the slices into the
    # loop, where they would copy every weight at every step
    decoder = jax.lax.optimization_barrier(unstack_decoder_params(params["decoder"], config.text))
    decode_params, decode_model = {**params, "decoder": decoder}, Qwen3VL(config, unrolled_decoder=True)

    def body(state):
        step, tokens, logprobs, done, logits, cache, rng = state
        rng, key = jax.random.split(rng)
        token = jnp.where(done, pad_id, next_token(logits, key, sampling=sampling))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        if with_logprobs:
            chosen = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], axis=-1)
            chosen = jnp.where(done[:, None], 0.0, chosen)
            logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, chosen, step, axis=1)
        done = done | jnp.isin(token, eos_ids)
        logits, cache = decode_model.apply(
            {"params": decode_params}, token, first_position + step, cache, method=Qwen3VL.decode
        )
        return step + 1, tokens, logprobs, done, logits, cache, rng

    def not_finished(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    logprobs = jnp.zeros((batch, max_new_tokens if with_logprobs else 0), jnp.float32)
    state = (jnp.int32(0), tokens, logprobs, jnp.zeros(batch, bool), logits, cache, rng)
    _, tokens, logprobs, *_ = jax.lax.while_loop(not_finished, body, state)
    return (tokens, logprobs) if with_logprobs else tokens


_STATIC = ("config", "max_new_tokens", "sampling", "with_logprobs")
_generate = jax.jit(_prefill_and_decode, static_argnames=_STATIC)
_generate_on_cpu = jax.jit(_prefill_and_decode, static_argnames=_STATIC, compiler_options=CPU_COMPILER_OPTIONS)


def generate(
    params: Any,
    inputs: ModelInputs,
    *,
    rng: jax.Array,
    eos_ids: jax.Array,
    pad_id: jax.Array,
    config: ModelConfig,
    max_new_tokens: int,
    sampling: SamplingConfig,
    with_logprobs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """New token ids (B, max_new_tokens) for the prompts in `inputs` (with_logprobs: and their log-probabilities),
    as `_prefill_and_decode`, after checking the
    arguments: max_new_tokens a positive integer, eos_ids token ids of the vocabulary (-1: no eos), pad_id one
    integer (any: a value outside the vocabulary marks the padding apart from tokens), top_k at most the
    vocabulary size. Compiled without YNNPACK on CPU (CPU_COMPILER_OPTIONS)."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    vocab = config.text.vocab_size
    pad = np.asarray(pad_id)
    if pad.ndim != 0 or not np.issubdtype(pad.dtype, np.integer):
        raise ValueError(f"pad_id must be one integer, got {pad_id}")
    eos = np.asarray(eos_ids)
    if eos.ndim != 1 or not np.issubdtype(eos.dtype, np.integer) or not ((eos >= -1) & (eos < vocab)).all():
        raise ValueError(f"eos_ids must be token ids in [0, {vocab}) (the vocabulary) or -1 (none), got {eos}")
    if sampling.do_sample and sampling.top_k > vocab:
        raise ValueError(f"top_k must be at most the vocabulary size {vocab}, got {sampling.top_k}")
    return jitted_generate(jax.default_backend())(
        params,
        inputs,
        rng=rng,
        eos_ids=eos_ids,
        pad_id=pad_id,
        config=config,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        with_logprobs=with_logprobs,
    )


def jitted_generate(backend: str):
    """The jitted `_prefill_and_decode` that `generate` runs on `backend` (e.g. "cpu", "tpu"; on CPU without
    YNNPACK: CPU_COMPILER_OPTIONS), with its static arguments config, max_new_tokens, sampling and with_logprobs
    given by keyword. What the compile planner lowers for a TPU topology."""
    return _generate_on_cpu if backend == "cpu" else _generate


def check_max_new_tokens(max_new_tokens: Any) -> int:
    """`max_new_tokens` as an int, or a ValueError naming it when it is not a positive integer."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, (bool, np.bool_)):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer (at least 1), got {max_new_tokens}")
    return int(max_new_tokens)


def eos_array(eos_token_ids: Sequence[int] | int | None) -> jax.Array:
    """The eos ids as an int32 array (-1, matching no token, when there are none)."""
    if eos_token_ids is None:
        return jnp.full((1,), -1, jnp.int32)
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    return jnp.asarray(ids or [-1], jnp.int32)
