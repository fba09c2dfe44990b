"""Shared fixtures: random tiny HF checkpoints built once per session, and our models loaded from them."""

import functools
import os
import shutil
import tempfile

# Before jax is imported: 8 fake CPU devices for the sharding tests (computations without a mesh still run on
# device 0), and CPU even where libtpu is installed (it is, for the TPU compile tests). XLA:CPU generates its code
# with LLVM at -O0, here and in the binaries the tests start (helpers.ENV): the tests' small programs spend far
# longer compiling than running, and compile about a third faster; XLA's own HLO optimisations are those of the
# default level (results differ from -O2's in the last bits at most: no fused multiply-adds).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"
# One persistent compilation cache per test run, shared by the xdist workers and by the binaries the tests start
# (which compile the same tiny programs again): its keys hash the program and the compiler options.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set here by the first process (the xdist controller)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = OWN_CACHE = tempfile.mkdtemp(prefix="qwen3vl_jax_tests_jit_")

import jax
import numpy as np
import pytest
from helpers import CONFIG, OPTIMIZER, initial_state
from hf_reference import hf_model, save_hf

import qwen3vl_jax
from qwen3vl_jax.config import preset
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.modeling.model import init_params
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.training.optimizer import make_optimizer
from qwen3vl_jax.training.train_step import make_train_step


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


@pytest.fixture(scope="session")
def batch():
    """One packed batch (8 rows of 128 tokens, images and videos) of the built-in tasks for the tiny model."""
    processor = Processor(
        byte_tokenizer(),
        load_chat_template(None),
        config=VisionProcessingConfig(
            image_min_pixels=64 * 64, image_max_pixels=64 * 64, video_min_pixels=0, video_max_pixels=8 * 64 * 64
        ),
    )
    data = DataConfig(sources=({"kind": "synthetic", "size": 1000},), seq_len=128, max_patches=128, batch_size=8)
    iterator = iter(build_dataset(data, processor, model_config=CONFIG))
    batch = next(iterator)
    assert (batch.patch_segment_ids > 0).any()
    return batch


@pytest.fixture(scope="session")
def optimizer():
    params = jax.eval_shape(functools.partial(init_params, CONFIG), jax.random.PRNGKey(0))  # its structure is enough
    return make_optimizer(OPTIMIZER, total_steps=100, params=params)


@pytest.fixture(scope="session")
def single_device_step(batch, optimizer):
    """(state, metrics) of one unsharded step with the whole batch."""
    transform, schedule = optimizer
    step = make_train_step(CONFIG, optimizer=transform, schedule=schedule, loss_normalization="sqrt")
    return jax.jit(step)(initial_state(transform), batch)


def pytest_sessionfinish(session):
    if "OWN_CACHE" in globals():  # the process that made the cache, last to finish
        shutil.rmtree(OWN_CACHE, ignore_errors=True)
