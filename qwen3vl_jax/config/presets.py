"""Presets: the released checkpoints' config.json values (they share vocab, rope and the vision patching) and
tiny configs for tests."""

from __future__ import annotations

from typing import Any

from qwen3vl_jax.config.model import ModelConfig, TextConfig, VisionConfig

# what the released models share: vocabulary, rope, the ViT's position table; two ViT sizes
_RELEASED_TEXT = dict(vocab_size=151936, head_dim=128, rope_theta=5_000_000.0, mrope_section=(24, 20, 20))
_RELEASED_TEXT.update(rms_norm_eps=1e-6, max_position_embeddings=262144)
_SMALL_VIT_SIZES = dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096)
_LARGE_VIT_SIZES = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304)
_SMALL_VIT = dict(_SMALL_VIT_SIZES, deepstack_visual_indexes=(5, 11, 17))
_LARGE_VIT = dict(_LARGE_VIT_SIZES, deepstack_visual_indexes=(8, 16, 24))


def _released(
    *, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vit: dict, tie: bool, expert_mlp: int = 0
) -> ModelConfig:
    """A released size: decoder width, depth, attention / kv heads, SwiGLU width, ViT, tied head; `expert_mlp`:
    an MoE decoder of 128 experts, top-8, of that width (both released MoE models)."""
    text = dict(_RELEASED_TEXT, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)
    text.update(num_key_value_heads=kv_heads, intermediate_size=mlp)
    if expert_mlp:
        text.update(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=expert_mlp)
    vision = VisionConfig(out_hidden_size=hidden, num_position_embeddings=2304, **vit)
    return ModelConfig(
        vision=vision, text=TextConfig(**text), tie_word_embeddings=tie, dtype="bfloat16", param_dtype="bfloat16"
    )


# Qwen3.5 (the released config.json files): shared vocabulary, head size, rope (rotary on a quarter of each head,
# interleaved MRoPE over 32 frequencies), delta-net key heads; three ViT sizes, none with DeepStack
_QWEN3_5_TEXT = dict(architecture="qwen3_5", vocab_size=248320, head_dim=256, rope_theta=10_000_000.0)
_QWEN3_5_TEXT.update(partial_rotary_factor=0.25, mrope_section=(11, 11, 10), rms_norm_eps=1e-6)
_QWEN3_5_TEXT.update(max_position_embeddings=262144, linear_conv_kernel_dim=4, linear_num_key_heads=16)
_QWEN3_5_TEXT.update(linear_key_head_dim=128, linear_value_head_dim=128)
_QWEN3_5_IDS = dict(
    image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054
)
# the two larger towers are Qwen3-VL's (without DeepStack)
_QWEN3_5_SMALL_VIT = dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072)
_QWEN3_5_MEDIUM_VIT = _SMALL_VIT_SIZES
_QWEN3_5_LARGE_VIT = _LARGE_VIT_SIZES


def _released_qwen3_5(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    linear_value_heads: int,
    vit: dict,
    tie: bool,
    mlp: int = 0,
    experts: int = 0,
    experts_per_token: int = 0,
    expert_mlp: int = 0,
) -> ModelConfig:
    """A released Qwen3.5 size: decoder width, depth, attention / kv heads, delta-net value heads, ViT, tied head;
    dense: the SwiGLU width `mlp`; MoE: `experts` routed experts, top-`experts_per_token`, of width `expert_mlp`,
    and one shared expert of the same width on every layer (no dense MLP: intermediate_size 0)."""
    text = dict(_QWEN3_5_TEXT, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)
    text.update(num_key_value_heads=kv_heads, linear_num_value_heads=linear_value_heads, intermediate_size=mlp)
    if experts:
        text.update(num_experts=experts, num_experts_per_tok=experts_per_token, moe_intermediate_size=expert_mlp)
        text.update(shared_expert_intermediate_size=expert_mlp)
    vision = VisionConfig(out_hidden_size=hidden, num_position_embeddings=2304, deepstack_visual_indexes=(), **vit)
    return ModelConfig(
        vision=vision,
        text=TextConfig(**text),
        tie_word_embeddings=tie,
        dtype="bfloat16",
        param_dtype="bfloat16",
        **_QWEN3_5_IDS,
    )


def _tiny(**changes) -> ModelConfig:
    """A few-kB model for tests: head_dim != hidden/heads, GQA, 2 DeepStack levels, 3 decoder layers."""
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    vision.update(num_position_embeddings=256, deepstack_visual_indexes=(0, 1))
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    text.update(num_key_value_heads=2, head_dim=32, rope_theta=5_000_000.0, mrope_section=(6, 5, 5))
    # the ids of processing.tokenizer.byte_tokenizer(), so tiny models train with it
    ids = dict(image_token_id=268, video_token_id=269, vision_start_token_id=265, vision_end_token_id=266)
    config = ModelConfig(vision=VisionConfig(**vision), text=TextConfig(**text), **ids)
    return config.replace(**changes)


