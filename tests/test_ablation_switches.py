"""The ablation switches change the computation exactly where they should."""

import numpy as np
import pytest
import transformers
from hf_reference import batch_inputs, build_prompt, hf_logits

import qwen3vl_jax
from qwen3vl_jax.config import to_hf

VISUAL = [("text", 3), ("image", (6, 8)), ("text", 2), ("video", (2, 4, 4)), ("text", 4)]
TEXT = [("text", 15)]


@pytest.fixture(scope="module")
def inputs(tiny):
    rng = np.random.default_rng(5)
    return {
        name: batch_inputs(tiny.config, [build_prompt(tiny.config, parts, rng=rng)])
        for name, parts in (("visual", VISUAL), ("text", TEXT))
    }


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


def test_without_vision_positions_the_vit_ignores_where_patches_are(tiny, rng):
    """vision_positions=False: no learned position embedding and no 2-D rotary, so permuting an image's 2x2
    merge windows permutes its merged tokens (and nothing else); with positions the tokens change."""
    config, m = tiny.config, tiny.config.vision.spatial_merge_size
    grid = np.array([[1, 4, 6]])
    pixels = rng.standard_normal((24, config.vision.patch_dim)).astype(np.float32)
    order = rng.permutation(24 // m**2)
    permuted = pixels.reshape(-1, m**2, pixels.shape[-1])[order].reshape(pixels.shape)
    blind = qwen3vl_jax.load_pretrained(tiny.path, vision_positions=False)
    merged, deepstack = blind.encode_vision(pixels, grid)
    merged_permuted, deepstack_permuted = blind.encode_vision(permuted, grid)
    np.testing.assert_allclose(merged_permuted, merged[order], atol=1e-5, rtol=0)
    for a, b in zip(deepstack_permuted, deepstack):
        np.testing.assert_allclose(a, b[order], atol=1e-5, rtol=0)
    seeing, _ = tiny.ours.encode_vision(pixels, grid)
    assert np.abs(tiny.ours.encode_vision(permuted, grid)[0] - seeing[order]).max() > 1e-2
    assert np.abs(seeing - merged).max() > 1e-2
