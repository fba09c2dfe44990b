"""Model configuration: frozen dataclasses, released presets, and HF `config.json` conversion.

Field names and defaults mirror the transformers classes (`Qwen3VLVisionConfig`, `Qwen3VLTextConfig`,
`Qwen3VLMoeTextConfig`) so that `from_hf` fills a missing key exactly as transformers would.
Three ablation switches have no HF counterpart and change the computation:

* `mrope_layout`: "interleaved" (Qwen3-VL: t h w t h w ... t t t t over the frequencies, as in
  `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`) or "chunked" (Qwen2-VL: t, h, w take consecutive
  blocks of frequencies).
* `deepstack`: False removes the DeepStack mergers and their injection into the decoder
  (`Qwen3VLTextModel._deepstack_process`).
* `vision_positions`: False turns off the ViT's learned position embedding and 2-D rotary, so
  visual tokens carry no position of their own and MRoPE is the model's only spatial signal (the controlled
  MRoPE ablation). The position-embedding table stays in the parameters (unused) so checkpoints keep their keys.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax.numpy as jnp

log = logging.getLogger(__name__)

MROPE_LAYOUTS = ("interleaved", "chunked")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "splash")
ROPE_TYPES = ("default", "yarn")
# keys of an HF rope dict that describe the scaling itself (the rest: type, theta, MRoPE layout)
_ROPE_LAYOUT_KEYS = ("rope_type", "type", "rope_theta", "mrope_section", "mrope_interleaved")
REMAT_POLICIES = ("none", "full", "dots")  # see modeling/remat.py
MOE_BACKENDS = ("megablox", "ragged_dot", "dense")  # see modeling/moe.py


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT and its patch mergers (`Qwen3VLVisionConfig`). Defaults are transformers' class defaults."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6  # hard-coded in transformers, not part of config.json
    initializer_range: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))
        _check(
            self.hidden_size % self.num_heads == 0,
            f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
        )
        _check(self.head_dim % 4 == 0, f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D rotary)")
        _check(
            math.isqrt(self.num_position_embeddings) ** 2 == self.num_position_embeddings,
            f"num_position_embeddings {self.num_position_embeddings} is not a perfect square",
        )
        idx = self.deepstack_visual_indexes
        _check(
            all(0 <= i < self.depth for i in idx) and list(idx) == sorted(set(idx)),
            f"deepstack_visual_indexes {idx} must be increasing block indices in [0, {self.depth})",
        )
        _check(
            self.hidden_act == "gelu_pytorch_tanh",
            f"vision hidden_act {self.hidden_act!r} is not supported (Qwen3-VL uses 'gelu_pytorch_tanh')",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch row: C * Tp * P * P (1536 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        """Width of one 2x2 merge window after the shuffle: D * m^2."""
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder (`Qwen3VLTextConfig`) including the MoE fields of `Qwen3VLMoeTextConfig`
    (num_experts = 0: dense)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0  # transformers' class default; released checkpoints use 5e6
    rope_type: str = "default"
    # YaRN parameters as in HF's rope dict (factor, original_max_position_embeddings, beta_fast, ...), as sorted
    # (key, value) pairs so that the config stays hashable
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    attention_bias: bool = False
    initializer_range: float = 0.02
    # MoE (`Qwen3VLMoeTextConfig`). Used by the MoE decoder.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0  # optional (ST-MoE); not part of transformers' objective

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads {self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        _check(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even")
        _check(
            len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
            f"mrope_section {self.mrope_section} must have 3 entries summing to head_dim/2 = {self.head_dim // 2}",
        )
        _check(self.hidden_act == "silu", f"text hidden_act {self.hidden_act!r} is not supported (Qwen3 uses 'silu')")
        object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
        _check(self.rope_type in ROPE_TYPES, f"rope_type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if self.rope_type == "yarn":
            _check("factor" in dict(self.rope_scaling), "yarn rope needs a 'factor'")
        if self.num_experts:
            _check(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]",
            )
            _check(
                self.moe_intermediate_size > 0,
                f"an MoE model needs moe_intermediate_size > 0, got {self.moe_intermediate_size}",
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer: int) -> bool:
        """Which decoder layers use the MoE block (the rule of `Qwen3VLMoeTextDecoderLayer.__init__`)."""
        return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Qwen3-VL model plus the switches that select what runs."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    mrope_layout: str = "interleaved"
    deepstack: bool = True
    vision_positions: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    splash_block_sizes: tuple[int, int] = (512, 512)  # (q, kv) blocks of the splash kernels; v5p default
    moe_backend: str = "ragged_dot"
    moe_tiling: tuple[int, int, int] = (512, 1024, 1024)  # (m, k, n) tiles of the megablox grouped matmul
    remat: str = "none"

    def __post_init__(self):
        _check(self.remat in REMAT_POLICIES, f"remat {self.remat!r} not in {REMAT_POLICIES}")
        object.__setattr__(self, "splash_block_sizes", tuple(self.splash_block_sizes))
        object.__setattr__(self, "moe_tiling", tuple(self.moe_tiling))
        _check(self.moe_backend in MOE_BACKENDS, f"moe_backend {self.moe_backend!r} not in {MOE_BACKENDS}")
        _check(
            len(self.moe_tiling) == 3 and all(t > 0 for t in self.moe_tiling),
            f"moe_tiling {self.moe_tiling} must be three positive (m, k, n) tile sizes",
        )
        _check(
            len(self.splash_block_sizes) == 2 and all(b > 0 and b % 128 == 0 for b in self.splash_block_sizes),
            f"splash_block_sizes {self.splash_block_sizes} must be two positive multiples of 128",
        )
        _check(self.mrope_layout in MROPE_LAYOUTS, f"mrope_layout {self.mrope_layout!r} not in {MROPE_LAYOUTS}")
        _check(self.dtype in DTYPES, f"dtype {self.dtype!r} not in {DTYPES}")
        _check(self.param_dtype in DTYPES, f"param_dtype {self.param_dtype!r} not in {DTYPES}")
        _check(
            self.attention_impl in ATTENTION_IMPLS, f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}"
        )
        _check(
            self.vision.out_hidden_size == self.text.hidden_size,
            f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size {self.text.hidden_size}",
        )
        _check(
            self.num_deepstack <= self.text.num_hidden_layers,
            f"{self.num_deepstack} DeepStack levels but only {self.text.num_hidden_layers} decoder layers",
        )
        ids = (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)
        _check(
            all(0 <= i < self.text.vocab_size for i in ids),
            f"special token ids {ids} must lie inside the vocabulary (size {self.text.vocab_size})",
        )

    @property
    def dense_kwargs(self) -> dict:
        """dtype / param_dtype for the modules' layers."""
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

    @property
    def num_deepstack(self) -> int:
        """Number of DeepStack levels that actually run (0 when the ablation switch is off)."""
        return len(self.vision.deepstack_visual_indexes) if self.deepstack else 0

    @property
    def model_type(self) -> str:
        return "qwen3_vl_moe" if self.text.is_moe else "qwen3_vl"

    def replace(self, **changes: Any) -> ModelConfig:
        """`dataclasses.replace`, also accepting dicts for `vision=` / `text=` (partial overrides)."""
        for name in ("vision", "text"):
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# transformers config.json <-> ModelConfig

