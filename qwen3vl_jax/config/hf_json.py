"""transformers' `config.json` (4.x form: rope_theta + rope_scaling; 5.x form: rope_parameters) <-> ModelConfig.
A missing key gets the transformers class default (`Qwen3VLTextConfig`, `Qwen3VLVisionConfig`,
`Qwen3VLMoeTextConfig`, whose defaults differ from the dense text config; for Qwen3.5 `Qwen3_5TextConfig`,
`Qwen3_5MoeTextConfig`, `Qwen3_5VisionConfig` and `Qwen3_5Config` of transformers 5.24)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from qwen3vl_jax.config.model import (
    DTYPES,
    LAYER_TYPES,
    QWEN3_5_FULL_ATTENTION_INTERVAL,
    ModelConfig,
    TextConfig,
    VisionConfig,
    interval_layer_types,
)

log = logging.getLogger(__name__)
# keys of an HF rope dict that describe the scaling itself (the rest: type, theta, MRoPE layout)
_ROPE_LAYOUT_KEYS = ("rope_type", "type", "rope_theta", "mrope_section", "mrope_interleaved")


_VISION_HF_KEYS = tuple(
    "depth hidden_size intermediate_size num_heads in_channels patch_size temporal_patch_size spatial_merge_size "
    "out_hidden_size num_position_embeddings deepstack_visual_indexes hidden_act initializer_range".split()
)
_TEXT_HF_KEYS = tuple(
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
    "hidden_act max_position_embeddings rms_norm_eps attention_bias initializer_range".split()
)
_MOE_HF_KEYS = ("moe_intermediate_size", "num_experts_per_tok", "decoder_sparse_step", "mlp_only_layers")
_MOE_HF_KEYS += ("router_aux_loss_coef",)
# transformers' Qwen3VLMoeTextConfig defaults differ from the dense text config.
_MOE_TEXT_DEFAULTS = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16)
_MOE_TEXT_DEFAULTS.update(num_key_value_heads=16, moe_intermediate_size=1408, num_experts_per_tok=4, num_experts=60)
_MOE_TEXT_DEFAULTS.update(decoder_sparse_step=1, mlp_only_layers=(), router_aux_loss_coef=0.001)
_TOP_HF_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """Builds a ModelConfig from a transformers `config.json` dict (4.x or 5.x form).

    4.x form: `text_config.rope_theta` + `text_config.rope_scaling`; 5.x form: `text_config.rope_parameters`
    (which wins when both are present, as in transformers). `overrides` are ModelConfig fields such as
    `dtype="bfloat16"` or `mrope_layout="chunked"`.
    """
    model_type = hf.get("model_type")
    if model_type in ("qwen3_5", "qwen3_5_moe"):
        return _from_hf_qwen3_5(hf, **overrides)
    if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
        raise ValueError(
            f"config.json model_type {model_type!r} is not a Qwen3-VL or Qwen3.5 model (expected 'qwen3_vl', "
            "'qwen3_vl_moe', 'qwen3_5' or 'qwen3_5_moe')"
        )
    vision_hf = hf.get("vision_config") or {}
    text_hf = hf.get("text_config") or {}

    vision = {k: vision_hf[k] for k in _VISION_HF_KEYS if k in vision_hf}
    vision_rope = vision_hf.get("rope_parameters") or {}
    vision["rope_theta"] = float(vision_rope.get("rope_theta", 10000.0))

    text: dict[str, Any] = dict(_MOE_TEXT_DEFAULTS) if model_type == "qwen3_vl_moe" else {}
    text.update({k: text_hf[k] for k in _TEXT_HF_KEYS if k in text_hf})
    if text_hf.get("num_key_value_heads") is None:  # transformers: None means "no GQA"
        text["num_key_value_heads"] = text.get("num_attention_heads", TextConfig.num_attention_heads)
    if text_hf.get("head_dim") is None:
        text.pop("head_dim", None)
    if model_type == "qwen3_vl_moe":
        text.update({k: text_hf[k] for k in _MOE_HF_KEYS if k in text_hf})
        text["num_experts"] = text_hf.get("num_experts", text_hf.get("num_local_experts", text["num_experts"]))

    rope = text_hf.get("rope_parameters") or text_hf.get("rope_scaling") or {}
    text["rope_theta"] = float(rope.get("rope_theta", text_hf.get("rope_theta", TextConfig.rope_theta)))
    text["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if text["rope_type"] != "default":
        scaling = {k: v for k, v in rope.items() if k not in _ROPE_LAYOUT_KEYS}
        # transformers: original_max_position_embeddings defaults to max_position_embeddings
        scaling.setdefault(
            "original_max_position_embeddings", text.get("max_position_embeddings", TextConfig.max_position_embeddings)
        )
        text["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items())
    text["mrope_section"] = tuple(rope.get("mrope_section", (24, 20, 20)))
    interleaved = rope.get("mrope_interleaved", True)
    if not interleaved:
        log.warning(
            "config.json sets mrope_interleaved=false: using the chunked MRoPE layout. Note that "
            "transformers ignores this flag and always computes the interleaved layout."
        )

    top = {k: hf[k] for k in _TOP_HF_KEYS if k in hf}
    # transformers 5.x reads only the top-level flag (its default is False), never text_config's.
    top["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    config = ModelConfig(
        vision=VisionConfig(**vision),
        text=TextConfig(**text),
        mrope_layout="interleaved" if interleaved else "chunked",
        dtype=_hf_dtype(hf),
        param_dtype=_hf_dtype(hf),
        **top,
    )
    return config.replace(**overrides) if overrides else config


def _hf_dtype(hf: dict) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def to_hf(config: ModelConfig) -> dict:
    """The transformers `config.json` dict for `config`: Qwen3-VL in the released (4.x) form, which transformers
    4.57 and 5.x both read; Qwen3.5 in the 5.x form of its released files (see `_to_hf_qwen3_5`)."""
    if config.text.is_qwen3_5:
        return _to_hf_qwen3_5(config)
    vision, text = config.vision, config.text
    if not config.deepstack:
        vision = dataclasses.replace(vision, deepstack_visual_indexes=())
    text_hf = {k: getattr(text, k) for k in _TEXT_HF_KEYS}
    text_hf.update(
        model_type=f"{config.model_type}_text",
        rope_theta=text.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_scaling=dict(
            rope_type=text.rope_type,
            mrope_section=list(text.mrope_section),
            mrope_interleaved=config.mrope_layout == "interleaved",
            **dict(text.rope_scaling),
        ),
    )
    if text.is_moe:
        text_hf.update(
            {k: getattr(text, k) for k in _MOE_HF_KEYS},
            num_experts=text.num_experts,
            mlp_only_layers=list(text.mlp_only_layers),
            norm_topk_prob=True,
        )
    vision_hf = {k: getattr(vision, k) for k in _VISION_HF_KEYS}
    vision_hf.update(
        model_type=config.model_type,
        deepstack_visual_indexes=list(vision.deepstack_visual_indexes),
        rope_parameters=dict(rope_type="axial", rope_theta=vision.rope_theta),
    )
    arch = "Qwen3VLMoeForConditionalGeneration" if text.is_moe else "Qwen3VLForConditionalGeneration"
    return dict(
        architectures=[arch],
        model_type=config.model_type,
        dtype=config.param_dtype,
        text_config=text_hf,
        vision_config=vision_hf,
        tie_word_embeddings=config.tie_word_embeddings,
        **{k: getattr(config, k) for k in _TOP_HF_KEYS},
    )


# Qwen3.5 (transformers 5.24 `models/qwen3_5`, `models/qwen3_5_moe`): class defaults of `Qwen3_5TextConfig`
_QWEN3_5_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=248320,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    attention_bias=False,
    initializer_range=0.02,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
)
_QWEN3_5_MOE_KEYS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "router_aux_loss_coef",
)
# `Qwen3_5MoeTextConfig` has no intermediate_size (every layer is sparse): 0 here, written only when set
_QWEN3_5_MOE_TEXT_DEFAULTS: dict[str, Any] = dict(
    _QWEN3_5_TEXT_DEFAULTS,
    hidden_size=2048,
    intermediate_size=0,
    num_hidden_layers=40,
    num_key_value_heads=2,
    num_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    router_aux_loss_coef=0.001,
)
# the rope values transformers fills in when the file has none: `PreTrainedConfig.default_theta`,
# `Qwen3_5TextConfig.__post_init__` (partial_rotary_factor) and `Qwen3_5TextRotaryEmbedding` (mrope_section)
_QWEN3_5_ROPE_THETA = 10000.0
_QWEN3_5_PARTIAL_ROTARY_FACTOR = 0.25
_QWEN3_5_MROPE_SECTION = (11, 11, 10)
# `Qwen3_5Config` defaults
_QWEN3_5_TOP_DEFAULTS = dict(
    image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054
)
_QWEN3_5_VISION_OUT_HIDDEN_SIZE = 3584  # `Qwen3_5VisionConfig.out_hidden_size`
_QWEN3_5_VISION_HF_KEYS = tuple(k for k in _VISION_HF_KEYS if k != "deepstack_visual_indexes")


def _from_hf_qwen3_5(hf: dict, **overrides: Any) -> ModelConfig:
    """`from_hf` for model_type qwen3_5 / qwen3_5_moe: transformers 5.24's defaults for absent keys; a key whose
    value transformers would not honour (it has no switch for it) is refused, naming the key."""
    model_type = hf["model_type"]
    moe = model_type == "qwen3_5_moe"
    text_hf = hf.get("text_config") or {}
    vision_hf = hf.get("vision_config") or {}
    rope = _qwen3_5_rope_dict(text_hf)
    _refuse_qwen3_5_keys_transformers_ignores(
        model_type, text_hf=text_hf, vision_hf=vision_hf, rope=rope, mrope_layout=overrides.get("mrope_layout")
    )

    defaults = _QWEN3_5_MOE_TEXT_DEFAULTS if moe else _QWEN3_5_TEXT_DEFAULTS
    for key in defaults:
        if key in text_hf and text_hf[key] is None:  # transformers' strict dataclass refuses null too
            raise ValueError(f"config.json text_config.{key} is null; give a value or leave the key out")
    text: dict[str, Any] = {k: text_hf.get(k, v) for k, v in defaults.items()}
    text.update(
        architecture="qwen3_5",
        # precedence of `PreTrainedConfig.convert_rope_params_to_dict`: the rope dict, then the text_config key,
        # then the default
        rope_theta=float(rope.get("rope_theta", text_hf.get("rope_theta", _QWEN3_5_ROPE_THETA))),
        partial_rotary_factor=float(
            rope.get("partial_rotary_factor", text_hf.get("partial_rotary_factor", _QWEN3_5_PARTIAL_ROTARY_FACTOR))
        ),
        mrope_section=tuple(rope.get("mrope_section", _QWEN3_5_MROPE_SECTION)),
        rope_type=rope.get("rope_type", rope.get("type", "default")),
        layer_types=_qwen3_5_layer_types(text_hf, num_hidden_layers=text["num_hidden_layers"]),
    )
    if text["rope_type"] != "default":
        scaling = {k: v for k, v in rope.items() if k not in (*_ROPE_LAYOUT_KEYS, "partial_rotary_factor")}
        scaling.setdefault("original_max_position_embeddings", text["max_position_embeddings"])
        text["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items())
    text_config = TextConfig(**text)
    if text_config.layer_kinds == dataclasses.replace(text_config, layer_types=()).layer_kinds:
        text_config = dataclasses.replace(text_config, layer_types=())  # the architecture's own pattern

    vision = {k: vision_hf[k] for k in _QWEN3_5_VISION_HF_KEYS if k in vision_hf}
    vision["rope_theta"] = float((vision_hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    vision["deepstack_visual_indexes"] = ()
    if "out_hidden_size" not in vision_hf and text_config.hidden_size != _QWEN3_5_VISION_OUT_HIDDEN_SIZE:
        raise ValueError(
            f"config.json vision_config has no out_hidden_size: transformers would build the merger with its default "
            f"{_QWEN3_5_VISION_OUT_HIDDEN_SIZE}, which does not match text_config.hidden_size "
            f"{text_config.hidden_size}; write vision_config.out_hidden_size explicitly"
        )

    top = {k: hf.get(k, default) for k, default in _QWEN3_5_TOP_DEFAULTS.items()}
    # `Qwen3_5(Moe)ForConditionalGeneration` ties lm_head by the top-level flag only (default False)
    top["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    if "tie_word_embeddings" in text_hf and bool(text_hf["tie_word_embeddings"]) != top["tie_word_embeddings"]:
        log.warning(
            "config.json text_config.tie_word_embeddings=%s differs from the top-level tie_word_embeddings=%s: "
            "following the top level, as transformers does",
            text_hf["tie_word_embeddings"],
            top["tie_word_embeddings"],
        )
    interleaved = rope.get("mrope_interleaved", True)
    config = ModelConfig(
        vision=VisionConfig(**vision),
        text=text_config,
        mrope_layout="interleaved" if interleaved else "chunked",
        dtype=_hf_dtype(hf),
        param_dtype=_hf_dtype(hf),
        **top,
    )
    return config.replace(**overrides) if overrides else config


def _qwen3_5_rope_dict(text_hf: dict) -> dict:
    """The text rope dict: `rope_scaling` or `rope_parameters` (transformers 5.24 prefers `rope_scaling`); both
    present and different is refused."""
    parameters, scaling = text_hf.get("rope_parameters"), text_hf.get("rope_scaling")
    if parameters and scaling and parameters != scaling:
        raise ValueError(
            f"config.json text_config has both rope_parameters {parameters} and rope_scaling {scaling}, which differ; "
            "keep one"
        )
    rope = scaling or parameters or {}
    if any(kind in rope for kind in LAYER_TYPES):
        raise ValueError(
            f"config.json text_config.rope_parameters {rope} is nested by layer type; Qwen3.5 has one rope for "
            "all layers"
        )
    return rope


def _qwen3_5_layer_types(text_hf: dict, *, num_hidden_layers: int) -> tuple[str, ...]:
    """`layer_types`, or the pattern `Qwen3_5TextConfig.__post_init__` builds from `full_attention_interval`."""
    if text_hf.get("layer_types") is not None:
        return tuple(text_hf["layer_types"])
    interval = text_hf.get("full_attention_interval", QWEN3_5_FULL_ATTENTION_INTERVAL)
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"config.json text_config.full_attention_interval {interval!r} must be a positive integer")
    return interval_layer_types(num_hidden_layers, full_attention_interval=interval)


def _refuse_qwen3_5_keys_transformers_ignores(
    model_type: str, *, text_hf: dict, vision_hf: dict, rope: dict, mrope_layout: str | None
) -> None:
    """Raises for a Qwen3.5 `config.json` value that transformers 5.24 reads past: the model it builds (and ours,
    which follows it) would silently differ from what the file says."""

    def refuse(key: str, value: Any, why: str) -> None:
        raise ValueError(f"config.json {key}={value!r} is not supported for model_type {model_type!r}: {why}")

    if not text_hf.get("attn_output_gate", True):
        refuse(
            "text_config.attn_output_gate",
            text_hf["attn_output_gate"],
            "transformers' Qwen3.5 attention always applies the output gate (q_proj has 2 x heads x head_dim rows)",
        )
    if not rope.get("mrope_interleaved", True) and mrope_layout != "chunked":
        refuse(
            "text_config.rope_parameters.mrope_interleaved",
            rope["mrope_interleaved"],
            "transformers' Qwen3.5 rotary is always interleaved; to load a checkpoint trained with the chunked "
            "MRoPE layout pass mrope_layout='chunked' explicitly",
        )
    if vision_hf.get("deepstack_visual_indexes"):
        refuse(
            "vision_config.deepstack_visual_indexes",
            vision_hf["deepstack_visual_indexes"],
            "Qwen3.5 has no DeepStack (transformers deletes the field)",
        )
    if model_type == "qwen3_5" and text_hf.get("num_experts"):
        refuse("text_config.num_experts", text_hf["num_experts"], "an MoE Qwen3.5 has model_type 'qwen3_5_moe'")
    if model_type == "qwen3_5_moe":
        if text_hf.get("mlp_only_layers"):
            refuse("text_config.mlp_only_layers", text_hf["mlp_only_layers"], "every Qwen3.5 MoE layer is sparse")
        if text_hf.get("decoder_sparse_step", 1) != 1:
            refuse(
                "text_config.decoder_sparse_step", text_hf["decoder_sparse_step"], "every Qwen3.5 MoE layer is sparse"
            )
        if not text_hf.get("norm_topk_prob", True):
            refuse(
                "text_config.norm_topk_prob",
                text_hf["norm_topk_prob"],
                "transformers' Qwen3.5 MoE router always renormalises the top-k probabilities",
            )


def _to_hf_qwen3_5(config: ModelConfig) -> dict:
    """`to_hf` for Qwen3.5: the released files' 5.x form, which `transformers.Qwen3_5Config(**d)` /
    `Qwen3_5MoeConfig(**d)` read into this model: explicit layer_types, rope_parameters with the partial rotary
    factor, out_hidden_size, no deepstack_visual_indexes."""
    text, vision = config.text, config.vision
    if text.is_moe and (text.mlp_only_layers or text.decoder_sparse_step != 1):
        raise ValueError(
            f"mlp_only_layers {text.mlp_only_layers} / decoder_sparse_step {text.decoder_sparse_step}: transformers' "
            "Qwen3.5 MoE makes every layer sparse and has no field for dense layers"
        )
    text_hf = {k: getattr(text, k) for k in _QWEN3_5_TEXT_DEFAULTS}
    if text.is_moe and not text.intermediate_size:
        del text_hf["intermediate_size"]  # not a `Qwen3_5MoeTextConfig` field (stored as a plain attribute if set)
    text_hf.update(
        model_type=f"{config.model_type}_text",
        layer_types=list(text.layer_kinds),
        rope_parameters=dict(
            rope_type=text.rope_type,
            rope_theta=text.rope_theta,
            partial_rotary_factor=text.partial_rotary_factor,
            mrope_section=list(text.mrope_section),
            mrope_interleaved=config.mrope_layout == "interleaved",
            **dict(text.rope_scaling),
        ),
        attn_output_gate=True,  # as in the released files; transformers always gates
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if text.is_moe:
        text_hf.update({k: getattr(text, k) for k in _QWEN3_5_MOE_KEYS})
    vision_hf = {k: getattr(vision, k) for k in _QWEN3_5_VISION_HF_KEYS}
    vision_hf.update(
        model_type=config.model_type, rope_parameters=dict(rope_type="axial", rope_theta=vision.rope_theta)
    )
    architecture = "Qwen3_5MoeForConditionalGeneration" if text.is_moe else "Qwen3_5ForConditionalGeneration"
    return dict(
        architectures=[architecture],
        model_type=config.model_type,
        dtype=config.param_dtype,
        text_config=text_hf,
        vision_config=vision_hf,
        tie_word_embeddings=config.tie_word_embeddings,
        **{k: getattr(config, k) for k in _TOP_HF_KEYS},
    )
