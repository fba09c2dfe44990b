"""The MoE decoder (Qwen3-VL-30B-A3B / 235B-A22B) against transformers' Qwen3VLMoeForConditionalGeneration, its
dispatch backends against each other, expert parallelism on 8 fake devices, checkpoints, and TPU lowering."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import Reference
from helpers import OPTIMIZER, compile_for_tpu
from hf_reference import batch_inputs, build_prompt, hf_logits
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open

import qwen3vl_jax
from qwen3vl_jax.config import preset
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.decoder import LayerKind, layer_runs
from qwen3vl_jax.modeling.lm_head import token_cross_entropy
from qwen3vl_jax.modeling.model import Qwen3VL, abstract_params
from qwen3vl_jax.modeling.moe import MoeBlock, experts_dense, experts_grouped, load_balancing_loss, route
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, batch_sharding, make_mesh, param_shardings
from qwen3vl_jax.training.builder import train_state_shardings
from qwen3vl_jax.training.metrics import train_flops
from qwen3vl_jax.training.optimizer import make_optimizer
from qwen3vl_jax.training.train_step import TrainState, make_train_step

BACKENDS = ("dense", "ragged_dot", "megablox", "blocked")
PROMPTS = {
    "image_and_text": [[("text", 4), ("image", (6, 8)), ("text", 9)], [("text", 11)]],
    "video": [[("text", 3), ("video", (2, 4, 6)), ("text", 5)]],
}


def expert_mesh():
    return make_mesh({"fsdp": 2, "expert": 4})


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return Reference(preset("tiny-moe"), tmp_path_factory.mktemp("tiny_moe"))


def hf_outputs(model, inputs):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_router_logits=True)
    return out.logits.numpy(), float(out.aux_loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PROMPTS)
def test_logits_and_aux_loss_equal_transformers(moe, backend, case):
    model = qwen3vl_jax.Qwen3VLModel(moe.config.replace(moe_backend=backend), moe.ours.params)
    inputs = batch_inputs(
        moe.config, [build_prompt(moe.config, p, rng=np.random.default_rng(4)) for p in PROMPTS[case]]
    )
    ref_logits, ref_aux = hf_outputs(moe.hf, inputs)
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(model(**inputs)[real], ref_logits[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.router_aux_loss(**inputs), ref_aux, rtol=1e-5)


def routing_case(tokens=40, hidden=64, experts=8, inter=48, top_k=2):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    logits = jnp.asarray(rng.standard_normal((tokens, experts)) * 2, jnp.float32)
    gate_up = jnp.asarray(rng.standard_normal((experts, hidden, 2 * inter)) / 8, jnp.float32)
    down = jnp.asarray(rng.standard_normal((experts, inter, hidden)) / 7, jnp.float32)
    weights, chosen = route(logits, top_k)
    return x, chosen, weights, gate_up, down


@pytest.mark.parametrize("first, count", [(0, 8), (2, 4)], ids=["all_experts", "experts_2_to_5"])
def test_uneven_loads_and_gradients_of_grouped_backends_equal_dense(first, count, monkeypatch):
    """Values and gradients of the sorted dispatch equal every-expert-on-every-token, also when only a slice of
    the experts is local (as on one device of an expert-parallel mesh: the other experts' rows are left out).
    blocked runs with windows of 4 rows (several per expert, most ending in the next expert's rows) and of 256
    (one window per expert, running past every later expert's rows)."""
    x, chosen, weights, gate_up, down = routing_case()
    loads = np.bincount(np.asarray(chosen).ravel(), minlength=8)
    assert loads.max() >= 2 * max(loads.min(), 1)  # uneven expert loads, some experts nearly idle
    local = (chosen >= first) & (chosen < first + count)
    assert 0 < local.mean() < 1 or count == 8

    def grads(backend):
        def loss(x, weights, gate_up, down):
            expert_weights = dict(gate_up=gate_up, down=down)
            if backend == "dense":  # the other experts' assignments get weight 0
                local_experts = jnp.clip(chosen - first, 0, count - 1)
                y = experts_dense(x, experts=local_experts, weights=jnp.where(local, weights, 0), **expert_weights)
            else:
                dispatch = dict(backend=backend, tiling=(16, 32, 32), first_expert=first)
                y = experts_grouped(x, experts=chosen, weights=weights, **expert_weights, **dispatch)
            return (y**2).sum()

        args = (x, weights, gate_up[first : first + count], down[first : first + count])
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)

    value, reference = grads("dense")
    for backend, tile_rows in (("ragged_dot", None), ("megablox", None), ("blocked", 4), ("blocked", 256)):
        monkeypatch.setattr("qwen3vl_jax.modeling.moe.BLOCKED_TILE_ROWS", tile_rows)
        got_value, got = grads(backend)
        np.testing.assert_allclose(got_value, value, rtol=1e-6)
        for g, r in zip(got, reference):
            assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max(), (backend, tile_rows)


@pytest.mark.parametrize("tokens", [16, 3], ids=["split_tokens", "replicated_tokens"])
def test_expert_parallel_block_equals_single_device(tokens):
    """The MoE block on an expert mesh, with tokens split over the batch axes and with too few tokens to split
    (a decode step); and a clear error when the experts do not divide over the expert axis."""
    text = preset("tiny-moe").text
    settings = dict(backend="ragged_dot", tiling=(16, 32, 32), dtype=jnp.float32, param_dtype=jnp.float32)
    block = MoeBlock(text, **settings)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, tokens, text.hidden_size))
    params = block.init(jax.random.PRNGKey(1), x)
    single = jax.jit(block.apply)(params, x)
    with jax.set_mesh(expert_mesh()):
        sharded = jax.jit(block.apply)(params, x)
    np.testing.assert_allclose(sharded[0], single[0], atol=1e-6, rtol=0)
    six = MoeBlock(preset("tiny-moe", text=dict(num_experts=6)).text, **settings)
    with jax.set_mesh(make_mesh({"expert": 8})), pytest.raises(ValueError, match="num_experts 6 is not a multiple"):
        jax.eval_shape(six.init, jax.random.PRNGKey(1), x)


