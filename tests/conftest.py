"""Shared fixtures: random tiny HF checkpoints built once per session, and our models loaded from them."""

import os
import shutil
import tempfile

# Before jax is imported: 8 fake CPU devices for the sharding tests (computations without a mesh still run on
# device 0), and CPU even where libtpu is installed (it is, for the TPU compile tests).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
# One persistent compilation cache per test run, shared by the xdist workers and by the binaries the tests start
# (which compile the same tiny programs again): its keys hash the program and the compiler options.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set here by the first process (the xdist controller)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = OWN_CACHE = tempfile.mkdtemp(prefix="qwen3vl_jax_tests_jit_")

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


def pytest_sessionfinish(session):
    if "OWN_CACHE" in globals():  # the process that made the cache, last to finish
        shutil.rmtree(OWN_CACHE, ignore_errors=True)
