"""KV-cache generation: greedy tokens equal transformers' generate; sampling is reproducible and its filters
behave as documented; rows stop at eos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import batch_inputs, build_prompt

from qwen3vl_jax.inference.generation import generate
from qwen3vl_jax.inference.sampling import SamplingConfig, next_token

PROMPTS = {
    "text": [[("text", 12)]],
    "image": [[("text", 5), ("image", (6, 4)), ("text", 7)]],
    "video": [[("text", 3), ("video", (2, 4, 6)), ("text", 4)]],
    "left_padded_batch": [
        [("text", 3), ("image", (4, 4)), ("text", 9)],
        [("text", 2), ("image", (6, 8)), ("video", (2, 4, 4)), ("text", 5)],
    ],
}
NEW = 10


def prompt(config, case, seed=0):
    rng = np.random.default_rng(seed)
    return batch_inputs(config, [build_prompt(config, parts, rng=rng) for parts in PROMPTS[case]])


@pytest.mark.parametrize("case", PROMPTS)
def test_greedy_equals_transformers_generate(tiny, case):
    inputs = prompt(tiny.config, case)
    with torch.no_grad():
        ref = tiny.hf.generate(
            **{k: torch.from_numpy(v) for k, v in inputs.items()},
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    ours = tiny.ours.generate(**inputs, max_new_tokens=NEW, eos_token_ids=None)
    np.testing.assert_array_equal(ours, ref[:, inputs["input_ids"].shape[1] :].numpy())


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    inputs = prompt(tiny.config, "left_padded_batch")
    greedy = tiny.ours.generate(**inputs, max_new_tokens=NEW, eos_token_ids=None)

    def sample(seed, **kw):
        return tiny.ours.generate(**inputs, max_new_tokens=NEW, eos_token_ids=None, do_sample=True, seed=seed, **kw)

    np.testing.assert_array_equal(sample(3, temperature=0.7, top_p=0.9), sample(3, temperature=0.7, top_p=0.9))
    assert not np.array_equal(sample(3, temperature=2.0), sample(4, temperature=2.0))
    np.testing.assert_array_equal(sample(5, top_k=1), greedy)
    np.testing.assert_array_equal(sample(6, top_p=1e-6), greedy)  # the nucleus holds the argmax alone


def test_the_samplers_log_probabilities_equal_those_of_a_forward_pass_over_the_completion(tiny):
    """What a policy-gradient update recomputes: each sampled token's log-probability under the model, from a
    teacher-forced forward pass over prompt + completion (images and a video, left-padded rows), equals the one
    the sampler recorded (fp32); greedy decoding with logprobs returns the same tokens as without."""
    inputs = prompt(tiny.config, "left_padded_batch")
    settings = dict(max_new_tokens=NEW, eos_token_ids=None, do_sample=True, temperature=0.7, top_k=50, seed=2)
    tokens, logprobs = tiny.ours.generate(**inputs, return_logprobs=True, **settings)
    np.testing.assert_array_equal(tokens, tiny.ours.generate(**inputs, **settings))
    full = dict(inputs, input_ids=np.concatenate([inputs["input_ids"], tokens], axis=1))
    full["attention_mask"] = np.concatenate([inputs["attention_mask"], np.ones_like(tokens)], axis=1)
    full.pop("mm_token_type_ids", None)
    logits = tiny.ours(**full).astype(np.float64)
    length = inputs["input_ids"].shape[1]
    predicting = logits[:, length - 1 : length - 1 + NEW]  # position t predicts token t + 1
    log_softmax = predicting - predicting.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs, expected, atol=1e-4, rtol=0)
    assert (logprobs < 0).all() and logprobs.min() < -1.0  # sampled at temperature 0.7: not all near-certain


def test_rows_stop_at_eos_and_are_padded(tiny):
    inputs = prompt(tiny.config, "left_padded_batch")
    greedy = tiny.ours.generate(**inputs, max_new_tokens=NEW, eos_token_ids=None)
    eos = int(greedy[0, 3])
    stopped = tiny.ours.generate(**inputs, max_new_tokens=NEW, eos_token_ids=[eos], pad_token_id=-7)
    for row, full in zip(stopped, greedy):
        hits = np.flatnonzero(full == eos)
        end = hits[0] + 1 if len(hits) else NEW
        np.testing.assert_array_equal(row[:end], full[:end])
        assert (row[end:] == -7).all()
    assert (stopped[0, 4:] == -7).all()


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))

    def draw(config):
        return {int(next_token(logits, jax.random.PRNGKey(i), sampling=config)[0]) for i in range(200)}

    assert draw(SamplingConfig(do_sample=True)) == {0, 1, 2, 3}
    assert draw(SamplingConfig(do_sample=True, top_k=2)) == {0, 1}
    assert draw(SamplingConfig(do_sample=True, top_p=0.5)) == {0, 1}  # smallest set reaching 0.5: 0.4 + 0.3
    assert draw(SamplingConfig(do_sample=True, top_p=0.75)) == {0, 1, 2}
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
        SamplingConfig(do_sample=True, temperature=0.0)


@pytest.mark.parametrize(
    "arguments, named",
    [
        (dict(max_new_tokens=0), "max_new_tokens .* got 0"),
        (dict(max_new_tokens=-1), "max_new_tokens .* got -1"),
        (dict(max_new_tokens=2.5), "max_new_tokens .* got 2.5"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when sampling"),
        (dict(temperature=float("nan")), "temperature .* got nan"),
        (dict(do_sample=True, top_k=-1), "top_k .* got -1"),
        (dict(do_sample=True, top_k=1.5), "top_k .* got 1.5"),
        (dict(do_sample=True, top_k=10**6), "top_k must be at most the vocabulary size"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\] .* got 0.0"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\] .* got 1.5"),
        (dict(eos_token_ids=[5, 10**6]), r"eos_token_ids must be token ids in \[0, \d+\)"),
        (dict(pad_token_id=2**40), "pad_token_id must be one 32-bit integer"),
    ],
    ids=lambda value: value if isinstance(value, str) and " " not in value else None,
)
def test_bad_arguments_are_refused_naming_them(tiny, arguments, named):
    """Each bad argument stops generate with a ValueError that names it and its value, before any compile."""
    arguments = dict(dict(max_new_tokens=4), **arguments)
    with pytest.raises(ValueError, match=named):
        tiny.ours.generate(**prompt(tiny.config, "text"), **arguments)


def test_the_engine_checks_max_new_tokens_itself():
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive integer .* got 0"):
        generate(None, None, rng=None, eos_ids=None, pad_id=None, config=None, max_new_tokens=0, sampling=None)
