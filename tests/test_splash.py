"""Splash attention (Pallas, interpret mode on CPU) equals the XLA path: forward and gradients, packed causal
text, GQA, the ViT's block-diagonal buffer, padding, fp32 and bf16, sharded and unsharded; the whole model and
a few train steps agree; and the Pallas path lowers for TPU through Mosaic."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_for_tpu
from hf_reference import batch_inputs, build_prompt, hf_logits, hf_model
from jax.sharding import NamedSharding, PartitionSpec

import qwen3vl_jax
from qwen3vl_jax.config import from_hf, to_hf
from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, make_mesh

BLOCKS = (128, 128)


def packed_inputs(dtype, *, length=200, batch=2, heads=4, kv_heads=2, head_dim=32):
    """Rows of `length` tokens (not a multiple of 128): even rows pack three examples and padding, odd rows have
    left padding; GQA with 2 query heads per kv head."""
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, length, h, head_dim)), dtype) for h in (heads, kv_heads, kv_heads)
    )
    segments = np.zeros((batch, length), np.int32)
    segments[0::2, :60], segments[0::2, 60:130], segments[0::2, 130:190] = 1, 2, 3
    segments[1::2, 50:] = 1
    return q, k, v, jnp.asarray(segments)


def outputs_and_grads(inputs, *, impl, causal):
    """inputs: (q, k, v, segments) as `packed_inputs` returns them."""
    q, k, v, segments = inputs
    real = (segments > 0)[..., None, None]  # padding rows carry no meaning in either implementation

    def loss(q, k, v):
        out = attention(
            q, k, v, q_segment_ids=segments, kv_segment_ids=segments, causal=causal, impl=impl, block_sizes=BLOCKS
        )
        return (jnp.where(real, out, 0).astype(jnp.float32) ** 2).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.where(real, np.asarray(out, np.float32), 0), [np.asarray(g, np.float32) for g in grads]


@pytest.mark.parametrize("causal", [True, False], ids=["causal_packed_text", "full_block_diagonal"])
def test_splash_equals_xla_fp32(causal):
    inputs = packed_inputs(jnp.float32)
    (out_x, grads_x), (out_s, grads_s) = (
        outputs_and_grads(inputs, impl=impl, causal=causal) for impl in ("xla", "splash")
    )
    np.testing.assert_allclose(out_s, out_x, atol=1e-5, rtol=0)
    for g_s, g_x in zip(grads_s, grads_x):
        np.testing.assert_allclose(g_s, g_x, atol=5e-5, rtol=0)


def test_splash_bf16_as_accurate_as_xla_bf16():
    """bf16 inputs: both kernels round differently (online vs materialised softmax), so each is compared with
    the fp32 result: splash's error must stay within 2x of the XLA path's own bf16 error."""
    exact, exact_grads = outputs_and_grads(packed_inputs(jnp.float32), impl="xla", causal=True)
    errors = {}
    for impl in ("xla", "splash"):
        out, grads = outputs_and_grads(packed_inputs(jnp.bfloat16), impl=impl, causal=True)
        errors[impl] = [np.abs(out - exact).max()] + [np.abs(g - e).max() for g, e in zip(grads, exact_grads)]
    for splash_error, xla_error in zip(errors["splash"], errors["xla"]):
        assert splash_error <= 2 * xla_error + 1e-3, errors


def test_vit_splash_on_images_of_different_sizes(tiny):
    """The ViT's block-diagonal attention over a packed buffer whose length (200) is not a multiple of 128."""
    splash = qwen3vl_jax.Qwen3VLModel(
        tiny.config.replace(attention_impl="splash", splash_block_sizes=BLOCKS), tiny.ours.params
    )
    rng = np.random.default_rng(1)
    grids = np.array([[1, 6, 4], [1, 4, 10], [2, 4, 6]])
    pixels = rng.standard_normal((int(grids.prod(-1).sum()), tiny.config.vision.patch_dim)).astype(np.float32)
    (merged_x, ds_x), (merged_s, ds_s) = (m.encode_vision(pixels, grids, max_patches=200) for m in (tiny.ours, splash))
    np.testing.assert_allclose(merged_s, merged_x, atol=2e-5, rtol=0)
    for a, b in zip(ds_s, ds_x):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "parts",
    [
        [[("text", 3), ("image", (6, 8)), ("text", 2), ("video", (2, 4, 4)), ("text", 4)]],
        [[("text", 3), ("image", (4, 4)), ("text", 9)], [("text", 2), ("image", (6, 8)), ("text", 5)]],
    ],
    ids=["image_and_video", "left_padded_batch"],
)
def test_whole_model_splash_equals_xla_and_transformers(tiny, parts):
    splash = qwen3vl_jax.load_pretrained(tiny.path, attention_impl="splash", splash_block_sizes=BLOCKS)
    inputs = batch_inputs(tiny.config, [build_prompt(tiny.config, p, rng=np.random.default_rng(2)) for p in parts])
    real = inputs["attention_mask"].astype(bool)
    ours = splash(**inputs)
    np.testing.assert_allclose(ours[real], tiny.ours(**inputs)[real], atol=2e-5, rtol=0)
    np.testing.assert_allclose(ours[real], hf_logits(tiny.hf, inputs)[real], atol=1e-4, rtol=0)