@pytest.mark.parametrize("layout", ["hub", "transposed"])
def test_save_then_transformers_loads_same_logits(moe, tmp_path, layout):
    moe.ours.save_pretrained(str(tmp_path), expert_layout=layout)
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        shape = tuple(f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape())
    assert shape == ((8, 64, 96) if layout == "hub" else (8, 96, 64))
    reloaded = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(tmp_path))
    inputs = batch_inputs(moe.config, [build_prompt(moe.config, PROMPTS["video"][0], rng=np.random.default_rng(5))])
    np.testing.assert_allclose(moe.ours(**inputs), hf_logits(reloaded, inputs), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(qwen3vl_jax.load_pretrained(str(tmp_path))(**inputs), moe.ours(**inputs))


def test_mixed_dense_and_moe_layers(tmp_path):
    """mlp_only_layers / decoder_sparse_step pick the layer kinds; each run of one kind is a scanned stack."""
    config = preset("tiny-moe").replace(text=dict(num_hidden_layers=4, mlp_only_layers=(1,)))
    moe, dense = (LayerKind(mixer="full_attention", moe=flag) for flag in (True, False))
    assert layer_runs(config.text) == [(0, 1, (moe,)), (1, 2, (dense,)), (2, 4, (moe,))]
    reference = Reference(config, tmp_path)
    inputs = batch_inputs(config, [build_prompt(config, PROMPTS["image_and_text"][0], rng=np.random.default_rng(6))])
    ref_logits, ref_aux = hf_outputs(reference.hf, inputs)
    np.testing.assert_allclose(reference.ours(**inputs), ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(reference.ours.router_aux_loss(**inputs), ref_aux, rtol=1e-5)


def test_mfu_counts_the_active_experts():
    """Training FLOPs of an MoE model: a dense model of width k x moe_intermediate_size plus the router."""
    moe = preset("tiny-moe")
    t = moe.text
    dense = moe.replace(
        text=dict(
            num_experts=0,
            num_experts_per_tok=0,
            moe_intermediate_size=0,
            intermediate_size=t.num_experts_per_tok * t.moe_intermediate_size,
        )
    )
    router = 3 * 2 * 2 * 16 * t.hidden_size * t.num_experts * t.num_hidden_layers
    shapes = dict(batch=2, seq_len=16, patches=0)
    assert train_flops(moe, **shapes) == train_flops(dense, **shapes) + router


def test_greedy_generation_equals_transformers(moe):
    inputs = batch_inputs(
        moe.config, [build_prompt(moe.config, p, rng=np.random.default_rng(7)) for p in PROMPTS["image_and_text"]]
    )
    with torch.no_grad():
        ref = moe.hf.generate(
            **{k: torch.from_numpy(v) for k, v in inputs.items()},
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    ours = moe.ours.generate(**inputs, max_new_tokens=8, eos_token_ids=None)
    np.testing.assert_array_equal(ours, ref[:, inputs["input_ids"].shape[1] :].numpy())


@pytest.fixture(scope="module")
def moe_batch(moe):
    rows = [
        build_prompt(moe.config, p, rng=np.random.default_rng(8 + i))
        for i, p in enumerate(PROMPTS["image_and_text"] * 4)
    ]
    inputs, _ = moe.ours.prepare(**batch_inputs(moe.config, rows), seq_len=64, max_patches=64)
    arrays = {f: np.asarray(getattr(inputs, f)) for f in inputs.__dataclass_fields__}
    return TrainingBatch.from_arrays(
        dict(
            arrays,
            targets=np.roll(arrays["input_ids"], -1, axis=1),
            loss_mask=(arrays["segment_ids"] > 0).astype(np.int32),
            num_dropped=np.zeros(len(arrays["input_ids"]), np.int32),
        )
    )


def test_expert_parallel_megablox_forward_and_gradients_equal_single_device(moe, moe_batch):
    """On 8 fake devices (expert 4 x fsdp 2) the expert-parallel megablox dispatch (the released configs'
    backend) gives the single-device logits, aux loss and gradients. ragged_dot: the train step test below."""
    config = moe.config.replace(moe_backend="megablox")
    model = Qwen3VL(config)

    def loss(params, batch):
        logits, router_logits = model.apply({"params": params}, batch.inputs, method=Qwen3VL.logits_and_router_logits)
        mask = batch.loss_mask
        ce = (token_cross_entropy(logits, batch.targets) * mask).sum() / mask.sum()
        real = batch.segment_ids.reshape(-1) > 0
        aux = load_balancing_loss(router_logits, real, top_k=config.text.num_experts_per_tok)
        return ce + 0.1 * aux, (logits, aux)

    fn = jax.value_and_grad(loss, has_aux=True)
    (single_loss, (single_logits, single_aux)), single_grads = jax.jit(fn)(moe.ours.params, moe_batch)
    mesh = expert_mesh()
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        params = jax.device_put(moe.ours.params, param_shardings(abstract_params(config, boxed=True), mesh))
        (loss_value, (logits, aux)), grads = jax.jit(fn)(params, jax.device_put(moe_batch, batch_sharding(mesh)))
    np.testing.assert_allclose(logits, single_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(aux, single_aux, rtol=1e-6)
    np.testing.assert_allclose(loss_value, single_loss, rtol=1e-6)

    def flat(tree):
        return jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]

    for (path, g), (_, r) in zip(flat(grads), flat(single_grads)):
        assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max(), jax.tree_util.keystr(path)


def test_expert_parallel_step_equals_single_device(moe, moe_batch):
    """On 8 fake devices (expert 4 x fsdp 2) one train step (CE + router aux loss, AdamW) equals the
    single-device step."""
    config = moe.config.replace(moe_backend="ragged_dot")
    optimizer, schedule = make_optimizer(OPTIMIZER, total_steps=100, params=moe.ours.params)
    step = make_train_step(config, optimizer=optimizer, schedule=schedule, loss_normalization="sqrt")
    state = TrainState(
        step=np.int32(0), params=moe.ours.params, opt_state=optimizer.init(moe.ours.params), rng=jax.random.PRNGKey(0)
    )
    single_state, single = jax.jit(step)(state, moe_batch)

    mesh = expert_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = train_state_shardings(abstract_params(config, boxed=True), optimizer, mesh)
    layers = shardings.params["decoder"]["layers"]
    # (layers, experts, embed, mlp): experts over the expert axis, the model dimension over fsdp; a dense weight's
    # model dimension over both (ZeRO-3)
    assert layers["mlp"]["experts_gate_up"].spec == PartitionSpec(None, "expert", "fsdp", None)
    assert layers["q_proj"]["kernel"].spec[1] == ("fsdp", "expert")
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated))
        sharded_state, metrics = sharded(
            jax.device_put(state, shardings), jax.device_put(moe_batch, batch_sharding(mesh))
        )
    for key in ("loss", "aux_loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], single[key], rtol=1e-5, err_msg=key)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6),
        jax.device_get(sharded_state.params),
        jax.device_get(single_state.params),
    )


def test_tiny_moe_with_megablox_compiles_for_tpu_v5p():
    expert_parallel = ("--config.mesh.data=1", "--config.mesh.expert=2", "--config.mesh.fsdp=2")
    out = compile_for_tpu("configs/tiny_moe.py", *expert_parallel, "--config.model.overrides.moe_backend=megablox")
    assert "-> fits" in out
    assert "mesh {'data': 1, 'fsdp': 2, 'context': 1, 'tensor': 1, 'expert': 2}" in out
    assert int(out.split("Pallas (Mosaic) kernel calls: ")[1].split()[0]) >= 4  # gmm and tgmm
