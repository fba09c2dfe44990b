"""The gated delta-net layer against transformers 5.24's `Qwen3_5GatedDeltaNet` and its torch fallbacks
(`torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule`): the rules, the module (left padding, its
decoding cache), packed rows against each example run alone, and gradients against torch autograd."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen3_5TextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from qwen3vl_jax.modeling.gated_delta_net import (
    DeltaNetState,
    GatedDeltaNet,
    GatedDeltaNetConfig,
    causal_depthwise_conv1d,
    chunked_gated_delta_rule,
    recurrent_gated_delta_rule,
)

BATCH, KEY_HEADS, VALUE_HEADS, HEAD_DIM, HIDDEN = 2, 2, 4, 16, 32
CONFIG = GatedDeltaNetConfig(
    hidden_size=HIDDEN, num_key_heads=KEY_HEADS, num_value_heads=VALUE_HEADS, key_head_dim=HEAD_DIM, value_head_dim=24
)
ATOL = 1e-5


def rule_inputs(length: int, seed: int = 0, batch: int = BATCH) -> dict[str, np.ndarray]:
    """q, k (B, L, Hk, D), v (B, L, Hv, D), g <= 0 and beta in (0, 1) (B, L, Hv), float32."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(
        q=normal(batch, length, KEY_HEADS, HEAD_DIM),
        k=normal(batch, length, KEY_HEADS, HEAD_DIM),
        v=normal(batch, length, VALUE_HEADS, HEAD_DIM),
        g=-np.log1p(np.exp(normal(batch, length, VALUE_HEADS))) * 0.3,
        beta=1 / (1 + np.exp(-normal(batch, length, VALUE_HEADS))),
    )


def random_state(seed: int, batch: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, VALUE_HEADS, HEAD_DIM, HEAD_DIM)).astype(np.float32)


def torch_rule(rule, inputs: dict, initial_state=None):
    """transformers' rule (l2-normalised q, k) on numpy inputs -> (out, final state) as numpy."""
    tensors = {name: torch.from_numpy(value) for name, value in inputs.items()}
    initial = None if initial_state is None else torch.from_numpy(initial_state)
    out, state = rule(
        tensors.pop("q"),
        tensors.pop("k"),
        tensors.pop("v"),
        **tensors,
        initial_state=initial,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    return out.numpy(), state.numpy()


def ours_chunked(inputs: dict, segment_ids, initial_state=None):
    return jax.jit(chunked_gated_delta_rule, static_argnames="use_qk_l2norm")(
        **inputs, segment_ids=jnp.asarray(segment_ids), initial_state=initial_state, use_qk_l2norm=True
    )


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_chunked_rule_equals_transformers(with_state):
    """L = 150: two full chunks and a padded third."""
    inputs, initial = rule_inputs(150), random_state(1) if with_state else None
    ref_out, ref_state = torch_rule(hf.torch_chunk_gated_delta_rule, inputs, initial)
    out, state = ours_chunked(inputs, np.ones((BATCH, 150), np.int32), initial)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(state, ref_state, atol=ATOL, rtol=0)
    # and the token-by-token recurrence of transformers over the same sequence
    ref_out, ref_state = torch_rule(hf.torch_recurrent_gated_delta_rule, inputs, initial)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(state, ref_state, atol=ATOL, rtol=0)


def test_recurrent_rule_token_by_token_equals_transformers():
    """Our recurrent step, one token per call for 70 tokens, = transformers' chunked rule (and its recurrent one on
    a 3-token call)."""
    inputs, initial = rule_inputs(70, seed=2), random_state(3)
    ref_out, ref_state = torch_rule(hf.torch_chunk_gated_delta_rule, inputs, initial)
    step = jax.jit(recurrent_gated_delta_rule, static_argnames="use_qk_l2norm")
    state, outs = jnp.asarray(initial), []
    for t in range(70):
        out, state = step(**{name: x[:, t : t + 1] for name, x in inputs.items()}, state=state, use_qk_l2norm=True)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), ref_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(state, ref_state, atol=ATOL, rtol=0)
    short = {name: x[:, :3] for name, x in inputs.items()}
    ref_out, ref_state = torch_rule(hf.torch_recurrent_gated_delta_rule, short, initial)
    out, state = step(**short, state=jnp.asarray(initial), use_qk_l2norm=True)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(state, ref_state, atol=ATOL, rtol=0)


