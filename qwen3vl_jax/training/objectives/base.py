"""What a training objective is to the train step, the step builder and the trainer (`Objective`), and the parts
every objective shares: the policy's per-token cross-entropy and its counters, the teacher-forced eval step, and
the training data of packed rows (`TrainingData`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import ConfigDict

from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.data.pipeline import DataConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.processing import Processor
from qwen3vl_jax.training.loss import example_totals, token_weights


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What an objective's loss is computed with: the model, the token weighting (training/loss.py), the number of
    microbatches a batch is split into and the positions the head runs at a time (0: the whole row)."""

    model: Qwen3VL
    normalization: str
    microbatches: int = 1
    loss_chunk: int = 0


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """Frozen parameters the train step takes after (state, batch): a teacher or a reference model. `checkpoint`:
    the HF directory they are read from; empty: the run's step-0 parameters."""

    config: ModelConfig
    checkpoint: str = ""


@dataclasses.dataclass(frozen=True)
class RunDescription:
    """What an objective may check a training run against before it starts (e.g. a cache made for its batches):
    this process's data config, the groups of processes reading distinct rows, the data shards, the vision
    processing settings, the number of steps and the model's vocabulary."""

    data: DataConfig
    row_group_count: int
    num_shards: int
    processing: dict[str, Any]
    steps: int
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class DataEnvironment:
    """What an objective's training data is made from: the run config, this process's data config, the processor,
    the model config, the mesh and its logical axis rules, this process's group of processes reading the same rows
    (row_group of row_group_count) and the pipeline of packed rows (`packed_batches(data)`, data.pipeline)."""

    config: ConfigDict
    data: DataConfig
    processor: Processor
    model_config: ModelConfig
    mesh: Mesh
    rules: tuple
    row_group: int
    row_group_count: int
    packed_batches: Callable[[DataConfig], Any]


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """This process's rows of a step's batch, the host-side metrics made with it (averaged over the steps of a log
    line) and the seconds spent making it while the devices waited (e.g. sampling rollouts)."""

    batch: TrainingBatch
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


class TrainingData:
    """The batches of a training run: `dataset()` is what the trainer iterates and checkpoints (grain), and
    `next_batch` turns what it yields into this process's batch of a step, given the parameters as they are
    before the step. Here: packed rows of the data pipeline, passed through the objective's `host_batch`."""

    def __init__(self, objective: Objective, environment: DataEnvironment):
        self.objective, self.environment = objective, environment

    def dataset(self):
        return self.environment.packed_batches(self.environment.data)

    def next_batch(self, iterator: Iterator, *, step: int, params: Any) -> HostBatch:
        del params
        batch = next(iterator)
        first_row = self.environment.row_group * batch.batch_size
        return HostBatch(self.objective.host_batch(batch, step=step, first_row=first_row))


@flax.struct.dataclass
class Counters:
    """Sums over a (micro)batch that the step adds up over microbatches and reports: the cross-entropy term as the
    objective weights it (`ce`), supervised tokens, those whose target has the highest logit and their summed
    cross-entropy; `extra`: the objective's own terms (e.g. kl, dpo_loss), reported under their names."""

    ce: jax.Array
    tokens: jax.Array
    correct: jax.Array
    token_ce: jax.Array
    extra: dict[str, jax.Array] = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvalSummary:
    """An eval set's metrics from the summed outputs of the eval step, a line for the console and the number of
    examples (or pairs) they cover."""

    metrics: dict[str, float]
    line: str
    count: float


def token_losses(
    model: Qwen3VL, params: Any, batch: TrainingBatch, *, loss_chunk: int, dropout_rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, Any]:
    """Per token (B, L): cross-entropy against batch.targets and whether the target has the highest logit;
    plus the MoE router logits (None for a dense model). dropout_rng: LoRA dropout on (training), else off."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return model.apply(
        {"params": params},
        batch.inputs,
        batch.targets,
        chunk=loss_chunk,
        method=Qwen3VL.token_losses,
        rngs=rngs,
    )


def token_counters(cross_entropy: jax.Array, correct: jax.Array, batch: TrainingBatch, *, ce: jax.Array) -> Counters:
    """The Counters of per-token cross-entropy and hits (B, L) over the batch's supervised tokens, with `ce` the
    cross-entropy term as the objective weights it."""
    mask = batch.loss_mask > 0
    return Counters(
        ce=ce,
        tokens=mask.sum(dtype=jnp.float32),
        correct=(correct & mask).sum(dtype=jnp.float32),
        token_ce=jnp.where(mask, cross_entropy, 0.0).sum(),
    )


def weighted_ce(
    cross_entropy: jax.Array, batch: TrainingBatch, *, normalization: str, total_weight: jax.Array
) -> jax.Array:
    """sum(w * CE) / total_weight, w the supervised tokens' weights (training/loss.py) and total_weight the whole
    batch's sum of them (a microbatch's share of the batch's mean)."""
    weights = token_weights(batch.loss_mask, batch.segment_ids, normalization=normalization)
    return (weights * cross_entropy).sum() / total_weight


