"""GRPO (qwen3vl_jax/training/objectives/grpo.py): prompt records and their rewards, rollouts sampled from the
current parameters and packed back into training rows (the log-probabilities the update recomputes equal the
sampler's), sharded rollouts equal to single-device ones, dynamic sampling, and a 2-step run through the trainer
from a tiny checkpoint with images."""

import dataclasses
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONFIG, ROOT, random_params

from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.checkpoints.hf_export import export_hf
from qwen3vl_jax.data.sources import make_source
from qwen3vl_jax.modeling.model import Qwen3VL, abstract_params
from qwen3vl_jax.parallel.sharding import make_mesh, param_shardings
from qwen3vl_jax.processing import DataError, Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template
from qwen3vl_jax.training.builder import processor_from
from qwen3vl_jax.training.model_source import model_config_from
from qwen3vl_jax.training.objectives.base import StepSettings, token_losses
from qwen3vl_jax.training.objectives.grpo import PolicyOptimization, RolloutData
from qwen3vl_jax.training.prompts import PromptBatch, PromptEncoder, prompt_batches, prompt_record
from qwen3vl_jax.training.rewards import RewardSpec
from qwen3vl_jax.training.rollouts import (
    ADVANTAGES,
    OLD_LOGPROBS,
    Completions,
    RewardScorer,
    RolloutSettings,
    SlotLayout,
    pack_rollout,
    sample_completions,
    score_rollout,
)
from qwen3vl_jax.training.run_config import config_from_file
from qwen3vl_jax.training.trainer import Trainer

PROCESSOR = Processor(
    byte_tokenizer(),
    load_chat_template(None),
    config=VisionProcessingConfig(
        image_min_pixels=64 * 64, image_max_pixels=64 * 64, video_min_pixels=0, video_max_pixels=8 * 64 * 64
    ),
)
SETTINGS = RolloutSettings(group_size=2, max_prompt_tokens=160, max_completion_tokens=12)
LAYOUT = SlotLayout(rows=3, seq_len=2 * 172, max_patches=128, slot_tokens=172)


def distinct_characters(completion, reference, meta):
    """A reward that varies between random completions (what the tests train on): distinct characters / 10."""
    return len(set(completion)) / 10


def synthetic_prompts(tasks, count, *, encoder):
    source = make_source(dict(kind="synthetic", tasks=tasks, size=100, image_size=64, num_frames=8))
    return [encoder(source[i]) for i in range(count)]


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder(PROCESSOR, CONFIG, max_prompt_tokens=SETTINGS.max_prompt_tokens, max_prompt_patches=64)


@pytest.fixture(scope="module")
def model():
    # Qwen3VLModel.from_config(CONFIG, seed=0)'s weights, from the initialisation the other tests compile
    return Qwen3VLModel(CONFIG, random_params(CONFIG, 0))


@pytest.fixture(scope="module")
def rollout(model, encoder):
    """3 prompts (two images, one video) x 2 completions sampled from the random tiny model, scored by exact match
    against a reference and by a dotted-path user reward."""
    prompts = synthetic_prompts(("grounding", "video_timestamp"), 3, encoder=encoder)
    assert [p.encoded.video_grid_thw.shape[0] for p in prompts] == [0, 1, 0]
    reward = (RewardSpec("exact"), RewardSpec(f"{__name__}.distinct_characters", weight=2.0))
    prompts = [dataclasses.replace(p, record=dataclasses.replace(p.record, reward=reward)) for p in prompts]
    completions = sample_completions(model, PROCESSOR, prompts, settings=SETTINGS, seed=3)
    return score_rollout(prompts, completions, processor=PROCESSOR, scorer=RewardScorer(), settings=SETTINGS)