# rows of 150 tokens: three examples (starts inside chunks, the second running into the next chunk), then padding;
# two examples, the second starting on a chunk's first token (64), then padding
PACKED_LENGTHS = [(70, 66, 6), (64, 80)]


def packed_segment_ids(lengths_per_row, *, length: int, left_padding=(0, 0)) -> np.ndarray:
    ids = np.zeros((len(lengths_per_row), length), np.int32)
    for row, (lengths, pad) in enumerate(zip(lengths_per_row, left_padding)):
        start = pad
        for segment, n in enumerate(lengths, start=1):
            ids[row, start : start + n] = segment
            start += n
    return ids


def segment_spans(segment_ids: np.ndarray):
    """(row, segment id, start, end) of every segment."""
    for row, ids in enumerate(segment_ids):
        for segment in sorted(set(ids.tolist()) - {0}):
            where = np.flatnonzero(ids == segment)
            yield row, segment, int(where[0]), int(where[-1]) + 1


def test_packed_rule_gives_each_example_its_output_alone():
    """Packed rows, through the chunked rule and through the recurrent one = transformers' recurrence on each
    example alone; the final state = the last example's; padding outputs are zero."""
    segment_ids = packed_segment_ids(PACKED_LENGTHS, length=150)
    inputs = rule_inputs(150, seed=4)
    out, state = map(np.asarray, ours_chunked(inputs, segment_ids))
    step_out, _ = jax.jit(recurrent_gated_delta_rule, static_argnames="use_qk_l2norm")(
        **inputs, state=np.zeros_like(random_state(0)), segment_ids=segment_ids, use_qk_l2norm=True
    )
    for row, _, start, end in segment_spans(segment_ids):
        alone = {name: x[row : row + 1, start:end] for name, x in inputs.items()}
        ref_out, ref_state = torch_rule(hf.torch_recurrent_gated_delta_rule, alone)
        np.testing.assert_allclose(out[row : row + 1, start:end], ref_out, atol=ATOL, rtol=0)
        np.testing.assert_allclose(step_out[row : row + 1, start:end], ref_out, atol=ATOL, rtol=0)
        if end == np.flatnonzero(segment_ids[row])[-1] + 1:
            np.testing.assert_allclose(state[row : row + 1], ref_state, atol=ATOL, rtol=0)
    assert not np.any(out[segment_ids == 0])


