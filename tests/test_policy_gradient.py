"""GRPO / GSPO advantages and losses (qwen3vl_jax/training/policy_gradient.py) against the formulas written
independently in torch here (values and gradients), and with one update per rollout (ratio 1) the gradient of
REINFORCE with the group mean as baseline."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen3vl_jax.training.policy_gradient import group_advantages, policy_loss

N, T, G = 6, 5, 3  # 2 prompts x 3 completions, 5 completion tokens at most


def case(seed=0):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.1, 3.0, (N, T))
    return dict(
        logps=logps,
        old_logps=logps + rng.normal(0, 0.4, (N, T)),  # far enough that some ratios are clipped
        reference_logps=logps + rng.normal(0, 0.3, (N, T)),
        advantages=rng.normal(0, 1, N),
        mask=(np.arange(T)[None] < np.array([5, 3, 4, 1, 5, 2])[:, None]).astype(np.float64),
    )


def torch_loss(c, *, variant, aggregation, clip_low, clip_high, beta):
    """The per-token clipped surrogate plus beta k3-KL, as the GRPO / GSPO papers and TRL write it."""
    logps = torch.tensor(c["logps"], requires_grad=True)
    old, ref, mask = (torch.tensor(c[k]) for k in ("old_logps", "reference_logps", "mask"))
    advantage = torch.tensor(c["advantages"])[:, None]
    log_ratio = logps - old
    if variant == "gspo":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None].expand_as(logps)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    per_token = per_token + beta * kl
    if aggregation == "token":
        loss = (per_token * mask).sum() / mask.sum()
    else:
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    loss.backward()
    hit = ((ratio < 1 - clip_low) & (advantage < 0)) | ((ratio > 1 + clip_high) & (advantage > 0))
    return (
        loss.item(),
        logps.grad.numpy(),
        ((kl * mask).sum() / mask.sum()).item(),
        ((hit * mask).sum() / mask.sum()).item(),
    )


@pytest.mark.parametrize(
    "variant, aggregation, beta", list(itertools.product(("grpo", "gspo"), ("token", "sequence"), (0.0, 0.04)))
)
def test_the_loss_and_its_gradient_equal_the_formula(variant, aggregation, beta):
    c = case()
    settings = dict(variant=variant, aggregation=aggregation, clip_low=0.2, clip_high=0.28)
    expected, expected_grad, expected_kl, expected_clip = torch_loss(c, beta=beta, **settings)

    def loss(logps):
        out = policy_loss(
            logps,
            jnp.asarray(c["old_logps"], jnp.float32),
            jnp.asarray(c["advantages"], jnp.float32),
            jnp.asarray(c["mask"]),
            reference_logps=jnp.asarray(c["reference_logps"], jnp.float32),
            beta=beta,
            **settings,
        )
        return out.loss, out

    (value, out), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(c["logps"], jnp.float32))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.kl, expected_kl, rtol=1e-5)
    np.testing.assert_allclose(out.clip_fraction, expected_clip, rtol=1e-6)
    assert 0 < expected_clip < 1 or variant == "gspo"  # the case exercises the clip (per token, at least)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_one_update_per_rollout_is_reinforce_with_the_group_baseline(aggregation):
    """pi = pi_old: every ratio is 1, nothing is clipped, and d loss / d log pi(y_t) = -A_i / (the token count, or
    N x completion i's token count)."""
    c = case(1)
    rewards = jnp.asarray([1.0, 0.0, 0.5, 2.0, 2.0, 1.0])
    advantages = group_advantages(rewards, group_size=G, scale_rewards="none").advantage
    np.testing.assert_allclose(advantages, [0.5, -0.5, 0.0, 1 / 3, 1 / 3, -2 / 3], rtol=1e-6)
    logps = jnp.asarray(c["logps"], jnp.float32)
    mask = jnp.asarray(c["mask"])

    def loss(x):
        return policy_loss(x, jax.lax.stop_gradient(x), advantages, mask, aggregation=aggregation).loss

    grad = jax.grad(loss)(logps)
    counts = c["mask"].sum() if aggregation == "token" else N * c["mask"].sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, -np.asarray(advantages)[:, None] * c["mask"] / counts, rtol=1e-6, atol=1e-8)
    assert float(policy_loss(logps, logps, advantages, mask).clip_fraction) == 0.0


