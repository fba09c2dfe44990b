"""Qwen3.5's gated delta-net (linear attention) layer, as transformers' `Qwen3_5GatedDeltaNet`, with packing and a
decoding state.

Per value head the layer keeps a state S (Dk, Dv) and, at each token t (Yang et al., "Gated Delta Networks",
2024, eq. 10; transformers' `torch_recurrent_gated_delta_rule`):
    S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
with q, k the l2-normalised outputs of a causal depthwise conv (kernel 4, silu) over the projected q/k/v, q scaled
by Dk^-1/2, g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b). Each key head serves Hv / Hk consecutive
value heads. The output is RMS-normalised per head, gated by silu(z) and projected back.

Packing. `segment_ids` (B, L) give each token's example (0 = padding). A segment is a run of equal nonzero ids
(padding inside a run does not break it): the recurrent state and the conv window restart from zero at the first
token of every segment but the first one of the call, which continues the given state (zero without one), so a
decoding step or a prefill after left padding carries its row's state on. Padding tokens write nothing and leave
both states as they are (their decay is 1); inside the conv window they count as zero inputs, as transformers'
`apply_mask_to_padding_states` makes them. A packed row therefore gives each example the outputs it gets alone.

Parameters of `GatedDeltaNet` (ours <- transformers' `linear_attn.*`, torch Linear weights are (out, in)), with
H = hidden_size, C = 2 Hk Dk + Hv Dv the conv channels (q, k, v concatenated in that order), K the conv kernel:
    in_proj_qkv/kernel (H, C)          <- in_proj_qkv.weight (C, H), transposed
    in_proj_z/kernel   (H, Hv, Dv)     <- in_proj_z.weight (Hv Dv, H), transposed and reshaped
    in_proj_b/kernel   (H, Hv)         <- in_proj_b.weight (Hv, H), transposed
    in_proj_a/kernel   (H, Hv)         <- in_proj_a.weight (Hv, H), transposed
    conv1d/kernel      (K, C)          <- conv1d.weight (C, 1, K): weight[:, 0, :] transposed (no bias in Qwen3.5)
    dt_bias            (Hv,)           <- dt_bias (Hv,)
    A_log              (Hv,)           <- A_log (Hv,)
    norm/scale         (Dv,)           <- norm.weight (Dv,): y * scale, not zero-centred (`Qwen3_5RMSNormGated`)
    out_proj/kernel    (Hv, Dv, H)     <- out_proj.weight (H, Hv Dv), transposed and reshaped
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from qwen3vl_jax.config import LoraConfig
from qwen3vl_jax.config.delta_net import GatedDeltaNetConfig
from qwen3vl_jax.modeling.layers import Dense, default_init, param
from qwen3vl_jax.modeling.loops import scan_unroll

L2NORM_EPS = 1e-6  # transformers' `l2norm` default, as the FLA kernels use


@flax.struct.dataclass
class DeltaNetState:
    """One layer's decoding state: the conv window and the recurrent state."""

    conv_window: jax.Array  # (B, K - 1, C) the conv inputs of the last K - 1 tokens, in the compute dtype
    recurrent: jax.Array  # (B, Hv, Dk, Dv) float32

    @classmethod
    def zeros(cls, config: GatedDeltaNetConfig, *, batch: int, dtype=jnp.float32) -> DeltaNetState:
        """The state before a sequence's first token."""
        return cls(
            conv_window=jnp.zeros((batch, config.conv_kernel_size - 1, config.conv_channels), dtype),
            recurrent=jnp.zeros((batch, config.num_value_heads, config.key_head_dim, config.value_head_dim)),
        )


