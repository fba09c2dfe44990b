"""LoRA adapters in the PEFT format: `adapter_config.json` + `adapter_model.safetensors` with transformers'
module names, which `peft.PeftModel.from_pretrained(Qwen3VLForConditionalGeneration...)` loads; reading them
back; and merging adapters into the base weights for an HF export.

Ours (modeling/layers.py `Dense`): A (*in, rank), B (rank, *out), y += (alpha / rank) x A B. PEFT's
`lora.Linear`: lora_A.weight (rank, in), lora_B.weight (out, rank), y += (lora_alpha / r) lora_B(lora_A(x)).
So lora_A.weight = A.reshape(in, rank).T and lora_B.weight = B.reshape(rank, out).T, in the input / output
orders of the base weight's own conversion (hf_mapping.Rule, LINEAR: weight (out, in) <-> kernel (*in, *out)).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qwen3vl_jax.checkpoints.hf_io import CheckpointError
from qwen3vl_jax.checkpoints.hf_mapping import LINEAR, hf_rules
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.config.lora import LORA_TARGETS, LoraConfig
from qwen3vl_jax.modeling.layers import is_lora
from qwen3vl_jax.modeling.model import abstract_params
from qwen3vl_jax.storage import read_json, write_json

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


def _adapter_settings(path: str) -> dict:
    """adapter_config.json of the PEFT directory `path`, refusing the LoRA variants our `Dense` does not compute."""
    settings = read_json(os.path.join(path, ADAPTER_CONFIG))
    if settings.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter (peft_type {settings.get('peft_type')!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(settings.get(key), (int, float)) or isinstance(settings.get(key), bool):
            raise CheckpointError(f"{path}: {ADAPTER_CONFIG} has no number {key!r} (got {settings.get(key)!r})")
    unsupported = {
        key: settings[key]
        for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
        if settings.get(key)
    }
    if settings.get("bias", "none") != "none":
        unsupported["bias"] = settings["bias"]
    if unsupported:
        raise CheckpointError(
            f"{path}: adapter settings {unsupported} are not supported (plain LoRA of one rank and alpha on every "
            "layer of the adapted kinds, without bias or saved modules)"
        )
    return settings


def adapter_lora_config(path: str, config: ModelConfig) -> LoraConfig:
    """The LoraConfig of the PEFT LoRA adapter directory `path` for a base model of `config`: its rank, alpha and
    dropout, and as targets our names of the layers it holds adapters for (transformers' module names mapped by
    the checkpoint rules: e.g. `model.visual.blocks.0.attn.qkv` -> attn_qkv). CheckpointError for a tensor that
    is not a LoRA A / B weight of a linear layer of this model."""
    settings = _adapter_settings(path)
    with safe_open(os.path.join(path, ADAPTER_WEIGHTS), framework="numpy") as f:
        names = list(f.keys())
    every_layer = config.replace(lora=dict(rank=1, alpha=1.0, dropout=0.0, targets=LORA_TARGETS))
    kind_of = {layer.module: layer.kernel[-2] for layer in adapted_layers(every_layer)}
    kinds, strange = set(), []
    for name in names:
        module, dot, suffix = name.removeprefix(_PREFIX).rpartition(".lora_")
        if not name.startswith(_PREFIX) or not dot or suffix not in ("A.weight", "B.weight") or module not in kind_of:
            strange.append(name)
        else:
            kinds.add(kind_of[module])
    if strange:
        raise CheckpointError(
            f"{path}: {len(strange)} tensor(s) are not LoRA weights of a linear layer of this model "
            f"({config.model_type}), e.g. {strange[:3]}"
        )
    return LoraConfig(
        rank=int(settings["r"]),
        alpha=float(settings["lora_alpha"]),
        dropout=float(settings.get("lora_dropout") or 0.0),
        targets=tuple(kind for kind in LORA_TARGETS if kind in kinds),
    )


def read_adapters(path: str, config: ModelConfig) -> dict[tuple[str, ...], np.ndarray]:
    """The adapters of the PEFT directory `path` as {parameter path: array} in our layout and full shapes (a
    scanned stack's adapters (layers, *in, rank) / (layers, rank, *out)), for the model of `config`: the file's
    rank and alpha must be config.lora's, and it must hold every layer config.lora adapts and nothing else."""
    settings, lora = _adapter_settings(path), config.lora
    if not lora.rank:
        raise CheckpointError(
            f"{path}: the model's config has no adapters (lora rank 0) to read them into; load the base with them "
            f"in one call, qwen3vl_jax.load_pretrained(base, adapters={path!r}), add them to a loaded model, "
            f"model.with_adapters({path!r}), or give the config the adapter's settings, "
            "config.replace(lora=adapter_lora_config(path, config))"
        )
    if settings["r"] != lora.rank or float(settings["lora_alpha"]) != lora.alpha:
        raise CheckpointError(
            f"{path}: adapters of rank {settings['r']} and alpha {settings['lora_alpha']}, config.lora has rank "
            f"{lora.rank} and alpha {lora.alpha}"
        )
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    shapes = {name: leaf for name, leaf in flatten_dict(abstract_params(config)).items() if is_lora(name)}
    adapters = {name: np.zeros(leaf.shape, leaf.dtype) for name, leaf in shapes.items()}
    expected = set()
    for layer in adapted_layers(config):
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = f"{_PREFIX}{layer.module}.{theirs}.weight"
            if key not in tensors:
                raise CheckpointError(f"{path}: no {key}")
            expected.add(key)
            target = adapters[layer.ours(ours)]
            shape = target.shape if layer.index is None else target.shape[1:]
            # ours: A (in..., r) and B (r, out...); PEFT's: A (r, in), B (out, r)
            stored = (shape[-1], int(np.prod(shape[:-1]))) if ours == "lora_a" else (int(np.prod(shape[1:])), shape[0])
            if tensors[key].shape != stored:
                raise CheckpointError(
                    f"{path}: {key} has shape {tensors[key].shape}, this model's layer needs {stored}"
                )
            value = tensors[key].T.reshape(shape)
            if layer.index is None:
                adapters[layer.ours(ours)] = value.astype(target.dtype)
            else:
                target[layer.index] = value
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} adapter tensor(s) this config does not use: {unexpected[:3]}")
    return adapters


def load_adapters(path: str, params: dict, config: ModelConfig) -> dict:
    """`params` (with or without adapter leaves, e.g. a LoRA-less model's from `load_pretrained`) with the adapters
    of the PEFT directory `path` (see `read_adapters`), as numpy arrays. For a model from `load_pretrained`, whose
    config has no adapters, `Qwen3VLModel.with_adapters(path)` builds the model with them."""
    adapters = read_adapters(path, config)
    flat = {name: np.array(value) for name, value in flatten_dict(jax.device_get(params)).items()}
    for name, value in adapters.items():
        flat[name] = value.astype(flat[name].dtype) if name in flat else value
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
