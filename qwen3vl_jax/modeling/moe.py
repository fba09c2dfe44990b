"""The sparse MoE block of Qwen3-VL-30B-A3B / 235B-A22B (transformers' `Qwen3VLMoeTextSparseMoeBlock`):
softmax router, top-k, renormalised weights, dropless expert dispatch, SwiGLU experts; plus the load-balancing
loss as transformers computes it.

Dispatch: the (token, slot) assignments are sorted by expert, the experts' SwiGLU runs as two grouped
matmuls over the sorted rows, and the rows are unsorted and summed with the routing weights. Backends:
"megablox" (Pallas grouped matmul, interpret mode off TPU), "blocked" (loops of dense tiles of one expert's rows
that gather their tokens and scatter-add their weighted outputs, plain XLA with its own gradient:
`blocked_experts`; the fast one off TPU), "ragged_dot" (jax.lax.ragged_dot) and "dense" (every expert on every
token: the test reference). With an `expert` mesh axis > 1 the block runs expert-parallel (see
`_expert_parallel`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qwen3vl_jax.config import LoraConfig, TextConfig
from qwen3vl_jax.kernels.megablox import megablox_matmul
from qwen3vl_jax.modeling.layers import Dense, default_init, param
from qwen3vl_jax.modeling.loops import scan_unroll
from qwen3vl_jax.modeling.mlp import SwiGLU
from qwen3vl_jax.parallel.sharding import BATCH_AXES


class Routing(NamedTuple):
    """Each token's k experts and their weights (`route`)."""

    weights: jax.Array  # (T, k) in the router logits' dtype: renormalised to sum to 1 per token
    experts: jax.Array  # (T, k) int32: expert ids, highest probability first


class MoeBlockOutputs(NamedTuple):
    """`MoeBlock`'s results."""

    hidden: jax.Array  # (B, L, H) compute dtype: the weighted sum of each token's experts' outputs
    router_logits: jax.Array  # (B*L, E) compute dtype: for the load-balancing and z losses


def route(logits: jax.Array, top_k: int) -> Routing:
    """logits (T, E) -> `Routing` (weights (T, k) in the logits dtype, experts (T, k) int32): softmax over all
    experts in fp32, top-k, then always renormalised, as `Qwen3VLMoeTextTopKRouter.forward` does (it never reads
    the released configs' norm_topk_prob)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, experts = jax.lax.top_k(probs, top_k)
    return Routing(
        weights=(top / top.sum(axis=-1, keepdims=True)).astype(logits.dtype), experts=experts.astype(jnp.int32)
    )


def load_balancing_loss(router_logits: jax.Array, mask: jax.Array, *, top_k: int) -> jax.Array:
    """transformers' load_balancing_loss_func: router_logits (layers, T, E), mask (T,) of real tokens -> float32
    scalar. f_e = top-k assignments to e / (real tokens x layers), P_e = mean softmax probability of e over the
    same rows; loss = E * sum_e f_e P_e."""
    experts = router_logits.shape[-1]
    mask = mask.astype(jnp.float32)
    probs = jax.nn.softmax(router_logits, axis=-1).astype(jnp.float32)
    chosen = jax.nn.one_hot(jax.lax.top_k(probs, top_k)[1], experts, dtype=jnp.float32).sum(axis=-2)
    rows = mask.sum() * router_logits.shape[0]
    tokens_per_expert = jnp.einsum("lte,t->e", chosen, mask) / rows
    prob_per_expert = jnp.einsum("lte,t->e", probs, mask) / rows
    return experts * jnp.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """router_logits (layers, T, E), mask (T,) of real tokens -> float32 scalar: the mean over real tokens and
    layers of logsumexp(router logits)^2 (ST-MoE)."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2
    return jnp.einsum("lt,t->", z, mask.astype(jnp.float32)) / (mask.sum() * router_logits.shape[0])


def experts_dense(x, *, experts, weights, gate_up, down):
    """x (T, H), experts and weights (T, k) (`Routing`), gate_up (E, H, 2I), down (E, I, H) -> (T, H): every
    expert on every token, combined with the routing weights: O(T E) work, the reference."""
    inter = down.shape[1]
    h = jnp.einsum("th,ehf->etf", x, gate_up)
    h = jax.nn.silu(h[..., :inter]) * h[..., inter:]
    y = jnp.einsum("etf,efh->eth", h, down)
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, gate_up.shape[0], dtype=weights.dtype))
    return jnp.einsum("te,eth->th", combine, y)