def segment_runs(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(real, run), both (B, L): real = not padding; run = how many segment starts lie at or before each token,
    counting only starts after the first real token (so run 0 continues a given state). A start is a real token
    whose id differs from the id of the last real token before it."""
    real = segment_ids != 0
    positions = jnp.arange(segment_ids.shape[1])
    last_real = jax.lax.cummax(jnp.where(real, positions, -1), axis=1)
    before = jnp.pad(last_real[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    previous_id = jnp.where(before >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(before, 0), axis=1), 0)
    starts = real & (previous_id != 0) & (segment_ids != previous_id)
    return real, jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def causal_depthwise_conv1d(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, *, segment_ids: jax.Array, conv_state=None
) -> tuple[jax.Array, jax.Array]:
    """silu(causal depthwise conv) over x (B, L, C) with weight (K, C) (bias (C,) or None), as transformers'
    `causal_conv1d_fn` / `causal_conv1d_update`: y_t = silu(b + sum_s weight[s] x_{t - K + 1 + s}), where a token
    of another segment, a padding token or a position before the sequence counts as zero, and conv_state
    (B, K - 1, C) holds the inputs before x (zeros if None). Returns y (B, L, C) in x's dtype, computed in float32,
    and the new window: the K - 1 inputs up to the last real token (the old window if x has none)."""
    batch, length, channels = x.shape
    kernel = weight.shape[0]
    if weight.shape != (kernel, channels) or segment_ids.shape != (batch, length):
        raise ValueError(f"conv: x {x.shape}, weight {weight.shape} (K, C), segment_ids {segment_ids.shape} (B, L)")
    if conv_state is None:
        conv_state = jnp.zeros((batch, kernel - 1, channels), x.dtype)
    elif conv_state.shape != (batch, kernel - 1, channels):
        raise ValueError(f"conv_state {conv_state.shape} must be (B, K - 1, C) = {(batch, kernel - 1, channels)}")
    real, run = segment_runs(segment_ids)
    inputs = jnp.concatenate([conv_state.astype(x.dtype), jnp.where(real[..., None], x, 0)], axis=1)
    input_run = jnp.pad(run, ((0, 0), (kernel - 1, 0)))  # the window's tokens continue run 0
    y = jnp.zeros((batch, length, channels), jnp.float32) if bias is None else bias.astype(jnp.float32)
    for s in range(kernel):  # weight[s] multiplies the input K - 1 - s tokens back: inputs[t + s]
        same = (input_run[:, s : s + length] == run)[..., None]
        y = y + jnp.where(same, inputs[:, s : s + length].astype(jnp.float32), 0) * weight[s].astype(jnp.float32)
    # the new window ends at the last real token (inputs row K - 2 + last + 1), keeping that token's run only
    last = jnp.max(jnp.where(real, jnp.arange(length), -1), axis=1)
    rows = last[:, None] + 1 + jnp.arange(kernel - 1)
    window = jnp.take_along_axis(inputs, rows[..., None], axis=1)
    final_run = jnp.take_along_axis(input_run, last[:, None] + kernel - 1, axis=1)
    window = jnp.where((jnp.take_along_axis(input_run, rows, axis=1) == final_run)[..., None], window, 0)
    return jax.nn.silu(y).astype(x.dtype), window.astype(conv_state.dtype)


def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """x / sqrt(sum x^2 + eps) over the last axis (transformers' `l2norm`)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _prepare(q, k, v, g, beta, *, use_qk_l2norm: bool):
    """Shapes checked; q, k repeated to the value heads; everything float32; q (optionally l2-normalised) scaled."""
    batch, length, key_heads, key_dim = k.shape
    value_heads = v.shape[2]
    if (
        q.shape != k.shape
        or v.shape[:2] != (batch, length)
        or v.ndim != 4
        or value_heads % key_heads
        or g.shape != (batch, length, value_heads)
        or beta.shape != g.shape
    ):
        raise ValueError(
            f"gated delta rule: q {q.shape} and k {k.shape} (B, L, Hk, Dk), v {v.shape} (B, L, Hv, Dv) with Hv a "
            f"multiple of Hk, g {g.shape} and beta {beta.shape} (B, L, Hv)"
        )
    q, k = (jnp.repeat(t, value_heads // key_heads, axis=2).astype(jnp.float32) for t in (q, k))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * key_dim**-0.5, k, v.astype(jnp.float32), g.astype(jnp.float32), beta.astype(jnp.float32)


def chunked_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array,
    beta: jax.Array,
    segment_ids: jax.Array,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule over whole sequences, chunk by chunk (transformers' `torch_chunk_gated_delta_rule`).

    q, k (B, L, Hk, Dk), v (B, L, Hv, Dv), g (log decay, <= 0) and beta (B, L, Hv), segment_ids (B, L) as in the
    module docstring, initial_state (B, Hv, Dk, Dv) or None (zeros). Returns out (B, L, Hv, Dv) in q's dtype (0 at
    padding) and the final state (B, Hv, Dk, Dv) float32.

    Within a chunk every interaction between tokens i >= j is a product of the decays exp(g_t), t in (j, i], or, for
    the carried state, t in [chunk start, i]. A segment start is a decay of exactly 0 at its token, so each such
    product is multiplied by [no start in the interval], which is [run_i == run_j] (resp. [run_i == the run at the
    chunk's start]); padding tokens get g = 0, beta = 0 and q = 0. The chunk algorithm is an algebraic identity in
    the decays, so it stays exact with zero decays: this is the recurrence with the state reset at every start.
    """
    batch, length = k.shape[:2]
    if segment_ids.shape != (batch, length) or length == 0 or chunk_size < 1:
        raise ValueError(f"segment_ids {segment_ids.shape} must be (B, L) = {(batch, length)}, L and chunk_size >= 1")
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)
    heads, key_dim, value_dim = v.shape[2], k.shape[-1], v.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    elif initial_state.shape != (batch, heads, key_dim, value_dim):
        raise ValueError(
            f"initial_state {initial_state.shape} must be (B, Hv, Dk, Dv) = {(batch, heads, key_dim, value_dim)}"
        )
    real, run = segment_runs(segment_ids)
    g, beta = jnp.where(real[..., None], g, 0), jnp.where(real[..., None], beta, 0)
    q = jnp.where(real[..., None, None], q, 0)

    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length

    def by_chunk(x, mode="constant"):
        """(B, L, ...) -> (N, B, C, ...), the sequence padded (zeros, or the last value) to N chunks of C."""
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), mode=mode)
        return x.reshape(batch, chunks, chunk_size, *x.shape[2:]).swapaxes(0, 1)

    run = by_chunk(run, mode="edge")  # the padded tail continues the last run
    # heads before positions: (N, B, H, C, D) and (N, B, H, C)
    q, k, v = (by_chunk(x).swapaxes(2, 3) for x in (q, k, v))
    g, beta = (by_chunk(x).swapaxes(2, 3) for x in (g, beta))
    start_run = jnp.concatenate([jnp.zeros_like(run[:1, :, -1]), run[:-1, :, -1]])  # (N, B): run before the chunk
    same_run = (run[..., :, None] == run[..., None, :])[:, :, None]  # (N, B, 1, C, C)
    from_start = (run == start_run[..., None])[:, :, None]  # (N, B, 1, C)
    to_end = (run == run[..., -1:])[:, :, None]

    cumulative = jnp.cumsum(g, axis=-1)  # log of the decay from the chunk's start to each token
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool)) & same_run
    log_pair = cumulative[..., :, None] - cumulative[..., None, :]
    pair_decay = jnp.where(causal, jnp.exp(jnp.where(causal, log_pair, 0)), 0)  # decay from token j to token i
    decay_from_start = jnp.exp(cumulative) * from_start
    decay_to_end = jnp.exp(cumulative[..., -1:] - cumulative) * to_end
    chunk_decay = (jnp.exp(cumulative[..., -1]) * from_start[..., -1])[..., None, None]  # (N, B, H, 1, 1)

    # the UT transform (Yang et al., "Parallelizing Linear Transformers with the Delta Rule", 2024, section 3):
    # (I + strictly_lower(beta k k^T * decay)) [u, w] = [beta v, beta k * decay_from_start]
    k_beta = k * beta[..., None]
    system = jnp.einsum("...id,...jd->...ij", k_beta, k) * pair_decay
    rhs = jnp.concatenate([v * beta[..., None], k_beta * decay_from_start[..., None]], axis=-1)
    solved = unit_lower_triangular_solve(system, rhs)
    new_values, decayed_keys = solved[..., :value_dim], solved[..., value_dim:]
    intra_attention = jnp.einsum("...id,...jd->...ij", q, k) * pair_decay
    q_from_start = q * decay_from_start[..., None]
    k_to_end = k * decay_to_end[..., None]

    def step(state, chunk):
        new_value, decayed_key, attention, query, key, decay = chunk
        corrected = new_value - decayed_key @ state  # what the carried state does not already predict
        out = query @ state + attention @ corrected
        return state * decay + key.swapaxes(-1, -2) @ corrected, out

    final_state, out = jax.lax.scan(
        step,
        initial_state.astype(jnp.float32),
        (new_values, decayed_keys, intra_attention, q_from_start, k_to_end, chunk_decay),
        unroll=scan_unroll(new_values.shape[0]),
    )
    out = out.swapaxes(2, 3).swapaxes(0, 1).reshape(batch, chunks * chunk_size, heads, value_dim)[:, :length]
    return out.astype(out_dtype), final_state


def unit_lower_triangular_solve(system: jax.Array, rhs: jax.Array) -> jax.Array:
    """X (..., C, D) with (I + strictly_lower(system)) X = rhs: system (..., C, C) (its diagonal and upper part are
    not read), rhs (..., C, D). XLA's triangular solve on accelerators; on CPU the same forward substitution row by
    row, because jaxlib's CPU kernel (LAPACK trsm, its batch spread over the thread pool that also runs the
    devices' programs) deadlocks when several CPU devices run it at once."""

    def substitution(system, rhs):
        lower = jnp.tril(system, -1)

        def row(i, solved):
            value = rhs[..., i, :] - jnp.einsum("...j,...jd->...d", lower[..., i, :], solved)
            return jax.lax.dynamic_update_index_in_dim(solved, value, i, axis=-2)

        return jax.lax.fori_loop(0, rhs.shape[-2], row, jnp.zeros_like(rhs))

    def triangular_solve(system, rhs):
        return jax.lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True, unit_diagonal=True)

    return jax.lax.platform_dependent(system, rhs, cpu=substitution, default=triangular_solve)


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    segment_ids: jax.Array | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule token by token from `state` (transformers' `torch_recurrent_gated_delta_rule`): the
    decoding step (L small, typically 1). Shapes as `chunked_gated_delta_rule`; segment_ids (B, L) or None (all
    tokens real, one segment) with the same meaning (a start zeroes the state, padding leaves it unchanged).
    Returns out (B, L, Hv, Dv) in q's dtype and the new state (B, Hv, Dk, Dv) float32."""
    batch, length = k.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)
    if state.shape != (batch, v.shape[2], k.shape[-1], v.shape[-1]) or segment_ids.shape != (batch, length):
        raise ValueError(f"state {state.shape} must be (B, Hv, Dk, Dv), segment_ids {segment_ids.shape} (B, L)")
    real, run = segment_runs(segment_ids)
    starts = jnp.diff(run, axis=1, prepend=0) > 0
    decay = jnp.where(real[..., None], jnp.exp(g), 1) * jnp.where(starts[..., None], 0.0, 1.0)
    beta = jnp.where(real[..., None], beta, 0)
    q = jnp.where(real[..., None, None], q, 0)

    def step(state, token):
        query, key, value, decay, beta = token  # (B, H, D) and (B, H)
        state = state * decay[..., None, None]
        delta = (value - jnp.einsum("bhkv,bhk->bhv", state, key)) * beta[..., None]
        state = state + key[..., :, None] * delta[..., None, :]
        return state, jnp.einsum("bhkv,bhk->bhv", state, query)

    tokens = tuple(x.swapaxes(0, 1) for x in (q, k, v, decay, beta))
    state, out = jax.lax.scan(step, state.astype(jnp.float32), tokens)
    return out.swapaxes(0, 1).astype(out_dtype), state


class GatedRMSNorm(nn.Module):
    """transformers' `Qwen3_5RMSNormGated`: scale * rmsnorm(x) * silu(gate) over the last axis, normalised in float32
    and cast back to x's dtype before the scale (initialised to ones; not zero-centred)."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        """x, gate (..., D) -> (..., D) in x's dtype."""
        scale = param(
            self, "scale", init=nn.initializers.ones, shape=x.shape[-1:], dtype=self.param_dtype, axes=("head_dim",)
        )
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return (scale * y * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class DepthwiseConv1D(nn.Module):
    """The causal depthwise conv + silu over the q/k/v channels (transformers' `conv1d`, no bias)."""

    kernel_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, segment_ids: jax.Array, conv_state: jax.Array | None):
        """x (B, L, C) -> (silu(conv(x)) (B, L, C), new window (B, K - 1, C)); see `causal_depthwise_conv1d`."""
        kernel = param(
            self,
            "kernel",
            init=default_init,
            shape=(self.kernel_size, x.shape[-1]),
            dtype=self.param_dtype,
            axes=("linear_conv_kernel", "linear_qkv"),
        )
        return causal_depthwise_conv1d(x, kernel, None, segment_ids=segment_ids, conv_state=conv_state)


def _log_uniform(low: float, high: float):
    """transformers' A_log initialisation: log(U(low, high))."""
    return lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)


class GatedDeltaNet(nn.Module):
    """transformers' `Qwen3_5GatedDeltaNet` (parameters in the module docstring)."""

    config: GatedDeltaNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraConfig | None = None
    chunk_size: int = 64

    @nn.compact
    def __call__(
        self, x: jax.Array, *, segment_ids: jax.Array, state: DeltaNetState | None = None
    ) -> tuple[jax.Array, DeltaNetState | None]:
        """x (B, L, H), segment_ids (B, L) (0 = padding) -> (y (B, L, H) in the compute dtype, the new state).

        Without a state (training): the chunked rule from zero states, and no state back. With one (from
        `DeltaNetState.zeros` for a prefill): one token is a recurrent step, more run chunked from it; the state
        after the last real token comes back."""
        config = self.config
        batch, length, hidden = x.shape[0], x.shape[1], config.hidden_size
        if x.shape[2:] != (hidden,) or segment_ids.shape != (batch, length):
            raise ValueError(
                f"GatedDeltaNet: x {x.shape} must be (B, L, {hidden}), segment_ids {segment_ids.shape} (B, L)"
            )
        heads, key_dim, value_dim = config.num_value_heads, config.key_head_dim, config.value_head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        x = jnp.where((segment_ids != 0)[..., None], x, 0)  # `apply_mask_to_padding_states`
        mixed = Dense(config.conv_channels, ("embed", "linear_qkv"), name="in_proj_qkv", **kw)(x)
        z = Dense((heads, value_dim), ("embed", "linear_v_heads", "head_dim"), name="in_proj_z", **kw)(x)
        b = Dense(heads, ("embed", "linear_v_heads"), name="in_proj_b", **kw)(x)
        a = Dense(heads, ("embed", "linear_v_heads"), name="in_proj_a", **kw)(x)
        mixed, conv_window = DepthwiseConv1D(config.conv_kernel_size, self.param_dtype, name="conv1d")(
            mixed, segment_ids=segment_ids, conv_state=None if state is None else state.conv_window
        )
        q, k, v = jnp.split(mixed, [config.key_dim, 2 * config.key_dim], axis=-1)
        q = q.reshape(batch, length, config.num_key_heads, key_dim)
        k = k.reshape(batch, length, config.num_key_heads, key_dim)
        v = v.reshape(batch, length, heads, value_dim)

        vector = dict(shape=(heads,), dtype=self.param_dtype, axes=("linear_v_heads",))
        dt_bias = param(self, "dt_bias", init=nn.initializers.ones, **vector)
        a_log = param(self, "A_log", init=_log_uniform(0.01, 16.0), **vector)
        beta = jax.nn.sigmoid(b)
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        rule = dict(g=g, beta=beta, segment_ids=segment_ids, use_qk_l2norm=True)
        if state is not None and length == 1:
            out, recurrent = recurrent_gated_delta_rule(q, k, v, state=state.recurrent, **rule)
        else:
            initial = None if state is None else state.recurrent
            out, recurrent = chunked_gated_delta_rule(
                q, k, v, initial_state=initial, chunk_size=self.chunk_size, **rule
            )
        out = GatedRMSNorm(config.rms_norm_eps, self.param_dtype, name="norm")(out, z)
        y = Dense(hidden, ("linear_v_heads", "head_dim", "embed"), contract=2, name="out_proj", **kw)(out)
        return y, None if state is None else DeltaNetState(conv_window=conv_window, recurrent=recurrent)
