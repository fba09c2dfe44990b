"""Qwen3.5 configs: the config.json round trip through transformers 5.24's `Qwen3_5Config` /
`Qwen3_5MoeConfig`, transformers' defaults for absent keys, refused values, and parameter counts of the released
sizes against transformers' models built on the meta device.

The round trip compares whole ModelConfigs: dtype and param_dtype both come from the file's one `dtype` (the
presets use the same value for both), and the run-time fields without an HF counterpart (attention_impl,
moe_backend, remat, ...) keep their defaults in every preset.
"""

import copy
import json

import jax
import pytest
import torch
import transformers
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

from qwen3vl_jax.config import PRESETS, ModelConfig, from_hf, preset, to_hf
from qwen3vl_jax.config.model import with_yarn
from qwen3vl_jax.modeling import abstract_params

RELEASED = sorted(name for name in PRESETS if name.startswith("qwen3.5-"))
TINY = ["tiny-qwen3.5", "tiny-qwen3.5-moe"]


def hf_config_class(model_type: str) -> type:
    return transformers.Qwen3_5MoeConfig if model_type == "qwen3_5_moe" else transformers.Qwen3_5Config


def assert_same_model(config: ModelConfig, hf: transformers.PreTrainedConfig) -> None:
    """Every field of `config` that transformers' Qwen3.5 model reads equals transformers' value in `hf`."""
    text, t = config.text, hf.text_config
    assert text.is_qwen3_5
    pairs = [
        (name, getattr(text, name), getattr(t, name))
        for name in (
            "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim hidden_act "
            "max_position_embeddings rms_norm_eps attention_bias initializer_range linear_conv_kernel_dim "
            "linear_key_head_dim linear_value_head_dim linear_num_key_heads linear_num_value_heads"
        ).split()
    ]
    if text.is_moe:
        for name in (
            "num_experts num_experts_per_tok moe_intermediate_size shared_expert_intermediate_size router_aux_loss_coef"
        ).split():
            pairs.append((name, getattr(text, name), getattr(t, name)))
    else:
        pairs.append(("intermediate_size", text.intermediate_size, t.intermediate_size))
    pairs.append(("layer_types", text.layer_kinds, tuple(t.layer_types)))
    pairs.append(("rope_theta", text.rope_theta, t.rope_parameters["rope_theta"]))
    pairs.append(("rope_type", text.rope_type, t.rope_parameters["rope_type"]))
    # the rotary module's own reading: its mrope_section default and rotary width (partial_rotary_factor)
    rotary = Qwen3_5TextRotaryEmbedding(t)
    pairs.append(("mrope_section", text.mrope_section, tuple(rotary.mrope_section)))
    pairs.append(("rotary_dim", text.rotary_dim, 2 * rotary.inv_freq.shape[0]))
    for name in (
        "depth hidden_size intermediate_size num_heads in_channels patch_size temporal_patch_size "
        "spatial_merge_size out_hidden_size num_position_embeddings hidden_act initializer_range"
    ).split():
        pairs.append((f"vision.{name}", getattr(config.vision, name), getattr(hf.vision_config, name)))
    pairs.append(("vision.rope_theta", config.vision.rope_theta, hf.vision_config.rope_parameters["rope_theta"]))
    assert config.vision.deepstack_visual_indexes == ()
    for name in "image_token_id video_token_id vision_start_token_id vision_end_token_id tie_word_embeddings".split():
        pairs.append((name, getattr(config, name), getattr(hf, name)))
    assert [p for p in pairs if p[1] != p[2]] == []


@pytest.mark.parametrize("name", TINY + RELEASED)
def test_to_hf_round_trip_through_transformers(name):
    config = preset(name)
    hf_dict = to_hf(config)
    hf = hf_config_class(config.model_type)(**copy.deepcopy(hf_dict))
    assert_same_model(config, hf)
    assert from_hf(hf.to_dict()) == config  # transformers' own serialisation
    assert from_hf(json.loads(json.dumps(hf_dict))) == config


@pytest.mark.parametrize(
    "make",
    [
        lambda: with_yarn(preset("tiny-qwen3.5"), factor=4),
        lambda: preset("tiny-qwen3.5-moe", tie_word_embeddings=True),
        lambda: preset("tiny-qwen3.5", text=dict(layer_types=("full_attention", "linear_attention") * 4)),
    ],
    ids=["yarn", "moe-tied", "own-layer-types"],
)
def test_variants_round_trip_through_transformers(make):
    config = make()
    hf = hf_config_class(config.model_type)(**to_hf(config))
    assert_same_model(config, hf)
    assert from_hf(hf.to_dict()) == config
    if config.text.rope_type == "yarn":
        assert {k: hf.text_config.rope_parameters[k] for k in dict(config.text.rope_scaling)} == dict(
            config.text.rope_scaling
        )


