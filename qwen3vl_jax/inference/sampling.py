"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen: the argmax (do_sample=False; the other fields are then unused) or a draw
    from softmax(logits / temperature) restricted to the top_k most likely tokens and the top_p nucleus."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def __post_init__(self):
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.do_sample and self.temperature == 0:
            raise ValueError("temperature must be > 0 when sampling (do_sample=True), got 0; greedy: do_sample=False")
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no top-k filter), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filter), got {self.top_p!r}")
        object.__setattr__(self, "do_sample", bool(self.do_sample))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


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
