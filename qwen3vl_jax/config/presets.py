"""Presets: the released checkpoints' config.json values (they share vocab, rope and the vision patching) and
tiny configs for tests."""

from __future__ import annotations

from typing import Any

from qwen3vl_jax.config.model import ModelConfig, TextConfig, VisionConfig

# what the released models share: vocabulary, rope, the ViT's position table; two ViT sizes
_RELEASED_TEXT = dict(vocab_size=151936, head_dim=128, rope_theta=5_000_000.0, mrope_section=(24, 20, 20))
_RELEASED_TEXT.update(rms_norm_eps=1e-6, max_position_embeddings=262144)
_SMALL_VIT = dict(
    depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, deepstack_visual_indexes=(5, 11, 17)
)
_LARGE_VIT = dict(
    depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, deepstack_visual_indexes=(8, 16, 24)
)


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
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (see PRESETS) with optional ModelConfig overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
