"""The run config: every config file takes the mesh's context axis and any model field from the command line; with
model.init_from the checkpoint's config.json is the model (its logits equal transformers'), explicit overrides
apply and are logged, and one that contradicts the checkpoint's shapes stops naming the field; LoRA and the data
defaults have one source."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest
from helpers import ROOT, parse_flags, tiny_config
from hf_reference import batch_inputs, build_prompt, hf_logits, hf_model, save_hf
from ml_collections import ConfigDict

from qwen3vl_jax import Qwen3VLModel
from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.config import LoraConfig, preset, to_hf
from qwen3vl_jax.data.pipeline import DataConfig
from qwen3vl_jax.parallel.sharding import MESH_AXES
from qwen3vl_jax.training.model_source import model_config_from
from qwen3vl_jax.training.run_config import model_settings, run_config

# every config file, with the argument it needs after `:`; sweep files hold the run config under `base`
CONFIG_FILES = {
    "tiny.py": "",
    "tiny_moe.py": "",
    "tiny_qwen3_5.py": "",
    "qwen3_5_2b.py": ":sft_32k",
    "qwen3_5_9b.py": "",
    "dpo_toy.py": "",
    "grpo_toy.py": "",
    "grpo_vs_sft.py": ":/default/hf",
    "qwen3_vl_2b.py": ":sft",
    "qwen3_vl_8b.py": ":long",
    "qwen3_vl_30b_a3b.py": ":pretrain",
    "qwen3_vl_235b_a22b.py": "",
    "qwen3_vl_4b.py": "",
    "qwen3_vl_32b.py": ":sft_32k",
    "ablate_deepstack.py": ":finetune,/stage1",
    "ablate_loss_norm.py": "",
    "ablate_mrope.py": ":full",
    "ablate_mrope_video.py": "",
    "distill_tiny.py": ":/teacher",
}
# the released checkpoint's settings, unlike the tiny-cpu preset of configs/tiny.py (rope 1e4, rms eps 1e-6)
CHECKPOINT = preset("tiny", text=dict(rope_theta=2.5e5, rms_norm_eps=1e-5))


def test_the_config_files_are_all_listed():
    names = {name for name in os.listdir(os.path.join(ROOT, "configs")) if name.endswith(".py")}
    assert names - {"__init__.py", "released.py", "ablation_base.py"} == CONFIG_FILES.keys()


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_every_config_takes_the_context_axis_and_any_model_field_from_the_command_line(name):
    path = os.path.join(ROOT, "configs", name) + CONFIG_FILES[name]
    sweep = name.startswith(("ablate", "distill", "grpo_vs"))
    prefix = "--config.base." if sweep else "--config."
    config = parse_flags(
        f"--config={path}",
        f"{prefix}mesh.context=2",
        f"{prefix}model.overrides.text.rope_theta=1e6",
        f"{prefix}model.overrides.vision.intermediate_size=96",
        f"{prefix}lora.rank=4",
    )
    run = config.base if sweep else config
    assert set(run.mesh) == set(MESH_AXES) and run.mesh.context == 2
    model = model_config_from(ConfigDict(dict(run.to_dict(), model=dict(run.model.to_dict(), init_from=""))))
    assert (model.text.rope_theta, model.vision.intermediate_size, model.lora.rank) == (1e6, 96, 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random transformers checkpoint of CHECKPOINT (other widths, rope base and norm eps than configs/tiny.py's
    preset) and the transformers model it holds."""
    model = hf_model(CHECKPOINT)
    return save_hf(model, tmp_path_factory.mktemp("checkpoint")), model


