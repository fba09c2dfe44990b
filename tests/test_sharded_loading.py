"""Streamed, sharded loading of HF checkpoints onto a mesh of 8 fake devices: every device's shard is read from
the files on its own (only its bytes), equal to reading whole tensors; square fused experts in both layouts."""

import json

import jax
import numpy as np
import pytest
import transformers
from flax.traverse_util import flatten_dict
from helpers import RecordingFile, data_bytes_read, random_params
from hf_reference import batch_inputs, build_prompt, hf_logits, hf_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qwen3vl_jax
from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.checkpoints.hf_io import CheckpointError
from qwen3vl_jax.checkpoints.hf_mapping import hf_rules
from qwen3vl_jax.config.presets import preset
from qwen3vl_jax.modeling.kv_cache import init_cache
from qwen3vl_jax.modeling.model import abstract_params
from qwen3vl_jax.parallel.sharding import make_mesh, param_shardings

PARTS = [("text", 3), ("image", (4, 6)), ("text", 2), ("video", (2, 4, 4)), ("text", 4)]
GATE_UP = "model.language_model.layers.0.mlp.experts.gate_up_proj"


def whole_tensor_params(path, config):
    """The parameters read the simple way, independently of the loader: every tensor whole with the
    `safetensors` library, converted by the rules' whole-tensor `to_ours`."""
    files = hf_io.checkpoint_files(str(path))
    tensors = {}
    for file in sorted(set(files.values())):
        tensors.update(load_file(file))
    flat = {p: np.zeros(x.shape, np.float32) for p, x in flatten_dict(abstract_params(config)).items()}
    for rule in hf_rules(config):
        target = flat[rule.path] if rule.index is None else flat[rule.path][rule.index]
        target[...] = rule.to_ours(tensors[rule.hf], target.shape)
    return flat


def load_sharded(path, config, mesh_sizes):
    mesh = make_mesh(mesh_sizes)
    shardings = param_shardings(abstract_params(config, boxed=True), mesh)
    RecordingFile.reads = []
    params = hf_io.load_params(str(path), config, shardings, opener=RecordingFile)
    return params, shardings


def assert_sharded_equal(params, shardings, expected):
    flat, flat_shardings = flatten_dict(params), flatten_dict(shardings)
    split = 0
    for name, want in expected.items():
        array = flat[name]
        assert array.sharding == flat_shardings[name], name
        shard_shape = flat_shardings[name].shard_shape(want.shape)
        split += shard_shape != want.shape
        for shard in array.addressable_shards:  # each device holds its shard only, with the right values
            assert shard.data.shape == shard_shape, name
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg="/".join(name))
    assert split > len(expected) // 2  # most parameters really are split over the mesh


def tensor_data_bytes(path):
    total = 0
    for file in sorted(set(hf_io.checkpoint_files(str(path)).values())):
        with safe_open(file, "numpy") as f:
            total += sum(f.get_tensor(key).nbytes for key in f.keys())
    return total


def test_dense_checkpoint_loads_onto_fsdp_4_x_tensor_2_reading_each_byte_once(tiny):
    params, shardings = load_sharded(tiny.path, tiny.config, {"fsdp": 4, "tensor": 2})
    assert_sharded_equal(params, shardings, whole_tensor_params(tiny.path, tiny.config))
    # the 8 devices' shards tile every tensor: reading only its own box, each byte is read once in all
    assert data_bytes_read() == tensor_data_bytes(tiny.path)
    inputs = batch_inputs(tiny.config, [build_prompt(tiny.config, PARTS, rng=np.random.default_rng(3))])
    # the model runs on the sharded parameters (its matmuls split over the mesh: another summation order)
    sharded_logits = qwen3vl_jax.Qwen3VLModel(tiny.config, params)(**inputs)
    np.testing.assert_allclose(sharded_logits, tiny.ours(**inputs), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    config = preset("tiny-moe")
    model = qwen3vl_jax.Qwen3VLModel.from_config(config, seed=4)
    return config, model, tmp_path_factory


@pytest.mark.parametrize("layout", ["hub", "transposed"])
def test_moe_checkpoint_loads_onto_fsdp_2_x_expert_4_in_both_layouts(moe, layout):
    config, model, tmp = moe
    path = tmp.mktemp(layout)
    model.save_pretrained(str(path), expert_layout=layout)
    params, shardings = load_sharded(path, config, {"fsdp": 2, "expert": 4})
    assert_sharded_equal(params, shardings, whole_tensor_params(path, config))
    assert data_bytes_read() == tensor_data_bytes(path)
    for name, value in flatten_dict(jax.device_get(model.params)).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(params)[name]), value, err_msg="/".join(name))


