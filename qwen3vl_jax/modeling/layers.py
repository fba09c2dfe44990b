"""Building blocks with logical axis names on every parameter (mapped to mesh axes by `qwen3vl_jax.parallel.sharding`).

Parameters are stored in `param_dtype`; matmuls run in `dtype`. Norms compute in float32, as in transformers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import LoraConfig
from qwen3vl_jax.parallel.context import context_shards
from qwen3vl_jax.parallel.sharding import gathered_for_matmul

Initializer = Callable[..., jax.Array]
default_init = nn.initializers.normal(stddev=0.02)  # transformers' initializer_range


def param(module: nn.Module, name: str, *, init: Initializer, shape: Sequence[int], dtype, axes: Sequence[str]):
    """A parameter annotated with logical axis names (one per dim)."""
    assert len(axes) == len(shape), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def is_lora(path: tuple[str, ...]) -> bool:
    """A LoRA adapter parameter of a `Dense` layer (never part of an HF base checkpoint)."""
    return path[-1] in ("lora_a", "lora_b")


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting the last `contract` dims of x.

    kernel: (*x.shape[-contract:], *features) with logical names `axes` (input dims first).
    """

    features: int | tuple[int, ...]
    axes: tuple[str, ...]
    contract: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_init
    lora: LoraConfig | None = None  # adapters when lora.adapts(this layer's name)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., *in) with `contract` input dims -> (..., *features) in the compute dtype."""
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        batch_shape, in_shape = x.shape[: x.ndim - self.contract], x.shape[x.ndim - self.contract :]
        kernel = param(
            self, "kernel", init=self.kernel_init, shape=in_shape + features, dtype=self.param_dtype, axes=self.axes
        )
        # One 2-D matmul (free reshapes): XLA:CPU runs multi-dimensional dot_generals, and their gradients,
        # far slower than the equivalent matrix product. x (B, L, ...) with L split over `context` is flattened
        # context-chunk-major, (C, B, L / C), so that each device's rows stay one block of the flattened rows; in
        # (B, L) order they would not be, and XLA would gather the whole sequence on every device.
        x = inputs = x.astype(self.dtype)
        shards = context_shards()
        by_chunk = len(batch_shape) == 2 and shards > 1 and batch_shape[1] % shards == 0
        if by_chunk:
            x = x.reshape(batch_shape[0], shards, batch_shape[1] // shards, *in_shape).swapaxes(0, 1)
        kernel = gathered_for_matmul(kernel.astype(self.dtype), self.axes)
        y = x.reshape(-1, math.prod(in_shape)) @ kernel.reshape(math.prod(in_shape), -1)
        if by_chunk:
            y = y.reshape(shards, batch_shape[0], batch_shape[1] // shards, *features).swapaxes(0, 1)
        y = y.reshape(batch_shape + features)
        if self.lora is not None and self.lora.adapts(self.name):
            y = y + self._lora_delta(inputs, in_shape=in_shape, features=features)
        if self.use_bias:
            bias_axes = self.axes[self.contract :]
            bias = param(
                self, "bias", init=nn.initializers.zeros, shape=features, dtype=self.param_dtype, axes=bias_axes
            )
            y = y + bias.astype(self.dtype)
        return y

    def _lora_delta(self, x: jax.Array, *, in_shape: tuple[int, ...], features: tuple[int, ...]) -> jax.Array:
        """(alpha / rank) dropout(x) A B: A (*in, rank) with peft's default init (kaiming-uniform, a = sqrt(5), i.e.
        U(+-1/sqrt(in))), B (rank, *features) zeros; float32 parameters, computed in the layer's dtype."""
        rank, fan_in = self.lora.rank, math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)
        a = param(
            self,
            "lora_a",
            init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            shape=(*in_shape, rank),
            dtype=jnp.float32,
            axes=(*self.axes[: self.contract], "lora_rank"),
        )
        b = param(
            self,
            "lora_b",
            init=nn.initializers.zeros,
            shape=(rank, *features),
            dtype=jnp.float32,
            axes=("lora_rank", *self.axes[self.contract :]),
        )
        if self.lora.dropout and self.has_rng("dropout"):
            x = nn.Dropout(self.lora.dropout, deterministic=False, name="lora_dropout")(x)
        rows = x.reshape(-1, fan_in)
        delta = (rows @ a.astype(self.dtype).reshape(fan_in, rank)) @ b.astype(self.dtype).reshape(rank, -1)
        return (
            (delta * (self.lora.alpha / rank)).astype(self.dtype).reshape(x.shape[: x.ndim - self.contract] + features)
        )


class _Norm(nn.Module):
    """eps, then the logical axis name and storage dtype of the per-feature parameters."""

    eps: float
    _: dataclasses.KW_ONLY
    axis_name: str = "embed"
    param_dtype: jnp.dtype = jnp.float32

    def feature_param(self, name: str, init: Initializer, features: int) -> jax.Array:
        """A (features,) parameter named `name`."""
        return param(self, name, init=init, shape=(features,), dtype=self.param_dtype, axes=(self.axis_name,))


class RMSNorm(_Norm):
    """Qwen3 RMSNorm, as `Qwen3VLTextRMSNorm`: normalise in fp32, cast back to the input dtype, then scale (no 1+w).
    zero_centered (Qwen3.5, `Qwen3_5RMSNorm`): the weight w starts at 0 and the fp32 normalised x is multiplied by
    1 + w before the cast back."""

    zero_centered: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., D) in x's dtype, normalised over D."""
        init = nn.initializers.zeros if self.zero_centered else nn.initializers.ones
        scale = self.feature_param("scale", init, x.shape[-1])
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.zero_centered:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return y.astype(x.dtype) * scale.astype(x.dtype)


class LayerNorm(_Norm):
    """LayerNorm with scale and bias, computed entirely in fp32 and cast to the input dtype (torch's CPU/TPU
    behaviour for half-precision inputs)."""

    axis_name: str = "vision_embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., D) in x's dtype, normalised over D."""
        scale = self.feature_param("scale", nn.initializers.ones, x.shape[-1])
        bias = self.feature_param("bias", nn.initializers.zeros, x.shape[-1])
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Embed(nn.Module):
    """Token embedding table (vocab, embed); `attend` gives the tied output head."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = param(
            self,
            "embedding",
            init=default_init,
            shape=(self.num_embeddings, self.features),
            dtype=self.param_dtype,
            axes=("vocab", "embed"),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids (...) int -> embeddings (..., features) in the compute dtype."""
        # the table gathered over its storage split (as a Dense kernel is): a lookup in a table split along
        # `embed` gives rows split along `embed`, which XLA could only turn into the activations' (batch,
        # length) split by replicating them whole on every device
        table = gathered_for_matmul(self.embedding.astype(self.dtype), ("vocab", "embed"))
        return jnp.take(table, ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """x (..., features) -> logits (..., vocab) in the compute dtype: the tied output head."""
        return jnp.einsum("...h,vh->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))