_VISION_HF_KEYS = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "in_channels",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "out_hidden_size",
    "num_position_embeddings",
    "deepstack_visual_indexes",
    "hidden_act",
    "initializer_range",
)
_TEXT_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_bias",
    "initializer_range",
)
_MOE_HF_KEYS = (
    "moe_intermediate_size",
    "num_experts_per_tok",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
)
# transformers' Qwen3VLMoeTextConfig defaults differ from the dense text config.
_MOE_TEXT_DEFAULTS = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    moe_intermediate_size=1408,
    num_experts_per_tok=4,
    num_experts=60,
    decoder_sparse_step=1,
    mlp_only_layers=(),
    router_aux_loss_coef=0.001,
)
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


# --------------------------------------------------------------------------------------------------
# Presets: the released checkpoints' config.json values; they share vocab, rope and the vision patching.

_RELEASED_TEXT = dict(
    vocab_size=151936,
    head_dim=128,
    rope_theta=5_000_000.0,
    mrope_section=(24, 20, 20),
    rms_norm_eps=1e-6,
    max_position_embeddings=262144,
)
_SMALL_VIT = dict(
    depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, deepstack_visual_indexes=(5, 11, 17)
)
_LARGE_VIT = dict(
    depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, deepstack_visual_indexes=(8, 16, 24)
)


def _released(hidden, layers, heads, kv, ffn, vit, tie, **moe) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(out_hidden_size=hidden, num_position_embeddings=2304, **vit),
        text=TextConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=ffn,
            **_RELEASED_TEXT,
            **moe,
        ),
        tie_word_embeddings=tie,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


def _tiny(**changes) -> ModelConfig:
    """A few-kB model for tests: head_dim != hidden/heads, GQA, 2 DeepStack levels, 3 decoder layers."""
    config = ModelConfig(
        vision=VisionConfig(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=256,
            deepstack_visual_indexes=(0, 1),
        ),
        text=TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=5_000_000.0,
            mrope_section=(6, 5, 5),
        ),
        # the ids of processing.tokenizer.byte_tokenizer(), so tiny models train with it
        image_token_id=268,
        video_token_id=269,
        vision_start_token_id=265,
        vision_end_token_id=266,
    )
    return config.replace(**changes)


PRESETS = {
    "qwen3-vl-2b": lambda: _released(2048, 28, 16, 8, 6144, _SMALL_VIT, tie=True),
    "qwen3-vl-4b": lambda: _released(2560, 36, 32, 8, 9728, _SMALL_VIT, tie=True),
    "qwen3-vl-8b": lambda: _released(4096, 36, 32, 8, 12288, _LARGE_VIT, tie=False),
    "qwen3-vl-32b": lambda: _released(5120, 64, 64, 8, 25600, _LARGE_VIT, tie=False),
    "qwen3-vl-30b-a3b": lambda: _released(
        2048, 48, 32, 4, 6144, _LARGE_VIT, tie=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768
    ),
    "qwen3-vl-235b-a22b": lambda: _released(
        4096,
        94,
        64,
        4,
        12288,
        _LARGE_VIT,
        tie=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=1536,
    ),
    "tiny": _tiny,
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
