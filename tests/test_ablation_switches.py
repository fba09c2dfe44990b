"""The ablation switches change the computation exactly where they should."""

import numpy as np
import pytest
import torch
import transformers

import qwen3vl_jax
from hf_reference import batch_inputs, build_prompt, hf_logits
from qwen3vl_jax.config import to_hf

VISUAL = [("text", 3), ("image", (6, 8)), ("text", 2), ("video", (2, 4, 4)), ("text", 4)]
TEXT = [("text", 15)]


@pytest.fixture(scope="module")
def inputs(tiny):
    rng = np.random.default_rng(5)
    return {name: batch_inputs(tiny.config, [build_prompt(tiny.config, parts, rng)])
            for name, parts in (("visual", VISUAL), ("text", TEXT))}


def test_chunked_mrope_changes_visual_outputs_only(tiny, inputs):
    chunked = qwen3vl_jax.load_pretrained(tiny.path, mrope_layout="chunked")
    assert np.abs(chunked(**inputs["visual"]) - tiny.ours(**inputs["visual"])).max() > 1e-2
    # text-only positions are equal on the t, h and w axes, so the layout cannot matter
    np.testing.assert_array_equal(chunked(**inputs["text"]), tiny.ours(**inputs["text"]))


def test_deepstack_off_equals_a_model_without_deepstack(tiny, inputs):
    """deepstack=False drops the DeepStack mergers and their injection: it equals transformers with
    deepstack_visual_indexes=[] and the same remaining weights, and differs from the full model."""
    off = qwen3vl_jax.load_pretrained(tiny.path, deepstack=False)
    assert not any(k.startswith("deepstack") for k in off.params["visual"])
    hf_off = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**to_hf(off.config))).eval()
    missing, unexpected = hf_off.load_state_dict(tiny.hf.state_dict(), strict=False)
    assert not missing and all(k.startswith("model.visual.deepstack_merger_list.") for k in unexpected)
    visual = inputs["visual"]
    np.testing.assert_allclose(off(**visual), hf_logits(hf_off, visual), atol=1e-4, rtol=0)
    assert np.abs(off(**visual) - tiny.ours(**visual)).max() > 1e-2
    np.testing.assert_array_equal(off(**inputs["text"]), tiny.ours(**inputs["text"]))
