"""LoRA adapters: saved in the PEFT format, `peft` on transformers gives our logits; read back; merged into the
base for an HF export; and a LoRA train step keeps optimizer state for the adapters only."""

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import OPTIMIZER
from hf_reference import batch_inputs, build_prompt, hf_logits
from safetensors.numpy import load_file, save_file

import qwen3vl_jax
from qwen3vl_jax.checkpoints.hf_io import CheckpointError
from qwen3vl_jax.checkpoints.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapted_layers,
    load_adapters,
    merge_lora,
    save_adapters,
)
from qwen3vl_jax.config.lora import LORA_TARGETS, LoraConfig
from qwen3vl_jax.modeling.layers import is_lora
from qwen3vl_jax.modeling.model import abstract_params
from qwen3vl_jax.parallel.sharding import param_shardings
from qwen3vl_jax.training.optimizer import make_optimizer

PROMPTS = [[("text", 4), ("image", (6, 8)), ("text", 9)], [("text", 3), ("video", (2, 4, 6)), ("text", 5)]]


# every layer kind Qwen3-VL has (the others are Qwen3.5's gated delta-net projections)
QWEN3_VL_TARGETS = tuple(
    t for t in LORA_TARGETS if t not in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
)


def with_adapters(tiny, *, targets=QWEN3_VL_TARGETS, rank=4, alpha=8.0):
    """Our tiny model's weights plus adapters on `targets`, A and B both random (at init B = 0: no effect; A drawn
    as its init draws it, U(+-1/sqrt(in)), with the tiny model's in ~ 100)."""
    config = tiny.config.replace(lora=dict(rank=rank, alpha=alpha, targets=targets))
    flat = dict(flatten_dict(jax.device_get(tiny.ours.params)))
    rng = np.random.default_rng(1)
    for name, leaf in flatten_dict(abstract_params(config)).items():
        if name[-1] == "lora_a":
            flat[name] = rng.uniform(-0.1, 0.1, leaf.shape).astype(np.float32)
        elif name[-1] == "lora_b":
            flat[name] = (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return config, unflatten_dict(flat)


@pytest.fixture(scope="module")
def inputs(tiny):
    return batch_inputs(tiny.config, [build_prompt(tiny.config, p, rng=np.random.default_rng(2)) for p in PROMPTS])


def test_peft_on_transformers_gives_our_logits(tiny, inputs, tmp_path):
    config, params = with_adapters(tiny)
    ours = qwen3vl_jax.Qwen3VLModel(config, params)(**inputs)
    save_adapters(str(tmp_path / "adapter"), params, config, base_model=str(tiny.path))
    model = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.hf), str(tmp_path / "adapter")).eval()
    adapted = [name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)]
    assert len(adapted) == len(adapted_layers(config)) > 0  # every ViT block, merger and decoder layer
    real = inputs["attention_mask"].astype(bool)
    reference = hf_logits(model, inputs)
    np.testing.assert_allclose(ours[real], reference[real], atol=1e-5, rtol=0)
    without = hf_logits(tiny.hf, inputs)  # the adapters matter: the base model's logits are far from these
    assert np.abs(without[real] - reference[real]).max() > 1e-2
    # the base checkpoint and the adapter directory in one call: the LoRA settings come from the directory
    loaded = qwen3vl_jax.load_pretrained(str(tiny.path), adapters=str(tmp_path / "adapter"))
    assert loaded.config.lora == config.lora
    np.testing.assert_allclose(loaded(**inputs)[real], reference[real], atol=1e-5, rtol=0)


def test_adapters_read_back_and_merge_into_the_base(tiny, inputs, tmp_path):
    config, params = with_adapters(tiny, targets=("q_proj", "o_proj", "down_proj", "attn_qkv", "linear_fc2"))
    save_adapters(str(tmp_path), params, config)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[-1].key.startswith("lora") else x, params
    )
    read = load_adapters(str(tmp_path), zeroed, config)
    for name, value in flatten_dict(params).items():
        np.testing.assert_array_equal(flatten_dict(read)[name], value, err_msg="/".join(name))
    merged, plain = merge_lora(params, config)
    assert plain.lora.rank == 0 and not any(is_lora(name) for name in flatten_dict(merged))
    expected = qwen3vl_jax.Qwen3VLModel(config, params)(**inputs)
    np.testing.assert_allclose(qwen3vl_jax.Qwen3VLModel(plain, merged)(**inputs), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="LoRA adapters, which an HF checkpoint cannot hold"):
        qwen3vl_jax.Qwen3VLModel(config, params).save_pretrained(str(tmp_path / "hf"))


