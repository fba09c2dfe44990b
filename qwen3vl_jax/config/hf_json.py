"""transformers' `config.json` (4.x form: rope_theta + rope_scaling; 5.x form: rope_parameters) <-> ModelConfig.
A missing key gets the transformers class default (`Qwen3VLTextConfig`, `Qwen3VLVisionConfig`,
`Qwen3VLMoeTextConfig`, whose defaults differ from the dense text config)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from qwen3vl_jax.config.model import DTYPES, ModelConfig, TextConfig, VisionConfig

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
    if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
        raise ValueError(
            f"config.json model_type {model_type!r} is not a Qwen3-VL model (expected 'qwen3_vl' or 'qwen3_vl_moe')"
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
    """The transformers `config.json` dict for `config`, in the released (4.x) form, which transformers
    4.57 and 5.x both read."""
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