@jax.custom_vjp
def _move_rows(x: jax.Array, source: jax.Array, destination: jax.Array) -> jax.Array:
    """x[source] (rows; an index past the end gives a zero row), for a `source` that takes each row of x at most
    once: destination[r] is where row r lands (past the end when nowhere). The gradient is then the inverse move,
    a gather too, where XLA's own gradient of a gather is a scatter-add (far slower on CPU)."""
    return jnp.take(x, source, axis=0, mode="fill", fill_value=0)


def _move_rows_forward(x, source, destination):
    return _move_rows(x, source, destination), destination


def _move_rows_backward(destination, cotangent):
    return jnp.take(cotangent, destination, axis=0, mode="fill", fill_value=0), None, None


_move_rows.defvjp(_move_rows_forward, _move_rows_backward)


def experts_grouped(
    x,
    *,
    experts,
    weights,
    gate_up,
    down,
    backend: str,
    tiling: tuple[int, int, int],
    first_expert: int | jax.Array = 0,
):
    """x (T, H), experts and weights (T, k) (`Routing`), gate_up (E_local, H, 2I), down (E_local, I, H) -> (T, H):
    dropless sorted dispatch over the local experts first_expert .. first_expert + E_local - 1 (all when not
    expert-parallel); assignments to other experts contribute nothing here. tiling: megablox's (m, k, n) tiles."""
    tokens, top_k = experts.shape
    local_experts, inter = gate_up.shape[0], down.shape[1]
    local = experts - first_expert
    mine = (local >= 0) & (local < local_experts)
    groups = jnp.where(mine, local, local_experts).reshape(-1)  # other experts: a last group, not computed
    order = jnp.argsort(groups, stable=True)
    group_sizes = jnp.bincount(groups, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    if backend == "blocked":
        sorted_weights = jnp.take(jnp.where(mine, weights, 0).reshape(-1), order)
        return blocked_experts(
            x,
            sorted_weights=sorted_weights,
            sorted_tokens=order // top_k,
            group_sizes=group_sizes,
            gate_up=gate_up,
            down=down,
            tile_rows=BLOCKED_TILE_ROWS,
        )
    position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))  # sorted slot of each assignment
    # each token repeated for its k assignments (whose gradient is a sum), then sorted: moves of rows both ways
    rows = _move_rows(jnp.repeat(x, top_k, axis=0), order, position)
    grouping = dict(group_sizes=group_sizes, backend=backend, tiling=tiling)
    h = _grouped_matmul(rows, gate_up, **grouping)
    h = jax.nn.silu(h[:, :inter]) * h[:, inter:]
    out = _grouped_matmul(h, down, **grouping)
    out = _move_rows(out, position, order).reshape(tokens, top_k, -1)
    return jnp.einsum("tk,tkh->th", jnp.where(mine, weights, 0), out)


BLOCKED_TILE_ROWS = 256  # benchmarks/moe_layer.py --tiles: the fastest of 64 .. 512 on CPU


def blocked_experts(x, *, sorted_weights, sorted_tokens, group_sizes, gate_up, down, tile_rows: int):
    """The experts' SwiGLU on expert-sorted assignments, in plain XLA loops of dense tiles: x (T, H) tokens;
    assignment r (sorted by expert, group_sizes (G,) rows per expert; rows past their sum belong to no expert and
    are skipped) is token sorted_tokens[r] with routing weight sorted_weights[r]; gate_up (G, H, 2I), down
    (G, I, H) -> (T, H), the weighted sum over each token's assignments.

    For each expert g (a loop), for each window of `tile_rows` rows starting at its first row (an inner loop of
    ceil(size_g / tile_rows) steps: exactly the work the group needs, no empty tiles): gather the window's token
    rows, run them through g's SwiGLU with two dense matmuls, and scatter-add the weighted rows into their
    tokens. The last window of a group runs past it into the next group's rows: those rows are masked here (their
    token index is set past the last token: zero input, output dropped) and computed in their own window. The
    sorted (T k, H) activations are never built. Custom gradient: the same loops backwards, with the pre-activations
    (T k, 2I) kept from the forward pass and each expert's weight gradient summed in float32 in the loop."""
    return _blocked_experts(x, sorted_weights, sorted_tokens, group_sizes, gate_up, down, tile_rows)