def test_train_steps_with_splash_match_xla(batch, optimizer):
    from helpers import CONFIG, initial_state

    from qwen3vl_jax.training.train_step import make_train_step

    losses = {}
    transform, schedule = optimizer
    for impl in ("xla", "splash"):
        config = CONFIG.replace(attention_impl=impl, splash_block_sizes=BLOCKS)
        step = jax.jit(make_train_step(config, optimizer=transform, schedule=schedule, loss_normalization="sqrt"))
        state, losses[impl] = initial_state(transform), []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses[impl].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses["splash"], losses["xla"], rtol=2e-5)


def test_sharded_splash_equals_unsharded():
    """On 8 fake devices: batch over (data, fsdp), heads over tensor, the kernel inside shard_map."""
    q, k, v, segments = packed_inputs(jnp.float32, batch=4, heads=4, kv_heads=2)
    expected, expected_grads = outputs_and_grads((q, k, v, segments), impl="splash", causal=True)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        heads = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
        q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
        segments = jax.device_put(segments, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        out, grads = outputs_and_grads((q, k, v, segments), impl="splash", causal=True)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=0)


def test_tiny_model_with_splash_compiles_for_tpu_v5p():
    """The real TPU compiler (Mosaic for the Pallas kernels): forward and backward of the whole train step."""
    flags = ("--config.mesh.data=2", "--config.mesh.tensor=2", "--config.model.overrides.attention_impl=splash")
    out = compile_for_tpu("configs/tiny.py", *flags)
    assert "-> fits" in out
    kernels = int(out.split("Pallas (Mosaic) kernel calls: ")[1].split()[0])
    assert kernels >= 6  # forward, dq and dkv kernels of the decoder and of the ViT


def test_yarn_logits_equal_transformers(tmp_path):
    config = qwen3vl_jax.preset("tiny")
    hf = to_hf(config)
    hf["text_config"]["rope_scaling"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
    config = from_hf(hf)
    model = hf_model(config)
    model.save_pretrained(tmp_path)
    ours = qwen3vl_jax.load_pretrained(str(tmp_path))
    assert ours.config.text.rope_type == "yarn"
    inputs = batch_inputs(
        config, [build_prompt(config, [("text", 30), ("image", (8, 8)), ("text", 60)], rng=np.random.default_rng(3))]
    )  # positions far past 32
    np.testing.assert_allclose(ours(**inputs), hf_logits(model, inputs), atol=1e-4, rtol=0)
