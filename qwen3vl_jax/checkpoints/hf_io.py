"""Hugging Face checkpoint directories (config.json, generation_config.json, safetensors files, one or sharded
with an index) read into our parameter tree and written from it, local or gs://.

The tensors are read and written by the rules of `hf_mapping`, which state each tensor's name, shape and layout:
a missing, unexpected or mis-shaped tensor is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.experimental.multihost_utils
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qwen3vl_jax import storage
from qwen3vl_jax.checkpoints.expert_layouts import (
    EXPERT_LAYOUT_KEY,
    PER_EXPERT,
    ExpertLayoutError,
    expert_layouts,
    per_expert_keys,
)
from qwen3vl_jax.checkpoints.hf_mapping import COPY, EXPERT_LAYOUTS, EXPERTS, Rule, hf_rules, released_expert_layout
from qwen3vl_jax.checkpoints.safetensors_slices import SafetensorsFile, SafetensorsFormatError, write_streamed
from qwen3vl_jax.config import ModelConfig, from_hf, to_hf
from qwen3vl_jax.modeling.layers import is_lora
from qwen3vl_jax.modeling.model import abstract_params

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model (names the file or tensor)."""


# --------------------------------------------------------------------------------------------------
# Reading


def load_generation_config(path: str) -> dict:
    """eos_token_id / pad_token_id from `path/generation_config.json` ({} when there is none)."""
    file = os.path.join(path, GENERATION_CONFIG)
    if not os.path.exists(file):
        return {}
    hf = _read_json(file)
    return {k: hf[k] for k in ("eos_token_id", "pad_token_id") if hf.get(k) is not None}


def load_config(path: str, **overrides: Any) -> ModelConfig:
    """ModelConfig from `path/config.json` (plus ModelConfig field overrides)."""
    return from_hf(_read_json(os.path.join(path, "config.json")), **overrides)


def checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index when the checkpoint is sharded (local or gs://)."""
    index = os.path.join(path, INDEX_FILE)
    if storage.path(index).exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {key: os.path.join(path, name) for key, name in weight_map.items()}
        for file in sorted(set(files.values())):
            if not storage.path(file).exists():
                raise CheckpointError(f"{index} lists shard {os.path.basename(file)}, which does not exist")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if not storage.path(single).exists():
        raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    with _open(single) as f:
        return {key: single for key in f.tensors}


def load_params(
    path: str, config: ModelConfig, shardings: Any = None, *, opener=None, fresh: Sequence[str] = ()
) -> dict:
    """Parameters in config.param_dtype from the HF checkpoint at `path` (local or gs://).

    fresh: prefixes of parameter paths ("visual/deepstack_merger") that are not read: they are left out of the
    returned tree (the caller initialises them), and the checkpoint may lack them (e.g. DeepStack mergers added
    to a model pretrained without them) or have them (ignored). LoRA adapters (config.lora) are left out too.

    shardings: None gives a nested dict of numpy arrays. A tree of `jax.sharding.Sharding`s shaped like the
    parameters gives jax.Arrays built shard by shard: each addressable device's shard is read straight from
    the files (only the bytes of that box, `safetensors_slices`) and converted to our layout on its own, so a
    process reads only what its devices hold and the host holds little beyond the shards of one tensor.
    opener: opens a file for reading (default: `etils.epath`), e.g. to observe what is read."""
    files = checkpoint_files(path)
    rules = hf_rules(config)
    is_fresh = functools.partial(_is_fresh, prefixes=tuple(fresh))
    skipped = {r.hf for r in rules if is_fresh(r.path)}
    rules = [r for r in rules if not is_fresh(r.path)]
    _check_names(path, {k: v for k, v in files.items() if k not in skipped}, rules, config)
    readers: dict[str, SafetensorsFile] = {}
    try:
        for file in sorted(set(files.values())):
            readers[file] = _open(file, opener=opener)
        shapes = {key: readers[file].tensors[key].shape for key, file in files.items()}
        try:
            layouts = expert_layouts(path, rules, shapes=shapes, metadata=lambda key: readers[files[key]].metadata)
        except ExpertLayoutError as e:
            raise CheckpointError(str(e)) from None
        source = _Source(files=files, readers=readers, layouts=layouts)
        dtype = np.dtype(_NUMPY_DTYPES[config.param_dtype])
        by_path: dict[tuple[str, ...], list[Rule]] = {}
        for rule in rules:
            by_path.setdefault(rule.path, []).append(rule)
        flat_shardings = None if shardings is None else flatten_dict(shardings)
        flat = {}
        for name, shape in _flat_shapes(config).items():
            if is_fresh(name) or is_lora(name):  # LoRA adapters live in PEFT files (checkpoints/peft.py)
                continue
            read = _ParamReader(by_path[name], shape=shape, dtype=dtype, source=source)
            if flat_shardings is None:
                flat[name] = read((slice(None),) * len(shape))
            else:
                flat[name] = jax.make_array_from_callback(shape, flat_shardings[name], read, dtype=dtype)
        if config.tie_word_embeddings and "lm_head.weight" in files:
            _check_tied_head(source, embedding=flat[("embed_tokens", "embedding")], dtype=dtype)
    finally:
        for reader in readers.values():
            reader.close()
    return unflatten_dict(flat)


def _is_fresh(name: tuple[str, ...], *, prefixes: tuple[str, ...]) -> bool:
    return "/".join(name).startswith(prefixes) if prefixes else False


def _check_names(path: str, files: dict[str, str], rules: list[Rule], config: ModelConfig) -> None:
    expected = {r.hf for r in rules}
    for rule in rules:  # fused experts may be stored one tensor per expert (expert_layouts.py)
        if rule.kind == EXPERTS and rule.hf not in files:
            per_expert = {key for key, _ in per_expert_keys(rule)}
            if per_expert & files.keys():
                expected = (expected - {rule.hf}) | per_expert
    missing = sorted(expected - files.keys())
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}")
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if not config.deepstack:  # the ablation switch drops the DeepStack mergers of a pretrained model
        dropped = {k for k in files if k.startswith("model.visual.deepstack_merger_list.")}
        if dropped:
            log.info("deepstack=False: ignoring %d DeepStack merger tensors of %s", len(dropped), path)
        ignorable |= dropped
    multi_token_prediction = {k for k in files if k.startswith("mtp.")}
    if multi_token_prediction:  # Qwen3.5's MTP head, which transformers does not load either
        log.info("ignoring %d multi-token-prediction tensors (mtp.*) of %s", len(multi_token_prediction), path)
    unexpected = sorted(files.keys() - expected - ignorable - multi_token_prediction)
    if unexpected:
        raise CheckpointError(
            f"{path}: checkpoint has {len(unexpected)} tensor(s) this config does not use, e.g. {unexpected[:5]}"
        )