def test_chunked_mrope_round_trips_only_when_asked_for():
    """transformers has no chunked layout for Qwen3.5: the file says mrope_interleaved=false, and reading it back
    needs the explicit override."""
    config = preset("tiny-qwen3.5", mrope_layout="chunked")
    hf_dict = to_hf(config)
    assert hf_dict["text_config"]["rope_parameters"]["mrope_interleaved"] is False
    assert from_hf(hf_dict, mrope_layout="chunked") == config
    with pytest.raises(ValueError, match="mrope_interleaved"):
        from_hf(hf_dict)


@pytest.mark.parametrize(
    "model_type, text_config, vision_config",
    [
        ("qwen3_5", {"num_hidden_layers": 6, "hidden_size": 3584}, {"depth": 2}),
        ("qwen3_5", {"num_hidden_layers": 6, "full_attention_interval": 2}, {"out_hidden_size": 4096}),
        ("qwen3_5", {"rope_theta": 5e6, "num_hidden_layers": 3}, {"out_hidden_size": 4096}),
        ("qwen3_5", {"rope_parameters": {"rope_type": "default"}}, {"out_hidden_size": 4096}),
        ("qwen3_5_moe", {"num_hidden_layers": 5}, {"out_hidden_size": 2048}),
        ("qwen3_5_moe", {"hidden_size": 3584, "num_experts": 16}, {}),
    ],
)
def test_minimal_config_gets_transformers_defaults(model_type, text_config, vision_config):
    """Absent keys get what transformers' classes fill in (rope theta 1e4, partial rotary 0.25, MRoPE sections
    [11, 11, 10], out_hidden_size 3584, layer_types every 4th full, the Qwen3.5 token ids, untied)."""
    hf_dict = {"model_type": model_type, "text_config": text_config, "vision_config": vision_config}
    config = from_hf(copy.deepcopy(hf_dict))
    hf = hf_config_class(model_type)(**copy.deepcopy(hf_dict))
    assert_same_model(config, hf)
    assert config.model_type == model_type and config.dtype == config.param_dtype == "float32"


def test_released_file_form_reads_as_the_preset():
    """A config.json in the released files' form (explicit layer_types beside full_attention_interval, vision
    model_type 'qwen3_5_moe', empty deepstack_visual_indexes, MTP and other keys transformers does not read, no
    intermediate_size) reads as the preset and as transformers reads it."""
    config = preset("qwen3.5-35b-a3b")
    layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(40)]
    hf_dict = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "attention_bias": False,
            "attn_output_gate": True,
            "dtype": "bfloat16",
            "eos_token_id": 248044,
            "full_attention_interval": 4,
            "head_dim": 256,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "layer_types": layer_types,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "linear_value_head_dim": 128,
            "mamba_ssm_dtype": "float32",
            "max_position_embeddings": 262144,
            "mlp_only_layers": [],
            "moe_intermediate_size": 512,
            "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False,
            "num_attention_heads": 16,
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 40,
            "num_key_value_heads": 2,
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-06,
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": 512,
            "use_cache": True,
            "vocab_size": 248320,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": [11, 11, 10],
                "rope_type": "default",
                "rope_theta": 10000000,
                "partial_rotary_factor": 0.25,
            },
            "partial_rotary_factor": 0.25,
        },
        "vision_config": {
            "model_type": "qwen3_5_moe",
            "deepstack_visual_indexes": [],
            "depth": 27,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1152,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": 4304,
            "num_heads": 16,
            "num_position_embeddings": 2304,
            "out_hidden_size": 2048,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "dtype": "bfloat16",
    }
    assert from_hf(copy.deepcopy(hf_dict)) == config
    assert_same_model(config, transformers.Qwen3_5MoeConfig(**copy.deepcopy(hf_dict)))


