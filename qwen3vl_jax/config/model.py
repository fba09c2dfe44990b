"""The model configuration as frozen dataclasses, checked when built.

Field names and defaults mirror the transformers classes (`Qwen3VLVisionConfig`, `Qwen3VLTextConfig`,
`Qwen3VLMoeTextConfig`) so that `config.hf_json.from_hf` fills a missing key exactly as transformers would.
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
import math
from typing import Any

import jax.numpy as jnp

from qwen3vl_jax.config.delta_net import GatedDeltaNetConfig
from qwen3vl_jax.config.lora import LORA_TARGETS, LoraConfig  # noqa: F401 (re-exported)

MROPE_LAYOUTS = ("interleaved", "chunked")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "splash")
ROPE_TYPES = ("default", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "offload")  # see modeling/remat.py
MOE_BACKENDS = ("megablox", "ragged_dot", "dense", "blocked")  # see modeling/moe.py
ARCHITECTURES = ("qwen3_vl", "qwen3_5")
FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"  # transformers' `layer_types` values
LAYER_TYPES = (FULL_ATTENTION, LINEAR_ATTENTION)
QWEN3_5_FULL_ATTENTION_INTERVAL = 4  # transformers' `Qwen3_5TextConfig` default


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


def interval_layer_types(num_layers: int, *, full_attention_interval: int) -> tuple[str, ...]:
    """Qwen3.5's layer pattern (`Qwen3_5TextConfig.__post_init__`): every `full_attention_interval`-th layer full
    attention, the others linear attention."""
    return tuple(
        FULL_ATTENTION if (i + 1) % full_attention_interval == 0 else LINEAR_ATTENTION for i in range(num_layers)
    )


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder (`Qwen3VLTextConfig`) including the MoE fields of `Qwen3VLMoeTextConfig`
    (num_experts = 0: dense), and Qwen3.5's (`Qwen3_5TextConfig`, `Qwen3_5MoeTextConfig`) when architecture is
    "qwen3_5": gated delta-net layers among the full-attention ones (`layer_types`, the `linear_*` sizes), an
    output gate on full attention, rotary on the first partial_rotary_factor of each head, zero-centred RMSNorm
    weights (1 + w) and, for MoE, a shared expert beside the routed ones. transformers has no switches for the
    last three (they always come with the architecture), so neither do we."""

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
    # Qwen3.5 (architecture "qwen3_5"); the defaults are those of Qwen3-VL, where they change nothing
    architecture: str = "qwen3_vl"
    # per layer "full_attention" or "linear_attention"; () = the architecture's pattern (`layer_kinds`)
    layer_types: tuple[str, ...] = ()
    partial_rotary_factor: float = 1.0  # rotary on the first int(head_dim * factor) dims of each head
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    shared_expert_intermediate_size: int = 0  # Qwen3.5 MoE: the shared expert's SwiGLU width

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        _check(
            self.architecture in ARCHITECTURES,
            f"text architecture {self.architecture!r} is not one of {ARCHITECTURES}",
        )
        _check(
            not self.layer_types or len(self.layer_types) == self.num_hidden_layers,
            f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers",
        )
        _check(
            set(self.layer_types) <= set(LAYER_TYPES),
            f"layer_types {sorted(set(self.layer_types) - set(LAYER_TYPES))} are not among {LAYER_TYPES}",
        )
        _check(
            self.architecture == "qwen3_5" or LINEAR_ATTENTION not in self.layer_kinds,
            "linear_attention layers are a Qwen3.5 layer kind: set architecture='qwen3_5'",
        )
        _check(
            0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0,
            f"partial_rotary_factor {self.partial_rotary_factor} must give an even number of rotary dims in "
            f"(0, head_dim={self.head_dim}], got {self.rotary_dim}",
        )
        _check(
            self.linear_num_value_heads % self.linear_num_key_heads == 0,
            f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
            f"linear_num_key_heads {self.linear_num_key_heads}",
        )
        _check(
            self.architecture == "qwen3_5" or not self.shared_expert_intermediate_size,
            "shared_expert_intermediate_size is a Qwen3.5 MoE field: set architecture='qwen3_5'",
        )
        _check(
            not (self.architecture == "qwen3_5" and self.is_moe)
            or (not self.mlp_only_layers and self.decoder_sparse_step == 1),
            f"every layer of a Qwen3.5 MoE model is sparse (transformers has no dense ones), but mlp_only_layers is "
            f"{self.mlp_only_layers} and decoder_sparse_step {self.decoder_sparse_step}",
        )
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads {self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        _check(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even")
        _check(
            len(self.mrope_section) == 3 and sum(self.mrope_section) == self.rotary_dim // 2,
            f"mrope_section {self.mrope_section} must have 3 entries summing to the rotary dims / 2 = "
            f"{self.rotary_dim // 2}",
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

    @property
    def is_qwen3_5(self) -> bool:
        """Qwen3.5's gated attention, zero-centred norms and (MoE) shared expert."""
        return self.architecture == "qwen3_5"

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head the rotary embedding turns (transformers: int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Each layer's token mixer: `layer_types`, or the architecture's pattern: Qwen3-VL all full attention,
        Qwen3.5 a full-attention layer after every three linear ones (`full_attention_interval` 4)."""
        if self.layer_types:
            return self.layer_types
        if self.architecture == "qwen3_5":
            return interval_layer_types(self.num_hidden_layers, full_attention_interval=QWEN3_5_FULL_ATTENTION_INTERVAL)
        return (FULL_ATTENTION,) * self.num_hidden_layers

    @property
    def delta_net(self) -> GatedDeltaNetConfig:
        """The gated delta-net layers' sizes."""
        return GatedDeltaNetConfig(
            hidden_size=self.hidden_size,
            num_key_heads=self.linear_num_key_heads,
            num_value_heads=self.linear_num_value_heads,
            key_head_dim=self.linear_key_head_dim,
            value_head_dim=self.linear_value_head_dim,
            conv_kernel_size=self.linear_conv_kernel_dim,
            rms_norm_eps=self.rms_norm_eps,
        )

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
    moe_backend: str = "blocked"  # plain XLA, fast off TPU; the released configs use megablox on TPU
    moe_tiling: tuple[int, int, int] = (512, 1024, 1024)  # (m, k, n) tiles of the megablox grouped matmul
    remat: str = "none"
    # the dense MLP runs this many strided slices of the sequence one after the other, each rematerialised
    # (1: the whole sequence at once); divides the (B, L, intermediate) buffers of a layer's backward pass
    mlp_chunks: int = 1
    # not part of an HF config.json: adapters are saved in the PEFT format
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def __post_init__(self):
        _check(self.remat in REMAT_POLICIES, f"remat {self.remat!r} not in {REMAT_POLICIES}")
        _check(self.mlp_chunks >= 1, f"mlp_chunks {self.mlp_chunks} must be >= 1")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
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
        _check(
            not (self.text.is_qwen3_5 and self.vision.deepstack_visual_indexes),
            f"Qwen3.5 has no DeepStack, but deepstack_visual_indexes is {self.vision.deepstack_visual_indexes}",
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
    def linear_kwargs(self) -> dict:
        """dense_kwargs plus the LoRA config, for the `Dense` layers that may carry adapters."""
        return dict(self.dense_kwargs, lora=self.lora if self.lora.rank else None)

    @property
    def num_deepstack(self) -> int:
        """Number of DeepStack levels that actually run (0 when the ablation switch is off)."""
        return len(self.vision.deepstack_visual_indexes) if self.deepstack else 0

    @property
    def model_type(self) -> str:
        """transformers' model_type: qwen3_vl, qwen3_vl_moe, qwen3_5 or qwen3_5_moe."""
        family = "qwen3_5" if self.text.is_qwen3_5 else "qwen3_vl"
        return f"{family}_moe" if self.text.is_moe else family

    def replace(self, **changes: Any) -> ModelConfig:
        """`dataclasses.replace`, also accepting dicts for `vision=` / `text=` / `lora=` (partial overrides; a
        `lora` dict of rank 0 turns the adapters off: `replace(lora=dict(rank=0))` is the model without them)."""
        lora = changes.get("lora")
        if isinstance(lora, dict) and lora.get("rank", self.lora.rank) == 0:
            changes["lora"] = LoraConfig(**lora)  # rank 0: no adapters, nothing kept from the current ones
        for name in ("vision", "text", "lora"):
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)


def with_yarn(
    config: ModelConfig, *, factor: float, original_max_position_embeddings: int | None = None
) -> ModelConfig:
    """`config` with YaRN on its text MRoPE, to read `factor` x longer sequences than it was trained on: the
    `rope_scaling` entry Qwen's model cards give for long inputs ({"rope_type": "yarn", "factor": ...,
    "original_max_position_embeddings": ...}), which transformers applies the same way (modeling.rotary.text_rope).
    original_max_position_embeddings defaults to the checkpoint's max_position_embeddings; the new
    max_position_embeddings is factor x that. A config already on YaRN is refused (its factor is the checkpoint's
    choice: load it without this)."""
    text = config.text
    if text.rope_type == "yarn":
        raise ValueError(f"the config already uses YaRN ({dict(text.rope_scaling)}); load it without a yarn factor")
    if not factor > 1:
        raise ValueError(f"a YaRN factor must be > 1, got {factor}")
    original = original_max_position_embeddings or text.max_position_embeddings
    scaling = dict(factor=float(factor), original_max_position_embeddings=int(original))
    text = dataclasses.replace(
        text, rope_type="yarn", rope_scaling=tuple(scaling.items()), max_position_embeddings=int(original * factor)
    )
    return config.replace(text=text)
