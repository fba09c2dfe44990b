"""LoRA adapters in the PEFT format: `adapter_config.json` + `adapter_model.safetensors` with transformers'
module names, which `peft.PeftModel.from_pretrained(Qwen3VLForConditionalGeneration...)` loads; reading them
back; and merging adapters into the base weights for an HF export.

Ours (modeling/layers.py `Dense`): A (*in, rank), B (rank, *out), y += (alpha / rank) x A B. PEFT's
`lora.Linear`: lora_A.weight (rank, in), lora_B.weight (out, rank), y += (lora_alpha / r) lora_B(lora_A(x)).
So lora_A.weight = A.reshape(in, rank).T and lora_B.weight = B.reshape(rank, out).T, in the input / output
orders of the base weight's own conversion (hf_io.Rule, LINEAR: weight (out, in) <-> kernel (*in, *out)).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from qwen3vl_jax.checkpoints.hf_io import LINEAR, CheckpointError, hf_rules
from qwen3vl_jax.checkpoints.storage import read_json, write_json
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.modeling.layers import is_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel wraps the transformers model as base_model.model


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """One adapted linear layer: transformers' module name (`model.language_model.layers.3.self_attn.q_proj`)
    and our kernel's path (index: the layer within a scanned stack)."""

    module: str
    kernel: tuple[str, ...]
    index: int | None

    def ours(self, name: str) -> tuple[str, ...]:
        return (*self.kernel[:-1], name)


def adapted_layers(config: ModelConfig) -> list[AdaptedLayer]:
    """Every layer config.lora adapts, in checkpoint order."""
    return [
        AdaptedLayer(rule.hf.removesuffix(".weight"), rule.path, rule.index)
        for rule in hf_rules(config)
        if rule.kind == LINEAR and rule.path[-1] == "kernel" and config.lora.adapts(rule.path[-2])
    ]


def _slice(array, index):
    return np.asarray(array if index is None else array[index], np.float32)


def save_adapters(path: str, params: dict, config: ModelConfig, *, base_model: str = "") -> None:
    """Writes the adapters of `params` as a PEFT LoRA adapter directory (base_model: the base checkpoint's
    path or hub name, recorded in adapter_config.json)."""
    lora = config.lora
    if not lora.rank:
        raise ValueError("config.lora.rank is 0: the model has no adapters to save")
    flat = flatten_dict(jax.device_get(params))
    tensors = {}
    for layer in adapted_layers(config):
        a, b = _slice(flat[layer.ours("lora_a")], layer.index), _slice(flat[layer.ours("lora_b")], layer.index)
        tensors[f"{_PREFIX}{layer.module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T)
        tensors[f"{_PREFIX}{layer.module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(
        os.path.join(path, ADAPTER_CONFIG),
        dict(
            peft_type="LORA",
            task_type=None,
            base_model_name_or_path=base_model,
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias="none",
            fan_in_fan_out=False,
            # every adapted module by its full name: our ViT MLP and the mergers share transformers' short
            # names (linear_fc1 / linear_fc2), so short names would adapt more than was trained
            target_modules=[layer.module for layer in adapted_layers(config)],
            modules_to_save=None,
            use_rslora=False,
            use_dora=False,
            init_lora_weights=True,
        ),
    )


def load_adapters(path: str, params: dict, config: ModelConfig) -> dict:
    """`params` with their adapters read from the PEFT directory `path` (its rank and alpha must be config.lora's;
    every layer config.lora adapts must be in the file, and nothing else)."""
    settings = read_json(os.path.join(path, ADAPTER_CONFIG))
    lora = config.lora
    if settings.get("peft_type") != "LORA" or settings.get("r") != lora.rank:
        raise CheckpointError(f"{path}: not a LoRA adapter of rank {lora.rank} (peft_type / r: {settings})")
    if float(settings.get("lora_alpha")) != lora.alpha or settings.get("use_rslora") or settings.get("use_dora"):
        raise CheckpointError(f"{path}: lora_alpha / rslora / dora differ from config.lora {lora}")
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    flat = {name: np.array(value) for name, value in flatten_dict(jax.device_get(params)).items()}
    expected = set()
    for layer in adapted_layers(config):
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = f"{_PREFIX}{layer.module}.{theirs}.weight"
            if key not in tensors:
                raise CheckpointError(f"{path}: no {key}")
            expected.add(key)
            target = flat[layer.ours(ours)]
            shape = target.shape if layer.index is None else target.shape[1:]
            value = tensors[key].T.reshape(shape)
            if layer.index is None:
                flat[layer.ours(ours)] = value.astype(target.dtype)
            else:
                target[layer.index] = value
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} adapter tensor(s) this config does not use: {unexpected[:3]}")
    return unflatten_dict(flat)


def merge_lora(params: dict, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """The base weights with (alpha / rank) A B added to each adapted kernel, without the adapters, and the config
    without LoRA: a plain model for an HF export."""
    lora = config.lora
    flat = {name: np.array(value) for name, value in flatten_dict(jax.device_get(params)).items()}
    for layer in adapted_layers(config):
        kernel = flat[layer.kernel]
        a, b = _slice(flat[layer.ours("lora_a")], layer.index), _slice(flat[layer.ours("lora_b")], layer.index)
        rank = lora.rank
        shape = kernel.shape if layer.index is None else kernel.shape[1:]
        delta = (a.reshape(-1, rank) @ b.reshape(rank, -1)) * (lora.alpha / rank)
        merged = (_slice(kernel, layer.index) + delta.reshape(shape)).astype(kernel.dtype)
        if layer.index is None:
            flat[layer.kernel] = merged
        else:
            kernel[layer.index] = merged
    base = {name: value for name, value in flat.items() if not is_lora(name)}
    return unflatten_dict(base), config.replace(lora=dict(rank=0))
