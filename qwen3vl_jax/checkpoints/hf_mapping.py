"""The tensor names of an HF Qwen3-VL checkpoint (`Qwen3VLForConditionalGeneration`: `model.visual.*`,
`model.language_model.*`, `lm_head.weight`) and the parameter each one is, with the layout conversion between
them.

Every HF tensor maps to one parameter (or one layer slice of a scanned stack) by a `Rule`. The rules are
generated from the config, so they also state the shape each checkpoint tensor must have; `hf_io` reads and
writes checkpoint directories by them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen3vl_jax.config import ModelConfig, TextConfig
from qwen3vl_jax.modeling.decoder import layer_runs, run_names
from qwen3vl_jax.modeling.deepstack import block_stacks

LINEAR, COPY, EXPERTS = "linear", "copy", "experts"
EXPERT_LAYOUTS = ("hub", "transposed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """HF tensor `hf` of shape `hf_shape` <-> params[path] (or params[path][index] for a scanned stack).

    LINEAR: an nn.Linear / Conv weight (out, ...in) <-> kernel (...in, ...out); COPY: same values, reshaped;
    EXPERTS: stacked expert weights (E, in, out) as the released checkpoints store them (`hf_shape`), or
    transposed (E, out, in) as transformers 5.x writes them (the in-memory layout of its
    `Qwen3VLMoeTextExperts`), told apart by shape.
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
    for (start, end, moe), name in zip(layer_runs(text), run_names(text)):
        for layer in range(start, end):
            _decoder_layer_rules(
                text,
                add=add,
                linear=linear,
                hf=f"{lm}.layers.{layer}",
                ours=f"decoder/{name}",
                index=layer - start,
                moe=moe,
            )
    add(f"{lm}.norm.weight", "decoder/norm/scale", hf_shape=(hidden,))
    if not config.tie_word_embeddings:
        linear("lm_head", "lm_head", out_dim=text.vocab_size, in_dim=hidden, bias=False)
    return rules


def _decoder_layer_rules(text: TextConfig, *, add, linear, hf: str, ours: str, index: int, moe: bool) -> None:
    """Rules of decoder layer `hf` (slice `index` of the stack `ours`): attention, then a dense or an MoE MLP."""
    hidden, mlp, hd, bias = text.hidden_size, text.intermediate_size, text.head_dim, text.attention_bias
    q_dim, kv_dim = text.num_attention_heads * hd, text.num_key_value_heads * hd
    norm = dict(kind=COPY, index=index)
    add(f"{hf}.input_layernorm.weight", f"{ours}/input_layernorm/scale", hf_shape=(hidden,), **norm)
    add(f"{hf}.post_attention_layernorm.weight", f"{ours}/post_attention_layernorm/scale", hf_shape=(hidden,), **norm)
    attn_proj = dict(bias=bias, index=index)
    linear(f"{hf}.self_attn.q_proj", f"{ours}/q_proj", out_dim=q_dim, in_dim=hidden, **attn_proj)
    linear(f"{hf}.self_attn.k_proj", f"{ours}/k_proj", out_dim=kv_dim, in_dim=hidden, **attn_proj)
    linear(f"{hf}.self_attn.v_proj", f"{ours}/v_proj", out_dim=kv_dim, in_dim=hidden, **attn_proj)
    linear(f"{hf}.self_attn.o_proj", f"{ours}/o_proj", out_dim=hidden, in_dim=q_dim, **attn_proj)
    add(f"{hf}.self_attn.q_norm.weight", f"{ours}/q_norm/scale", hf_shape=(hd,), **norm)
    add(f"{hf}.self_attn.k_norm.weight", f"{ours}/k_norm/scale", hf_shape=(hd,), **norm)
    mlp_proj = dict(bias=False, index=index)
    if moe:
        experts, width = text.num_experts, text.moe_intermediate_size
        linear(f"{hf}.mlp.gate", f"{ours}/mlp/gate", out_dim=experts, in_dim=hidden, **mlp_proj)
        stacked = dict(kind=EXPERTS, index=index)
        add(
            f"{hf}.mlp.experts.gate_up_proj",
            f"{ours}/mlp/experts_gate_up",
            hf_shape=(experts, hidden, 2 * width),
            **stacked,
        )
        add(f"{hf}.mlp.experts.down_proj", f"{ours}/mlp/experts_down", hf_shape=(experts, width, hidden), **stacked)
    else:
        linear(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate_proj", out_dim=mlp, in_dim=hidden, **mlp_proj)
        linear(f"{hf}.mlp.up_proj", f"{ours}/mlp/up_proj", out_dim=mlp, in_dim=hidden, **mlp_proj)
        linear(f"{hf}.mlp.down_proj", f"{ours}/mlp/down_proj", out_dim=hidden, in_dim=mlp, **mlp_proj)
