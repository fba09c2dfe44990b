"""The ModelConfig a run config describes: a preset, or an HF checkpoint's config.json (config.model.init_from),
with the overrides the config gives explicitly (config.model.overrides: None leaves are not given) and the LoRA
settings of config.lora.

With init_from the checkpoint's config.json is the model. An explicit override applies on top of it and is logged
when it changes a value; one that changes the checkpoint's parameter shapes (a width, a depth, a vocabulary) is an
error naming the field and both values, unless the parameters it adds lie under config.model.init_fresh (parts
initialised randomly instead of read, e.g. DeepStack mergers added to a model trained without them).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.checkpoints.hf_mapping import hf_rules
from qwen3vl_jax.config import LoraConfig, ModelConfig, TextConfig, VisionConfig, preset

log = logging.getLogger(__name__)

# the nested sections of ModelConfig an override may name field by field (config.model.overrides.text.hidden_size)
SECTIONS = {"text": TextConfig, "vision": VisionConfig}
# the DeepStack ablation switch (deepstack=False) leaves a checkpoint's mergers unread on purpose (hf_io)
DEEPSTACK_MERGERS = "visual/deepstack_merger"


def model_config_from(config: Any) -> ModelConfig:
    """The model of a run config (a ConfigDict as `run_config()` builds it): config.model.init_from's config.json,
    else the preset config.model.preset; then config.model.overrides' explicit fields; then config.lora."""
    model = config.model
    overrides = explicit_overrides(model.overrides)
    lora = LoraConfig(**_as_dict(config.lora))
    if model.init_from:
        base = checkpoint_with_overrides(model.init_from, overrides, fresh=tuple(model.init_fresh))
    else:
        base = preset(model.preset, **overrides)
    return base.replace(lora=lora)


def explicit_overrides(overrides: Any) -> dict:
    """The fields `overrides` (a ConfigDict or dict of ModelConfig fields, `text` / `vision` nested) gives: its
    None leaves (fields left to the preset or checkpoint) dropped. Unknown field names are an error naming them."""
    given = {}
    for name, value in _as_dict(overrides or {}).items():
        if name in SECTIONS and isinstance(value, Mapping):
            section = {k: v for k, v in value.items() if v is not None}
            _check_names(section, SECTIONS[name], where=f"config.model.overrides.{name}")
            if section:
                given[name] = section
        elif value is not None:
            given[name] = value
    if "lora" in given:
        raise ValueError("config.model.overrides.lora: LoRA is set in config.lora (--config.lora.rank=16)")
    _check_names(given, ModelConfig, where="config.model.overrides")
    return given


def checkpoint_with_overrides(path: str, overrides: Mapping[str, Any], *, fresh: Sequence[str] = ()) -> ModelConfig:
    """`path`'s config.json with `overrides` (explicit ModelConfig fields, `text` / `vision` as dicts). Each field
    that changes the checkpoint's value is logged; one that changes the parameter shapes outside the `fresh`
    prefixes is a ValueError naming it and both values."""
    checkpoint = hf_io.load_config(path)
    changes = _changes(checkpoint, overrides)
    if not changes:
        return checkpoint
    try:
        model = checkpoint.replace(**_nested(overrides))
        contradiction = _shape_difference(checkpoint, model, fresh=fresh)
    except ValueError as error:
        contradiction = str(error)
    if contradiction:
        culprits = [name for name in changes if _contradicts(checkpoint, name, changes[name][1], fresh=fresh)]
        named = ", ".join(
            f"{name} = {changes[name][1]!r} (checkpoint: {changes[name][0]!r})" for name in culprits or changes
        )
        raise ValueError(
            f"config.model.overrides contradict the checkpoint {path}: {named} ({contradiction}). With "
            "model.init_from the checkpoint's config.json is the model: drop the override, or name the parts it adds "
            "in model.init_fresh"
        )
    if jax.process_index() == 0:
        for name, (old, new) in changes.items():
            log.warning("model override %s = %r (checkpoint: %r)", name, new, old)
    return model


def _as_dict(value: Any) -> dict:
    return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def _check_names(given: Mapping[str, Any], cls: type, *, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {known}"
            raise ValueError(f"{where}.{name}: {cls.__name__} has no field {name!r}{hint}")


def _nested(flat_or_nested: Mapping[str, Any]) -> dict:
    """{"text.rope_theta": x} or {"text": {"rope_theta": x}} -> the nested form ModelConfig.replace takes."""
    nested: dict[str, Any] = {}
    for name, value in flat_or_nested.items():
        section, _, field = name.partition(".")
        if field:
            nested.setdefault(section, {})[field] = value
        elif isinstance(value, Mapping):
            nested.setdefault(name, {}).update(value)
        else:
            nested[name] = value
    return nested


def _changes(checkpoint: ModelConfig, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{"text.rope_theta": (checkpoint's value, override)} for the overrides that differ from the checkpoint,
    compared as the dataclasses hold them (tuples, floats)."""
    changes = {}
    for name, value in overrides.items():
        if name in SECTIONS:
            old_section = getattr(checkpoint, name)
            for field, new in value.items():
                old = getattr(old_section, field)
                if _normalised(new) != _normalised(old):
                    changes[f"{name}.{field}"] = (old, new)
        elif _normalised(value) != _normalised(getattr(checkpoint, name)):
            changes[name] = (getattr(checkpoint, name), value)
    return changes


def _normalised(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_normalised(v) for v in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _checkpoint_tensors(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{HF tensor name: (our parameter path, its shape in the checkpoint)} of `config`'s checkpoint: what
    hf_io.load_params reads (our parameter layout, e.g. ViT blocks stacked between DeepStack taps, may differ
    where the checkpoint's tensors do not)."""
    return {rule.hf: ("/".join(rule.path), rule.hf_shape) for rule in hf_rules(config)}


def _shape_difference(checkpoint: ModelConfig, model: ModelConfig, *, fresh: Sequence[str]) -> str:
    """How the tensors `model` reads from a checkpoint differ from those the checkpoint holds ('' when they do not):
    one of another shape, one the checkpoint lacks (outside the `fresh` prefixes), or one of the checkpoint's the
    model does not read (except the DeepStack mergers that deepstack=False leaves unread)."""
    held, read = _checkpoint_tensors(checkpoint), _checkpoint_tensors(model)
    fresh = tuple(fresh)
    for name in sorted(held.keys() | read.keys()):
        path = (read.get(name) or held[name])[0]
        if fresh and path.startswith(fresh):
            continue
        if name not in read:
            if not model.deepstack and path.startswith(DEEPSTACK_MERGERS):
                continue
            return f"{name}: {held[name][1]} in the checkpoint, not in the model"
        if name not in held:
            return f"{name}: not in the checkpoint, {read[name][1]} in the model"
        if held[name][1] != read[name][1]:
            return f"{name}: {held[name][1]} in the checkpoint, {read[name][1]} in the model"
    return ""


def _contradicts(checkpoint: ModelConfig, name: str, value: Any, *, fresh: Sequence[str]) -> bool:
    """Whether overriding `name` alone gives a model of other parameters than the checkpoint's (or none)."""
    try:
        return bool(_shape_difference(checkpoint, checkpoint.replace(**_nested({name: value})), fresh=fresh))
    except ValueError:
        return True
