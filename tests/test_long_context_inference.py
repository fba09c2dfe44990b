"""Long-context inference on a mesh (8 fake CPU devices): the prompt prefilled with its tokens and patches split
over `context`, its KV cache left split there (kv heads over `tensor`), decode attention combining each shard's
partial softmax; the tokens and logits are the single device's. And YaRN as a load-time switch."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONFIG, random_params
from hf_reference import batch_inputs, build_prompt

import qwen3vl_jax
from qwen3vl_jax.config import from_hf, to_hf
from qwen3vl_jax.config.model import with_yarn
from qwen3vl_jax.modeling.kv_cache import init_cache
from qwen3vl_jax.modeling.model import Qwen3VL, abstract_params
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, make_mesh, param_shardings

MESHES = {"context4_tensor2": {"context": 4, "tensor": 2}, "context8": {"context": 8}}
PROMPTS = [  # left-padded: an image and a two-group video, each within one context shard's patch slot
    [("text", 3), ("image", (4, 6)), ("text", 9)],
    [("text", 2), ("video", (2, 4, 4)), ("text", 21)],
]
NEW, DECODE_STEPS = 8, 3
PROMPT_LENGTH = 96  # the prefill's padded length: a multiple of 2 x 8 shards that is none of the tiny model's sizes


@pytest.fixture(scope="module")
def single():
    return qwen3vl_jax.Qwen3VLModel(CONFIG, random_params(seed=1))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return batch_inputs(CONFIG, [build_prompt(CONFIG, parts, rng=rng) for parts in PROMPTS])


def _prefill_then_decode(params, inputs, *, slots: int):
    """Logits (B, 1 + DECODE_STEPS, vocab) after the prompt and after each of DECODE_STEPS greedy tokens (the
    scanned decoder's prefill and decode methods), and the cache."""
    model = Qwen3VL(CONFIG)
    cache = init_cache(CONFIG, batch=inputs.input_ids.shape[0], length=slots)
    logits, cache = model.apply({"params": params}, inputs, cache, method=Qwen3VL.prefill)
    steps, position = [logits], inputs.positions.max(axis=(1, 2)) + 1
    for step in range(DECODE_STEPS):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits, cache = model.apply({"params": params}, token, position + step, cache, method=Qwen3VL.decode)
        steps.append(logits)
    return jnp.stack(steps, axis=1), cache


@pytest.fixture(scope="module")
def single_device_logits(single, inputs):
    model_inputs, _ = single.prepare(**inputs, seq_len=PROMPT_LENGTH)
    run = jax.jit(lambda p, x: _prefill_then_decode(p, x, slots=PROMPT_LENGTH + DECODE_STEPS)[0])
    return np.asarray(run(single.params, model_inputs))


@pytest.mark.parametrize("sizes", MESHES.values(), ids=MESHES.keys())
def test_context_parallel_prefill_and_decode_give_the_single_device_tokens_and_logits(
    single, inputs, single_device_logits, sizes
):
    mesh = make_mesh(sizes)
    params = jax.device_put(single.params, param_shardings(abstract_params(CONFIG, boxed=True), mesh))
    model = qwen3vl_jax.Qwen3VLModel(CONFIG, params, mesh=mesh)
    greedy = dict(max_new_tokens=NEW, eos_token_ids=None, return_logprobs=True)
    tokens, logprobs = model.generate(**inputs, **greedy)
    expected_tokens, expected_logprobs = single.generate(**inputs, **greedy)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-5, rtol=0)

    model_inputs, _ = model.prepare(**inputs, seq_len=PROMPT_LENGTH)  # patches laid out per shard (align_patches)
    batch, length = model_inputs.input_ids.shape
    with model._on_mesh():
        run = jax.jit(lambda p, x: _prefill_then_decode(p, x, slots=DECODE_STEPS))
        logits, cache = run(params, model._batch_split(model_inputs))
        np.testing.assert_allclose(logits, single_device_logits, atol=1e-5, rtol=0)

        # the prompt's keys and values stay split: length over context, kv heads over tensor
        kv_heads, head_dim = CONFIG.text.num_key_value_heads, CONFIG.text.head_dim
        block = cache.prompt_k[0]
        assert block.shape == (batch, kv_heads, length, head_dim)
        shard = (batch, kv_heads // sizes.get("tensor", 1), length // sizes["context"], head_dim)
        assert block.sharding.shard_shape(block.shape) == shard
        assert cache.k[0].shape[2] == DECODE_STEPS  # the slots hold the new tokens only

        # a decode step reads the block where it is: no collective moves an array of the block's length
        decode = jax.jit(
            lambda p, c: Qwen3VL(CONFIG).apply(
                {"params": p}, jnp.zeros(batch, jnp.int32), jnp.full(batch, length, jnp.int32), c, method=Qwen3VL.decode
            )
        )
        hlo = decode.lower(params, cache).compile().as_text()
    moved = re.findall(r"= \w+\[([\d,]*)\]\S* (?:all-gather|all-to-all|collective-permute)\(", hlo)
    assert moved == [] or all(str(length) not in shape.split(",") for shape in moved), moved


def test_prompt_block_attention_with_a_fully_padded_shard(single):
    """A short prompt whose real tokens all sit on some context shards: the others see no key of the query's
    segment and must add nothing (their partial softmax has no maximum)."""
    rng = np.random.default_rng(3)
    short = batch_inputs(CONFIG, [build_prompt(CONFIG, [("text", 5)], rng=rng)])
    mesh = make_mesh({"context": 8})
    model = qwen3vl_jax.Qwen3VLModel(CONFIG, single.params, mesh=mesh)
    greedy = dict(max_new_tokens=4, eos_token_ids=None, return_logprobs=True)
    tokens, logprobs = model.generate(**short, **greedy)
    expected_tokens, expected_logprobs = single.generate(**short, **greedy)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-5, rtol=0)


def test_a_prompt_that_does_not_split_over_the_context_shards_is_refused(single):
    model_inputs, _ = single.prepare(
        **batch_inputs(CONFIG, [build_prompt(CONFIG, [("text", 5)], rng=np.random.default_rng(0))]), seq_len=72
    )
    with jax.set_mesh(make_mesh({"context": 8})), nn.logical_axis_rules(DEFAULT_RULES):
        with pytest.raises(ValueError, match="cannot be split over 8 context shards: the length must be a multiple"):
            jax.jit(lambda p, x: _prefill_then_decode(p, x, slots=DECODE_STEPS)).lower(single.params, model_inputs)


def test_yarn_factor_is_the_rope_scaling_of_qwens_model_cards():
    """with_yarn writes the config transformers reads from a `rope_scaling` {"rope_type": "yarn", "factor",
    "original_max_position_embeddings"} entry (whose logits equal transformers': test_splash.py)."""
    hf = to_hf(CONFIG)
    hf["text_config"]["rope_scaling"].update(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=CONFIG.text.max_position_embeddings
    )
    hf["text_config"]["max_position_embeddings"] = 4 * CONFIG.text.max_position_embeddings
    assert with_yarn(CONFIG, factor=4) == from_hf(hf, dtype=CONFIG.dtype, param_dtype=CONFIG.param_dtype)
    assert from_hf(to_hf(with_yarn(CONFIG, factor=4))) == from_hf(hf)
    with pytest.raises(ValueError, match="already uses YaRN"):
        with_yarn(with_yarn(CONFIG, factor=4), factor=2)
    with pytest.raises(ValueError, match="factor must be > 1"):
        with_yarn(CONFIG, factor=1.0)
