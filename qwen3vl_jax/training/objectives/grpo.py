"""Reinforcement learning with verifiable rewards: GRPO (Shao et al. 2024) and GSPO (Zheng et al. 2025), with
DAPO's clip-higher, token-level aggregation and dynamic sampling (Yu et al. 2025) as options.

Each rollout samples G = group_size completions for each of prompts_per_step prompts from the current parameters
(training/rollouts.py), scores them with the prompts' rewards (training/rewards.py) and normalises the rewards
within each group into advantages; `updates_per_rollout` optimizer steps then minimise the clipped surrogate of
training/policy_gradient.py on the packed rollout, the importance ratio taken against the sampler's own
log-probabilities. beta > 0 adds the k3 estimate of KL(policy || reference), the reference being the step-0
parameters, or, for a LoRA model, its base (the adapters off). `config.objective = "grpo"` with the `config.grpo`
section; the prompts are config.data.sources (training/prompts.py: records with a reference answer and a reward).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from qwen3vl_jax.api import Qwen3VLModel
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.training.objectives.base import (
    Counters,
    DataEnvironment,
    FrozenModel,
    HostBatch,
    Objective,
    RunDescription,
    StepSettings,
    TrainingData,
    token_counters,
    token_losses,
)
from qwen3vl_jax.training.objectives.dpo import without_adapters
from qwen3vl_jax.training.policy_gradient import AGGREGATIONS, VARIANTS, group_advantages, policy_loss, sequence_count
from qwen3vl_jax.training.prompts import PromptEncoder, prompt_batches, reward_specs
from qwen3vl_jax.training.rewards import RewardSpec
from qwen3vl_jax.training.rollouts import (
    ADVANTAGES,
    OLD_LOGPROBS,
    RewardScorer,
    Rollout,
    RolloutSettings,
    SlotLayout,
    concatenate_rollouts,
    pack_rollout,
    sample_completions,
    score_rollout,
    select_groups,
)

SWITCHES = ("prompts_per_step",)
log = logging.getLogger(__name__)


@dataclasses.dataclass
class PolicyOptimization(Objective):
    """The GRPO / GSPO loss (module docstring) on packed rollouts, whose extra arrays hold each completion token's
    rollout log-probability and advantage (training/rollouts.py)."""

    rollout: RolloutSettings
    prompts_per_step: int
    variant: str = "grpo"
    aggregation: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0
    updates_per_rollout: int = 1
    default_reward: tuple[RewardSpec, ...] = ()
    batch_fields = (OLD_LOGPROBS, ADVANTAGES)
    progress_metrics = ("loss", "reward_mean")

    def __post_init__(self):
        if self.variant not in VARIANTS or self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"grpo.variant must be in {VARIANTS} and grpo.aggregation in {AGGREGATIONS}, got {self.variant!r}, "
                f"{self.aggregation!r}"
            )
        if min(self.clip_low, self.clip_high, self.beta) < 0:
            raise ValueError(f"grpo.clip_low, clip_high and beta must be >= 0, got {self}")
        if self.prompts_per_step < 1 or self.updates_per_rollout < 1:
            raise ValueError(
                f"grpo.prompts_per_step and updates_per_rollout must be positive, got {self.prompts_per_step}, "
                f"{self.updates_per_rollout}"
            )

    def frozen_model(self, model_config: ModelConfig) -> FrozenModel | None:
        if not self.beta or model_config.lora.rank:  # no KL term, or the LoRA base is the reference
            return None
        return FrozenModel(model_config)

    def batch_totals(self, batch: TrainingBatch, settings: StepSettings) -> dict[str, jax.Array]:
        mask = batch.loss_mask > 0
        return dict(
            tokens=jnp.maximum(mask.sum(), 1).astype(jnp.float32),
            sequences=jnp.maximum(sequence_count(mask, batch.segment_ids), 1.0),
        )

    def loss(
        self,
        params: Any,
        batch: TrainingBatch,
        *,
        frozen_params: Any,
        totals: dict[str, jax.Array],
        settings: StepSettings,
        dropout_rng: jax.Array | None,
    ) -> tuple[jax.Array, Counters, Any]:
        ce, correct, router_logits = token_losses(
            settings.model, params, batch, loss_chunk=settings.loss_chunk, dropout_rng=dropout_rng
        )
        reference_logps = None
        if self.beta:
            reference = params if frozen_params is None else frozen_params
            reference_ce, _, _ = token_losses(
                Qwen3VL(without_adapters(settings.model.config)),
                jax.lax.stop_gradient(reference),
                batch,
                loss_chunk=settings.loss_chunk,
            )
            reference_logps = -reference_ce
        mask = batch.loss_mask > 0
        old_logps = batch.extra[OLD_LOGPROBS]
        out = policy_loss(
            -ce,
            old_logps,
            batch.extra[ADVANTAGES],
            mask,
            segment_ids=batch.segment_ids,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            variant=self.variant,
            aggregation=self.aggregation,
            reference_logps=reference_logps,
            beta=self.beta,
            total_tokens=totals["tokens"],
            total_sequences=totals["sequences"],
        )
        tokens = totals["tokens"]
        mean_ce = jnp.where(mask, ce, 0.0).sum() / tokens  # reported, not trained
        gap = jnp.where(mask, jnp.abs(-ce - old_logps), 0.0).sum() / tokens
        counters = token_counters(ce, correct, batch, ce=mean_ce).replace(
            extra=dict(policy_loss=out.loss, kl=out.kl, clip_fraction=out.clip_fraction, logprob_gap=gap)
        )
        return out.loss, counters, router_logits

    def extra_batch_shapes(self, *, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {name: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32) for name in self.batch_fields}

    def check_run(self, run: RunDescription) -> None:
        if run.num_shards != run.row_group_count:
            raise ValueError(
                "grpo reads its prompts whole on every process (data.num_shards must stay 0): the rollout is "
                "sampled on the whole mesh and each process trains on its rows of it"
            )

    def training_data(self, environment: DataEnvironment) -> TrainingData:
        return RolloutData(self, environment)


class RolloutData(TrainingData):
    """A rollout every `updates_per_rollout` steps, from prompt batches of the data sources: this process's rows
    of the packed rollout and its metrics (rewards per function, zero-variance groups, completion lengths, the
    sampled tokens' entropy estimate, rollout time and tokens/s). Every process samples the same rollout (the
    same prompts and seeds) on the whole mesh."""

    def __init__(self, objective: PolicyOptimization, environment: DataEnvironment):
        super().__init__(objective, environment)
        data, model_config = environment.data, environment.model_config
        settings = objective.rollout
        self.layout = SlotLayout(
            rows=data.batch_size * environment.row_group_count,
            seq_len=data.seq_len,
            max_patches=data.max_patches,
            slot_tokens=settings.max_prompt_tokens + settings.max_completion_tokens,
            patch_multiple=model_config.vision.spatial_merge_size**2,
        )
        sequences = objective.prompts_per_step * settings.group_size
        if sequences > self.layout.capacity:
            raise ValueError(
                f"grpo.prompts_per_step x group_size = {sequences} sequences do not fit a batch of "
                f"{self.layout.rows} rows x {self.layout.slots_per_row} slots of {self.layout.slot_tokens} tokens "
                f"(data.seq_len {data.seq_len} // (grpo.max_prompt_tokens + max_completion_tokens)): raise "
                f"data.batch_size or data.seq_len, or lower prompts_per_step, group_size or the token limits"
            )
        self.encoder = PromptEncoder(
            environment.processor,
            model_config,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_prompt_patches=self.layout.slot_patches,
            default_reward=objective.default_reward,
            on_bad_input=data.on_bad_input,
        )
        self.model = Qwen3VLModel(model_config, None, mesh=environment.mesh, rules=environment.rules)
        self.scorer = RewardScorer()
        self.current: TrainingBatch | None = None
        self.made_at = -1

    def dataset(self):
        data = self.environment.data
        return prompt_batches(
            data.sources,
            self.encoder,
            prompts=self.objective.prompts_per_step,
            seed=data.seed,
            shuffle=data.shuffle,
            num_epochs=data.num_epochs,
            workers=data.workers,
        )

    def next_batch(self, iterator: Iterator, *, step: int, params: Any) -> HostBatch:
        objective: PolicyOptimization = self.objective
        if self.current is not None and step - self.made_at < objective.updates_per_rollout:
            # the same rollout again: its skipped prompts were reported with its first update
            return HostBatch(self.current.replace(num_dropped=np.zeros_like(self.current.num_dropped)))
        jax.block_until_ready(params)  # the previous updates finish before the rollout's clock starts
        start = time.perf_counter()
        rollout, sampled, dropped, rounds = self.sample(iterator, params=params, step=step)
        batch = pack_rollout(
            rollout,
            config=self.environment.model_config,
            layout=self.layout,
            settings=objective.rollout,
            context_shards=self.environment.data.context_shards,
            dropped=dropped,
        )
        per_host = self.layout.rows // self.environment.row_group_count
        first = self.environment.row_group * per_host
        self.current = jax.tree_util.tree_map(lambda x: x[first : first + per_host], batch)
        self.made_at = step
        seconds = time.perf_counter() - start
        return HostBatch(self.current, rollout_metrics(sampled, rounds=rounds, seconds=seconds), seconds)

    def sample(self, iterator: Iterator, *, params: Any, step: int) -> tuple[Rollout, Rollout, int, int]:
        """(the rollout to train on, everything sampled for it, bad prompts skipped, generation rounds). Without
        dynamic sampling one round; with it, groups whose rewards all equal are set aside and further prompts
        sampled until prompts_per_step groups vary or max_sampling_rounds is reached (then set-aside groups fill
        the rest, with advantage 0)."""
        objective: PolicyOptimization = self.objective
        settings, group = objective.rollout, objective.rollout.group_size
        self.model.params = params
        rounds, dropped = [], 0
        for round_index in range(settings.max_sampling_rounds):
            prompts = next(iterator)
            dropped += prompts.dropped
            seed = int(np.random.SeedSequence([self.environment.config.seed, step, round_index]).generate_state(1)[0])
            completions = sample_completions(
                self.model, self.environment.processor, prompts.prompts, settings=settings, seed=seed
            )
            rounds.append(
                score_rollout(
                    prompts.prompts,
                    completions,
                    processor=self.environment.processor,
                    scorer=self.scorer,
                    settings=settings,
                )
            )
            varied = sum(int((~r.zero_variance[::group]).sum()) for r in rounds)
            if not settings.dynamic_sampling or varied >= objective.prompts_per_step:
                break
        sampled = concatenate_rollouts(rounds)
        groups = np.arange(len(sampled.prompts))
        if settings.dynamic_sampling:
            zero = sampled.zero_variance[::group]
            groups = np.concatenate([groups[~zero], groups[zero]])[: objective.prompts_per_step]
        else:
            groups = groups[: objective.prompts_per_step]
        chosen = select_groups(sampled, groups, group_size=group)
        advantages = group_advantages(chosen.rewards, group_size=group, scale_rewards=settings.scale_rewards)
        chosen = dataclasses.replace(
            chosen,
            advantages=np.asarray(advantages.advantage, np.float32),
            zero_variance=np.asarray(advantages.zero_variance),
        )
        return chosen, sampled, dropped, len(rounds)


def rollout_metrics(sampled: Rollout, *, rounds: int, seconds: float) -> dict[str, float]:
    """What a rollout shows, over every completion sampled for it: rewards (the weighted total and each
    function's mean and std over the completions that use it; failures: completions it raised on), the fraction of
    groups whose rewards all equal, completion length and the fraction cut at max_completion_tokens, the sampled
    tokens' mean -log p (an estimate of the policy's entropy per token), generation rounds, seconds and generated
    tokens per second."""
    completions = sampled.completions
    lengths = completions.lengths
    real = np.arange(completions.tokens.shape[1])[None] < lengths[:, None]
    metrics = dict(
        reward_mean=float(sampled.rewards.mean()),
        reward_std=float(sampled.rewards.std()),
        zero_variance_groups=float(sampled.zero_variance.mean()),
        completion_tokens=float(lengths.mean()),
        truncated_fraction=float(completions.truncated.mean()),
        sampled_entropy=float(-(completions.logprobs * real).sum() / max(real.sum(), 1)),
        sampling_rounds=float(rounds),
        rollout_seconds=seconds,
        rollout_tokens_per_second=float(lengths.sum()) / max(seconds, 1e-9),
    )
    for name, values in sampled.per_reward.items():
        used = values[~np.isnan(values)]
        metrics.update({f"reward_{name}_mean": float(used.mean()), f"reward_{name}_std": float(used.std())})
        metrics[f"reward_{name}_failures"] = float(sampled.reward_failures.get(name, 0))
    return metrics


def from_config(config: ConfigDict, model_config: ModelConfig) -> PolicyOptimization:
    """config.grpo (run_config.py: every field with its meaning)."""
    del model_config
    grpo = config.grpo
    if not grpo.prompts_per_step:
        raise ValueError("objective 'grpo' needs grpo.prompts_per_step (prompts sampled per rollout)")
    rollout = RolloutSettings(
        group_size=grpo.group_size,
        max_prompt_tokens=grpo.max_prompt_tokens,
        max_completion_tokens=grpo.max_completion_tokens,
        temperature=grpo.temperature,
        top_k=grpo.top_k,
        top_p=grpo.top_p,
        scale_rewards=grpo.scale_rewards,
        mask_truncated=grpo.mask_truncated,
        dynamic_sampling=grpo.dynamic_sampling,
        max_sampling_rounds=grpo.max_sampling_rounds,
    )
    return PolicyOptimization(
        rollout=rollout,
        prompts_per_step=grpo.prompts_per_step,
        variant=grpo.variant,
        aggregation=grpo.aggregation,
        clip_low=grpo.clip_low,
        clip_high=grpo.clip_high,
        beta=grpo.beta,
        updates_per_rollout=grpo.updates_per_rollout,
        default_reward=reward_specs(list(grpo.rewards)),
    )
