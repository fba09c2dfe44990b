"""Strong-to-weak distillation (Qwen3-VL report, post-training): the student learns from a frozen teacher's
next-token distribution on the same tokens.

Per position, with temperature T, p = softmax(teacher logits / T) and q = softmax(student logits / T):

    KL_T = T^2 * sum_v p_v (log p_v - log q_v)

(the T^2 keeps the gradient's scale independent of T, Hinton et al. 2015). The student's loss mixes it with the
cross-entropy on the targets, alpha * KL_T + (1 - alpha) * CE, each weighted and normalised per token as the
plain loss is (training/loss.py). Both heads run `chunk` positions at a time, so neither model's (B, L, vocab)
logits ever exist whole; the teacher's side gets no gradient.

Offline distillation keeps only the teacher's k largest logits per position (computed once and cached on disk,
training/teacher_cache.py): p is then the softmax over those k tokens, renormalised, and the KL sums over them
(`top_k_kl_divergence`; with k = vocabulary it is the exact KL).

`config.objective = "distill"` with the `config.distill` section: `teacher` (an HF checkpoint directory: online,
`OnlineDistillation`) or `teacher_cache` (a directory written by experiments.cache_teacher: offline,
`OfflineDistillation`), alpha, temperature, all_text_tokens, top_k (what the cache holds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from qwen3vl_jax.checkpoints import hf_io
from qwen3vl_jax.config import ModelConfig
from qwen3vl_jax.inputs.batch import TrainingBatch
from qwen3vl_jax.modeling.lm_head import chunk_logits, cross_entropy_and_hits, over_position_chunks
from qwen3vl_jax.modeling.model import Qwen3VL
from qwen3vl_jax.training.loss import token_weights
from qwen3vl_jax.training.objectives.base import (
    Counters,
    FrozenModel,
    Objective,
    RunDescription,
    StepSettings,
    token_counters,
    weighted_ce,
)
from qwen3vl_jax.training.teacher_cache import TEACHER_TOP_K, TeacherCache, TeacherCacheError, stream_description

# config.distill fields whose being set means distillation: set while config.objective is another, they are refused
SWITCHES = ("teacher", "teacher_cache")


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float) -> jax.Array:
    """(..., V) logits of both models -> KL_T(teacher || student) (...) in float32."""
    t = jnp.float32(temperature)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
    return t * t * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def top_k_kl_divergence(
    student_logits: jax.Array, top_logits: jax.Array, top_ids: jax.Array, *, temperature: float
) -> jax.Array:
    """Student logits (..., V), the teacher's k largest logits (..., k) and their token ids (..., k) ->
    T^2 * sum_j p_j (log p_j - log q_(id_j)) (...) in float32, p = softmax(top_logits / T) over the k tokens and
    q = softmax(student_logits / T) over the whole vocabulary."""
    t = jnp.float32(temperature)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(top_logits).astype(jnp.float32) / t, axis=-1)
    student_at_teacher_ids = jnp.take_along_axis(student, top_ids, axis=-1)
    return t * t * jnp.sum(jnp.exp(teacher) * (teacher - student_at_teacher_ids), axis=-1)


def chunked_distillation(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float,
    chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Final-norm hidden states (B, L, H_student) / (B, L, H_teacher), heads (H, V) of the same vocabulary,
    targets (B, L) -> (student cross-entropy, KL_T(teacher || student), student hit) each (B, L), `chunk`
    positions at a time (the backward pass recomputes each chunk's logits)."""
    if student_head.shape[-1] != teacher_head.shape[-1]:
        raise ValueError(
            f"student vocabulary {student_head.shape[-1]} != teacher vocabulary {teacher_head.shape[-1]}: "
            "distillation compares the two distributions token by token"
        )
    student_head = nn.with_logical_constraint(student_head, (None, "loss_vocab"))
    teacher_head = nn.with_logical_constraint(jax.lax.stop_gradient(teacher_head), (None, "loss_vocab"))
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)

    def one_chunk(student_x, teacher_x, chunk_targets):
        student_logits = chunk_logits(student_x, student_head)
        cross_entropy, hits = cross_entropy_and_hits(student_logits, chunk_targets)
        kl = kl_divergence(student_logits, chunk_logits(teacher_x, teacher_head), temperature=temperature)
        return cross_entropy, kl, hits

    return over_position_chunks(one_chunk, (student_hidden, teacher_hidden, targets), chunk=chunk)


