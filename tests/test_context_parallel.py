"""Context parallelism (qwen3vl_jax/parallel/context.py) on 8 fake CPU devices: the load-balanced layout, the
ViT's patch slots, attention over the context axis (XLA and splash) and whole train-step gradients equal to the
single-device ones, dense and MoE, with images, multi-group videos, text-only examples and DeepStack."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONFIG, ROOT, losses, parse_flags, random_params

from qwen3vl_jax.config import preset
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.data.synthetic import TASKS
from qwen3vl_jax.modeling.attention import attention
from qwen3vl_jax.modeling.model import Qwen3VL, abstract_params
from qwen3vl_jax.parallel.context import (
    align_patches,
    check_patch_layout,
    from_load_balanced,
    load_balanced_positions,
    to_load_balanced,
)
from qwen3vl_jax.parallel.sharding import DEFAULT_RULES, batch_shardings, make_mesh, param_shardings, row_groups
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.training.objectives.base import StepSettings
from qwen3vl_jax.training.objectives.sft import CrossEntropy
from qwen3vl_jax.training.train_step import objective_loss
from qwen3vl_jax.training.trainer import Trainer

SHARDS = 8  # the batch's patch buffers are laid out for 8 context shards (hence also for 4 and 2)


def test_load_balanced_layout_and_its_inverse():
    # 8 chunks of 2 positions: shard s holds chunks s and 7 - s
    expected = [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    np.testing.assert_array_equal(load_balanced_positions(16, 4), expected)
    x = jnp.arange(2 * 48 * 3, dtype=jnp.float32).reshape(2, 48, 3)
    weights = jnp.arange(48.0)[None, :, None]
    for sizes in ({"context": 4, "fsdp": 2}, {"context": 8}):
        mesh = make_mesh(sizes)
        positions = load_balanced_positions(48, mesh.shape["context"])
        with jax.set_mesh(mesh):
            balanced = jax.jit(lambda x: to_load_balanced(x, axis=1))(x)
            restored = jax.jit(lambda x: from_load_balanced(x, axis=1))(balanced)
            grad = jax.jit(jax.grad(lambda x: (to_load_balanced(x, axis=1) * weights).sum()))(x)
        np.testing.assert_array_equal(balanced, x[:, positions])
        np.testing.assert_array_equal(restored, x)
        np.testing.assert_array_equal(grad[0, :, 0], np.argsort(positions))  # the transpose is the inverse


def _row(segment_lengths, patches=32):
    """A finalized row with ViT segments of the given lengths one after the other, pixel rows numbered by patch,
    and one visual token per merged token."""
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(segment_lengths)]).astype(np.int32)
    used = len(segments)
    row = dict(
        patch_segment_ids=np.pad(segments, (0, patches - used)),
        pixel_patches=np.pad(np.arange(used, dtype=np.float32) + 1, (0, patches - used))[:, None],
        pos_embed_index=np.zeros((patches, 4), np.int32),
        pos_embed_weight=np.zeros((patches, 4), np.float32),
        patch_rowcol=np.zeros((patches, 2), np.int32),
        visual_index=np.concatenate([[-1], np.arange(used // 4), [-1]]).astype(np.int32),
    )
    return row


def test_align_patches_keeps_segments_within_shards_and_follows_the_visual_tokens():
    row = _row([4, 8, 12, 4])  # with 4 shards of 8 patches, the 8- and the 12-patch segments would cross
    with pytest.raises(ValueError, match="longer than a context shard's slot of 8 patches"):
        align_patches(row, shards=4)
    row = _row([4, 8, 4, 8])
    with pytest.raises(ValueError, match="crosses the boundary at patch 8 between context shards 0 and 1"):
        check_patch_layout(row["patch_segment_ids"][None], shards=4)
    aligned = align_patches(row, shards=4)
    expected = [1] * 4 + [0] * 4 + [2] * 8 + [3] * 4 + [0] * 4 + [4] * 8  # in order, where that fits
    np.testing.assert_array_equal(aligned["patch_segment_ids"], expected)
    _assert_aligned(row, aligned, shards=4)
    # one after the other they would need 36 of 32 patches; placed largest first they fit
    row = _row([4, 8, 4, 8, 4], patches=32)
    aligned = align_patches(row, shards=4)
    np.testing.assert_array_equal(
        aligned["patch_segment_ids"], [2] * 8 + [4] * 8 + [1] * 4 + [3] * 4 + [5] * 4 + [0] * 4
    )
    _assert_aligned(row, aligned, shards=4)
    # 40 patches would fit in 48, but 4 slots of 12 hold one 8-patch segment each
    with pytest.raises(ValueError, match=r"40 patches in ViT segments of \[8, 8, 8, 8, 8\] patches do not fit in 4"):
        align_patches(_row([8] * 5, patches=48), shards=4)


def _assert_aligned(row, aligned, *, shards):
    """No segment crosses a shard's slot, and every visual token still reads the same pixels (merged token m =
    patches 4m .. 4m+3)."""
    check_patch_layout(aligned["patch_segment_ids"][None], shards=shards)
    for old, new in zip(row["visual_index"], aligned["visual_index"]):
        assert (old < 0) == (new < 0)
        if old >= 0:
            np.testing.assert_array_equal(
                aligned["pixel_patches"][4 * new : 4 * new + 4], row["pixel_patches"][4 * old : 4 * old + 4]
            )


def _attention_inputs():
    rng = np.random.default_rng(0)
    batch, length, heads, kv_heads, head_dim = 2, 512, 4, 2, 64
    q = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    segments = np.ones((batch, length), np.int32)
    # packed examples that start and end at the boundary of 2 context shards (position 256), as local attention
    # needs; in the load-balanced layout of 4 chunks of 128 they still span shards
    segments[0, 200:256] = 2
    segments[0, 256:] = 3
    segments[1, 256:] = 3
    segments[1, 450:] = 0
    cotangent = rng.normal(size=q.shape).astype(np.float32)
    return (q, k, v), segments, cotangent


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("context_layout", ["load_balanced", "local"])
def test_attention_over_the_context_axis_equals_unsplit(impl, context_layout):
    (q, k, v), segments, cotangent = _attention_inputs()
    causal = context_layout == "load_balanced"

    def unsplit(q, k, v):
        return attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, causal=causal)

    def split(q, k, v):
        arrays = (q, k, v, jnp.asarray(segments))
        if causal:
            arrays = tuple(to_load_balanced(x, axis=1) for x in arrays)
        q, k, v, s = arrays
        blocks = dict(impl=impl, block_sizes=(128, 128))
        out = attention(
            q, k, v, q_segment_ids=s, kv_segment_ids=s, causal=causal, context_layout=context_layout, **blocks
        )
        return from_load_balanced(out, axis=1) if causal else out

    expected, expected_vjp = jax.vjp(unsplit, q, k, v)
    with jax.set_mesh(make_mesh({"context": 2, "fsdp": 2, "tensor": 2})):
        out, vjp = jax.vjp(jax.jit(split), q, k, v)
        grads = vjp(cotangent)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
    for grad, expected_grad in zip(grads, expected_vjp(cotangent)):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def context_batch():
    """A packed batch (8 rows of 128 tokens and 128 patches) of the built-in tasks and a text-only task, laid out
    for 8 context shards."""
    processor = Processor(
        byte_tokenizer(),
        load_chat_template(None),
        config=VisionProcessingConfig(
            image_min_pixels=64 * 64, image_max_pixels=64 * 64, video_min_pixels=0, video_max_pixels=8 * 64 * 64
        ),
    )
    tasks = [*TASKS, "text_reverse"]  # the built-in tasks and a text-only one
    data = DataConfig(
        sources=({"kind": "synthetic", "tasks": tasks, "size": 1000},),
        seq_len=128,
        max_patches=128,
        batch_size=8,
        context_shards=SHARDS,
        seed=2,  # a first batch with images, 4-group videos and text-only examples (asserted by the test)
    )
    batch = next(iter(build_dataset(data, processor, model_config=CONFIG)))
    check_patch_layout(batch.patch_segment_ids, shards=SHARDS)
    return batch


def _examples(batch, config):
    """(visual token kind, ViT segments) of every packed example: kind None for a text-only example."""
    examples = []
    for row in range(len(batch.input_ids)):
        ids, segments, index = batch.input_ids[row], batch.segment_ids[row], batch.visual_index[row]
        for example in set(segments[segments > 0].tolist()):
            visual = (segments == example) & (index >= 0)
            kinds = set(ids[visual].tolist())
            groups = set(batch.patch_segment_ids[row][4 * index[visual]].tolist())
            examples.append((kinds.pop() if kinds else None, len(groups)))
    return examples


def _loss_and_grads(config, batch, params, *, mesh=None, loss_chunk=0):
    """The loss and gradients, and the step's FLOPs (XLA's cost analysis) summed over the mesh's devices."""
    model = Qwen3VL(config)

    def loss(params, batch):
        settings, objective = StepSettings(model=model, normalization="sqrt", loss_chunk=loss_chunk), CrossEntropy()
        totals = objective.batch_totals(batch, settings)
        return objective_loss(objective, params, batch, settings=settings, totals=totals)[0]

    def run(step, params, batch):
        compiled = step.lower(params, batch).compile()
        cost = compiled.cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost)["flops"] * (1 if mesh is None else mesh.size)
        return *compiled(params, batch), flops

    if mesh is None:
        return run(jax.jit(jax.value_and_grad(loss)), params, batch)
    shardings = param_shardings(abstract_params(config, boxed=True), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        step = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, batch_shardings(mesh)))
        return run(step, jax.device_put(params, shardings), jax.device_put(batch, batch_shardings(mesh)))