def test_chunked_rule_gradients_equal_torch_autograd():
    """d(sum(out * w) + sum(state * u)) / d(q, k, v, g, beta, initial state), over two chunks with a segment start
    in the second, against torch autograd through transformers' chunked rule on the same segments."""
    length, split = 100, 80
    inputs, initial = rule_inputs(length, seed=5, batch=1), random_state(6, batch=1)
    rng = np.random.default_rng(7)
    out_weight = rng.standard_normal((1, length, VALUE_HEADS, HEAD_DIM)).astype(np.float32)
    state_weight = rng.standard_normal(initial.shape).astype(np.float32)
    segment_ids = np.repeat([[1, 2]], [split, length - split], axis=1).astype(np.int32)

    def loss(inputs, initial):
        out, state = chunked_gated_delta_rule(
            **inputs, segment_ids=jnp.asarray(segment_ids), initial_state=initial, use_qk_l2norm=True
        )
        return jnp.sum(out * out_weight) + jnp.sum(state * state_weight)

    grads, grad_initial = jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs, initial)

    tensors = {name: torch.from_numpy(x).requires_grad_() for name, x in inputs.items()}
    torch_initial = torch.from_numpy(initial).requires_grad_()
    first = {name: x[:, :split] for name, x in tensors.items()}
    second = {name: x[:, split:] for name, x in tensors.items()}
    kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
    out_1, _ = hf.torch_chunk_gated_delta_rule(**_torch_args(first), initial_state=torch_initial, **kw)
    out_2, state = hf.torch_chunk_gated_delta_rule(**_torch_args(second), **kw)
    total = (torch.cat([out_1, out_2], dim=1) * torch.from_numpy(out_weight)).sum()
    (total + (state * torch.from_numpy(state_weight)).sum()).backward()
    for name, tensor in tensors.items():
        assert np.all(np.isfinite(grads[name])), name
        np.testing.assert_allclose(grads[name], tensor.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(grad_initial, torch_initial.grad.numpy(), atol=1e-4, rtol=1e-4)


def _torch_args(tensors: dict) -> dict:
    return dict(query=tensors["q"], key=tensors["k"], value=tensors["v"], g=tensors["g"], beta=tensors["beta"])


# the module


@pytest.fixture(scope="module")
def reference():
    """A randomly initialised `Qwen3_5GatedDeltaNet` (A_log, dt_bias and the norm weight randomised too) and our
    parameters copied from it."""
    torch.manual_seed(0)
    config = Qwen3_5TextConfig(
        hidden_size=HIDDEN,
        linear_num_key_heads=KEY_HEADS,
        linear_num_value_heads=VALUE_HEADS,
        linear_key_head_dim=HEAD_DIM,
        linear_value_head_dim=CONFIG.value_head_dim,
        linear_conv_kernel_dim=CONFIG.conv_kernel_size,
        num_hidden_layers=1,
        rms_norm_eps=CONFIG.rms_norm_eps,
    )
    layer = hf.Qwen3_5GatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():
        layer.dt_bias.normal_(0.0, 1.0)
        layer.A_log.normal_(-1.0, 1.0)
        layer.norm.weight.normal_(1.0, 0.5)
    weight = {name: p.detach().numpy() for name, p in layer.named_parameters()}
    heads, value_dim = VALUE_HEADS, CONFIG.value_head_dim
    params = {
        "in_proj_qkv": {"kernel": weight["in_proj_qkv.weight"].T},
        "in_proj_z": {"kernel": weight["in_proj_z.weight"].T.reshape(HIDDEN, heads, value_dim)},
        "in_proj_b": {"kernel": weight["in_proj_b.weight"].T},
        "in_proj_a": {"kernel": weight["in_proj_a.weight"].T},
        "conv1d": {"kernel": weight["conv1d.weight"][:, 0, :].T},
        "dt_bias": weight["dt_bias"],
        "A_log": weight["A_log"],
        "norm": {"scale": weight["norm.weight"]},
        "out_proj": {"kernel": weight["out_proj.weight"].T.reshape(heads, value_dim, HIDDEN)},
    }
    x, segment_ids = jnp.zeros((1, 3, HIDDEN)), jnp.ones((1, 3), jnp.int32)
    ours = jax.eval_shape(lambda: GatedDeltaNet(CONFIG).init(jax.random.key(0), x, segment_ids=segment_ids))
    assert jax.tree.map(np.shape, nn.meta.unbox(ours["params"])) == jax.tree.map(np.shape, params)
    return config, layer, params


def hidden_states(length: int, seed: int, batch: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, length, HIDDEN)).astype(np.float32)


@jax.jit
def apply(params, x, segment_ids, state=None):
    return GatedDeltaNet(CONFIG).apply({"params": params}, x, segment_ids=segment_ids, state=state)


def torch_layer(layer, x: np.ndarray, attention_mask=None, cache=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return layer(torch.from_numpy(x), cache=cache, attention_mask=mask).numpy()


def test_module_equals_transformers_on_a_left_padded_batch(reference):
    """130 tokens, row 1 left-padded by 37 (transformers' attention_mask 0 = our segment id 0): real tokens equal."""
    _, layer, params = reference
    x = hidden_states(130, seed=8)
    attention_mask = np.ones((BATCH, 130), np.int64)
    attention_mask[1, :37] = 0
    expected = torch_layer(layer, x, attention_mask)
    y, state = apply(params, x, attention_mask.astype(np.int32))
    assert state is None
    real = attention_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(y)[real], expected[real], atol=ATOL, rtol=0)


