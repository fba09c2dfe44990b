"""How a checkpoint stores the fused MoE expert weights of each layer, one of:

* "hub": (E, in, out), our parameters' layout and that of the released Qwen3-VL MoE checkpoints;
* "transposed": (E, out, in), transformers 5.x's in-memory layout (`Qwen3VLMoeTextExperts`, `Qwen3_5MoeExperts`),
  which its `save_pretrained` writes for Qwen3-VL and the released Qwen3.5 MoE checkpoints hold;
* "per_expert": one (out, in) tensor per expert and projection, `mlp.experts.{e}.{gate,up,down}_proj.weight`, as
  transformers 5.x's `save_pretrained` writes Qwen3.5 MoE models (its conversion mapping unfuses them).
"""

from __future__ import annotations

import os

from qwen3vl_jax import storage
from qwen3vl_jax.checkpoints.hf_mapping import EXPERT_LAYOUTS, EXPERTS, Rule

EXPERT_LAYOUT_KEY = "qwen3vl_jax.expert_layout"  # safetensors metadata: the layout of the fused expert tensors
PER_EXPERT = "per_expert"


class ExpertLayoutError(ValueError):
    """A checkpoint whose expert tensors cannot be read (names the file or tensor)."""


def per_expert_keys(rule: Rule) -> list[tuple[str, tuple[int, ...]]]:
    """The per-expert tensors (name, shape) that hold the fused tensor of `rule` (an EXPERTS rule): for
    `...experts.gate_up_proj` (E, H, 2I) the gate_proj and up_proj weights (I, H) of each expert, for
    `...experts.down_proj` (E, I, H) the down_proj weights (H, I)."""
    prefix, fused = rule.hf.rsplit(".", 1)
    experts, rows, cols = rule.hf_shape  # (E, in, out)
    names = ("gate_proj", "up_proj") if fused == "gate_up_proj" else ("down_proj",)
    out = cols // len(names)
    return [(f"{prefix}.{e}.{name}.weight", (out, rows)) for e in range(experts) for name in names]


def expert_layouts(path: str, rules: list[Rule], *, shapes: dict[str, tuple[int, ...]], metadata) -> dict[str, str]:
    """Checks every tensor's shape (`shapes`: tensor -> shape, from the file headers) and returns the layout of
    each fused expert tensor: per expert when the checkpoint has those tensors instead; else told by its shape,
    or, when it is square (hidden = 2 x moe_intermediate_size), by what wrote the file: our marker in the
    safetensors metadata (`metadata(tensor)` -> that file's metadata dict), else config.json's
    `transformers_version` (4.x wrote "hub", 5.x writes "transposed"). Refused when neither says."""
    layouts, version = {}, transformers_version(path)
    for rule in rules:
        if rule.kind == EXPERTS and rule.hf not in shapes:
            for key, shape in per_expert_keys(rule):
                if key not in shapes:
                    raise ExpertLayoutError(f"{path}: checkpoint lacks {rule.hf} and the per-expert tensor {key}")
                if shapes[key] != shape:
                    raise ExpertLayoutError(f"{path}: tensor {key} has shape {shapes[key]}, the config needs {shape}")
            layouts[rule.hf] = PER_EXPERT
            continue
        shape = shapes[rule.hf]
        if not rule.accepts(shape):
            raise ExpertLayoutError(f"{path}: tensor {rule.hf} has shape {shape}, but the config needs {rule.hf_shape}")
        if rule.kind != EXPERTS:
            continue
        if rule.hf_shape != rule.transposed_shape:
            layouts[rule.hf] = "hub" if shape == rule.hf_shape else "transposed"
            continue
        marked = metadata(rule.hf).get(EXPERT_LAYOUT_KEY)
        if marked in EXPERT_LAYOUTS:
            layouts[rule.hf] = marked
        elif version is not None:
            layouts[rule.hf] = "transposed" if version >= 5 else "hub"
        else:
            raise ExpertLayoutError(
                f"{path}: cannot tell the layout of {rule.hf} from its square shape {shape}: the file's metadata has "
                f"no {EXPERT_LAYOUT_KEY!r} and {path}/config.json no 'transformers_version'"
            )
    return layouts


def transformers_version(path: str) -> int | None:
    """The major version of transformers that wrote `path` (config.json's transformers_version), if it says."""
    file = os.path.join(path, "config.json")
    version = storage.read_json(file).get("transformers_version") if storage.path(file).exists() else None
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None