@pytest.mark.parametrize(
    "model, sizes",
    [
        ("dense", {"context": 4, "fsdp": 2}),
        ("dense", {"context": 8}),
        ("moe", {"context": 2, "expert": 4}),
    ],
)
def test_train_step_gradients_over_the_context_axis_equal_single_device(context_batch, model, sizes):
    config = CONFIG if model == "dense" else preset("tiny-moe").replace(moe_backend="ragged_dot")
    assert config.num_deepstack > 0
    examples = _examples(context_batch, config)
    assert (config.image_token_id, 1) in examples
    assert any(kind == config.video_token_id and groups > 1 for kind, groups in examples)
    assert (None, 0) in examples  # text only
    params = random_params(config, 0)
    expected_loss, expected_grads, expected_flops = _loss_and_grads(config, context_batch, params)
    # the chunked loss too: 4 strided chunks of 32 positions, each spread over every context shard
    loss, grads, flops = _loss_and_grads(config, context_batch, params, mesh=make_mesh(sizes), loss_chunk=32)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    # no work repeated on several devices: a (B, L) -> (B * L) flattening of rows split over `context` would make
    # XLA gather whole sequences onto every device, and attending every key from every shard doubles the causal
    # attention's work
    assert flops <= 1.02 * expected_flops, (flops, expected_flops)

    def relative_error(grad, expected):
        return float(np.abs(np.asarray(grad) - expected).max() / np.abs(expected).max())

    errors = jax.tree_util.tree_map(relative_error, grads, jax.device_get(expected_grads))
    assert max(jax.tree_util.tree_leaves(errors)) <= 1e-5, errors