def test_prompt_records_take_every_form_and_name_what_is_wrong(tmp_path):
    user = {"role": "user", "content": "How many?"}
    record = prompt_record({"id": "a", "messages": [user], "answer": "3", "reward": "numeric"})
    assert (record.messages, record.reference, record.reward) == ([user], "3", (RewardSpec("numeric"),))
    spec = {"name": "numeric", "weight": 2.0, "abs_tolerance": 0.5}
    record = prompt_record({"prompt": "Count.", "images": ["a.png"], "answer": "3", "reward": [spec, "format"]})
    assert record.messages[0]["content"][0] == {"type": "image", "image": "a.png"}
    assert record.reward == (RewardSpec("numeric", 2.0, {"abs_tolerance": 0.5}), RewardSpec("format"))
    # a conversation ending with its answer: the prompt is what precedes it; the built-in task names the reward
    synthetic = make_source(dict(kind="synthetic", tasks=("grounding",), size=10, image_size=64))[0]
    record = prompt_record(synthetic)
    assert record.messages == synthetic["messages"][:-1] and record.reference == synthetic["answer"]
    assert record.reward == (RewardSpec("box_iou"),) and record.meta["box"] == synthetic["meta"]["box"]
    default = (RewardSpec("exact"),)
    assert prompt_record({"messages": [user], "answer": "x"}, default_reward=default).reward == default
    for bad, message in (
        ({"messages": [user]}, "needs an 'answer'"),
        ({"prompt": "x"}, "needs an 'answer'"),
        ({"document": []}, "needs 'messages' or 'prompt'"),
        ({"messages": [user], "answer": "x", "reward": "no_such_reward"}, "neither a built-in one"),
        ({"messages": [user], "answer": "x"}, "names no reward"),
        ({"messages": [user], "answer": "x", "reward": "exact", "meta": [1]}, "'meta' must be an object"),
    ):
        with pytest.raises(DataError, match=message):
            prompt_record(bad)
    # JSONL: a source's "reward" applies to its records that name none; bad records are skipped and counted
    lines = [
        {"prompt": "Say yes.", "answer": "yes"},
        {"prompt": "Say no."},  # no answer
        {"prompt": "Say 7.", "answer": "7", "reward": "numeric"},
        {"prompt": "x" * 300, "answer": "long"},  # more than max_prompt_tokens
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    encoder = PromptEncoder(PROCESSOR, CONFIG, max_prompt_tokens=100, max_prompt_patches=64, on_bad_input="skip")
    source = dict(kind="jsonl", path=str(path), reward="exact")
    batches = iter(prompt_batches([source], encoder, prompts=2, shuffle=False, num_epochs=1))
    batch = next(batches)
    assert [p.record.reward for p in batch.prompts] == [(RewardSpec("exact"),), (RewardSpec("numeric"),)]
    assert batch.dropped == 1
    with pytest.raises(StopIteration):  # the stream ends (its last record is bad: logged, no batch left to count it)
        next(batches)
    strict = PromptEncoder(PROCESSOR, CONFIG, max_prompt_tokens=100, max_prompt_patches=64)
    with pytest.raises(DataError, match=r"prompts.jsonl:2: .*needs an 'answer'"):
        list(prompt_batches([source], strict, prompts=4, shuffle=False, num_epochs=1))


def test_packed_rollout_recomputes_the_samplers_logprobs_and_the_first_update_is_reinforce(model, rollout):
    """Packed back into training rows (prompt unweighted, completion weighted), a teacher-forced pass over the
    rollout's own parameters gives each completion token the log-probability the sampler recorded (fp32, images and
    a video), and the GRPO loss at ratio 1 is -mean(advantage) over the completion tokens."""
    completions = rollout.completions
    assert completions.tokens.shape == (6, SETTINGS.max_completion_tokens)
    assert rollout.per_reward["exact"].tolist() == [0.0] * 6  # a random model does not answer right
    np.testing.assert_allclose(rollout.rewards, 2.0 * rollout.per_reward[f"{__name__}.distinct_characters"])
    assert rollout.advantages.std() > 0
    batch = pack_rollout(rollout, config=CONFIG, layout=LAYOUT, settings=SETTINGS)
    mask = batch.loss_mask > 0
    assert mask.sum() == completions.lengths.sum()
    # every supervised position predicts a completion token, in order, each sequence in its own segment
    for row in range(LAYOUT.rows):
        for slot in range(LAYOUT.slots_per_row):
            i = row * LAYOUT.slots_per_row + slot
            targets = batch.targets[row][mask[row] & (batch.segment_ids[row] == slot + 1)]
            np.testing.assert_array_equal(targets, completions.tokens[i, : completions.lengths[i]])
            advantages = batch.extra[ADVANTAGES][row][mask[row] & (batch.segment_ids[row] == slot + 1)]
            np.testing.assert_array_equal(advantages, rollout.advantages[i])
    ce, _, _ = token_losses(Qwen3VL(CONFIG), model.params, batch, loss_chunk=0)
    old = batch.extra[OLD_LOGPROBS]
    np.testing.assert_allclose(np.asarray(-ce)[mask], old[mask], atol=1e-4, rtol=0)
    assert old[mask].min() < -1.0 and (old[~mask] == 0).all()

    objective = PolicyOptimization(rollout=SETTINGS, prompts_per_step=3, clip_high=0.28)
    settings = StepSettings(model=Qwen3VL(CONFIG), normalization="token")
    device_batch = jax.tree_util.tree_map(jnp.asarray, batch)
    totals = objective.batch_totals(device_batch, settings)
    value, counters, _ = objective.loss(
        model.params, device_batch, frozen_params=None, totals=totals, settings=settings, dropout_rng=None
    )
    expected = -(batch.extra[ADVANTAGES] * mask).sum() / mask.sum()
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    assert float(counters.extra["logprob_gap"]) < 1e-4 and float(counters.extra["clip_fraction"]) == 0.0


def test_truncated_completions_can_be_masked(rollout):
    masked = dataclasses.replace(SETTINGS, mask_truncated=True)
    batch = pack_rollout(rollout, config=CONFIG, layout=LAYOUT, settings=masked)
    completions = rollout.completions
    kept = completions.lengths[~completions.truncated].sum()
    assert (batch.loss_mask > 0).sum() == kept
    with pytest.raises(ValueError, match="6 sequences do not fit 2 rows x 2 slots"):
        pack_rollout(rollout, config=CONFIG, layout=dataclasses.replace(LAYOUT, rows=2), settings=SETTINGS)


def test_sharded_rollouts_sample_the_single_device_tokens(model, rollout):
    """The parameters laid out as training lays them out on fsdp 2 x tensor 2 (x data 2) sample the same tokens for
    the same seed as on one device."""
    mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    shardings = param_shardings(abstract_params(CONFIG, boxed=True), mesh)
    sharded = Qwen3VLModel(CONFIG, jax.device_put(model.params, shardings), mesh=mesh)
    specs = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(sharded.params)]
    assert {"fsdp", "tensor"} <= {axis for spec in specs for axis in spec}
    completions = sample_completions(sharded, PROCESSOR, rollout.prompts, settings=SETTINGS, seed=3)
    np.testing.assert_array_equal(completions.tokens, rollout.completions.tokens)
    np.testing.assert_allclose(completions.logprobs, rollout.completions.logprobs, atol=1e-4)


