"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")


def next_token(logits: jax.Array, rng: jax.Array, *, sampling: SamplingConfig) -> jax.Array:
    """logits (B, V) -> token ids (B,). Greedy takes the argmax; sampling divides by the temperature, keeps the
    top_k most likely tokens and the smallest set whose probability reaches top_p (as transformers does),
    then draws from the renormalised distribution."""
    logits = logits.astype(jnp.float32)
    if not sampling.do_sample:
        return jnp.argmax(logits, axis=-1)
    logits = logits / sampling.temperature
    minimum = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, minimum, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < sampling.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, minimum, logits)
    return jax.random.categorical(rng, logits, axis=-1)
