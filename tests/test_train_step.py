"""One sharded train step on 8 fake CPU devices (data x fsdp x tensor) equals the single-device step, and
gradient accumulation equals the whole batch at once."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from qwen3vl_jax.config import preset
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.modeling.model import abstract_params, init_params
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, param_shardings
from qwen3vl_jax.training.optimizer import make_optimizer
from qwen3vl_jax.training.train_step import TrainState, make_train_step

CONFIG = preset("tiny")
# Adam's first update is ~lr * g / (|g| + eps): with a tiny eps it turns rounding noise in near-zero gradients
# into +-lr jumps, so the test uses eps = 1e-4 to compare updates that depend smoothly on the gradients.
OPTIMIZER = ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-4,
                            weight_decay=0.1, clip_norm=1.0, freeze=()))


@pytest.fixture(scope="session")
def batch():
    processor = Processor(byte_tokenizer(), load_chat_template(None),
                          VisionProcessingConfig(image_min_pixels=64 * 64, image_max_pixels=64 * 64,
                                                 video_min_pixels=0, video_max_pixels=8 * 64 * 64))
    data = DataConfig(sources=({"kind": "synthetic", "size": 1000},), seq_len=128, max_patches=128, batch_size=8)
    iterator = iter(build_dataset(data, processor, CONFIG))
    batch = next(iterator)
    batch.pop("num_dropped")
    assert (batch["patch_segment_ids"] > 0).any()
    return batch


def initial_state(optimizer):
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    return TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))


@pytest.fixture(scope="session")
def optimizer():
    return make_optimizer(OPTIMIZER, 100, init_params(CONFIG, jax.random.PRNGKey(0)))


@pytest.fixture(scope="session")
def single_device_step(batch, optimizer):
    """(state, metrics) of one unsharded step with the whole batch."""
    step = make_train_step(CONFIG, *optimizer, loss_normalization="sqrt")
    return jax.jit(step)(initial_state(optimizer[0]), batch)


def test_sharded_step_equals_single_device(batch, optimizer, single_device_step):
    assert jax.device_count() == 8
    single_state, single_metrics = single_device_step
    step = make_train_step(CONFIG, *optimizer, loss_normalization="sqrt")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = abstract_params(CONFIG, boxed=True)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(step=replicated, params=param_shardings(boxed, mesh),
                           opt_state=param_shardings(jax.eval_shape(optimizer[0].init, boxed), mesh), rng=replicated)
    q_proj = shardings.params["decoder"]["layers"]["q_proj"]["kernel"].spec
    assert q_proj == PartitionSpec(None, "fsdp", "tensor", None)  # really sharded over fsdp and tensor
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated))
        state, metrics = sharded(jax.device_put(initial_state(optimizer[0]), shardings),
                                 jax.device_put(batch, batch_sharding(mesh)))
    assert state.params["decoder"]["layers"]["q_proj"]["kernel"].sharding.spec == q_proj
    # fp32 sums over differently split batches and weights differ in rounding only
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], single_metrics["grad_norm"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6),
                           jax.device_get(state.params), jax.device_get(single_state.params))


def test_gradient_accumulation_equals_whole_batch(batch, optimizer, single_device_step):
    whole, whole_metrics = single_device_step
    step = make_train_step(CONFIG, *optimizer, loss_normalization="sqrt", grad_accum_steps=4)
    accumulated, accumulated_metrics = jax.jit(step)(initial_state(optimizer[0]), batch)
    np.testing.assert_allclose(accumulated_metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6),
                           accumulated.params, whole.params)