def test_dynamic_sampling_replaces_groups_whose_rewards_all_equal(monkeypatch, encoder):
    """With dynamic_sampling, groups whose completions all score the same are set aside while further prompts are
    sampled; the rollout trains on the varied groups first, and counts what it sampled."""
    prompts = synthetic_prompts(("counting",), 6, encoder=encoder)
    answers = [p.record.reference for p in prompts]
    # rounds of 2 prompts x 2 completions: round 1 both groups right (no variance), round 2 one right and one wrong
    scripted = iter([[answers[0]] * 2 + [answers[1]] * 2, [answers[2], "x", "y", "z"], [answers[4], "x"] * 2])

    def fake_sample(model, processor, group_prompts, *, settings, seed):
        texts = next(scripted)
        tokens = np.full((len(texts), 4), PROCESSOR.pad_token_id, np.int32)
        lengths = np.zeros(len(texts), np.int64)
        for i, text in enumerate(texts):
            ids = [*PROCESSOR.tokenizer.encode(text, add_special_tokens=False).ids, PROCESSOR.eos_token_ids[0]]
            tokens[i, : len(ids)], lengths[i] = ids, len(ids)
        return Completions(tokens, np.full(tokens.shape, -0.5, np.float32), lengths, np.zeros(len(texts), bool))

    monkeypatch.setattr("qwen3vl_jax.training.objectives.grpo.sample_completions", fake_sample)
    rollout = dataclasses.replace(SETTINGS, dynamic_sampling=True, max_sampling_rounds=3)
    data = RolloutData.__new__(RolloutData)  # only what `sample` reads
    data.objective = PolicyOptimization(rollout=rollout, prompts_per_step=2)
    data.environment = SimpleNamespace(config=SimpleNamespace(seed=0), processor=PROCESSOR)
    data.model, data.scorer = SimpleNamespace(), RewardScorer()
    batches = iter([PromptBatch(prompts[i : i + 2]) for i in (0, 2, 4)])
    chosen, sampled, dropped, rounds = data.sample(batches, params=None, step=0)
    assert rounds == 3 and len(sampled.prompts) == 6 and dropped == 0
    # round 2's varied group (prompt 2), round 3's (prompt 4): both varied groups, none set aside
    assert [p.record.id for p in chosen.prompts] == [prompts[2].record.id, prompts[4].record.id]
    assert not chosen.zero_variance.any()
    np.testing.assert_allclose(chosen.advantages.reshape(2, 2).sum(1), 0, atol=1e-6)