@dataclasses.dataclass(frozen=True)
class _Source:
    files: dict[str, str]  # tensor -> file
    readers: dict[str, SafetensorsFile]  # file -> open reader
    layouts: dict[str, str]  # fused expert tensor -> "hub" | "transposed"

    def read(self, key: str, box: tuple[slice, ...] | None = None, *, as_shape=None) -> np.ndarray:
        file = self.files[key]
        try:
            return self.readers[file].read(key, box, as_shape=as_shape)
        except (SafetensorsFormatError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {key} from {file}: {e}") from None


class _ParamReader:
    """The callback that reads one box of a parameter (in our layout) from the HF tensors its rules name: a
    scanned stack reads the box's layers from their own tensors. Boxes asked for again (devices holding the
    same shard) are read once."""

    def __init__(self, rules: list[Rule], *, shape: tuple[int, ...], dtype: np.dtype, source: _Source):
        self.shape, self.dtype, self.source = shape, dtype, source
        self.stacked = rules[0].index is not None
        self.rules = {r.index: r for r in rules} if self.stacked else {None: rules[0]}
        if self.stacked and sorted(self.rules) != list(range(shape[0])):
            raise CheckpointError(f"{'/'.join(rules[0].path)}: rules do not cover the {shape[0]} stacked layers")
        self.cache: dict[tuple, np.ndarray] = {}

    def __call__(self, box: tuple[slice, ...]) -> np.ndarray:
        ranges = tuple(s.indices(n)[:2] for s, n in zip(box, self.shape))
        if ranges not in self.cache:
            box = tuple(slice(*r) for r in ranges)
            if self.stacked:
                layers = [self._read(self.rules[i], box[1:], self.shape[1:]) for i in range(*ranges[0])]
                value = np.stack(layers) if layers else np.zeros((0, *self.shape[1:]), self.dtype)
            else:
                value = self._read(self.rules[None], box, self.shape)
            self.cache[ranges] = value.astype(self.dtype, copy=False)
        return self.cache[ranges]

    def _read(self, rule: Rule, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
        """The box `box` of the (one-layer) parameter of shape `shape` that `rule` maps from its HF tensor."""
        if rule.kind == EXPERTS:
            if self.source.layouts[rule.hf] == PER_EXPERT:
                return self._read_per_expert(rule, box)
            if self.source.layouts[rule.hf] == "hub":
                return self.source.read(rule.hf, box)
            return self.source.read(rule.hf, (box[0], box[2], box[1])).swapaxes(1, 2)
        if rule.kind == COPY:  # the same elements in another shape
            return self.source.read(rule.hf, box, as_shape=shape)
        # LINEAR: HF (out, *in) holds, row-major, the elements of (*out_dims, *in_dims) when ours is
        # (*in_dims, *out_dims): read the box in that order and move the in dimensions first
        split = next(
            k
            for k in range(1, len(shape))
            if math.prod(shape[:k]) == math.prod(rule.hf_shape[1:]) and math.prod(shape[k:]) == rule.hf_shape[0]
        )
        outs = len(shape) - split
        x = self.source.read(rule.hf, (*box[split:], *box[:split]), as_shape=(*shape[split:], *shape[:split]))
        return x.transpose(*range(outs, len(shape)), *range(outs))

    def _read_per_expert(self, rule: Rule, box: tuple[slice, ...]) -> np.ndarray:
        """The box of a fused (E, in, out) expert tensor from its per-expert (out, in) tensors (gate_up: the gate's
        rows, then the up's, as transformers' `Concatenate` conversion fuses them)."""
        keys = per_expert_keys(rule)
        per = len(keys) // rule.hf_shape[0]
        experts = range(*box[0].indices(rule.hf_shape[0])[:2])
        fused = [
            np.concatenate([self.source.read(key) for key, _ in keys[e * per : (e + 1) * per]], axis=0).T[box[1:]]
            for e in experts
        ]
        return np.stack(fused) if fused else np.zeros((0, *self.shape[1:]), self.dtype)[:, box[1], box[2]]


def _check_tied_head(source: _Source, *, embedding: Any, dtype: np.dtype) -> None:
    head = source.read("lm_head.weight")
    embedding = np.asarray(jax.device_get(embedding))
    if head.shape != embedding.shape or not np.array_equal(head.astype(dtype), embedding):
        log.warning(
            "tie_word_embeddings=True: ignoring lm_head.weight, which differs from the embedding "
            "(transformers ties them the same way)"
        )


# --------------------------------------------------------------------------------------------------
# Writing


def save_params(
    path: str,
    params: dict,
    *,
    config: ModelConfig,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    expert_layout: str = "hub",
) -> None:
    """Writes `params` as an HF checkpoint directory (config.json + safetensors, sharded with an index when
    larger than `max_shard_bytes`) that transformers' `from_pretrained` loads. MoE experts are written in the
    released (`"hub"`) layout or in the `"transposed"` one transformers 5.x writes (expert_layouts.py); for
    Qwen3.5 both mean its released layout, (E, out, in), the only one transformers reads for it.

    `params` may be numpy arrays or jax.Arrays sharded over a mesh (of several processes too): the tensors are
    gathered one at a time, in checkpoint order, and streamed into the files, so the host never holds more than
    one tensor. Every process must call this; process 0 writes (to a local path or gs://)."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout {expert_layout!r} not in {EXPERT_LAYOUTS}")
    if config.text.is_qwen3_5:
        expert_layout = released_expert_layout(config)
    if config.lora.rank:
        raise ValueError(
            "this model has LoRA adapters, which an HF checkpoint cannot hold: save them with "
            "checkpoints.peft.save_adapters (next to the base checkpoint), or merge them first (peft.merge_lora)"
        )
    if not config.vision_positions:
        log.warning(
            "vision_positions=False has no transformers counterpart: transformers will add the ViT position "
            "embedding and rotary that this model was trained without"
        )
    dtype = dtype or config.param_dtype
    np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
    flat = flatten_dict(params)
    rules = hf_rules(config)
    for rule in rules:
        if rule.path not in flat:
            raise CheckpointError(f"params lack {'/'.join(rule.path)} (needed for {rule.hf})")
    writer = jax.process_index() == 0
    metadata = {"format": "pt"}
    if config.text.is_moe:
        metadata[EXPERT_LAYOUT_KEY] = expert_layout
        if expert_layout == "hub" and config.text.hidden_size == 2 * config.text.moe_intermediate_size and writer:
            log.warning(
                "square fused expert tensors written in the hub layout: this package reads them by the file's "
                "metadata, but transformers >= 5 decides by shape and will take them as transposed; write "
                "expert_layout='transposed' for transformers 5"
            )

    def shape_of(rule: Rule) -> tuple[int, ...]:
        return rule.transposed_shape if rule.kind == EXPERTS and expert_layout == "transposed" else rule.hf_shape

    def gathered(rule: Rule) -> Any:
        """The rule's parameter (or layer), whole; every process takes part when it is split across hosts."""
        x = flat[rule.path] if rule.index is None else flat[rule.path][rule.index]
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = jax.experimental.multihost_utils.process_allgather(x, tiled=True)
        return x

    def tensor(rule: Rule) -> np.ndarray:
        return rule.to_hf(np.asarray(gathered(rule)).astype(np_dtype), expert_layout)

    shards, size = [[]], 0
    for rule in rules:
        nbytes = math.prod(rule.hf_shape) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(rule)
        size += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    if writer:
        storage.path(path).mkdir(parents=True, exist_ok=True)
        hf_config = to_hf(config)
        hf_config["dtype"] = dtype
        storage.write_json(os.path.join(path, "config.json"), hf_config)
        for stale in (SINGLE_FILE, INDEX_FILE):
            if storage.path(os.path.join(path, stale)).exists():
                storage.path(os.path.join(path, stale)).unlink()
    for name, shard in zip(names, shards):
        by_name = {rule.hf: rule for rule in shard}
        if writer:
            specs = [(rule.hf, np_dtype, shape_of(rule)) for rule in shard]
            write_streamed(
                os.path.join(path, name), specs, lambda key, by_name=by_name: tensor(by_name[key]), metadata=metadata
            )
        else:  # the other processes take part in the gathers, in the same order
            for rule in shard:
                gathered(rule)
    if writer and len(shards) > 1:
        total = sum(math.prod(rule.hf_shape) * np_dtype.itemsize for rule in rules)
        weight_map = {rule.hf: name for name, shard in zip(names, shards) for rule in shard}
        storage.write_json(
            os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map}
        )


# --------------------------------------------------------------------------------------------------
# Helpers


def _read_json(file: str) -> dict:
    try:
        return storage.read_json(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def _open(file: str, *, opener=None) -> SafetensorsFile:
    try:
        return SafetensorsFile(file, opener=opener)
    except (SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"cannot read safetensors file {file}: {e}") from None


def _flat_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {p: x.shape for p, x in flatten_dict(abstract_params(config)).items()}
