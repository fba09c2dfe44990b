"""DPO / IPO losses equal the formulas computed independently in torch (values and gradients), and answer
log-probabilities sum each packed example's supervised tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen3vl_jax.training.dpo import answer_logps, preference_losses


def torch_reference(policy_c, policy_r, ref_c, ref_r, *, beta, variant):
    pc, pr = torch.tensor(policy_c, requires_grad=True), torch.tensor(policy_r, requires_grad=True)
    h = (pc - torch.tensor(ref_c)) - (pr - torch.tensor(ref_r))
    if variant == "sigmoid":  # the DPO paper's eq. 7
        loss = -torch.nn.functional.logsigmoid(beta * h)
    else:  # IPO (Azar et al., eq. 17)
        loss = (h - 1 / (2 * beta)) ** 2
    loss.sum().backward()
    return loss.detach().numpy(), pc.grad.numpy(), pr.grad.numpy()


@pytest.mark.parametrize("variant, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_losses_and_gradients_equal_torch(variant, beta):
    rng = np.random.default_rng(0)
    policy_c, policy_r, ref_c, ref_r = (rng.normal(-20, 5, 16).astype(np.float64) for _ in range(4))
    ref_loss, ref_grad_c, ref_grad_r = torch_reference(policy_c, policy_r, ref_c, ref_r, beta=beta, variant=variant)

    def total(pc, pr, rc, rr):
        return preference_losses(pc, pr, rc, rr, beta=beta, variant=variant).loss.sum()

    with jax.enable_x64():
        args = [jnp.asarray(a) for a in (policy_c, policy_r, ref_c, ref_r)]
        losses = preference_losses(*args, beta=beta, variant=variant)
        grads = jax.grad(total, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(losses.loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grads[0], ref_grad_c, rtol=1e-12)
    np.testing.assert_allclose(grads[1], ref_grad_r, rtol=1e-12)
    assert not np.any(grads[2]) and not np.any(grads[3])  # the reference is frozen
    np.testing.assert_allclose(losses.margin, beta * ((policy_c - ref_c) - (policy_r - ref_r)), rtol=1e-12)
    np.testing.assert_array_equal(losses.accuracy, (policy_c - ref_c) > (policy_r - ref_r))


def test_answer_logps_sum_each_examples_supervised_tokens():
    token_logps = -np.arange(1, 13, dtype=np.float32).reshape(2, 6)
    segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
    mask = np.array([[0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 1]])
    sums = np.asarray(answer_logps(jnp.asarray(token_logps), jnp.asarray(mask), jnp.asarray(segments)))
    assert sums[1] == -2 - 3 and sums[2] == -5 and sums[7 + 1] == -8 and sums[7 + 2] == -11 - 12
    with pytest.raises(ValueError, match="variant 'hinge' not in"):
        preference_losses(*[jnp.zeros(2)] * 4, beta=0.1, variant="hinge")