def chunked_top_k_distillation(
    student_hidden: jax.Array,
    student_head: jax.Array,
    top_logits: jax.Array,
    top_ids: jax.Array,
    targets: jax.Array,
    *,
    temperature: float,
    chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """As chunked_distillation, with the teacher's k largest logits (B, L, k) and their ids (B, L, k) in place of
    its hidden states and head (`top_k_kl_divergence`)."""
    if top_ids.shape != top_logits.shape or top_ids.shape[:2] != targets.shape:
        raise ValueError(f"teacher top-k logits {top_logits.shape} / ids {top_ids.shape} for targets {targets.shape}")
    student_head = nn.with_logical_constraint(student_head, (None, "loss_vocab"))

    def one_chunk(student_x, chunk_top_logits, chunk_top_ids, chunk_targets):
        student_logits = chunk_logits(student_x, student_head)
        cross_entropy, hits = cross_entropy_and_hits(student_logits, chunk_targets)
        kl = top_k_kl_divergence(student_logits, chunk_top_logits, chunk_top_ids, temperature=temperature)
        return cross_entropy, kl, hits

    arrays = (student_hidden, jax.lax.stop_gradient(top_logits), top_ids, targets)
    return over_position_chunks(one_chunk, arrays, chunk=chunk)


def teacher_top_k(
    teacher_hidden: jax.Array, teacher_head: jax.Array, *, k: int, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """The teacher's k largest logits (B, L, k) in float32 and their token ids (B, L, k) int32, `chunk` positions
    at a time (what the offline cache stores)."""
    if not 0 < k <= teacher_head.shape[-1]:
        raise ValueError(f"top_k {k} must be in [1, vocabulary {teacher_head.shape[-1]}]")

    def one_chunk(x):
        values, ids = jax.lax.top_k(chunk_logits(x, teacher_head).astype(jnp.float32), k)
        return values, ids.astype(jnp.int32)

    return over_position_chunks(one_chunk, (teacher_hidden,), chunk=chunk)


def distillation_loss(
    cross_entropy: jax.Array,
    kl: jax.Array,
    weights: jax.Array,
    *,
    alpha: float,
    kl_weights: jax.Array | None = None,
    total_weight: jax.Array | None = None,
    kl_total_weight: jax.Array | None = None,
) -> jax.Array:
    """alpha * sum(w' KL) / sum(w') + (1 - alpha) * sum(w CE) / sum(w): w the supervised tokens' weights
    (training/loss.py), w' = kl_weights (e.g. every text token, a switch) or w. total_weight / kl_total_weight
    replace sum(w) / sum(w') (a microbatch's share of the whole batch's mean)."""
    kl_weights = weights if kl_weights is None else kl_weights
    total_weight = jnp.maximum(weights.sum(), 1e-9) if total_weight is None else total_weight
    kl_total_weight = jnp.maximum(kl_weights.sum(), 1e-9) if kl_total_weight is None else kl_total_weight
    ce = jnp.sum(weights * cross_entropy) / total_weight
    return alpha * jnp.sum(kl_weights * kl) / kl_total_weight + (1 - alpha) * ce


def kl_token_weights(
    batch: TrainingBatch, *, all_text_tokens: bool, config: ModelConfig, normalization: str
) -> jax.Array:
    """The distillation term's token weights (B, L): the supervised tokens' (as the CE's), or those of every text
    token that has a next token in its example (not a visual token, not padding), normalised the same way."""
    if not all_text_tokens:
        return token_weights(batch.loss_mask, batch.segment_ids, normalization=normalization)
    visual = (batch.input_ids == config.image_token_id) | (batch.input_ids == config.video_token_id)
    same_example_next = jnp.pad(batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1], ((0, 0), (0, 1)))
    text = (batch.segment_ids > 0) & ~visual & same_example_next
    return token_weights(text, batch.segment_ids, normalization=normalization)


def make_top_k_step(teacher: ModelConfig, *, k: int, chunk: int, all_text_tokens: bool) -> Callable:
    """(teacher_params, batch) -> the teacher's k largest logits (B, L, k) float32, their ids (B, L, k) int32 and
    the positions the KL reads (B, L) bool (kl_token_weights > 0: the supervised tokens, or every text token):
    what experiments.cache_teacher writes for offline distillation."""
    model = Qwen3VL(teacher)

    def top_k_step(teacher_params, batch: TrainingBatch):
        hidden, head, _ = model.apply({"params": teacher_params}, batch.inputs, method=Qwen3VL.hidden_states_and_head)
        top_logits, top_ids = teacher_top_k(hidden, head, k=k, chunk=chunk or hidden.shape[1])
        weights = kl_token_weights(batch, all_text_tokens=all_text_tokens, config=teacher, normalization="token")
        return top_logits, top_ids, weights > 0

    return top_k_step


@dataclasses.dataclass
class _Distillation(Objective):
    """alpha * KL_T + (1 - alpha) * CE (module docstring); KL over the supervised tokens, or every text token."""

    alpha: float = 0.5
    temperature: float = 1.0
    all_text_tokens: bool = False

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError(f"distill.alpha must be in [0, 1] and distill.temperature > 0, got {self}")

    def batch_totals(self, batch: TrainingBatch, settings: StepSettings) -> dict[str, jax.Array]:
        kl_weights = self._kl_weights(batch, settings)
        return dict(super().batch_totals(batch, settings), kl_weight=jnp.maximum(kl_weights.sum(), 1e-9))

    def _kl_weights(self, batch: TrainingBatch, settings: StepSettings) -> jax.Array:
        config = settings.model.config
        return kl_token_weights(
            batch, all_text_tokens=self.all_text_tokens, config=config, normalization=settings.normalization
        )

    def _student(self, params: Any, batch: TrainingBatch, settings: StepSettings, dropout_rng: jax.Array | None):
        """The student's final-norm hidden states (B, L, H), head (H, V), router logits and the head's chunk."""
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        inputs = batch.inputs
        hidden, head, router_logits = settings.model.apply(
            {"params": params}, inputs, method=Qwen3VL.hidden_states_and_head, rngs=rngs
        )
        return hidden, head, router_logits, settings.loss_chunk or hidden.shape[1]

    def _mixed(self, ce, kl, correct, batch, *, totals, settings) -> tuple[jax.Array, Counters]:
        weights = token_weights(batch.loss_mask, batch.segment_ids, normalization=settings.normalization)
        kl_weights = self._kl_weights(batch, settings)
        loss = distillation_loss(
            ce,
            kl,
            weights,
            alpha=self.alpha,
            kl_weights=kl_weights,
            total_weight=totals["ce_weight"],
            kl_total_weight=totals["kl_weight"],
        )
        ce_term = weighted_ce(ce, batch, normalization=settings.normalization, total_weight=totals["ce_weight"])
        counters = token_counters(ce, correct, batch, ce=ce_term)
        return loss, counters.replace(extra=dict(kl=(kl_weights * kl).sum() / totals["kl_weight"]))


@dataclasses.dataclass
class OnlineDistillation(_Distillation):
    """The teacher (any size of the family, same vocabulary and ViT geometry) runs on the same batch; its
    parameters, read from `checkpoint`, are the step's frozen argument."""

    teacher: ModelConfig | None = None
    checkpoint: str = ""

    def frozen_model(self, model_config: ModelConfig) -> FrozenModel:
        return FrozenModel(self.teacher, checkpoint=self.checkpoint)

    def loss(self, params, batch, *, frozen_params, totals, settings, dropout_rng):
        if frozen_params is None:
            raise ValueError("online distillation needs the teacher's parameters as the train step's third argument")
        hidden, head, router_logits, chunk = self._student(params, batch, settings, dropout_rng)
        teacher_hidden, teacher_head, _ = Qwen3VL(self.teacher).apply(
            {"params": jax.lax.stop_gradient(frozen_params)},
            batch.inputs,
            method=Qwen3VL.hidden_states_and_head,
        )
        ce, kl, correct = chunked_distillation(
            hidden,
            head,
            teacher_hidden,
            teacher_head,
            batch.targets,
            temperature=self.temperature,
            chunk=chunk,
        )
        return *self._mixed(ce, kl, correct, batch, totals=totals, settings=settings), router_logits


@dataclasses.dataclass
class OfflineDistillation(_Distillation):
    """The teacher's top-k logits, cached on disk for this run's batches (training/teacher_cache.py), come with
    each batch (its `extra` TEACHER_TOP_K); `top_k`: the cache's k (the compile planner's batch shapes)."""

    cache_directory: str = ""
    top_k: int = 32
    cache: TeacherCache | None = dataclasses.field(default=None, init=False, repr=False)  # opened by check_run
    batch_fields = TEACHER_TOP_K

    def check_run(self, run: RunDescription) -> None:
        """Opens the cache and refuses a run whose batches, KL tokens, length or vocabulary it does not cover."""
        cache = TeacherCache(self.cache_directory)
        if cache.top_k != self.top_k:
            raise TeacherCacheError(
                f"{self.cache_directory}: the teacher's top {cache.top_k} logits are cached, this run has "
                f"distill.top_k = {self.top_k}"
            )
        cache.check(
            data=stream_description(
                dataclasses.asdict(run.data), row_group_count=run.row_group_count, num_shards=run.num_shards
            ),
            processing=run.processing,
            all_text_tokens=self.all_text_tokens,
            steps=run.steps,
            vocab_size=run.vocab_size,
        )
        self.cache = cache

    def host_batch(self, batch: TrainingBatch, *, step: int, first_row: int) -> TrainingBatch:
        if self.cache is None:
            raise RuntimeError("offline distillation: check_run opens the teacher cache before the first batch")
        return self.cache.add_to(batch, step, first_row=first_row)

    def extra_batch_shapes(self, *, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size, seq_len, self.top_k)
        logits, ids = TEACHER_TOP_K
        return {logits: jax.ShapeDtypeStruct(shape, jnp.float32), ids: jax.ShapeDtypeStruct(shape, jnp.int32)}

    def loss(self, params, batch, *, frozen_params, totals, settings, dropout_rng):
        del frozen_params
        hidden, head, router_logits, chunk = self._student(params, batch, settings, dropout_rng)
        logits, ids = TEACHER_TOP_K
        ce, kl, correct = chunked_top_k_distillation(
            hidden,
            head,
            batch.extra[logits],
            batch.extra[ids],
            batch.targets,
            temperature=self.temperature,
            chunk=chunk,
        )
        return *self._mixed(ce, kl, correct, batch, totals=totals, settings=settings), router_logits


def teacher_config(path: str, student: ModelConfig) -> ModelConfig:
    """The config of the teacher checkpoint at `path`, running in the student's compute and parameter dtypes and
    attention implementation; refused when its vocabulary or ViT geometry differs from the student's."""
    same = dict(dtype=student.dtype, param_dtype=student.param_dtype, attention_impl=student.attention_impl)
    teacher = hf_io.load_config(path, **same)
    if teacher.text.vocab_size != student.text.vocab_size:
        raise ValueError(
            f"teacher {path} has a vocabulary of {teacher.text.vocab_size}, the student "
            f"{student.text.vocab_size}: distillation needs the same tokenizer"
        )
    # the batch's patch features (pixels, position-embedding taps, rotary ids) are computed for the student's ViT
    geometry = ("patch_size", "temporal_patch_size", "spatial_merge_size", "num_position_embeddings", "in_channels")
    differ = [f for f in geometry if getattr(teacher.vision, f) != getattr(student.vision, f)]
    if differ:
        raise ValueError(f"teacher {path}: its ViT differs from the student's in {differ}")
    return teacher


def from_config(config: ConfigDict, model_config: ModelConfig) -> OnlineDistillation | OfflineDistillation:
    """config.distill: teacher (online) or teacher_cache (offline), exactly one of them."""
    settings = config.distill
    mixing = dict(alpha=settings.alpha, temperature=settings.temperature, all_text_tokens=settings.all_text_tokens)
    if settings.teacher and settings.teacher_cache:
        raise ValueError("distill.teacher and distill.teacher_cache are both set: online or offline, choose one")
    if settings.teacher_cache:
        return OfflineDistillation(**mixing, cache_directory=settings.teacher_cache, top_k=settings.top_k)
    if not settings.teacher:
        raise ValueError(
            "objective 'distill' needs distill.teacher (a teacher's HF checkpoint directory) or distill.teacher_cache"
            " (its cached top-k logits, experiments.cache_teacher)"
        )
    teacher = teacher_config(settings.teacher, model_config)
    return OnlineDistillation(**mixing, teacher=teacher, checkpoint=settings.teacher)