def test_only_the_adapters_get_optimizer_state(tiny):
    _, params = with_adapters(tiny, targets=("q_proj", "v_proj", "gate_proj"))
    optimizer, _ = make_optimizer(OPTIMIZER, total_steps=10, params=params, lora=True)
    state_sizes = sum(x.size for x in jax.tree_util.tree_leaves(optimizer.init(params)) if np.ndim(x) > 0)
    adapter_sizes = sum(v.size for name, v in flatten_dict(params).items() if is_lora(name))
    assert adapter_sizes > 0 and state_sizes == 2 * adapter_sizes  # Adam's two moments, adapters only
    updates, _ = optimizer.update(jax.tree_util.tree_map(np.ones_like, params), optimizer.init(params), params)
    for name, update in flatten_dict(updates).items():
        assert bool(np.any(update != 0)) == is_lora(name), "/".join(name)


def test_adapters_load_onto_a_model_from_load_pretrained(tiny, tmp_path):
    """A model from `load_pretrained` has no adapter parameters: `load_adapters` adds them for a LoRA config,
    names the way to load them for a config without LoRA, and `load_pretrained(adapters=)` places them on a mesh
    that has only some of the project's axes, sharded like the weights they adapt."""
    config, params = with_adapters(tiny, targets=("q_proj", "down_proj", "attn_qkv", "linear_fc1"), rank=2)
    save_adapters(str(tmp_path), params, config)
    expected = flatten_dict(params)
    read = flatten_dict(load_adapters(str(tmp_path), tiny.ours.params, config))
    assert read.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(read[name], value, err_msg="/".join(name))
    with pytest.raises(CheckpointError, match=r"no adapters \(lora rank 0\).*load_pretrained\(base, adapters="):
        load_adapters(str(tmp_path), tiny.ours.params, tiny.ours.config)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    model = qwen3vl_jax.load_pretrained(str(tiny.path), adapters=str(tmp_path), mesh=mesh)
    assert model.config.lora == config.lora and dict(model.mesh.shape) == dict(
        data=1, fsdp=4, context=1, tensor=2, expert=1
    )
    shardings = flatten_dict(param_shardings(abstract_params(config, boxed=True), model.mesh))
    split = 0
    for name, value in flatten_dict(model.params).items():
        assert value.sharding == shardings[name], "/".join(name)
        np.testing.assert_array_equal(np.asarray(value), expected[name], err_msg="/".join(name))
        split += is_lora(name) and value.sharding.shard_shape(value.shape) != value.shape
    assert split > 0  # the adapters really are split over the mesh
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        model.with_adapters(str(tmp_path))


