"""Config presets, the HF config.json round trip, and parameter counts against transformers."""

import dataclasses

import jax
import pytest
import torch
import transformers

from qwen3vl_jax.config import PRESETS, from_hf, preset, to_hf
from qwen3vl_jax.modeling import abstract_params

RELEASED = ["qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b", "qwen3-vl-30b-a3b", "qwen3-vl-235b-a22b"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_round_trip(name):
    config = preset(name)
    assert from_hf(to_hf(config)) == config


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if not preset(n).text.is_qwen3_5))  # Qwen3.5: its own file
def test_transformers_reads_to_hf(name):
    """transformers parses what to_hf writes into the same numbers (rope, head_dim, tie, MoE fields)."""
    config = preset(name)
    cls = transformers.Qwen3VLMoeConfig if config.text.is_moe else transformers.Qwen3VLConfig
    hf = cls(**to_hf(config))
    t = hf.text_config
    assert t.rope_parameters["rope_theta"] == config.text.rope_theta
    assert tuple(t.rope_parameters["mrope_section"]) == config.text.mrope_section
    assert t.head_dim == config.text.head_dim and hf.tie_word_embeddings == config.tie_word_embeddings
    assert tuple(hf.vision_config.deepstack_visual_indexes) == config.vision.deepstack_visual_indexes
    if config.text.is_moe:
        assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (
            config.text.num_experts,
            config.text.num_experts_per_tok,
            config.text.moe_intermediate_size,
        )
    # and back: transformers' own 5.x serialisation reads into the same config
    assert from_hf(hf.to_dict()) == config


def test_hf_class_defaults_fill_missing_keys():
    """A minimal config.json gets transformers' class defaults, including rope_theta 500000 (not the released 5e6)."""
    config = from_hf({"model_type": "qwen3_vl", "vision_config": {"out_hidden_size": 4096}, "text_config": {}})
    hf = transformers.Qwen3VLConfig(vision_config={"out_hidden_size": 4096}, text_config={})
    assert config.text.rope_theta == hf.text_config.rope_parameters["rope_theta"] == 500000.0
    assert (config.text.head_dim, config.text.num_hidden_layers, config.vision.depth) == (
        hf.text_config.head_dim,
        hf.text_config.num_hidden_layers,
        hf.vision_config.depth,
    )
    assert config.tie_word_embeddings is False


@pytest.mark.parametrize("name", RELEASED)
def test_released_parameter_counts_equal_transformers(name):
    config = preset(name)
    with torch.device("meta"):
        if config.text.is_moe:
            hf = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(**to_hf(config)))
        else:
            hf = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**to_hf(config)))
    ours = sum(x.size for x in jax.tree_util.tree_leaves(abstract_params(config)))
    assert ours == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(text=dict(mrope_section=(24, 20, 21))), "mrope_section"),
        (dict(vision=dict(out_hidden_size=100)), "out_hidden_size 100 != text hidden_size"),
        (dict(text=dict(rope_type="longrope")), "rope_type 'longrope' is not supported"),
        (dict(text=dict(rope_type="yarn")), "yarn rope needs a 'factor'"),
        (dict(mrope_layout="diagonal"), "mrope_layout"),
        (dict(vision=dict(deepstack_visual_indexes=(2, 1))), "deepstack_visual_indexes"),
        (dict(dtype="float8"), "dtype"),
        (dict(text=dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=16)), "num_experts_per_tok 5"),
        (dict(text=dict(num_experts=4, num_experts_per_tok=2)), "moe_intermediate_size"),
        (dict(moe_backend="cutlass"), "moe_backend 'cutlass'"),
        (dict(moe_tiling=(128, 128)), "moe_tiling"),
    ],
)
def test_invalid_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **change)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("tiny").dtype = "bfloat16"
