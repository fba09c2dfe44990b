"""Rollouts for reinforcement learning: G completions sampled per prompt from the current parameters (the KV-cache
generator of inference/generation.py, run on the parameters as the training mesh holds them: no copy), scored by
the prompts' rewards, given group-normalised advantages (training/policy_gradient.py) and packed back into
training rows.

Static shapes: prompts are left-padded to `max_prompt_tokens` and completions run to `max_completion_tokens`, so
every rollout compiles the same generation program (patch buffers round up to power-of-two buckets). Each
sequence (prompt + completion) gets one slot of a training row: a row of seq_len tokens and max_patches patches
holds seq_len // (max_prompt_tokens + max_completion_tokens) slots, each with an equal share of the patches, so a
rollout of prompts x G sequences always fits the batch's rows (`SlotLayout`). In a row the prompt's tokens are
unweighted and the completion's tokens (through its end token) carry the loss, with the sampler's log-probability
of each completion token and the completion's advantage as the batch's `extra` arrays at the position that
predicts the token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.data.features import PATCH_FEATURES, TOKEN_FEATURES, example_features
from qwen3vl_jax.data.packing import finalize
from qwen3vl_jax.inputs.batch import BATCH_FIELDS, TrainingBatch
from qwen3vl_jax.inputs.model_inputs import MIN_PATCH_BUCKET, MIN_TOKEN_BUCKET, bucket
from qwen3vl_jax.processing import Encoded, Processor
from qwen3vl_jax.training.policy_gradient import SCALE_REWARDS, group_advantages
from qwen3vl_jax.training.prompts import Prompt, PromptRecord
from qwen3vl_jax.training.rewards import Rewards

OLD_LOGPROBS, ADVANTAGES = "old_logprobs", "advantages"  # the batch's extra arrays (B, L) float32


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """How completions are sampled and scored (config.grpo): G = group_size completions per prompt of at most
    max_completion_tokens tokens, sampled at temperature / top_k / top_p; advantages scaled per scale_rewards;
    mask_truncated: completions cut at max_completion_tokens carry no loss; dynamic_sampling: groups whose
    rewards all equal are dropped and refilled from further prompts, up to max_sampling_rounds generations."""

    group_size: int
    max_prompt_tokens: int
    max_completion_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    scale_rewards: str = "group"
    mask_truncated: bool = False
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be at least 2 (advantages compare a group), got {self.group_size}")
        if self.max_prompt_tokens < 1 or self.max_completion_tokens < 1:
            raise ValueError(
                f"grpo.max_prompt_tokens and max_completion_tokens must be positive, got {self.max_prompt_tokens}, "
                f"{self.max_completion_tokens}"
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"grpo.scale_rewards {self.scale_rewards!r} not in {SCALE_REWARDS}")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"grpo.max_sampling_rounds must be at least 1, got {self.max_sampling_rounds}")


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Training rows of seq_len tokens and max_patches patches, `rows` of them per (global) batch, each holding
    slots_per_row sequences of at most slot_tokens tokens and slot_patches patches."""

    rows: int
    seq_len: int
    max_patches: int
    slot_tokens: int
    patch_multiple: int = 4  # slot_patches is a multiple of it (the merge window)

    def __post_init__(self):
        if self.slots_per_row < 1:
            raise ValueError(
                f"a sequence of grpo.max_prompt_tokens + max_completion_tokens = {self.slot_tokens} tokens does not "
                f"fit a row of data.seq_len = {self.seq_len}"
            )

    @property
    def slots_per_row(self) -> int:
        return self.seq_len // self.slot_tokens

    @property
    def slot_patches(self) -> int:
        return self.max_patches // self.slots_per_row // self.patch_multiple * self.patch_multiple

    @property
    def capacity(self) -> int:
        """Sequences a batch holds."""
        return self.rows * self.slots_per_row


@dataclasses.dataclass(frozen=True)
class Completions:
    """N = prompts x G sampled completions (each prompt's G consecutive): tokens and the sampler's log-probabilities
    (N, T) (pad / 0 after the end), lengths (N,) (through the end token) and whether each was cut at T."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Scored groups: their prompts, completions, decoded texts, rewards (N,) (per function: NaN where a completion's
    prompt does not use it), advantages (N,) and whether each group's rewards all equal (N,)."""

    prompts: list[Prompt]
    completions: Completions
    texts: list[str]
    rewards: np.ndarray
    per_reward: dict[str, np.ndarray]
    reward_failures: dict[str, int]
    advantages: np.ndarray
    zero_variance: np.ndarray