def square(config):
    """hidden = 2 x moe_intermediate_size: the fused gate_up tensor is (E, hidden, hidden) in both layouts."""
    return config.replace(text=dict(moe_intermediate_size=config.text.hidden_size // 2))


def rewrite(path, *, metadata, transformers_version):
    """The checkpoint at `path` with other safetensors metadata and config.json's transformers_version."""
    tensors = load_file(str(path / "model.safetensors"))
    save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
    hf = json.loads((path / "config.json").read_text())
    hf.pop("transformers_version", None)
    if transformers_version:
        hf["transformers_version"] = transformers_version
    (path / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("layout", ["hub", "transposed"])
def test_square_experts_load_by_what_the_file_says(moe, layout):
    config, _, tmp = moe
    config = square(config)
    model = qwen3vl_jax.Qwen3VLModel.from_config(config, seed=5)
    path = tmp.mktemp(f"square_{layout}")
    model.save_pretrained(str(path), expert_layout=layout)
    with safe_open(str(path / "model.safetensors"), "numpy") as f:
        assert f.metadata()[hf_io.EXPERT_LAYOUT_KEY] == layout
        gate_up = f.get_tensor(GATE_UP)
    assert gate_up.shape[1] == gate_up.shape[2]
    expected = jax.device_get(model.params)
    loaded = flatten_dict(hf_io.load_params(str(path), config))
    for name, value in flatten_dict(expected).items():
        np.testing.assert_array_equal(loaded[name], value, err_msg="/".join(name))
    # without our marker, config.json's transformers_version says: 4.x wrote the hub layout, 5.x the transposed
    rewrite(path, metadata={"format": "pt"}, transformers_version="4.57.0" if layout == "hub" else "5.24.0")
    loaded = flatten_dict(hf_io.load_params(str(path), config))
    for name, value in flatten_dict(expected).items():
        np.testing.assert_array_equal(loaded[name], value, err_msg="/".join(name))
    rewrite(path, metadata={"format": "pt"}, transformers_version=None)
    with pytest.raises(CheckpointError, match=r"cannot tell the layout of .*gate_up_proj from its square shape"):
        hf_io.load_params(str(path), config)


def test_square_experts_written_by_transformers_give_its_logits(moe):
    config, _, tmp = moe
    config = square(config)
    reference = hf_model(config)
    path = tmp.mktemp("square_hf")
    reference.save_pretrained(str(path))
    ours = qwen3vl_jax.load_pretrained(str(path))
    inputs = batch_inputs(config, [build_prompt(config, PARTS, rng=np.random.default_rng(7))])
    np.testing.assert_allclose(ours(**inputs), hf_logits(reference, inputs), atol=1e-4, rtol=0)
    assert isinstance(reference, transformers.Qwen3VLMoeForConditionalGeneration)


@pytest.mark.parametrize("sizes", [{"tensor": 2, "data": 4}, {"tensor": 8}], ids=["tensor2_data4", "tensor8"])
def test_sharded_model_gives_the_single_device_logits_and_tokens(tiny, sizes):
    mesh = make_mesh(sizes)
    model = qwen3vl_jax.load_pretrained(tiny.path, mesh=mesh)
    expected_shardings = param_shardings(abstract_params(tiny.config, boxed=True), mesh)
    for (name, param), sharding in zip(flatten_dict(model.params).items(), flatten_dict(expected_shardings).values()):
        assert param.sharding == sharding, name
    prompts = [
        build_prompt(tiny.config, [("text", 3), ("image", (4, 6)), ("text", 2 + i)], rng=np.random.default_rng(i))
        for i in range(4)
    ]
    inputs = batch_inputs(tiny.config, prompts)
    np.testing.assert_allclose(model(**inputs), tiny.ours(**inputs), atol=1e-5, rtol=0)
    greedy = dict(max_new_tokens=6, eos_token_ids=None)
    np.testing.assert_array_equal(model.generate(**inputs, **greedy), tiny.ours.generate(**inputs, **greedy))
    pixels, grid = prompts[0].images[0]
    for ours, single in zip(model.encode_vision(pixels, [grid]), tiny.ours.encode_vision(pixels, [grid])):
        np.testing.assert_allclose(ours, single, atol=1e-5, rtol=0)
    # generation's KV cache is split by batch (data) and key/value heads (tensor, where it divides them)
    with model._on_mesh():
        cache = jax.jit(lambda: init_cache(tiny.config, batch=4, length=32))()
    kv_heads, head_dim = tiny.config.text.num_key_value_heads, tiny.config.text.head_dim
    heads_split = sizes["tensor"] if kv_heads % sizes["tensor"] == 0 else 1
    expected = (4 // sizes.get("data", 1), kv_heads // heads_split, 32, head_dim)
    assert cache.k[0].sharding.shard_shape(cache.k[0].shape) == expected


def test_a_mesh_with_some_of_the_axes_loads_and_gives_the_single_device_logits(tiny):
    """A mesh of jax.make_mesh with only fsdp and tensor (and jax's Explicit axis type): the axes it lacks count as
    size 1, the parameters are laid out as on the project's own mesh of those sizes, the logits are the single
    device's; a mesh axis the project does not know is named."""
    model = qwen3vl_jax.load_pretrained(tiny.path, mesh=jax.make_mesh((4, 2), ("fsdp", "tensor")))
    assert dict(model.mesh.shape) == dict(data=1, fsdp=4, context=1, tensor=2, expert=1)
    expected = param_shardings(abstract_params(tiny.config, boxed=True), make_mesh({"fsdp": 4, "tensor": 2}))
    split = 0
    for (name, param), sharding in zip(flatten_dict(model.params).items(), flatten_dict(expected).values()):
        assert param.sharding.spec == sharding.spec, name
        split += param.sharding.shard_shape(param.shape) != param.shape
    assert split > len(expected) // 2
    inputs = batch_inputs(tiny.config, [build_prompt(tiny.config, PARTS, rng=np.random.default_rng(5))])
    np.testing.assert_allclose(model(**inputs), tiny.ours(**inputs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"mesh axes \['model'\] are not axes of this project's sharding rules"):
        qwen3vl_jax.load_pretrained(tiny.path, mesh=jax.make_mesh((4, 2), ("fsdp", "model")))


def test_fresh_parts_are_not_read_and_may_be_missing(tmp_path):
    """A model pretrained without DeepStack (its export has no DeepStack mergers) loads into one with them when
    those parameters are named fresh: everything else is read, the fresh parts are left to the caller."""
    without = preset("tiny").replace(deepstack=False)
    model = qwen3vl_jax.Qwen3VLModel.from_config(without, seed=3)
    model.save_pretrained(str(tmp_path))
    with_deepstack = preset("tiny")
    with pytest.raises(CheckpointError, match=r"lacks 12 tensor.*deepstack_merger_list"):
        hf_io.load_params(str(tmp_path), with_deepstack)
    loaded = flatten_dict(hf_io.load_params(str(tmp_path), with_deepstack, fresh=("visual/deepstack_merger",)))
    wanted = flatten_dict(abstract_params(with_deepstack))
    fresh = {name for name in wanted if name[1].startswith("deepstack_merger")}
    assert fresh and loaded.keys() == wanted.keys() - fresh
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for rule in hf_rules(with_deepstack):  # every other tensor read as the file has it
        if rule.path not in fresh:
            value = loaded[rule.path] if rule.index is None else loaded[rule.path][rule.index]
            np.testing.assert_array_equal(value, rule.to_ours(tensors[rule.hf], value.shape), err_msg=rule.hf)
    # a checkpoint that has the fresh parts: they are ignored, not an error
    qwen3vl_jax.Qwen3VLModel(with_deepstack, random_params(with_deepstack, 4)).save_pretrained(str(tmp_path / "with"))
    assert hf_io.load_params(str(tmp_path / "with"), with_deepstack, fresh=("visual/deepstack_merger",)).keys()
