"""Shared fixtures: random tiny HF checkpoints built once per session, and our models loaded from them."""

import os

# Before jax is imported: 8 fake CPU devices for the sharding tests (computations without a mesh still run on
# device 0), and CPU even where libtpu is installed (it is, for the TPU compile tests).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np
import pytest

import qwen3vl_jax
from hf_reference import hf_model, save_hf
from qwen3vl_jax.config import preset


class Reference:
    """A tiny config, the transformers model built from it, its checkpoint dir, and our model loaded from it."""

    def __init__(self, config, path):
        self.config = config
        self.hf = hf_model(config)
        self.path = save_hf(self.hf, path)
        self.ours = qwen3vl_jax.load_pretrained(self.path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return Reference(preset("tiny"), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    return Reference(preset("tiny-tied"), tmp_path_factory.mktemp("tiny_tied"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