def _tiny_qwen3_5(**text_changes) -> ModelConfig:
    """The tiny Qwen3.5 model: `_tiny`'s sizes with Qwen3.5's decoder (see PRESETS)."""
    text = dict(architecture="qwen3_5", num_hidden_layers=8, partial_rotary_factor=0.5, mrope_section=(3, 3, 2))
    text.update(linear_num_key_heads=2, linear_key_head_dim=32, linear_num_value_heads=4, linear_value_head_dim=24)
    return _tiny(text=dict(text, **text_changes), vision=dict(deepstack_visual_indexes=()))


PRESETS = {
    "qwen3-vl-2b": lambda: _released(hidden=2048, layers=28, heads=16, kv_heads=8, mlp=6144, vit=_SMALL_VIT, tie=True),
    "qwen3-vl-4b": lambda: _released(hidden=2560, layers=36, heads=32, kv_heads=8, mlp=9728, vit=_SMALL_VIT, tie=True),
    "qwen3-vl-8b": lambda: _released(
        hidden=4096, layers=36, heads=32, kv_heads=8, mlp=12288, vit=_LARGE_VIT, tie=False
    ),
    "qwen3-vl-32b": lambda: _released(
        hidden=5120, layers=64, heads=64, kv_heads=8, mlp=25600, vit=_LARGE_VIT, tie=False
    ),
    "qwen3-vl-30b-a3b": lambda: _released(
        hidden=2048, layers=48, heads=32, kv_heads=4, mlp=6144, vit=_LARGE_VIT, tie=False, expert_mlp=768
    ),
    "qwen3-vl-235b-a22b": lambda: _released(
        hidden=4096, layers=94, heads=64, kv_heads=4, mlp=12288, vit=_LARGE_VIT, tie=False, expert_mlp=1536
    ),
    # Qwen3.5 (Qwen3.6-27B and -35B-A3B have the configs of Qwen3.5-27B and -35B-A3B)
    "qwen3.5-0.8b": lambda: _released_qwen3_5(
        hidden=1024, layers=24, heads=8, kv_heads=2, mlp=3584, linear_value_heads=16, vit=_QWEN3_5_SMALL_VIT, tie=True
    ),
    "qwen3.5-2b": lambda: _released_qwen3_5(
        hidden=2048, layers=24, heads=8, kv_heads=2, mlp=6144, linear_value_heads=16, vit=_QWEN3_5_MEDIUM_VIT, tie=True
    ),
    "qwen3.5-4b": lambda: _released_qwen3_5(
        hidden=2560, layers=32, heads=16, kv_heads=4, mlp=9216, linear_value_heads=32, vit=_QWEN3_5_MEDIUM_VIT, tie=True
    ),
    "qwen3.5-9b": lambda: _released_qwen3_5(
        hidden=4096,
        layers=32,
        heads=16,
        kv_heads=4,
        mlp=12288,
        linear_value_heads=32,
        vit=_QWEN3_5_LARGE_VIT,
        tie=False,
    ),
    "qwen3.5-27b": lambda: _released_qwen3_5(
        hidden=5120,
        layers=64,
        heads=24,
        kv_heads=4,
        mlp=17408,
        linear_value_heads=48,
        vit=_QWEN3_5_LARGE_VIT,
        tie=False,
    ),
    "qwen3.5-35b-a3b": lambda: _released_qwen3_5(
        hidden=2048,
        layers=40,
        heads=16,
        kv_heads=2,
        linear_value_heads=32,
        experts=256,
        experts_per_token=8,
        expert_mlp=512,
        vit=_QWEN3_5_LARGE_VIT,
        tie=False,
    ),
    "qwen3.5-122b-a10b": lambda: _released_qwen3_5(
        hidden=3072,
        layers=48,
        heads=32,
        kv_heads=2,
        linear_value_heads=64,
        experts=256,
        experts_per_token=8,
        expert_mlp=1024,
        vit=_QWEN3_5_LARGE_VIT,
        tie=False,
    ),
    "qwen3.5-397b-a17b": lambda: _released_qwen3_5(
        hidden=4096,
        layers=60,
        heads=32,
        kv_heads=2,
        linear_value_heads=64,
        experts=512,
        experts_per_token=10,
        expert_mlp=1024,
        vit=_QWEN3_5_LARGE_VIT,
        tie=False,
    ),
    "tiny": _tiny,
    # the 2M-parameter model of the default run (configs/tiny.py), trained on a laptop CPU in minutes
    "tiny-cpu": lambda: _tiny(
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, rope_theta=1e4),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=128, num_position_embeddings=64),
    ),
    "tiny-tied": lambda: _tiny(tie_word_embeddings=True),
    # 8 experts, top-2; expert widths chosen so that no expert tensor is square (the loader tells the two
    # on-disk layouts apart by shape)
    "tiny-moe": lambda: _tiny(text=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48)),
    # Qwen3.5: 8 layers (two periods of 3 gated delta-net + 1 full attention), rotary on half of each head, key and
    # value heads of the delta-net of different counts and sizes, no DeepStack. Keys of 32 dims: with 16, random
    # keys are so correlated that a 64-token chunk's triangular solve loses ~1e-4 of the logits in float32
    "tiny-qwen3.5": lambda: _tiny_qwen3_5(),
    "tiny-qwen3.5-moe": lambda: _tiny_qwen3_5(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=56
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (see PRESETS) with optional ModelConfig overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
