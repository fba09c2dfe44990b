"""Qwen3.5 (dense and MoE): logits and greedy generation equal transformers 5.24's `Qwen3_5ForConditionalGeneration`
and `Qwen3_5MoeForConditionalGeneration` on random tiny checkpoints (text, images, video, left-padded batches); our
checkpoints load in transformers with our logits; both expert storage forms and the multi-token-prediction tensors
of the released checkpoints load; packed examples get the losses they get alone; a mesh splits the delta-net
heads over `tensor` with unchanged logits."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import Reference
from helpers import ENV, ROOT, command, losses
from hf_reference import HF_CLASSES, batch_inputs, build_prompt, float64_copy, hf_logits
from safetensors.numpy import load_file, save_file

import qwen3vl_jax
from qwen3vl_jax.config import preset
from qwen3vl_jax.inputs.model_inputs import ModelInputs, empty_inputs
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.parallel.sharding import make_mesh

CASES = {
    "text_only": [[("text", 21)]],
    "image": [[("text", 5), ("image", (6, 4)), ("text", 7)]],
    "video": [[("text", 3), ("video", (3, 4, 6)), ("text", 4)]],
    # rows longer than a delta-net chunk (64 tokens), one left-padded by more than a chunk's worth of its length
    "left_padded_batch": [
        [("text", 3), ("image", (4, 4)), ("text", 9)],
        [("text", 40), ("image", (6, 8)), ("video", (2, 4, 4)), ("text", 35)],
    ],
}
MODELS = ("tiny-qwen3.5", "tiny-qwen3.5-moe")


@pytest.fixture(scope="module", params=MODELS)
def reference(request, tmp_path_factory):
    """transformers' model of the preset with perturbed random weights, saved by its save_pretrained (for the MoE
    model: one tensor per expert), ours loaded from that directory, and transformers' model in float64 (`exact`)."""
    reference = Reference(preset(request.param), tmp_path_factory.mktemp(request.param))
    reference.exact = float64_copy(reference.hf)
    return reference


def prompts(config, case, seed=0):
    rng = np.random.default_rng(seed)
    return batch_inputs(config, [build_prompt(config, parts, rng=rng) for parts in CASES[case]])


