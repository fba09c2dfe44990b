"""HF checkpoint import/export: round trips through transformers, sharding, tied heads, and clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import transformers
from hf_reference import batch_inputs, build_prompt, hf_logits
from safetensors.numpy import load_file, save_file

import qwen3vl_jax
from qwen3vl_jax.checkpoints.hf_io import CheckpointError

PARTS = [("text", 3), ("image", (4, 6)), ("text", 2), ("video", (2, 4, 4)), ("text", 4)]


def logits_pair(model_ours, model_hf, *, config, seed=3):
    inputs = batch_inputs(config, [build_prompt(config, PARTS, rng=np.random.default_rng(seed))])
    return model_ours(**inputs), hf_logits(model_hf, inputs)


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 200_000], ids=["single_file", "sharded"])
def test_save_then_transformers_loads_same_logits(tiny, tmp_path, shard_bytes):
    tiny.ours.save_pretrained(str(tmp_path), max_shard_bytes=shard_bytes)
    sharded = os.path.exists(tmp_path / "model.safetensors.index.json")
    assert sharded == (shard_bytes < 5 * 2**30)
    reloaded_hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path))
    ours, ref = logits_pair(tiny.ours, reloaded_hf, config=tiny.config)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # and the weights are bit-identical to the checkpoint we started from
    for name, p in tiny.hf.state_dict().items():
        np.testing.assert_array_equal(reloaded_hf.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    # our loader reads the sharded / single layout back to the same params
    again = qwen3vl_jax.load_pretrained(str(tmp_path))
    np.testing.assert_array_equal(
        again(**batch_inputs(tiny.config, [build_prompt(tiny.config, PARTS, rng=np.random.default_rng(3))])), ours
    )


def test_tied_head_with_or_without_lm_head_tensor(tiny_tied, tmp_path):
    tensors = load_file(os.path.join(tiny_tied.path, "model.safetensors"))
    assert "lm_head.weight" not in tensors  # transformers omits the tied copy ...
    shutil.copytree(tiny_tied.path, tmp_path / "with_head")
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]
    save_file(tensors, str(tmp_path / "with_head" / "model.safetensors"), metadata={"format": "pt"})
    with_head = qwen3vl_jax.load_pretrained(str(tmp_path / "with_head"))  # ... which some checkpoints carry
    ours, ref = logits_pair(with_head, tiny_tied.hf, config=tiny_tied.config)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    tiny_tied.ours.save_pretrained(str(tmp_path / "saved"))
    assert "lm_head.weight" not in load_file(str(tmp_path / "saved" / "model.safetensors"))


def test_config_forms_4x_and_5x_load_the_same(tiny, tmp_path):
    """A released-style (4.x: rope_theta + rope_scaling) config.json and the 5.x form give the same model."""
    shutil.copytree(tiny.path, tmp_path / "v4")
    hf = json.loads((tmp_path / "v4" / "config.json").read_text())
    rope = hf["text_config"].pop("rope_parameters")
    hf["text_config"]["rope_theta"] = rope.pop("rope_theta")
    hf["text_config"]["rope_scaling"] = rope
    (tmp_path / "v4" / "config.json").write_text(json.dumps(hf))
    assert qwen3vl_jax.load_pretrained(str(tmp_path / "v4")).config == tiny.ours.config


def corrupt(tiny, tmp_path, *, edit):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny.path, target)
    edit(target)
    return str(target)


def edit_tensors(fn):
    def edit(path):
        tensors = load_file(str(path / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    return edit


def truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def set_layers(path):
    hf = json.loads((path / "config.json").read_text())
    hf["text_config"]["num_hidden_layers"] = 4
    (path / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            edit_tensors(lambda t: t.pop("model.language_model.layers.1.self_attn.k_norm.weight")),
            r"lacks 1 tensor.*model\.language_model\.layers\.1\.self_attn\.k_norm\.weight",
        ),
        (
            edit_tensors(lambda t: t.update({"model.visual.extra.weight": np.zeros(3, np.float32)})),
            r"does not use.*model\.visual\.extra\.weight",
        ),
        (
            edit_tensors(lambda t: t.update({"model.visual.blocks.2.attn.qkv.weight": np.zeros((96, 31), np.float32)})),
            r"model\.visual\.blocks\.2\.attn\.qkv\.weight has shape \(96, 31\), but the config needs \(96, 32\)",
        ),
        (truncate, r"cannot read safetensors file .*model\.safetensors"),
        (lambda p: (p / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
        (lambda p: os.remove(p / "model.safetensors"), r"neither model\.safetensors nor"),
        (set_layers, r"lacks 11 tensor.*model\.language_model\.layers\.3\."),
    ],
    ids=["missing", "unexpected", "mis_shaped", "truncated_file", "bad_config_json", "no_weights", "config_mismatch"],
)
def test_bad_checkpoints_raise_clear_errors(tiny, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        qwen3vl_jax.load_pretrained(corrupt(tiny, tmp_path, edit=edit))


def test_sharded_index_naming_a_missing_shard(tiny, tmp_path):
    tiny.ours.save_pretrained(str(tmp_path), max_shard_bytes=200_000)
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"lists shard {shard}, which does not exist"):
        qwen3vl_jax.load_pretrained(str(tmp_path))