def generation_inputs(prompts: Sequence[Prompt], *, group_size: int, max_prompt_tokens: int) -> dict[str, np.ndarray]:
    """HF-processor-style arrays (left padding to max_prompt_tokens) of each prompt repeated group_size times."""
    rows = [prompt for prompt in prompts for _ in range(group_size)]
    input_ids = np.zeros((len(rows), max_prompt_tokens), np.int64)
    mask = np.zeros_like(input_ids)
    for b, prompt in enumerate(rows):
        ids = prompt.encoded.input_ids
        input_ids[b, max_prompt_tokens - len(ids) :], mask[b, max_prompt_tokens - len(ids) :] = ids, 1

    def stacked(field: str, width: int) -> np.ndarray:
        parts = [getattr(prompt.encoded, field) for prompt in rows]
        return np.concatenate(parts) if parts else np.zeros((0, width))

    patch_dim = prompts[0].encoded.pixel_values.shape[1]
    return dict(
        input_ids=input_ids,
        attention_mask=mask,
        pixel_values=stacked("pixel_values", patch_dim),
        image_grid_thw=stacked("image_grid_thw", 3).astype(np.int64),
        pixel_values_videos=stacked("pixel_values_videos", patch_dim),
        video_grid_thw=stacked("video_grid_thw", 3).astype(np.int64),
    )


def generation_buffer_sizes(layout: SlotLayout, settings: RolloutSettings) -> tuple[int, int]:
    """(seq_len, max_patches): the largest ModelInputs buffers of one rollout row that `sample_completions` hands
    the generator: the prompts, left-padded to max_prompt_tokens, and each row's patches (at most
    layout.slot_patches: the PromptEncoder skips prompts with more), in `Qwen3VLModel.prepare`'s power-of-two
    buckets (`inputs.model_inputs.from_hf_batch`: at least MIN_TOKEN_BUCKET tokens and MIN_PATCH_BUCKET patches).
    What the compile planner plans the rollout's generation for."""
    tokens = bucket(settings.max_prompt_tokens, MIN_TOKEN_BUCKET)
    return tokens, bucket(layout.slot_patches, MIN_PATCH_BUCKET) if layout.slot_patches else 0


def sample_completions(
    model: Qwen3VLModel, processor: Processor, prompts: Sequence[Prompt], *, settings: RolloutSettings, seed: int
) -> Completions:
    """G completions of each prompt sampled from `model` (its parameters where they are: on its mesh, sharded)."""
    inputs = generation_inputs(prompts, group_size=settings.group_size, max_prompt_tokens=settings.max_prompt_tokens)
    tokens, logprobs = model.generate(
        **inputs,
        max_new_tokens=settings.max_completion_tokens,
        do_sample=True,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=seed,
        eos_token_ids=list(processor.eos_token_ids),
        pad_token_id=processor.pad_token_id,
        return_logprobs=True,
    )
    ended = np.isin(tokens, np.asarray(processor.eos_token_ids))
    first_end = np.where(ended.any(axis=1), ended.argmax(axis=1), tokens.shape[1])
    lengths = np.minimum(first_end + 1, tokens.shape[1])
    return Completions(tokens.astype(np.int32), logprobs.astype(np.float32), lengths, ~ended.any(axis=1))


class RewardScorer:
    """Scores completions with each prompt's reward functions (one `Rewards` per distinct combination)."""

    def __init__(self):
        self._rewards: dict[str, Rewards] = {}  # by the specs' repr (their options may be unhashable)

    def __call__(self, records: Sequence[PromptRecord], texts: Sequence[str]):
        """(total (N,), {name: (N,) scores, NaN where unused}, {name: failures}) for texts[i] of records[i]."""
        total = np.zeros(len(texts))
        per_reward: dict[str, np.ndarray] = {}
        failures: dict[str, int] = {}
        by_reward: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_reward.setdefault(repr(record.reward), []).append(i)
        for key, rows in by_reward.items():
            if key not in self._rewards:
                self._rewards[key] = Rewards(records[rows[0]].reward)
            rewards = self._rewards[key]
            scores = rewards(
                [texts[i] for i in rows], [records[i].reference for i in rows], [records[i].meta for i in rows]
            )
            total[rows] = scores.total
            for name, values in scores.per_reward.items():
                per_reward.setdefault(name, np.full(len(texts), np.nan))[rows] = values
                failures[name] = failures.get(name, 0) + scores.failures[name]
        return total, per_reward, failures


