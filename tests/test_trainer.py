"""Trainer features: freezing, mixed precision, initialisation from an HF checkpoint, SIGTERM saves."""

import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import ENV, OPTIMIZER, ROOT, command, losses, random_params, tiny_config
from ml_collections import ConfigDict

import qwen3vl_jax
from qwen3vl_jax.checkpoints.hf_io import load_params
from qwen3vl_jax.config import preset
from qwen3vl_jax.modeling.model import init_params
from qwen3vl_jax.processing import Processor, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.training.optimizer import make_optimizer, part_of
from qwen3vl_jax.training.train_step import TrainState, make_train_step
from qwen3vl_jax.training.trainer import Trainer

CONFIG = preset("tiny")


def one_step(config, optimizer_config, *, batch, stop_frozen=True, compiled=None):
    """One train step; the optimizer freezes optimizer_config.freeze and, with stop_frozen, the step runs no
    backward pass into them (as the Trainer's). `compiled` (a list) receives the compiled step."""
    params = random_params(config, 0)
    optimizer, schedule = make_optimizer(optimizer_config, total_steps=100, params=params)
    state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
    freeze = tuple(optimizer_config.freeze) if stop_frozen else ()
    step = make_train_step(config, optimizer=optimizer, schedule=schedule, loss_normalization="sqrt", freeze=freeze)
    step = jax.jit(step).lower(state, batch).compile()
    if compiled is not None:
        compiled.append(step)
    new, metrics = step(state, batch)
    return params, new.params, metrics


FROZEN_VIT = ConfigDict({**OPTIMIZER.to_dict(), "freeze": ("vision",)})


@pytest.fixture(scope="module")
def frozen_vit_step(batch):
    """(parameters before, after, the compiled step) of one step with the ViT frozen and no backward pass into it
    (as the Trainer's), shared by the two tests of a frozen ViT."""
    programs = []
    before, after, _ = one_step(CONFIG, FROZEN_VIT, batch=batch, compiled=programs)
    return before, after, programs[0]


def test_freezing_the_vit_keeps_it_and_trains_the_rest(frozen_vit_step):
    before, after, _ = frozen_vit_step
    changed = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (part_of(tuple(k.key for k in path)), bool(np.any(np.asarray(a) != np.asarray(b)))),
        before,
        after,
    )
    parts = {}
    for part, moved in jax.tree_util.tree_leaves(changed, is_leaf=lambda x: isinstance(x, tuple)):
        parts.setdefault(part, []).append(moved)
    assert not any(parts["vision"]) and all(parts["llm"]) and all(parts["mergers"])


def test_a_frozen_vit_gets_no_backward_pass_and_the_same_updates(batch, frozen_vit_step):
    """Stopping the gradients at the frozen ViT changes no update (the optimizer zeroes the ViT's anyway) and
    the step needs less: no backward pass through the ViT blocks, no activations kept for one."""
    _, stopped, stopping = frozen_vit_step
    programs = [stopping]
    _, through, _ = one_step(CONFIG, FROZEN_VIT, batch=batch, stop_frozen=False, compiled=programs)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), stopped, through)
    flops = [program.cost_analysis()["flops"] for program in programs]
    assert flops[0] < 0.95 * flops[1], flops


def test_bf16_compute_with_fp32_master_weights(batch, single_device_step):
    _, fp32 = single_device_step
    _, params, bf16 = one_step(CONFIG.replace(dtype="bfloat16"), OPTIMIZER, batch=batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=2e-2)  # bf16 keeps ~3 significant digits


def tiny_checkpoint_with_processor(tiny, tmp_path):
    path = tmp_path / "init"
    shutil.copytree(tiny.path, path)
    Processor(byte_tokenizer(), load_chat_template(None)).save_pretrained(str(path))
    return str(path)


def test_initialisation_from_an_hf_checkpoint(tiny, tmp_path):
    config = tiny_config()
    config.model.init_from = tiny_checkpoint_with_processor(tiny, tmp_path)
    config.model.overrides = ConfigDict(dict(remat="dots"))
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    trainer = Trainer(config, str(tmp_path / "work"))
    assert trainer.model_config == tiny.config.replace(remat="dots")
    state = trainer.initial_state()
    expected = load_params(tiny.path, tiny.config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), expected)
    trainer.checkpointer.close()
    trainer.writer.close()


def test_fresh_parts_start_from_random_weights_and_the_rest_from_the_checkpoint(tmp_path):
    """A second stage that adds DeepStack to a model pretrained without it (model.init_fresh): the mergers are
    the random init of config.seed, everything else is the checkpoint's."""
    without = CONFIG.replace(deepstack=False)
    path = tmp_path / "stage1"
    qwen3vl_jax.Qwen3VLModel.from_config(without, seed=7).save_pretrained(str(path))
    Processor(byte_tokenizer(), load_chat_template(None)).save_pretrained(str(path))
    config = tiny_config()
    config.model.init_from = str(path)
    config.model.overrides = ConfigDict(dict(deepstack=True, vision=dict(deepstack_visual_indexes=(0, 1))))
    config.model.init_fresh = ("visual/deepstack_merger",)
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    trainer = Trainer(config, str(tmp_path / "work"))
    params = flatten_dict(jax.device_get(trainer.initial_state().params))
    init = jax.jit(init_params, static_argnums=0)  # as the trainer's: eager init rounds a few values differently
    random = flatten_dict(init(trainer.model_config, jax.random.PRNGKey(config.seed)))
    read = flatten_dict(load_params(str(path), trainer.model_config, fresh=config.model.init_fresh))
    fresh = {name for name in params if name[1].startswith("deepstack_merger")}
    assert fresh and params.keys() == random.keys() == read.keys() | fresh
    for name, value in params.items():
        np.testing.assert_array_equal(value, random[name] if name in fresh else read[name], err_msg="/".join(name))
    trainer.checkpointer.close()
    trainer.writer.close()


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    process = subprocess.Popen(
        command(tmp_path, steps=500, every=1000),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while max(losses(tmp_path), default=0) < 5:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    assert "SIGTERM: saving a checkpoint" in output
    saved = [int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()]
    assert saved == [max(losses(tmp_path))]  # the step it stopped at, although `every` is 1000
    assert 5 <= saved[0] < 500
