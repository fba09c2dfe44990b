"""The tensor names of an HF Qwen3-VL or Qwen3.5 checkpoint (`Qwen3VLForConditionalGeneration`,
`Qwen3_5ForConditionalGeneration` and their MoE forms: `model.visual.*`, `model.language_model.*`,
`lm_head.weight`) and the parameter each one is, with the layout conversion between them.

Every HF tensor maps to one parameter (or one layer slice of a scanned stack) by a `Rule`. The rules are
generated from the config, so they also state the shape each checkpoint tensor must have; `hf_io` reads and
writes checkpoint directories by them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen3vl_jax.config import ModelConfig, TextConfig
from qwen3vl_jax.modeling.decoder import FULL, layer_kinds, layer_params
from qwen3vl_jax.modeling.deepstack import block_stacks

LINEAR, COPY, EXPERTS = "linear", "copy", "experts"
EXPERT_LAYOUTS = ("hub", "transposed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """HF tensor `hf` of shape `hf_shape` <-> params[path] (or params[path][index] for a scanned stack).

    LINEAR: an nn.Linear / Conv weight (out, ...in) <-> kernel (...in, ...out); COPY: same values, reshaped;
    EXPERTS: stacked expert weights (E, in, out) as our parameters and the released Qwen3-VL checkpoints hold them
    (`hf_shape`, the "hub" layout), or transposed (E, out, in) as transformers 5.x writes them (the in-memory
    layout of its `Qwen3VLMoeTextExperts` and `Qwen3_5MoeExperts`; the released Qwen3.5 checkpoints too), told
    apart by shape.
    """

    hf: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    kind: str = COPY
    index: int | None = None

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return shape == self.hf_shape or (self.kind == EXPERTS and shape == self.transposed_shape)

    @property
    def transposed_shape(self) -> tuple[int, ...]:
        return (self.hf_shape[0], self.hf_shape[2], self.hf_shape[1])

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == LINEAR:
            x = x.reshape(x.shape[0], -1).T
        elif self.kind == EXPERTS and x.shape != self.hf_shape:
            x = x.swapaxes(1, 2)
        return x.reshape(shape)

    def to_hf(self, x: np.ndarray, expert_layout: str = "hub") -> np.ndarray:
        if self.kind == LINEAR:
            x = x.reshape(-1, self.hf_shape[0]).T
        elif self.kind == EXPERTS and expert_layout == "transposed":
            return np.ascontiguousarray(x.swapaxes(1, 2))
        return np.ascontiguousarray(x.reshape(self.hf_shape))


def hf_rules(config: ModelConfig) -> list[Rule]:
    """All tensors of the HF checkpoint of `config`, in checkpoint order."""
    vision, text = config.vision, config.text
    vit, vit_mlp, merged, out = vision.hidden_size, vision.intermediate_size, vision.merged_dim, vision.out_hidden_size
    hidden = text.hidden_size
    rules: list[Rule] = []

    def add(hf, path, *, hf_shape, kind=COPY, index=None):
        rules.append(Rule(hf=hf, path=tuple(path.split("/")), hf_shape=tuple(hf_shape), kind=kind, index=index))

    def linear(hf, path, *, out_dim, in_dim, bias, index=None):
        add(hf + ".weight", path + "/kernel", hf_shape=(out_dim, in_dim), kind=LINEAR, index=index)
        if bias:
            add(hf + ".bias", path + "/bias", hf_shape=(out_dim,), kind=COPY, index=index)

    def layer_norm(hf, path, *, dim, index=None):
        add(hf + ".weight", path + "/scale", hf_shape=(dim,), kind=COPY, index=index)
        add(hf + ".bias", path + "/bias", hf_shape=(dim,), kind=COPY, index=index)

    def merger(hf, path, *, norm_dim):
        layer_norm(hf + ".norm", path + "/norm", dim=norm_dim)
        linear(hf + ".linear_fc1", path + "/linear_fc1", out_dim=merged, in_dim=merged, bias=True)
        linear(hf + ".linear_fc2", path + "/linear_fc2", out_dim=out, in_dim=merged, bias=True)

    vis = "model.visual"
    add(
        f"{vis}.patch_embed.proj.weight",
        "visual/patch_embed/kernel",
        hf_shape=(vit, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size),
        kind=LINEAR,
    )
    add(f"{vis}.patch_embed.proj.bias", "visual/patch_embed/bias", hf_shape=(vit,))
    add(f"{vis}.pos_embed.weight", "visual/pos_embed", hf_shape=(vision.num_position_embeddings, vit))
    taps = vision.deepstack_visual_indexes[: config.num_deepstack]
    for stack, (start, end) in enumerate(block_stacks(vision.depth, taps)):
        for i in range(start, end):
            hf, ours, in_stack = f"{vis}.blocks.{i}", f"visual/blocks_{stack}", dict(index=i - start)
            layer_norm(f"{hf}.norm1", f"{ours}/norm1", dim=vit, **in_stack)
            layer_norm(f"{hf}.norm2", f"{ours}/norm2", dim=vit, **in_stack)
            linear(f"{hf}.attn.qkv", f"{ours}/attn_qkv", out_dim=3 * vit, in_dim=vit, bias=True, **in_stack)
            linear(f"{hf}.attn.proj", f"{ours}/attn_proj", out_dim=vit, in_dim=vit, bias=True, **in_stack)
            linear(f"{hf}.mlp.linear_fc1", f"{ours}/mlp_fc1", out_dim=vit_mlp, in_dim=vit, bias=True, **in_stack)
            linear(f"{hf}.mlp.linear_fc2", f"{ours}/mlp_fc2", out_dim=vit, in_dim=vit_mlp, bias=True, **in_stack)
    merger(f"{vis}.merger", "visual/merger", norm_dim=vit)
    for j in range(len(taps)):
        merger(f"{vis}.deepstack_merger_list.{j}", f"visual/deepstack_merger_{j}", norm_dim=merged)

    lm = "model.language_model"
    add(f"{lm}.embed_tokens.weight", "embed_tokens/embedding", hf_shape=(text.vocab_size, hidden))
    for layer, (kind, (path, index)) in enumerate(zip(layer_kinds(text), layer_params(text))):
        hf, ours, in_stack = f"{lm}.layers.{layer}", "/".join(("decoder", *path)), dict(index=index)
        norm = dict(hf_shape=(hidden,), **in_stack)
        add(f"{hf}.input_layernorm.weight", f"{ours}/input_layernorm/scale", **norm)
        add(f"{hf}.post_attention_layernorm.weight", f"{ours}/post_attention_layernorm/scale", **norm)
        if kind.mixer == FULL:
            _attention_rules(text, add=add, linear=linear, hf=f"{hf}.self_attn", ours=ours, index=index)
        else:
            _delta_net_rules(
                text, add=add, linear=linear, hf=f"{hf}.linear_attn", ours=f"{ours}/linear_attn", index=index
            )
        mlp = dict(bias=False, index=index)
        if kind.moe:
            _moe_rules(text, add=add, linear=linear, hf=f"{hf}.mlp", ours=f"{ours}/mlp", index=index)
        else:
            _swiglu_rules(
                linear, hf=f"{hf}.mlp", ours=f"{ours}/mlp", hidden=hidden, width=text.intermediate_size, **mlp
            )
    add(f"{lm}.norm.weight", "decoder/norm/scale", hf_shape=(hidden,))
    if not config.tie_word_embeddings:
        linear("lm_head", "lm_head", out_dim=text.vocab_size, in_dim=hidden, bias=False)
    return rules


def _attention_rules(text: TextConfig, *, add, linear, hf: str, ours: str, index: int) -> None:
    """Full attention (`self_attn`); Qwen3.5's q_proj holds [query | gate] per head: (heads * 2 * head_dim, H)."""
    hidden, hd, bias = text.hidden_size, text.head_dim, text.attention_bias
    q_dim, kv_dim = text.num_attention_heads * hd, text.num_key_value_heads * hd
    proj = dict(bias=bias, index=index)
    linear(f"{hf}.q_proj", f"{ours}/q_proj", out_dim=q_dim * (2 if text.is_qwen3_5 else 1), in_dim=hidden, **proj)
    linear(f"{hf}.k_proj", f"{ours}/k_proj", out_dim=kv_dim, in_dim=hidden, **proj)
    linear(f"{hf}.v_proj", f"{ours}/v_proj", out_dim=kv_dim, in_dim=hidden, **proj)
    linear(f"{hf}.o_proj", f"{ours}/o_proj", out_dim=hidden, in_dim=q_dim, **proj)
    add(f"{hf}.q_norm.weight", f"{ours}/q_norm/scale", hf_shape=(hd,), index=index)
    add(f"{hf}.k_norm.weight", f"{ours}/k_norm/scale", hf_shape=(hd,), index=index)