def test_a_grpo_run_with_images_from_a_tiny_checkpoint(tmp_path):
    """configs/grpo_toy.py at toy size from a random tiny checkpoint on a data 2 x fsdp 2 x tensor 2 mesh: 2 steps
    on one rollout (updates_per_rollout 2) rewarded by a user's function, evaluated by generation. The first update
    recomputes the sampler's log-probabilities; the second, after the parameters moved, does not."""
    config = config_from_file(os.path.join(ROOT, "configs", "grpo_toy.py"))
    checkpoint = tmp_path / "checkpoint"
    model = Qwen3VLModel.from_config(model_config_from(config), seed=0)
    export_hf(str(checkpoint), model.params, config=model.config, processor=processor_from(config))
    config = config_from_file(os.path.join(ROOT, "configs", "grpo_toy.py"), str(checkpoint))
    config.steps, config.log_every = 2, 1
    config.grpo.update(prompts_per_step=2, group_size=4, updates_per_rollout=2)
    config.data.update(batch_size=4)
    config.mesh.update(data=2, fsdp=2, tensor=2)  # the rollout samples on the training mesh's sharded parameters
    config.data.sources.tasks.reward = f"{__name__}.distinct_characters"
    config.optimizer.update(warmup_steps=0, lr=1e-3)
    config.eval.update(every=2, batch_size=2, max_new_tokens=8)
    for eval_set in config.eval.sets.values():
        eval_set.num_examples = 2
    results = Trainer(config, str(tmp_path / "run")).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, second = (line for line in lines if line["split"] == "train")
    assert first["reward_mean"] > 0 and first["zero_variance_groups"] < 1 and first["grad_norm"] > 0
    assert first["rollout_seconds"] > 0 and first["reward_" + f"{__name__}.distinct_characters_mean"] > 0
    assert first["logprob_gap"] < 1e-4 and first["clip_fraction"] == 0
    assert "reward_mean" not in second and second["logprob_gap"] > 1e-4  # the same rollout, moved parameters
    assert np.isfinite(second["loss"])
    assert set(results) >= {"grounding/box_hit", "grounding/iou", "counting/exact_match"}


def test_settings_that_cannot_work_are_refused_before_the_first_step(tmp_path):
    def trainer(**changes):
        config = config_from_file(os.path.join(ROOT, "configs", "grpo_toy.py"))
        for section, values in changes.items():
            config[section].update(values)
        return Trainer(config, str(tmp_path / "run"))

    with pytest.raises(ValueError, match=r"32 sequences do not fit a batch of 2 rows x 4 slots of 112 tokens"):
        trainer(grpo=dict(prompts_per_step=4), data=dict(batch_size=2))
    with pytest.raises(ValueError, match=r"does not fit a row of data\.seq_len = 100"):
        trainer(data=dict(seq_len=100))
    with pytest.raises(ValueError, match=r"eval\.mode 'greedy' is not one of"):
        trainer(eval=dict(mode="greedy"))
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        trainer(grpo=dict(group_size=1))
    with pytest.raises(ValueError, match="scale_rewards 'max' not in"):
        trainer(grpo=dict(scale_rewards="max"))
    with pytest.raises(ValueError, match="variant must be in"):
        trainer(grpo=dict(variant="ppo"))