def test_tiny_config_with_init_from_builds_exactly_the_checkpoints_model(checkpoint, caplog):
    """configs/tiny.py's preset does not apply on top of the checkpoint: same logits as transformers'; its one
    explicit model setting (remat "dots", which changes no number) applies and is logged."""
    path, reference = checkpoint
    config = tiny_config()
    config.model.init_from = path
    with caplog.at_level(logging.WARNING):
        model = model_config_from(config)
    assert (model.text.rope_theta, model.text.rms_norm_eps, model.remat) == (2.5e5, 1e-5, "dots")
    assert model == hf_io.load_config(path).replace(remat="dots")
    assert [r.getMessage() for r in caplog.records] == ["model override remat = 'dots' (checkpoint: 'none')"]

    rng = np.random.default_rng(0)
    prompt = build_prompt(CHECKPOINT, [("text", 5), ("image", (4, 6)), ("text", 7)], rng=rng)
    inputs = batch_inputs(CHECKPOINT, [prompt])
    ours = Qwen3VLModel(model, hf_io.load_params(path, model))(**inputs)
    expected = hf_logits(reference, inputs)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def config_json(tmp_path, config) -> str:
    """A directory holding only `config`'s config.json (what model_config_from reads of a checkpoint)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(to_hf(config)))
    return str(tmp_path)


def test_explicit_overrides_on_a_checkpoint_apply_and_are_logged(tmp_path, caplog):
    config = tiny_config()
    config.model.init_from = config_json(tmp_path, CHECKPOINT)
    config.model.overrides.text.rope_theta = 1e4  # the same value as the preset's: given, so it applies
    config.model.overrides.text.num_hidden_layers = 3  # the checkpoint's own value: a no-op, not logged
    config.model.overrides.update(dtype="bfloat16", mrope_layout="chunked")
    config.lora.rank = 8
    with caplog.at_level(logging.WARNING):
        model = model_config_from(config)
    expected = CHECKPOINT.replace(text=dict(rope_theta=1e4), dtype="bfloat16", mrope_layout="chunked", remat="dots")
    assert model == expected.replace(lora=dict(rank=8))
    assert sorted(r.getMessage() for r in caplog.records) == [
        "model override dtype = 'bfloat16' (checkpoint: 'float32')",
        "model override mrope_layout = 'chunked' (checkpoint: 'interleaved')",
        "model override remat = 'dots' (checkpoint: 'none')",
        "model override text.rope_theta = 10000.0 (checkpoint: 250000.0)",
    ]


def test_an_override_that_changes_the_checkpoints_shapes_stops_naming_it(tmp_path):
    config = tiny_config()
    config.model.init_from = config_json(tmp_path, CHECKPOINT)
    config.model.overrides.text.hidden_size = 256
    with pytest.raises(ValueError, match=r"text\.hidden_size = 256 \(checkpoint: 64\)"):
        model_config_from(config)
    config.model.overrides.vision.out_hidden_size = 256  # consistent with each other, not with the checkpoint
    with pytest.raises(ValueError, match=r"text\.hidden_size = 256 .*vision\.out_hidden_size = 256 \(checkpoint: 64\)"):
        model_config_from(config)
    config.model.overrides.text.hidden_size = config.model.overrides.vision.out_hidden_size = None
    config.model.overrides.text.num_hidden_layers = 2
    with pytest.raises(
        ValueError, match=r"text\.num_hidden_layers = 2 \(checkpoint: 3\).*layers\.2\..* not in the model"
    ):
        model_config_from(config)


def test_parts_added_to_a_checkpoint_must_be_named_fresh(tmp_path):
    """DeepStack mergers added to a model trained without them: allowed only as init_fresh parts; the switch that
    drops a checkpoint's mergers (deepstack=False) is allowed."""
    without = CHECKPOINT.replace(vision=dict(deepstack_visual_indexes=()))
    config = tiny_config()
    config.model.init_from = config_json(tmp_path / "without", without)
    config.model.overrides.vision.deepstack_visual_indexes = (0, 1)
    with pytest.raises(ValueError, match=r"vision\.deepstack_visual_indexes = \(0, 1\) \(checkpoint: \(\)\)"):
        model_config_from(config)
    config.model.init_fresh = ("visual/deepstack_merger",)
    assert model_config_from(config).num_deepstack == 2
    config = tiny_config()
    config.model.init_from = config_json(tmp_path / "with", CHECKPOINT)
    config.model.overrides.deepstack = False
    assert model_config_from(config).num_deepstack == 0


def test_preset_runs_take_any_field_and_the_preset_itself():
    config = tiny_config()
    config.model.overrides.text.hidden_size = config.model.overrides.vision.out_hidden_size = 256
    assert model_config_from(config) == preset(
        "tiny-cpu", remat="dots", text=dict(hidden_size=256), vision=dict(out_hidden_size=256)
    )
    config = tiny_config()
    config.model.preset = "tiny-moe"  # the preset named is the one built (with the config file's remat)
    assert model_config_from(config) == preset("tiny-moe", remat="dots")


def test_lora_is_set_in_one_place():
    config = tiny_config()
    assert "lora" not in config.model.overrides
    config.lora.update(rank=16, targets=("q_proj",))
    assert model_config_from(config).lora == LoraConfig(rank=16, targets=("q_proj",))
    config.model.overrides = ConfigDict(dict(lora=dict(rank=4)))
    with pytest.raises(ValueError, match=r"config\.model\.overrides\.lora: LoRA is set in config\.lora"):
        model_config_from(config)
    with pytest.raises(ValueError, match=r"LoRA is set in config\.lora"):
        model_settings("tiny", lora=dict(rank=4))


def test_unknown_model_fields_are_named_with_the_closest_ones():
    with pytest.raises(ValueError, match=r"overrides\.text\.hiden_size: TextConfig has no field .*hidden_size"):
        model_settings("tiny", text=dict(hiden_size=8))
    config = tiny_config()
    config.model.overrides = ConfigDict(dict(remmat="full"))
    with pytest.raises(ValueError, match=r"overrides\.remmat: ModelConfig has no field 'remmat'; did you mean remat"):
        model_config_from(config)


def test_sections_that_mirror_a_dataclass_take_its_defaults():
    config = run_config()
    assert config.lora.to_dict() == dataclasses.asdict(LoraConfig())
    data = {k: v for k, v in config.data.to_dict().items() if k not in ("rows_per_device", "num_shards")}
    assert DataConfig.from_dict(data) == DataConfig(sources=())
    defaulted = {f.name for f in dataclasses.fields(DataConfig) if f.name not in ("sources", "context_shards")}
    assert defaulted <= set(config.data)