def assert_logits_close(ours, ref, *, inputs, atol=1e-4):
    real = inputs["attention_mask"].astype(bool)  # padded positions carry no meaning in either model
    assert np.abs(ref).max() > 1.0, "reference logits too small to make the comparison meaningful"
    np.testing.assert_allclose(ours[real], ref[real], atol=atol, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(reference, case):
    """Against transformers' model evaluated in float64 (the exact logits of these weights), our float32 logits are
    as accurate as transformers' own float32 run: error within 1.5x of its on average and 2x at worst, and below
    5e-4 (a mapping error is of the logits' size, ~4). Both stray from the exact logits by up to ~3e-4 here: each
    float32 gated delta-net layer adds ~2e-5 (the chunked rule's triangular solve), and the 8 layers of these random
    models amplify it, so transformers' float32 run is no 1e-4 reference itself."""
    inputs = prompts(reference.config, case, seed=sorted(CASES).index(case))
    real = inputs["attention_mask"].astype(bool)
    exact = hf_logits(reference.exact, inputs)[real]
    assert np.abs(exact).max() > 1.0, "reference logits too small to make the comparison meaningful"
    err_ours = np.abs(reference.ours(**inputs)[real] - exact)
    err_theirs = np.abs(hf_logits(reference.hf, inputs)[real] - exact)
    assert err_ours.mean() <= 1.5 * err_theirs.mean(), (err_ours.mean(), err_theirs.mean())
    assert err_ours.max() <= 2.0 * err_theirs.max(), (err_ours.max(), err_theirs.max())
    assert err_ours.max() < 5e-4, err_ours.max()


def test_greedy_generate_equals_transformers(reference):
    """Prefill with the delta-net states and the full-attention KV cache, then recurrent decoding steps."""
    inputs = prompts(reference.config, "left_padded_batch", seed=5)
    new = 8
    with torch.no_grad():
        ref = reference.hf.generate(
            **{k: torch.from_numpy(v) for k, v in inputs.items()},
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    ours = reference.ours.generate(**inputs, max_new_tokens=new, eos_token_ids=None)
    np.testing.assert_array_equal(ours, ref[:, inputs["input_ids"].shape[1] :].numpy())


def test_our_checkpoint_loads_in_transformers_as_the_model_it_came_from(reference, tmp_path):
    """save_pretrained writes what transformers reads (MoE experts fused, (E, out, in), as released): it loads with
    no missing or unexpected keys, and every tensor equals that of the transformers model our parameters were
    loaded from (so its logits are the reference's, which ours match above)."""
    reference.ours.save_pretrained(str(tmp_path))
    model_class, _ = HF_CLASSES[reference.config.model_type]
    loaded, info = model_class.from_pretrained(str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = dict(reference.hf.named_parameters())
    for name, tensor in loaded.named_parameters():
        np.testing.assert_array_equal(tensor.detach().numpy(), expected[name].detach().numpy(), err_msg=name)
    assert len(dict(loaded.named_parameters())) == len(expected)


def test_released_forms_load_fused_experts_and_ignored_mtp_tensors(reference, tmp_path):
    """The released checkpoints hold fused experts and the multi-token-prediction head (`mtp.*`, which transformers
    does not load): our fused save plus an MTP tensor loads to the parameters of transformers' per-expert save."""
    reference.ours.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    fused = [key for key in tensors if key.endswith("experts.gate_up_proj")]
    assert bool(fused) == reference.config.text.is_moe
    hidden = reference.config.text.hidden_size
    tensors["mtp.fc.weight"] = np.ones((hidden, 2 * hidden), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = qwen3vl_jax.load_pretrained(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, reference.ours.params)


def packed_and_alone(config, *, lengths, seq_len):
    """ModelInputs of one row packing text examples of `lengths` (segments 1, 2, ..., then padding), and of each
    example alone in a row of seq_len; positions restart at 0 in every example."""
    rng = np.random.default_rng(0)
    examples = [rng.integers(0, 256, n).astype(np.int32) for n in lengths]

    def row(parts):
        base = empty_inputs(1, seq_len=seq_len, max_patches=0, patch_dim=config.vision.patch_dim)
        ids, segments, positions = (
            np.zeros((1, seq_len), np.int32),
            np.zeros((1, seq_len), np.int32),
            np.zeros((1, 3, seq_len), np.int32),
        )
        start = 0
        for segment, tokens in parts:
            ids[0, start : start + len(tokens)] = tokens
            segments[0, start : start + len(tokens)] = segment
            positions[0, :, start : start + len(tokens)] = np.arange(len(tokens))
            start += len(tokens)
        return ModelInputs(**{**base, "input_ids": ids, "segment_ids": segments, "positions": positions})

    packed = row([(i + 1, tokens) for i, tokens in enumerate(examples)])
    alone = [row([(1, tokens)]) for tokens in examples]
    return packed, alone, examples


@pytest.mark.parametrize("name", MODELS)
def test_packed_examples_get_the_loss_they_get_alone(name):
    """Three examples packed in one row, the second starting inside the first delta-net chunk and the third in the
    second chunk: each token's loss equals the loss of that token in its example alone (the recurrent state and
    the conv window restart at every example)."""
    config = preset(name)
    model = qwen3vl_jax.Qwen3VLModel.from_config(config, seed=1)
    lengths, seq_len = (37, 50, 30), 128
    packed, alone, examples = packed_and_alone(config, lengths=lengths, seq_len=seq_len)
    losses = jax.jit(
        lambda params, inputs: (
            Qwen3VL(config)
            .apply({"params": params}, inputs, jnp.roll(inputs.input_ids, -1, axis=1), method=Qwen3VL.token_losses)
            .cross_entropy
        )
    )
    packed_losses = np.asarray(losses(model.params, packed))[0]
    start = 0
    for example, (tokens, inputs) in enumerate(zip(examples, alone)):
        n = len(tokens)
        own = np.asarray(losses(model.params, inputs))[0, : n - 1]  # targets inside the example
        np.testing.assert_allclose(packed_losses[start : start + n - 1], own, atol=2e-5, rtol=0, err_msg=example)
        start += n


def test_a_mesh_splits_the_delta_net_heads_over_tensor_with_unchanged_logits(tmp_path_factory):
    """fsdp 2 x tensor 4: the delta-net's value heads (and its conv channels) and the attention heads split over
    `tensor`; logits and greedy tokens equal the single device's. A `context` axis is refused by name."""
    config = preset("tiny-qwen3.5")
    single = qwen3vl_jax.Qwen3VLModel.from_config(config, seed=2)
    path = str(tmp_path_factory.mktemp("qwen3_5_mesh"))
    single.save_pretrained(path)
    sharded = qwen3vl_jax.load_pretrained(path, mesh=make_mesh({"fsdp": 2, "tensor": 4}))
    kernel = sharded.params["decoder"]["layers"]["sublayer_0"]["linear_attn"]["in_proj_z"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape)[2] == kernel.shape[2] // 4  # value heads over tensor
    inputs = prompts(config, "left_padded_batch", seed=9)
    np.testing.assert_allclose(sharded(**inputs), single(**inputs), atol=2e-5, rtol=0)
    np.testing.assert_array_equal(
        sharded.generate(**inputs, max_new_tokens=4, eos_token_ids=None),
        single.generate(**inputs, max_new_tokens=4, eos_token_ids=None),
    )
    on_context = qwen3vl_jax.load_pretrained(path, mesh=make_mesh({"context": 2, "fsdp": 4}))
    with pytest.raises(ValueError, match=r"gated delta-net layers of Qwen3\.5 do not split the sequence"):
        on_context(**prompts(config, "text_only"))


def test_the_train_binary_trains_a_tiny_qwen3_5_and_exports_what_transformers_loads(tmp_path):
    """configs/tiny_qwen3_5.py: 3 steps of the train binary on CPU, then its HF export (workdir/hf) loads in
    transformers with no missing or unexpected keys and gives the trained model's logits."""
    workdir = tmp_path / "run"
    train = command(workdir, steps=3, every=3, config="configs/tiny_qwen3_5.py")
    train = [flag for flag in train if not flag.startswith("--config.export_hf")]
    result = subprocess.run(train, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = losses(workdir)
    assert sorted(steps) == [1, 2, 3] and all(np.isfinite(list(steps.values()))), steps
    exported = str(workdir / "hf")
    loaded, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        exported, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = qwen3vl_jax.load_pretrained(exported)
    assert ours.config.text.is_qwen3_5 and ours.config.text.linear_value_head_dim == 32
    inputs = batch_inputs(ours.config, [build_prompt(ours.config, CASES["image"][0], rng=np.random.default_rng(4))])
    exact = hf_logits(float64_copy(loaded.eval()), inputs)[0]
    assert np.abs(exact).max() > 0.1
    np.testing.assert_allclose(ours(**inputs)[0], exact, atol=5e-4, rtol=0)


def test_lora_on_every_adaptable_layer_loads_in_peft_with_our_logits(reference, tmp_path):
    """Adapters on the delta-net projections, the gated attention, the (shared-expert) MLPs and the ViT, saved in
    the PEFT format: peft puts them on transformers' model, which then gives our logits (against its float64 run,
    as in test_logits_equal_transformers)."""
    import copy

    import peft
    from flax.traverse_util import flatten_dict, unflatten_dict

    from qwen3vl_jax.checkpoints.peft import save_adapters
    from qwen3vl_jax.config.lora import LORA_TARGETS
    from qwen3vl_jax.modeling.model import abstract_params

    config = reference.config.replace(lora=dict(rank=4, alpha=8.0, targets=LORA_TARGETS))
    flat = dict(flatten_dict(jax.device_get(reference.ours.params)))
    rng = np.random.default_rng(1)
    for name, leaf in flatten_dict(abstract_params(config)).items():
        if name[-1] in ("lora_a", "lora_b"):
            flat[name] = (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    params = unflatten_dict(flat)
    save_adapters(str(tmp_path), params, config, base_model=reference.path)
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(reference.exact), str(tmp_path)).eval().double()
    layers = {
        name.rsplit(".", 1)[-1] for name, m in adapted.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "q_proj", "gate_proj"} <= layers
    inputs = prompts(reference.config, "image", seed=6)
    exact = hf_logits(adapted, inputs)[0]
    ours = qwen3vl_jax.Qwen3VLModel(config, params)(**inputs)[0]
    assert np.abs(ours - hf_logits(reference.exact, inputs)[0]).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, exact, atol=5e-4, rtol=0)


@pytest.mark.parametrize("objective", ["dpo", "distill"])
def test_dpo_and_distillation_train_a_qwen3_5_student(objective, tmp_path):
    """One Trainer step of each objective with configs/tiny_qwen3_5.py's model. DPO: the step's policy is its
    reference (the step-0 weights), so its reward margin is 0 and its loss log 2. Distillation from a Qwen3.5
    teacher with the student's architecture and other weights: the KL term is positive and the loss mixes it
    with the cross-entropy."""
    import json
    import os

    from qwen3vl_jax.training.model_source import model_config_from
    from qwen3vl_jax.training.run_config import config_from_file
    from qwen3vl_jax.training.trainer import Trainer

    config = config_from_file(os.path.join(ROOT, "configs", "dpo_toy.py" if objective == "dpo" else "tiny_qwen3_5.py"))
    config.model = config_from_file(os.path.join(ROOT, "configs", "tiny_qwen3_5.py")).model
    config.update(steps=1, log_every=1, export_hf=False)
    config.data.update(seq_len=256, max_patches=64, batch_size=8)  # a row per fake device
    config.eval.every = 0
    if objective == "distill":
        teacher = str(tmp_path / "teacher")
        qwen3vl_jax.Qwen3VLModel.from_config(model_config_from(config), seed=5).save_pretrained(teacher)
        config.objective = "distill"
        config.distill.update(teacher=teacher, alpha=0.5)
    Trainer(config, str(tmp_path / "run")).run()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = next(m for m in map(json.loads, f) if m.get("step") == 1 and m.get("split") == "train")
    if objective == "dpo":
        np.testing.assert_allclose(first["reward_margin"], 0.0, atol=1e-6)
        np.testing.assert_allclose(first["dpo_loss"], np.log(2.0), rtol=1e-5)
    else:
        assert first["kl"] > 0.01 and np.isfinite(first["loss"]), first