def test_adapter_directories_this_model_cannot_hold_are_refused(tiny, tmp_path):
    config, params = with_adapters(tiny, targets=("q_proj",), rank=2)
    save_adapters(str(tmp_path), params, config)
    settings = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(dict(settings, use_dora=True)))
    with pytest.raises(CheckpointError, match=r"adapter settings \{'use_dora': True\} are not supported"):
        qwen3vl_jax.load_pretrained(str(tiny.path), adapters=str(tmp_path))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(settings))
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    strange = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({**tensors, strange: np.ones(4, np.float32)}, str(tmp_path / ADAPTER_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) are not LoRA weights of a linear layer"):
        qwen3vl_jax.load_pretrained(str(tiny.path), adapters=str(tmp_path))


@pytest.mark.parametrize(
    "lora, message",
    [
        (dict(rank=4, targets=("qkv",)), r"lora targets \['qkv'\] are not adaptable layers"),
        (dict(rank=4, targets=("qproj",)), r"'qproj': did you mean q_proj"),
        (dict(rank=4, targets=()), "lora targets are empty"),
        (dict(rank=-1), r"lora rank must be an integer >= 0 .* got -1"),
        (dict(rank=4, dropout=1.0), r"lora dropout must be in \[0, 1\), got 1.0"),
        (dict(rank=4, alpha=0.0), r"lora alpha must be a number > 0"),
        # adapter options with rank 0 would silently train the whole model
        (dict(rank=0, alpha=32.0), "lora rank is 0, which turns the adapters off .* alpha=32.0 is set"),
        (dict(rank=0, targets=("q_proj",)), r"lora rank is 0, which turns the adapters off .* targets=\('q_proj',\)"),
        (dict(rank=0, dropout=0.1), "lora rank is 0, which turns the adapters off .* dropout=0.1 is set"),
    ],
)
def test_bad_lora_settings_are_refused(tiny, lora, message):
    with pytest.raises(ValueError, match=message):
        tiny.config.replace(lora=lora)


def test_adapter_options_with_rank_0_are_refused_in_a_run_config():
    from helpers import tiny_config

    from qwen3vl_jax.training.model_source import model_config_from

    config = tiny_config()
    assert model_config_from(config).lora == LoraConfig()  # the defaults: no adapters
    config.lora.alpha = 32.0
    with pytest.raises(ValueError, match=r"lora rank is 0, which turns the adapters off .* alpha=32.0 is set"):
        model_config_from(config)


def test_a_lora_run_trains_only_the_adapters_and_exports_them(tiny, tmp_path):
    """`--config.lora.rank=4` on the default config, from an HF checkpoint: two steps change the adapters and
    nothing else; the run writes the PEFT adapters and the merged model."""
    from helpers import tiny_config, with_byte_processor
    from ml_collections import ConfigDict

    from qwen3vl_jax.checkpoints.hf_io import load_params
    from qwen3vl_jax.training.trainer import Trainer

    base = with_byte_processor(tiny.path, tmp_path / "base")
    config = tiny_config()
    config.model.init_from, config.model.overrides = base, ConfigDict()
    config.lora.update(rank=4, dropout=0.1, targets=("q_proj", "v_proj", "mlp_fc1"))
    config.update(steps=2, log_every=1)
    config.eval.every = 0
    config.data.update(seq_len=128, max_patches=64, batch_size=8)
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    trainer = Trainer(config, str(tmp_path / "work"))
    trainer.run()
    trained = flatten_dict(jax.device_get(trainer.state.params))
    loaded = flatten_dict(load_params(base, trainer.model_config))
    for name, value in trained.items():
        if is_lora(name):
            assert name[-1] == "lora_a" or np.abs(value).max() > 0, "/".join(name)  # B moved away from zero
        else:
            np.testing.assert_array_equal(value, loaded[name], err_msg="/".join(name))
    adapters = load_adapters(str(tmp_path / "work" / "lora"), trainer.state.params, trainer.model_config)
    for name, value in flatten_dict(adapters).items():
        np.testing.assert_array_equal(value, trained[name])
    merged, _ = merge_lora(trainer.state.params, trainer.model_config)
    exported = flatten_dict(load_params(str(tmp_path / "work" / "hf"), tiny.config))
    for name, value in flatten_dict(merged).items():
        np.testing.assert_array_equal(exported[name], value, err_msg="/".join(name))


def test_lora_dropout_only_with_a_dropout_rng_and_unbiased():
    """Dropout on the adapter's input: off without a "dropout" rng (eval, generation); with one, each draw
    differs and the mean over draws is the dropout-free output (inverted dropout)."""
    from qwen3vl_jax.config import LoraConfig
    from qwen3vl_jax.modeling.layers import Dense

    layer = Dense(
        6, ("embed", "mlp"), lora=LoraConfig(rank=2, alpha=4.0, dropout=0.5, targets=("q_proj",)), name="q_proj"
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    params = layer.init(jax.random.PRNGKey(1), x)
    params = nn.meta.unbox(params)
    params["params"]["lora_b"] = jnp.ones_like(params["params"]["lora_b"])  # B != 0: the adapter contributes
    plain = Dense(6, ("embed", "mlp"), lora=LoraConfig(rank=2, alpha=4.0, targets=("q_proj",)), name="q_proj")
    expected = plain.apply(params, x)
    np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-6)  # no rng: no dropout
    draws = jax.vmap(lambda key: layer.apply(params, x, rngs={"dropout": key}))(
        jax.random.split(jax.random.PRNGKey(2), 4000)
    )
    assert np.abs(draws[0] - draws[1]).max() > 1e-3
    np.testing.assert_allclose(draws.mean(0), expected, atol=0.05 * np.abs(expected).max())
