"""Training objectives, one module each, named as `config.objective` names it: `sft` (cross-entropy), `distill`
(online or offline strong-to-weak distillation), `dpo` (DPO / IPO). A module defines its objective (a subclass of
base.Objective) and `from_config(config, model_config)`, which builds it from its own section of the run config
(config.<name>); a module's SWITCHES name the fields of that section whose being set means this objective, and are
refused under another one. Adding an objective is adding a module here and its config section."""

from __future__ import annotations

import importlib
import pkgutil

from ml_collections import ConfigDict

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.training.objectives.base import Objective

_NOT_OBJECTIVES = ("base",)


def available() -> tuple[str, ...]:
    """The objectives' names: the modules of this package."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_OBJECTIVES))


def objective_from(config: ConfigDict, model_config: ModelConfig) -> Objective:
    """The objective config.objective names, built from its config section for the model `model_config`."""
    name = config.objective
    names = available()
    if name not in names:
        raise ValueError(f"objective {name!r} is not one of {names}")
    for other in names:
        section = config.get(other)
        switches = getattr(importlib.import_module(f"{__name__}.{other}"), "SWITCHES", ())
        given = [field for field in switches if other != name and section is not None and section.get(field)]
        if given:
            raise ValueError(
                f"config.{other}.{given[0]} is set but the objective is {name!r}: set --config.objective={other}, "
                f"or clear config.{other}.{given[0]}"
            )
    return importlib.import_module(f"{__name__}.{name}").from_config(config, model_config)