@pytest.mark.parametrize(
    "top, text, tied", [(True, False, True), (False, True, False), (None, True, False), (True, None, True)]
)
def test_only_the_top_level_flag_ties(top, text, tied):
    """`Qwen3_5ForConditionalGeneration` ties lm_head by the top-level tie_word_embeddings alone."""
    hf_dict = to_hf(preset("tiny-qwen3.5"))
    for where, value in ((hf_dict, top), (hf_dict["text_config"], text)):
        where.pop("tie_word_embeddings")
        if value is not None:
            where["tie_word_embeddings"] = value
    assert from_hf(copy.deepcopy(hf_dict)).tie_word_embeddings is tied
    with torch.device("meta"):
        model = transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(**hf_dict))
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) is tied


@pytest.mark.parametrize("name", RELEASED + TINY)
def test_parameter_counts_equal_transformers(name):
    """Our parameter tree (jax.eval_shape) holds as many numbers as transformers' model of the same config.json
    (built on the meta device; a tied lm_head counted once)."""
    config = preset(name)
    model_class = (
        transformers.Qwen3_5MoeForConditionalGeneration
        if config.text.is_moe
        else transformers.Qwen3_5ForConditionalGeneration
    )
    with torch.device("meta"):
        model = model_class(hf_config_class(config.model_type)(**to_hf(config)))
    theirs = sum(p.numel() for p in model.parameters())
    ours = sum(leaf.size for leaf in jax.tree_util.tree_leaves(abstract_params(config)))
    assert ours == theirs


_DROP = object()


def _set(path: str, value=_DROP):
    """A change of to_hf's dict: `value` at the dotted `path` (no value: the key removed)."""

    def change(hf_dict: dict) -> None:
        *parents, key = path.split(".")
        where = hf_dict
        for parent in parents:
            where = where[parent]
        if value is _DROP:
            where.pop(key, None)
        else:
            where[key] = value

    return change


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("tiny-qwen3.5", [_set("text_config.attn_output_gate", False)], "text_config.attn_output_gate"),
        (
            "tiny-qwen3.5",
            [_set("text_config.rope_parameters.mrope_interleaved", False)],
            "text_config.rope_parameters.mrope_interleaved",
        ),
        ("tiny-qwen3.5", [_set("vision_config.deepstack_visual_indexes", [0, 1])], "deepstack_visual_indexes"),
        ("tiny-qwen3.5", [_set("text_config.num_experts", 4)], "text_config.num_experts"),
        ("tiny-qwen3.5-moe", [_set("text_config.mlp_only_layers", [1])], "text_config.mlp_only_layers"),
        ("tiny-qwen3.5-moe", [_set("text_config.decoder_sparse_step", 2)], "text_config.decoder_sparse_step"),
        ("tiny-qwen3.5-moe", [_set("text_config.norm_topk_prob", False)], "text_config.norm_topk_prob"),
        ("tiny-qwen3.5", [_set("vision_config.out_hidden_size")], "vision_config has no out_hidden_size"),
        ("tiny-qwen3.5", [_set("text_config.head_dim", None)], "text_config.head_dim is null"),
        ("tiny-qwen3.5", [_set("text_config.rope_scaling", {"rope_type": "default"})], "rope_scaling"),
        (
            "tiny-qwen3.5",
            [_set("text_config.layer_types"), _set("text_config.full_attention_interval", 0)],
            "full_attention_interval",
        ),
        ("tiny-qwen3.5", [_set("text_config.layer_types", ["full_attention"] * 3)], "layer_types has 3 entries"),
        ("tiny-qwen3.5", [_set("text_config.layer_types", ["sliding_attention"] * 8)], "sliding_attention"),
        ("tiny-qwen3.5", [_set("model_type", "qwen3_6")], "'qwen3_6'"),
    ],
)
def test_refused_inputs_name_the_key(name, changes, message):
    hf_dict = to_hf(preset(name))
    for change in changes:
        change(hf_dict)
    with pytest.raises(ValueError, match=message):
        from_hf(hf_dict)


def test_keys_transformers_does_not_read_are_accepted():
    config = preset("tiny-qwen3.5-moe")
    hf_dict = to_hf(config)
    hf_dict["text_config"].update(
        mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False,
        mamba_ssm_dtype="float32",
        norm_topk_prob=True,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        full_attention_interval=4,
        eos_token_id=248044,
        use_cache=True,
    )
    hf_dict.update(bos_token_id=1, pad_token_id=2, transformers_version="5.24.0")
    assert from_hf(hf_dict) == config


def test_to_hf_refuses_dense_layers_in_a_qwen3_5_moe():
    with pytest.raises(ValueError, match="mlp_only_layers"):
        to_hf(preset("tiny-qwen3.5-moe", text=dict(mlp_only_layers=(1,))))