def ce_total_weight(batch: TrainingBatch, *, normalization: str) -> jax.Array:
    """The whole batch's summed token weights (at least 1e-9): the cross-entropy's normaliser."""
    weights = token_weights(batch.loss_mask, batch.segment_ids, normalization=normalization)
    return jnp.maximum(weights.sum(), 1e-9)


class Objective:
    """A training objective. The train step (training/train_step.py) calls `batch_totals` once on the whole
    batch and `loss` on each microbatch; the step builder gives the step the `frozen_model`'s parameters as its
    third argument; the trainer checks the run with `check_run`, takes each step's batch from `training_data`
    (packed rows through `host_batch`, or, e.g., rollouts) and sums `eval_step`'s outputs over an eval set into
    `eval_summary`. The base class's eval is teacher-forced
    cross-entropy and exact match; an objective overrides what differs."""

    # names of the (B, L, ...) arrays the objective adds to the training batch's `extra` (host_batch)
    batch_fields: ClassVar[tuple[str, ...]] = ()
    # whether eval_step takes the frozen parameters too
    frozen_in_eval: ClassVar[bool] = False
    # the logged metrics the progress bar shows (when a log line has them), beside tokens/s
    progress_metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def frozen_model(self, model_config: ModelConfig) -> FrozenModel | None:
        """The frozen parameters the train step needs beside the trained ones (None: none)."""
        return None

    def batch_totals(self, batch: TrainingBatch, settings: StepSettings) -> dict[str, jax.Array]:
        """Normalisers over the whole batch (before it is split into microbatches), passed to every `loss`."""
        return dict(ce_weight=ce_total_weight(batch, normalization=settings.normalization))

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
        """One (micro)batch's share of the loss, its Counters and the MoE router logits (None for a dense model;
        the step adds the router losses)."""
        raise NotImplementedError

    def extra_batch_shapes(self, *, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of `batch_fields` in a global batch (the compile planner's abstract batch)."""
        return {}

    def check_run(self, run: RunDescription) -> None:
        """Refuses a training run the objective cannot serve (raises); called before the first step."""

    def training_data(self, environment: DataEnvironment) -> TrainingData:
        """The run's batches (default: packed rows of the data pipeline through `host_batch`)."""
        return TrainingData(self, environment)

    def host_batch(self, batch: TrainingBatch, *, step: int, first_row: int) -> TrainingBatch:
        """This process's batch of `step` (its rows of the global batch from `first_row` on) as the step takes it."""
        return batch

    def make_eval_step(self, config: ModelConfig, *, loss_chunk: int = 0) -> Callable:
        """(params, batch[, frozen_params]) -> sums over the batch (`eval_summary` reads them)."""
        return make_eval_step(config, loss_chunk=loss_chunk)

    def eval_summary(self, totals: dict[str, float]) -> EvalSummary:
        """An eval set's metrics from its summed eval-step outputs."""
        metrics = dict(
            token_ce=totals.get("token_ce", 0.0) / max(totals.get("tokens", 0.0), 1),
            exact_match=totals.get("exact", 0.0) / max(totals.get("examples", 0.0), 1),
            examples=totals.get("examples", 0.0),
        )
        line = f"exact match {metrics['exact_match']:.3f}, token CE {metrics['token_ce']:.3f}"
        return EvalSummary(metrics, line, metrics["examples"])


def make_eval_step(config: ModelConfig, *, loss_chunk: int = 0) -> Callable:
    """(params, batch) -> sums over the batch: token CE and count, examples and examples whose every
    supervised token is predicted by argmax (= the greedy answer under teacher forcing is exactly right)."""
    model = Qwen3VL(config)

    def eval_step(params, batch: TrainingBatch):
        ce, correct, _ = token_losses(model, params, batch, loss_chunk=loss_chunk)
        mask = batch.loss_mask > 0
        wrong = mask & ~correct
        (supervised, _), (errors, _) = (example_totals(x, batch.segment_ids) for x in (mask, wrong))
        examples = supervised > 0
        return dict(
            token_ce=jnp.where(mask, ce, 0.0).sum(),
            tokens=mask.sum(dtype=jnp.float32),
            examples=examples.sum(dtype=jnp.float32),
            exact=(examples & (errors == 0)).sum(dtype=jnp.float32),
        )

    return eval_step
