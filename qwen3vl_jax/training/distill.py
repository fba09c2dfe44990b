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
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen3vl_jax.modeling.lm_head import chunk_logits, cross_entropy_and_hits, over_position_chunks


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
    cross_entropy: jax.Array, kl: jax.Array, weights: jax.Array, *, alpha: float, kl_weights: jax.Array | None = None
) -> jax.Array:
    """alpha * sum(w' KL) / sum(w') + (1 - alpha) * sum(w CE) / sum(w): w the supervised tokens' weights
    (training/loss.py), w' = kl_weights (e.g. every text token, a switch) or w."""
    kl_weights = weights if kl_weights is None else kl_weights
    ce = jnp.sum(weights * cross_entropy) / jnp.maximum(weights.sum(), 1e-9)
    return alpha * jnp.sum(kl_weights * kl) / jnp.maximum(kl_weights.sum(), 1e-9) + (1 - alpha) * ce
