"""One sharded train step on 8 fake CPU devices (data x fsdp x tensor), with the chunked loss, equals the
unchunked single-device step; gradient accumulation equals the whole batch at once; every remat policy gives
the same gradients. The fixtures batch, optimizer and single_device_step are in conftest.py (shared with the
trainer and splash tests)."""

import flax.linen as nn
import jax
import numpy as np
from helpers import CONFIG, initial_state, random_params
from jax.sharding import NamedSharding, PartitionSpec

from qwen3vl_jax.config.model import REMAT_POLICIES
from qwen3vl_jax.modeling.model import Qwen3VL, abstract_params
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, batch_sharding, make_mesh
from qwen3vl_jax.training.builder import train_state_shardings
from qwen3vl_jax.training.train_step import make_train_step


def test_sharded_step_equals_single_device(batch, optimizer, single_device_step):
    assert jax.device_count() == 8
    single_state, single_metrics = single_device_step
    transform, schedule = optimizer
    # 128 positions in chunks of 48: two whole chunks and a padded one
    step = make_train_step(CONFIG, optimizer=transform, schedule=schedule, loss_normalization="sqrt", loss_chunk=48)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = train_state_shardings(abstract_params(CONFIG, boxed=True), transform, mesh)
    q_proj = shardings.params["decoder"]["layers"]["q_proj"]["kernel"].spec
    assert q_proj == PartitionSpec(None, "fsdp", "tensor", None)  # really sharded over fsdp and tensor
    assert shardings.params["lm_head"]["kernel"].spec == PartitionSpec("fsdp", "tensor")  # vocab over tensor
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated))
        state, metrics = sharded(
            jax.device_put(initial_state(transform), shardings), jax.device_put(batch, batch_sharding(mesh))
        )
    assert state.params["decoder"]["layers"]["q_proj"]["kernel"].sharding.spec == q_proj
    # fp32 sums over differently split batches and weights differ in rounding only
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], single_metrics["grad_norm"], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6),
        jax.device_get(state.params),
        jax.device_get(single_state.params),
    )


def test_gradient_accumulation_equals_whole_batch(batch, optimizer, single_device_step):
    whole, whole_metrics = single_device_step
    transform, schedule = optimizer
    step = make_train_step(
        CONFIG, optimizer=transform, schedule=schedule, loss_normalization="sqrt", grad_accum_steps=4
    )
    accumulated, accumulated_metrics = jax.jit(step)(initial_state(transform), batch)
    np.testing.assert_allclose(accumulated_metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6), accumulated.params, whole.params
    )


def test_every_remat_policy_gives_the_same_gradients(batch):
    """The policies "full", "dots" and "offload" (layer inputs kept in host memory) recompute what "none" keeps,
    and so does the MLP over 4 sequence slices (mlp_chunks): the same gradients, on a packed batch with images,
    videos and DeepStack."""
    params = random_params(CONFIG, 0)
    inputs = batch.inputs
    variants = {remat: dict(remat=remat) for remat in REMAT_POLICIES}
    variants["offload, mlp_chunks=4"] = dict(remat="offload", mlp_chunks=4)

    def loss(params, variant):
        model = Qwen3VL(CONFIG.replace(**variants[variant]))
        cross_entropy, _, _ = model.apply({"params": params}, inputs, batch.targets, method=Qwen3VL.token_losses)
        return (cross_entropy * batch.loss_mask).sum()

    grads = {variant: jax.jit(jax.grad(loss), static_argnums=1)(params, variant) for variant in variants}
    for variant in variants:
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()),
            grads[variant],
            grads["none"],
        )