def _delta_net_rules(text: TextConfig, *, add, linear, hf: str, ours: str, index: int) -> None:
    """Qwen3.5's gated delta-net (`linear_attn`; the layouts are in modeling/gated_delta_net.py's docstring)."""
    sizes, hidden = text.delta_net, text.hidden_size
    heads, values = sizes.num_value_heads, sizes.num_value_heads * sizes.value_head_dim
    proj = dict(bias=False, index=index)
    linear(f"{hf}.in_proj_qkv", f"{ours}/in_proj_qkv", out_dim=sizes.conv_channels, in_dim=hidden, **proj)
    linear(f"{hf}.in_proj_z", f"{ours}/in_proj_z", out_dim=values, in_dim=hidden, **proj)
    linear(f"{hf}.in_proj_b", f"{ours}/in_proj_b", out_dim=heads, in_dim=hidden, **proj)
    linear(f"{hf}.in_proj_a", f"{ours}/in_proj_a", out_dim=heads, in_dim=hidden, **proj)
    # the depthwise conv's (C, 1, K) weight is a LINEAR (C, K) -> (K, C)
    add(
        f"{hf}.conv1d.weight",
        f"{ours}/conv1d/kernel",
        hf_shape=(sizes.conv_channels, 1, sizes.conv_kernel_size),
        kind=LINEAR,
        index=index,
    )
    add(f"{hf}.dt_bias", f"{ours}/dt_bias", hf_shape=(heads,), index=index)
    add(f"{hf}.A_log", f"{ours}/A_log", hf_shape=(heads,), index=index)
    add(f"{hf}.norm.weight", f"{ours}/norm/scale", hf_shape=(sizes.value_head_dim,), index=index)
    linear(f"{hf}.out_proj", f"{ours}/out_proj", out_dim=hidden, in_dim=values, **proj)