def _window_tokens(padded_tokens, *, group_sizes, group, window, tile_rows, tokens):
    """(first row of one window, its tokens (tile_rows,)): T (past every token: gathers zeros, scatters nothing)
    on rows that are not the group's. padded_tokens: the sorted tokens and tile_rows more rows."""
    start = jnp.cumsum(group_sizes)[group] - group_sizes[group] + window * tile_rows
    in_group = jnp.arange(tile_rows) < group_sizes[group] - window * tile_rows
    return start, jnp.where(in_group, jax.lax.dynamic_slice_in_dim(padded_tokens, start, tile_rows), tokens)


def _pad_rows(a, tile_rows, value=0):
    return jnp.pad(a, [(0, tile_rows)] + [(0, 0)] * (a.ndim - 1), constant_values=value)


def _expert_windows(group_sizes, *, tile_rows, body, carry):
    """body(group, window, carry) -> carry over every expert's windows, in row order."""

    def expert(group, carry):
        windows = -(-group_sizes[group] // tile_rows)
        return jax.lax.fori_loop(0, windows, lambda window, c: body(group, window, c), carry)

    return jax.lax.fori_loop(0, group_sizes.shape[0], expert, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocked_experts(x, sorted_weights, sorted_tokens, group_sizes, gate_up, down, tile_rows):
    return _blocked_experts_forward(x, sorted_weights, sorted_tokens, group_sizes, gate_up, down, tile_rows)[0]


def _blocked_experts_forward(x, sorted_weights, sorted_tokens, group_sizes, gate_up, down, tile_rows):
    tokens, hidden = x.shape
    rows, inter = sorted_tokens.shape[0], down.shape[1]
    padded_tokens = _pad_rows(sorted_tokens, tile_rows, value=tokens)
    padded_weights = _pad_rows(sorted_weights, tile_rows)

    def window_step(group, window, carry):
        out, pre_activations = carry
        start, window_tokens = _window_tokens(
            padded_tokens, group_sizes=group_sizes, group=group, window=window, tile_rows=tile_rows, tokens=tokens
        )
        h = jnp.take(x, window_tokens, axis=0, mode="fill", fill_value=0) @ gate_up[group]
        y = (jax.nn.silu(h[:, :inter]) * h[:, inter:]) @ down[group]
        y = y * jax.lax.dynamic_slice_in_dim(padded_weights, start, tile_rows)[:, None]
        out = out.at[window_tokens].add(y.astype(jnp.float32), mode="drop")
        return out, jax.lax.dynamic_update_slice_in_dim(pre_activations, h, start, axis=0)

    carry = (jnp.zeros((tokens, hidden), jnp.float32), jnp.zeros((rows + tile_rows, 2 * inter), x.dtype))
    out, pre_activations = _expert_windows(group_sizes, tile_rows=tile_rows, body=window_step, carry=carry)
    return out.astype(x.dtype), (x, sorted_weights, sorted_tokens, group_sizes, gate_up, down, pre_activations)


def _blocked_experts_backward(tile_rows, residuals, d_out):
    x, sorted_weights, sorted_tokens, group_sizes, gate_up, down, pre_activations = residuals
    tokens = x.shape[0]
    rows, inter = sorted_tokens.shape[0], down.shape[1]
    padded_tokens = _pad_rows(sorted_tokens, tile_rows, value=tokens)
    padded_weights = _pad_rows(sorted_weights, tile_rows)
    f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)

    def window_step(group, window, carry):
        d_x, d_weights, d_gate_up, d_down = carry
        start, window_tokens = _window_tokens(
            padded_tokens, group_sizes=group_sizes, group=group, window=window, tile_rows=tile_rows, tokens=tokens
        )
        x_rows = jnp.take(x, window_tokens, axis=0, mode="fill", fill_value=0)
        d_y = jnp.take(d_out, window_tokens, axis=0, mode="fill", fill_value=0)  # zero on other groups' rows
        weight = jax.lax.dynamic_slice_in_dim(padded_weights, start, tile_rows)[:, None]
        h = jax.lax.dynamic_slice_in_dim(pre_activations, start, tile_rows)
        gate, up = h[:, :inter], h[:, inter:]
        sigmoid = jax.nn.sigmoid(gate)
        silu = gate * sigmoid
        activation = silu * up
        d_activation = d_y @ down[group].T  # of the unweighted expert output: d routing weight = its dot
        d_weights = jax.lax.dynamic_update_slice_in_dim(d_weights, (activation * d_activation).sum(-1), start, 0)
        d_activation = d_activation * weight
        d_down = d_down.at[group].add(f32(activation.T, d_y * weight))
        d_silu_d_gate = sigmoid * (1 + gate * (1 - sigmoid))
        d_h = jnp.concatenate([d_activation * up * d_silu_d_gate, d_activation * silu], axis=1)
        d_gate_up = d_gate_up.at[group].add(f32(x_rows.T, d_h))
        d_x = d_x.at[window_tokens].add(f32(d_h, gate_up[group].T), mode="drop")
        return d_x, d_weights, d_gate_up, d_down

    carry = (
        jnp.zeros(x.shape, jnp.float32),
        jnp.zeros((rows + tile_rows,), sorted_weights.dtype),
        jnp.zeros(gate_up.shape, jnp.float32),
        jnp.zeros(down.shape, jnp.float32),
    )
    d_x, d_weights, d_gate_up, d_down = _expert_windows(group_sizes, tile_rows=tile_rows, body=window_step, carry=carry)
    d_weights = jnp.where(jnp.arange(rows) < group_sizes.sum(), d_weights[:rows], 0)
    return d_x.astype(x.dtype), d_weights, None, None, d_gate_up.astype(gate_up.dtype), d_down.astype(down.dtype)


_blocked_experts.defvjp(_blocked_experts_forward, _blocked_experts_backward)


def _grouped_matmul(lhs, rhs, *, group_sizes, backend, tiling):
    """lhs (m, k) rows grouped by group_sizes, rhs (groups, k, n) -> (m, n); rows past sum(group_sizes) (those
    of no local expert) are zero. megablox leaves garbage there, in its output and in the lhs gradient of its
    backward pass: masking the output drops the first, masking the input drops the second."""
    valid = (jnp.arange(lhs.shape[0]) < group_sizes.sum())[:, None]
    lhs = jnp.where(valid, lhs, 0)
    if backend == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    else:
        out = megablox_matmul(lhs, rhs, group_sizes=group_sizes, tiling=tiling)
    return jnp.where(valid, out, 0)


class MoeBlock(nn.Module):
    """x (B, L, H) -> `MoeBlockOutputs` (hidden (B, L, H), router logits (B*L, E))."""

    config: TextConfig
    _: dataclasses.KW_ONLY
    backend: str
    tiling: tuple[int, int, int]
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraConfig | None = None  # adapters on the shared expert's projections (Qwen3.5)

    @nn.compact
    def __call__(self, x: jax.Array) -> MoeBlockOutputs:
        text = self.config
        batch, length, hidden = x.shape
        tokens = x.reshape(batch * length, hidden)
        logits = Dense(
            text.num_experts, ("embed", "expert_router"), dtype=self.dtype, param_dtype=self.param_dtype, name="gate"
        )(tokens)
        weights, experts = route(logits, text.num_experts_per_tok)
        inter = text.moe_intermediate_size
        expert_param = dict(init=default_init, dtype=self.param_dtype)
        gate_up = param(
            self,
            "experts_gate_up",
            shape=(text.num_experts, hidden, 2 * inter),
            axes=("expert", "embed", "mlp"),
            **expert_param,
        )
        down = param(
            self,
            "experts_down",
            shape=(text.num_experts, inter, hidden),
            axes=("expert", "mlp", "embed"),
            **expert_param,
        )
        routed = dict(
            experts=experts,
            weights=weights.astype(self.dtype),
            gate_up=gate_up.astype(self.dtype),
            down=down.astype(self.dtype),
        )
        tokens = tokens.astype(self.dtype)
        mesh = jax.sharding.get_abstract_mesh()
        # blocked with every expert on every token (top-k = E): the dense product is the same work, unpermuted
        if self.backend == "dense" or (self.backend == "blocked" and text.num_experts_per_tok == text.num_experts):
            y = experts_dense(tokens, **routed)
        elif not mesh.empty and (mesh.shape.get("expert", 1) > 1 or self.backend == "megablox"):
            # (megablox on a mesh without an expert axis too: a Pallas kernel runs only inside a shard_map)
            y = _expert_parallel(tokens, **routed, mesh=mesh, backend=self.backend, tiling=self.tiling)
        else:
            y = experts_grouped(tokens, **routed, backend=self.backend, tiling=self.tiling)
        y = y.reshape(batch, length, hidden)
        if text.shared_expert_intermediate_size:
            # Qwen3.5 (`Qwen3_5MoeSparseMoeBlock`): a SwiGLU on every token, scaled by sigmoid(x . shared_gate)
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            shared = SwiGLU(text.shared_expert_intermediate_size, name="shared_expert", lora=self.lora, **kw)(x)
            gate = Dense(1, ("embed", "expert_router"), name="shared_expert_gate", **kw)(x)
            y = y + jax.nn.sigmoid(gate) * shared
        return MoeBlockOutputs(hidden=y, router_logits=logits)


def _expert_parallel(tokens, *, experts, weights, gate_up, down, mesh, backend, tiling):
    """Experts split over the `expert` mesh axis (n devices), tokens over all batch axes (expert included) and
    context.
    Each device all-gathers the tokens of its expert group and computes what its local experts contribute to
    them, one source device's T tokens at a time (dropless: the other experts' rows are left out of the grouped
    matmuls); a reduce-scatter over `expert` sums the contributions and hands them back to the tokens' owners.

    Why not an all-to-all dispatch: per device the all-gather receives (n-1) T token rows and the reduce-scatter
    sends (n-1) T, where an all-to-all dispatch sends up to k (n-1)/n T rows and its combine as many back; for
    n <= k (the released configs: n = 4 or 8, k = 8) this moves no more data and needs no second routing
    exchange. Memory: dropless
    with static shapes, an all-to-all must receive into a worst-case buffer of n T k rows; the chunks here, each
    recomputed in the backward pass, keep T k rows of temporaries whatever n is (one 235B-A22B layer on 8 v5p
    chips: 5.2 GiB instead of 29.5 GiB for all n T k rows at once; benchmarks/moe_layer.py). Too few tokens to
    split over the batch axes (a decode step): they stay replicated and the contributions are psum-ed."""
    n, num_experts = mesh.shape["expert"], gate_up.shape[0]
    if num_experts % n:
        raise ValueError(f"num_experts {num_experts} is not a multiple of the expert mesh axis size {n}")
    # the token rows (B*L) are split like the (B, L) activations: batch axes, then the sequence over context
    row_axes = tuple(a for a in (*BATCH_AXES, "context") if mesh.shape.get(a, 1) > 1)
    split = tokens.shape[0] % math.prod(mesh.shape[a] for a in row_axes) == 0
    row = PartitionSpec(row_axes) if split else PartitionSpec()

    def local(tokens, experts, weights, gate_up, down):
        def dispatch(tokens, experts, weights):
            return experts_grouped(
                tokens,
                experts=experts,
                weights=weights,
                gate_up=gate_up,
                down=down,
                backend=backend,
                tiling=tiling,
                first_expert=jax.lax.axis_index("expert") * gate_up.shape[0],
            )

        if not split:
            return jax.lax.psum(dispatch(tokens, experts, weights), "expert")
        gathered = [jax.lax.all_gather(a, "expert") for a in (tokens, experts, weights)]  # (n, T, ...)
        # one source device's tokens at a time, recomputed in the backward pass: T k rows of temporaries
        _, y = jax.lax.scan(
            lambda _, chunk: (None, jax.checkpoint(dispatch)(*chunk)),
            None,
            gathered,
            unroll=scan_unroll(gathered[0].shape[0]),
        )
        return jax.lax.psum_scatter(y, "expert")  # (n, T, H) -> this device's (T, H)

    experts_spec = PartitionSpec("expert")
    return jax.shard_map(
        local, mesh=mesh, in_specs=(row, row, row, experts_spec, experts_spec), out_specs=row, check_vma=False
    )(tokens, experts, weights, gate_up, down)
