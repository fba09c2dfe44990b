"""Strong-to-weak distillation (Qwen3-VL report, post-training): the student learns from a frozen teacher's
next-token distribution on the same tokens.

Per position, with temperature T, p = softmax(teacher logits / T) and q = softmax(student logits / T):

    KL_T = T^2 * sum_v p_v (log p_v - log q_v)

(the T^2 keeps the gradient's scale independent of T, Hinton et al. 2015). The student's loss mixes it with the
cross-entropy on the targets, alpha * KL_T + (1 - alpha) * CE, each weighted and normalised per token as the
plain loss is (training/loss.py). Both heads run `chunk` positions at a time, so neither model's (B, L, vocab)
logits ever exist whole; the teacher's side gets no gradient.
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


def distillation_loss(
    cross_entropy: jax.Array, kl: jax.Array, weights: jax.Array, *, alpha: float, kl_weights: jax.Array | None = None
) -> jax.Array:
    """alpha * sum(w' KL) / sum(w') + (1 - alpha) * sum(w CE) / sum(w): w the supervised tokens' weights
    (training/loss.py), w' = kl_weights (e.g. every text token, a switch) or w."""
    kl_weights = weights if kl_weights is None else kl_weights
    ce = jnp.sum(weights * cross_entropy) / jnp.maximum(weights.sum(), 1e-9)
    return alpha * jnp.sum(kl_weights * kl) / jnp.maximum(kl_weights.sum(), 1e-9) + (1 - alpha) * ce