def _swiglu_rules(linear, *, hf: str, ours: str, hidden: int, width: int, bias: bool, index: int) -> None:
    linear(f"{hf}.gate_proj", f"{ours}/gate_proj", out_dim=width, in_dim=hidden, bias=bias, index=index)
    linear(f"{hf}.up_proj", f"{ours}/up_proj", out_dim=width, in_dim=hidden, bias=bias, index=index)
    linear(f"{hf}.down_proj", f"{ours}/down_proj", out_dim=hidden, in_dim=width, bias=bias, index=index)


def _moe_rules(text: TextConfig, *, add, linear, hf: str, ours: str, index: int) -> None:
    """The router, the fused experts and (Qwen3.5) the shared expert and its gate."""
    hidden, experts, width = text.hidden_size, text.num_experts, text.moe_intermediate_size
    linear(f"{hf}.gate", f"{ours}/gate", out_dim=experts, in_dim=hidden, bias=False, index=index)
    stacked = dict(kind=EXPERTS, index=index)
    add(f"{hf}.experts.gate_up_proj", f"{ours}/experts_gate_up", hf_shape=(experts, hidden, 2 * width), **stacked)
    add(f"{hf}.experts.down_proj", f"{ours}/experts_down", hf_shape=(experts, width, hidden), **stacked)
    if text.shared_expert_intermediate_size:
        shared = dict(hidden=hidden, width=text.shared_expert_intermediate_size, bias=False, index=index)
        _swiglu_rules(linear, hf=f"{hf}.shared_expert", ours=f"{ours}/shared_expert", **shared)
        linear(
            f"{hf}.shared_expert_gate", f"{ours}/shared_expert_gate", out_dim=1, in_dim=hidden, bias=False, index=index
        )


def released_expert_layout(config: ModelConfig) -> str:
    """How the released checkpoints of the config's family store the fused experts: Qwen3-VL (E, in, out) ("hub"),
    Qwen3.5 (E, out, in) ("transposed"), which is also the only layout transformers reads for Qwen3.5."""
    return "transposed" if config.text.is_qwen3_5 else "hub"