def score_rollout(
    prompts: Sequence[Prompt],
    completions: Completions,
    *,
    processor: Processor,
    scorer: RewardScorer,
    settings: RolloutSettings,
) -> Rollout:
    """Decodes the completions (special tokens kept: grounding boxes are made of them), scores them and computes
    the group advantages."""
    group = settings.group_size
    texts = []
    for row, length, truncated in zip(completions.tokens, completions.lengths, completions.truncated):
        texts.append(processor.decode(row[: length - (0 if truncated else 1)], skip_special_tokens=False))
    records = [prompt.record for prompt in prompts for _ in range(group)]
    total, per_reward, failures = scorer(records, texts)
    advantages = group_advantages(total, group_size=group, scale_rewards=settings.scale_rewards)
    return Rollout(
        prompts=list(prompts),
        completions=completions,
        texts=texts,
        rewards=total,
        per_reward=per_reward,
        reward_failures=failures,
        advantages=np.asarray(advantages.advantage, np.float32),
        zero_variance=np.asarray(advantages.zero_variance),
    )


def concatenate_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """Rollouts' groups one after the other."""
    names = sorted({name for rollout in rollouts for name in rollout.per_reward})

    def joined(arrays):
        return np.concatenate(list(arrays))

    return Rollout(
        prompts=[prompt for rollout in rollouts for prompt in rollout.prompts],
        completions=Completions(
            *(joined(getattr(r.completions, f.name) for r in rollouts) for f in dataclasses.fields(Completions))
        ),
        texts=[text for rollout in rollouts for text in rollout.texts],
        rewards=joined(r.rewards for r in rollouts),
        per_reward={
            name: joined(r.per_reward.get(name, np.full(len(r.rewards), np.nan)) for r in rollouts) for name in names
        },
        reward_failures={name: sum(r.reward_failures.get(name, 0) for r in rollouts) for name in names},
        advantages=joined(r.advantages for r in rollouts),
        zero_variance=joined(r.zero_variance for r in rollouts),
    )


def select_groups(rollout: Rollout, groups: Sequence[int], *, group_size: int) -> Rollout:
    """The rollout's groups `groups` (indices of prompts), in that order."""
    rows = np.asarray([g * group_size + i for g in groups for i in range(group_size)], np.int64)

    def take(values: np.ndarray) -> np.ndarray:
        return values[rows]

    return Rollout(
        prompts=[rollout.prompts[g] for g in groups],
        completions=Completions(*(take(getattr(rollout.completions, f.name)) for f in dataclasses.fields(Completions))),
        texts=[rollout.texts[i] for i in rows],
        rewards=take(rollout.rewards),
        per_reward={name: take(values) for name, values in rollout.per_reward.items()},
        reward_failures=dict(rollout.reward_failures),
        advantages=take(rollout.advantages),
        zero_variance=take(rollout.zero_variance),
    )


def sequence_features(
    prompt: Prompt, completion: np.ndarray, *, config: ModelConfig, layout: SlotLayout, supervised: bool
):
    """One sequence's example features (data.features.example_features): the prompt's tokens and pixels, then the
    completion's tokens, which are supervised unless `supervised` is False."""
    encoded = prompt.encoded
    ids = np.concatenate([encoded.input_ids, completion]).astype(np.int32)
    weights = np.concatenate([np.zeros(len(encoded.input_ids), bool), np.full(len(completion), supervised)])
    sequence = Encoded(
        input_ids=ids,
        supervised=weights,
        pixel_values=encoded.pixel_values,
        image_grid_thw=encoded.image_grid_thw,
        pixel_values_videos=encoded.pixel_values_videos,
        video_grid_thw=encoded.video_grid_thw,
    )
    return example_features(
        sequence,
        config,
        seq_len=layout.slot_tokens,
        max_patches=layout.slot_patches,
        overflow="drop",
        where=f"prompt record {prompt.record.id}",
    )


