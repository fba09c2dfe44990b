"""The three loss normalisations give the weights they document, on a batch worked by hand; the chunked LM head
and loss equal the whole logits' and never hold them whole."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from qwen3vl_jax.config import preset
from qwen3vl_jax.modeling.lm_head import chunked_cross_entropy, project, token_cross_entropy
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.training.loss import token_weights

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


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_chunked_loss_and_gradients_equal_the_whole_logits(batch, name):
    """The tiny model's weighted cross-entropy and every gradient, for the three normalisations, with the logits
    in chunks of 48 of the 128 positions (the last chunk padded) and whole."""
    config = preset(name)
    params = random_params(config, 0)
    inputs = batch.inputs
    weights = jnp.stack([token_weights(batch.loss_mask, batch.segment_ids, normalization=n) for n in EXPECTED])

    def loss(params, weights, chunk):
        ce, correct, _ = Qwen3VL(config).apply(
            {"params": params}, inputs, batch.targets, chunk=chunk, method=Qwen3VL.token_losses
        )
        return (weights * ce).sum() / weights.sum(), correct

    @functools.partial(jax.jit, static_argnums=0)
    def losses_and_gradients(chunk):  # one per normalisation
        return jax.vmap(jax.value_and_grad(loss, has_aux=True), in_axes=(None, 0, None))(params, weights, chunk)

    (whole, whole_correct), whole_grads = losses_and_gradients(0)
    (chunked, chunked_correct), chunked_grads = losses_and_gradients(48)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    np.testing.assert_array_equal(chunked_correct, whole_correct)
    for (path, chunked_grad), (_, whole_grad) in zip(
        jax.tree_util.tree_flatten_with_path(chunked_grads)[0], jax.tree_util.tree_flatten_with_path(whole_grads)[0]
    ):
        for c, w in zip(chunked_grad, whole_grad):  # per normalisation
            assert np.abs(c - w).max() <= 1e-5 * np.abs(w).max(), jax.tree_util.keystr(path)


def test_chunked_head_never_holds_the_whole_logits():
    """Temporary memory of the compiled loss-and-gradient program (XLA:CPU's buffer assignment), vocabulary 8,192:
    the whole logits of 2,048 positions take at least one (L, V) float32 buffer; in chunks of 256 the
    temporaries do not grow with L beyond the (L, H) hidden-state gradient: 8,192 positions need less than half
    of one 2,048-position logits buffer."""
    vocab, hidden_size = 8192, 64

    def temporaries(chunk, length):
        def loss(hidden, weight, targets):
            if chunk:
                return chunked_cross_entropy(hidden, weight, targets, chunk=chunk)[0].sum()
            return token_cross_entropy(project(hidden, weight), targets).sum()

        shapes = [
            ((1, length, hidden_size), jnp.float32),
            ((hidden_size, vocab), jnp.float32),
            ((1, length), jnp.int32),
        ]
        arguments = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*arguments).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 2048 * vocab * 4
    assert temporaries(0, 2048) >= logits_bytes
    short, long = temporaries(256, 2048), temporaries(256, 8192)
    assert long < logits_bytes / 2
    assert long - short < 2 * (8192 - 2048) * hidden_size * 4
