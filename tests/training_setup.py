"""What several test modules train with: the tiny model, an optimizer config, the initial train state, and the
default training config (configs/tiny.py)."""

import importlib.util
import os

import jax
import numpy as np
from ml_collections import ConfigDict

from qwen3vl_jax.config import preset
from qwen3vl_jax.modeling.model import init_params
from qwen3vl_jax.training.train_step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = preset("tiny")
# Adam's first update is ~lr * g / (|g| + eps): with a tiny eps it turns rounding noise in near-zero gradients
# into +-lr jumps, so the tests use eps = 1e-4 to compare updates that depend smoothly on the gradients.
OPTIMIZER = ConfigDict(
    dict(
        lr=1e-3,
        warmup_steps=0,
        final_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-4,
        weight_decay=0.1,
        clip_norm=1.0,
        freeze=(),
    )
)


def initial_state(optimizer):
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    return TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))


def tiny_config() -> ConfigDict:
    """configs/tiny.py's get_config() (configs/ is not a package the tests import)."""
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
