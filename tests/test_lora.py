"""LoRA adapters: saved in the PEFT format, `peft` on transformers gives our logits; read back; merged into the
base for an HF export; and a LoRA train step keeps optimizer state for the adapters only."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import OPTIMIZER
from hf_reference import batch_inputs, build_prompt, hf_logits

import qwen3vl_jax
from qwen3vl_jax.checkpoints.peft import adapted_layers, load_adapters, merge_lora, save_adapters
from qwen3vl_jax.config.model import LORA_TARGETS
from qwen3vl_jax.modeling.layers import is_lora
from qwen3vl_jax.modeling.model import init_params
from qwen3vl_jax.training.optimizer import make_optimizer

PROMPTS = [[("text", 4), ("image", (6, 8)), ("text", 9)], [("text", 3), ("video", (2, 4, 6)), ("text", 5)]]


def with_adapters(tiny, *, targets=LORA_TARGETS, rank=4, alpha=8.0):
    """Our tiny model's weights plus adapters on `targets` whose B is random (at init B = 0: no effect)."""
    config = tiny.config.replace(lora=dict(rank=rank, alpha=alpha, targets=targets))
    flat = flatten_dict(init_params(config, jax.random.PRNGKey(3)))
    base = flatten_dict(jax.device_get(tiny.ours.params))
    rng = np.random.default_rng(1)
    for name, value in flat.items():
        if name[-1] == "lora_b":
            flat[name] = (0.2 * rng.standard_normal(value.shape)).astype(np.float32)
        elif not is_lora(name):
            flat[name] = base[name]
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


def test_bad_targets_are_refused(tiny):
    with pytest.raises(ValueError, match=r"lora targets \['qkv'\] are not adaptable layers"):
        tiny.config.replace(lora=dict(rank=4, targets=("qkv",)))


def test_a_lora_run_trains_only_the_adapters_and_exports_them(tiny, tmp_path):
    """`--config.lora.rank=4` on the default config, from an HF checkpoint: two steps change the adapters and
    nothing else; the run writes the PEFT adapters and the merged model."""
    import shutil

    from helpers import tiny_config
    from ml_collections import ConfigDict

    from qwen3vl_jax.checkpoints.hf_io import load_params
    from qwen3vl_jax.processing import Processor, byte_tokenizer
    from qwen3vl_jax.processing.chat import load_chat_template
    from qwen3vl_jax.training.trainer import Trainer

    base = tmp_path / "base"
    shutil.copytree(tiny.path, base)
    Processor(byte_tokenizer(), load_chat_template(None)).save_pretrained(str(base))
    config = tiny_config()
    config.model.init_from, config.model.overrides = str(base), ConfigDict()
    config.lora.update(rank=4, dropout=0.1, targets=("q_proj", "v_proj", "mlp_fc1"))
    config.update(steps=2, log_every=1)
    config.eval.every = 0
    config.data.update(seq_len=128, max_patches=64, batch_size=8)
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    trainer = Trainer(config, str(tmp_path / "work"))
    trainer.run()
    trained = flatten_dict(jax.device_get(trainer.state.params))
    loaded = flatten_dict(load_params(str(base), trainer.model_config))
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