def pack_rollout(
    rollout: Rollout,
    *,
    config: ModelConfig,
    layout: SlotLayout,
    settings: RolloutSettings,
    context_shards: int = 1,
    dropped: int = 0,
) -> TrainingBatch:
    """The rollout's sequences in slot order as a (global) TrainingBatch of layout.rows rows, with the extra arrays
    OLD_LOGPROBS (the sampler's log-probability of the token each position predicts) and ADVANTAGES (its
    completion's advantage), both 0 off the completions. `dropped` (bad prompts skipped) is reported in row 0."""
    count = len(rollout.rewards)
    if count > layout.capacity:
        raise ValueError(
            f"{count} sequences do not fit {layout.rows} rows x {layout.slots_per_row} slots: lower "
            f"grpo.prompts_per_step or group_size, or raise data.batch_size / data.seq_len"
        )
    completions, group = rollout.completions, settings.group_size
    rows = []
    for r in range(layout.rows):
        members = range(r * layout.slots_per_row, min((r + 1) * layout.slots_per_row, count))
        pieces = []
        for i in members:
            length = int(completions.lengths[i])
            keep = not (settings.mask_truncated and completions.truncated[i])
            features = sequence_features(
                rollout.prompts[i // group],
                completions.tokens[i, :length],
                config=config,
                layout=layout,
                supervised=keep,
            )
            prompt_length = len(features["input_ids"]) - length
            old = np.zeros(len(features["input_ids"]), np.float32)
            old[prompt_length - 1 : prompt_length - 1 + length] = completions.logprobs[i, :length]
            pieces.append((features, old * features["loss_mask"], rollout.advantages[i] * features["loss_mask"]))
        rows.append(_packed_row(pieces, config=config, layout=layout, context_shards=context_shards))
    arrays = {name: np.stack([row[0][name] for row in rows]) for name in BATCH_FIELDS}
    arrays["num_dropped"][0] = dropped
    extra = {
        OLD_LOGPROBS: np.stack([row[1] for row in rows]).astype(np.float32),
        ADVANTAGES: np.stack([row[2] for row in rows]).astype(np.float32),
    }
    return TrainingBatch.from_arrays(arrays, extra=extra)


def _packed_row(pieces, *, config: ModelConfig, layout: SlotLayout, context_shards: int):
    """Sequences' features side by side in one row (segment 1, 2, ...), as data.packing's packer lays them out,
    finalised into TrainingBatch arrays; plus the row's old log-probabilities and advantages (L,). No sequences:
    a row of padding."""
    if not pieces:
        empty = TrainingBatch.empty(
            1, seq_len=layout.seq_len, max_patches=layout.max_patches, patch_dim=config.vision.patch_dim
        )
        zeros = np.zeros(layout.seq_len, np.float32)
        return {name: value[0] for name, value in empty.arrays.items()}, zeros, zeros
    row: dict[str, Any] = {}
    for name in TOKEN_FEATURES + PATCH_FEATURES:
        size = layout.seq_len if name in TOKEN_FEATURES else layout.max_patches
        value = np.concatenate([features[name] for features, _, _ in pieces])
        row[name] = np.concatenate([value, np.zeros((size - len(value), *value.shape[1:]), value.dtype)])
    for key, first, size in (
        ("input_ids_segment_ids", "input_ids", layout.seq_len),
        ("pixel_patches_segment_ids", "pixel_patches", layout.max_patches),
    ):
        value = np.concatenate([np.full(len(f[first]), s + 1, np.int32) for s, (f, _, _) in enumerate(pieces)])
        row[key] = np.concatenate([value, np.zeros(size - len(value), np.int32)])
    extras = []
    for column in (1, 2):
        value = np.concatenate([piece[column] for piece in pieces])
        extras.append(np.concatenate([value, np.zeros(layout.seq_len - len(value), np.float32)]))
    return (finalize(row, config, context_shards=context_shards), *extras)