def test_group_advantages():
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.0, 3.0, 3.0])
    groups = rewards.reshape(3, 3)
    centred = groups - groups.mean(1, keepdims=True)
    per_group = group_advantages(jnp.asarray(rewards), group_size=3, scale_rewards="group")
    np.testing.assert_allclose(
        per_group.advantage, (centred / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).ravel(), rtol=1e-5
    )
    np.testing.assert_array_equal(per_group.zero_variance, [False] * 3 + [True] * 3 + [False] * 3)
    np.testing.assert_allclose(per_group.advantage[3:6], 0.0)  # an all-equal group teaches nothing
    per_batch = group_advantages(jnp.asarray(rewards), group_size=3, scale_rewards="batch")
    np.testing.assert_allclose(per_batch.advantage, centred.ravel() / (rewards.std(ddof=1) + 1e-4), rtol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(jnp.asarray(rewards), group_size=4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(jnp.asarray(rewards), group_size=3, scale_rewards="max")


def test_bad_settings_are_refused():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="variant must be in"):
        policy_loss(x, x, jnp.zeros(2), x, variant="ppo")
    with pytest.raises(ValueError, match="needs the reference"):
        policy_loss(x, x, jnp.zeros(2), x, beta=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        policy_loss(x, x, jnp.zeros(2), x, clip_low=-0.1)


@pytest.mark.parametrize("variant, aggregation", list(itertools.product(("grpo", "gspo"), ("token", "sequence"))))
def test_packed_completions_give_the_per_completion_loss_and_microbatch_shares_add_up(variant, aggregation):
    """The 6 completions packed 3 to a row (each a segment, a prompt's unweighted tokens before it, advantages per
    token) give the loss and gradient of the (N, T) form; two microbatches of one row each, normalised by the whole
    batch's token and sequence counts, add up to it."""
    c = case(2)
    settings = dict(variant=variant, aggregation=aggregation, clip_low=0.2, clip_high=0.28, beta=0.04)
    prompt = 2  # unweighted tokens before each completion
    length = 3 * (prompt + T)
    packed = {name: np.zeros((2, length)) for name in ("logps", "old_logps", "reference_logps", "advantages", "mask")}
    segments = np.zeros((2, length), np.int32)
    for i in range(N):
        row, start = divmod(i, 3)
        start = start * (prompt + T)
        segments[row, start : start + prompt + T] = i % 3 + 1
        span = slice(start + prompt, start + prompt + T)
        for name in ("logps", "old_logps", "reference_logps", "mask"):
            packed[name][row, span] = c[name][i]
        packed["advantages"][row, span] = c["advantages"][i]
        packed["logps"][row, start : start + prompt] = -0.3  # the prompt: in the segment, outside the mask

    def per_completion(logps):
        return policy_loss(
            logps,
            *(jnp.asarray(c[k], jnp.float32) for k in ("old_logps", "advantages", "mask")),
            reference_logps=jnp.asarray(c["reference_logps"], jnp.float32),
            **settings,
        ).loss

    def packed_loss(logps, rows, totals=None):
        return policy_loss(
            logps,
            *(jnp.asarray(packed[k][rows], jnp.float32) for k in ("old_logps", "advantages", "mask")),
            segment_ids=jnp.asarray(segments[rows]),
            reference_logps=jnp.asarray(packed["reference_logps"][rows], jnp.float32),
            **settings,
            **(totals or {}),
        ).loss

    expected, expected_grad = jax.value_and_grad(per_completion)(jnp.asarray(c["logps"], jnp.float32))
    rows = slice(0, 2)
    value, grad = jax.value_and_grad(packed_loss)(jnp.asarray(packed["logps"], jnp.float32), rows)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for i in range(N):
        row, start = divmod(i, 3)
        span = slice(start * (prompt + T) + prompt, start * (prompt + T) + prompt + T)
        np.testing.assert_allclose(grad[row, span], expected_grad[i], rtol=1e-4, atol=1e-7)
    totals = dict(total_tokens=jnp.float32(c["mask"].sum()), total_sequences=jnp.float32(N))
    shares = [packed_loss(jnp.asarray(packed["logps"][[r]], jnp.float32), [r], totals) for r in (0, 1)]
    np.testing.assert_allclose(sum(shares), expected, rtol=1e-5)