def test_trainer_on_a_context_mesh(tmp_path):
    """The default config's run with `--config.mesh.context=4 --config.mesh.fsdp=2` on its command line: the
    pipeline lays the patches out for 4 shards (else global_batch would refuse the batch), every row of 384 tokens
    is split over 4 chips, and the loss is finite."""
    mesh = ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.context=4")
    config = parse_flags(f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", *mesh, "--config.steps=2")
    config.eval.update(sets={}, every=0)
    config.data.batch_size = 4
    trainer = Trainer(config, str(tmp_path / "work"))
    assert trainer.data_config.context_shards == 4
    trainer.run()
    assert int(trainer.state.step) == 2
    assert trainer.state.params["decoder"]["layers"]["q_proj"]["kernel"].sharding.spec[1] == ("fsdp", "context")
    logged = losses(str(tmp_path / "work"))
    assert logged and all(np.isfinite(list(logged.values()))), logged
    trainer.checkpointer.close()
    trainer.writer.close()


@pytest.mark.parametrize("sizes, groups", [({"fsdp": 2, "context": 4}, 2), ({"context": 8}, 1), ({"fsdp": 8}, 2)])
def test_hosts_that_split_a_row_read_the_same_data(sizes, groups):
    """Two hosts of 4 devices: with the context axis inside a host each host reads its own rows; with `context 8`
    both hold parts of every row, so both must read the same rows (one group)."""
    index, count = row_groups(make_mesh(sizes), process_of=lambda device: device.id // 4)
    assert (index, count) == (0, groups)