def test_packed_module_gives_each_example_its_output_alone(reference):
    """Conv window and recurrent state restart at every segment: each example of a packed row = transformers'
    layer on that example alone."""
    _, layer, params = reference
    segment_ids = packed_segment_ids(PACKED_LENGTHS, length=150)
    x = hidden_states(150, seed=9)
    y = np.asarray(apply(params, x, segment_ids)[0])
    for row, _, start, end in segment_spans(segment_ids):
        np.testing.assert_allclose(
            y[row, start:end], torch_layer(layer, x[row : row + 1, start:end])[0], atol=ATOL, rtol=0
        )


def test_decoding_equals_transformers_with_its_cache(reference):
    """Prefill (row 0 left-padded, row 1 right-padded: the state is the one after the last real token), then 5
    one-token steps = transformers' layer with its `DynamicCache` on each row's prompt alone, then the same steps."""
    config, layer, params = reference
    prompt_lengths, length, steps = (70, 41), 72, 5
    prompt = hidden_states(length, seed=10)
    new_tokens = hidden_states(steps, seed=11)
    segment_ids = np.zeros((BATCH, length), np.int32)
    segment_ids[0, length - prompt_lengths[0] :] = 1
    segment_ids[1, : prompt_lengths[1]] = 1
    state = DeltaNetState.zeros(CONFIG, batch=BATCH)
    y, state = apply(params, prompt, segment_ids, state)
    ours = [np.asarray(y)]
    for step in range(steps):
        y, state = apply(params, new_tokens[:, step : step + 1], np.ones((BATCH, 1), np.int32), state)
        ours.append(np.asarray(y))
    for row in range(BATCH):
        cache = DynamicCache(config=config)
        real = segment_ids[row].astype(bool)
        expected_prompt = torch_layer(layer, prompt[row : row + 1, real], cache=cache)[0]
        np.testing.assert_allclose(ours[0][row, real], expected_prompt, atol=ATOL, rtol=0)
        for step in range(steps):
            expected = torch_layer(layer, new_tokens[row : row + 1, step : step + 1], cache=cache)[0]
            np.testing.assert_allclose(ours[1 + step][row], expected, atol=ATOL, rtol=0, err_msg=f"step {step}")


@pytest.mark.parametrize(
    "segment_ids",
    [[1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 2, 2, 0, 0, 0]],
    ids=["right_padded", "short_last_segment"],
)
def test_conv_window_continues_the_last_segment(segment_ids):
    """After a call ending in padding, the conv window lets the next call continue the row's last segment as
    transformers' `causal_conv1d_fn` over that segment and the new tokens does."""
    rng = np.random.default_rng(12)
    x, new = rng.standard_normal((1, 9, 6)).astype(np.float32), rng.standard_normal((1, 4, 6)).astype(np.float32)
    weight = rng.standard_normal((4, 6)).astype(np.float32)
    segment_ids = np.array([segment_ids], np.int32)
    _, window = causal_depthwise_conv1d(x, weight, None, segment_ids=segment_ids)
    y, _ = causal_depthwise_conv1d(new, weight, None, segment_ids=np.ones((1, 4), np.int32), conv_state=window)
    last_segment = x[:, segment_ids[0] == segment_ids[0].max()]
    whole = torch.from_numpy(np.concatenate([last_segment, new], axis=1)).transpose(1, 2)
    expected = hf.causal_conv1d_fn(whole, torch.from_numpy(weight.T), activation="silu").transpose(1, 2)[:, -4:]
    np.testing.assert_allclose(y, expected.numpy(), atol=ATOL, rtol=0)


def test_bad_inputs_raise_errors_that_name_them():
    x, weight = np.zeros((1, 9, 6), np.float32), np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="conv_state"):
        causal_depthwise_conv1d(x, weight, None, segment_ids=np.ones((1, 9), np.int32), conv_state=x[:, :2])
    with pytest.raises(ValueError, match="num_value_heads"):
        GatedDeltaNetConfig(hidden_size=8, num_key_heads=3, num_value_heads=4, key_head_dim=4, value_head_dim=4)
    with pytest.raises(ValueError, match="segment_ids"):
        chunked_gated_delta_rule(**rule_inputs(5), segment_ids=np.ones((BATCH, 4), np.int32))
    with pytest.raises(ValueError, match="state"):
        recurrent_gated_delta_rule(**rule_inputs(1), state=np.zeros((BATCH, VALUE_HEADS, HEAD_DIM, 3), np.float32))
