"""Token-level knowledge distillation from a same-family (same-tokenizer) teacher.

Both losses compare full next-token distributions at every masked-in position and return the token-weighted mean
``(sum, count, metrics)``. The temperature divides both the student's and the teacher's logits; no tau^2 factor is
applied (as in GKD / TRL), so rescale the learning rate when comparing temperatures. ``beta`` and ``temperature``
are static Python floats (hyper-parameters), not traced arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from forgetjax.losses.token import Array, LossOutput, check_rank, masked_sum_count


def _tempered_log_probs(logits: Array, temperature: float) -> Array:
    """log softmax(logits / temperature) in float32."""
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _check_inputs(student_logits: Array, teacher_logits: Array, mask: Array, temperature: float) -> None:
    check_rank("student_logits", student_logits, 3)
    check_rank("teacher_logits", teacher_logits, 3)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} differ; "
            "token-level KD needs a shared vocabulary and aligned positions"
        )
    if student_logits.shape[:2] != jnp.shape(mask):
        raise ValueError(f"mask {tuple(jnp.shape(mask))} does not match logits [B, T] {student_logits.shape[:2]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kl_divergence(log_p: Array, log_q: Array) -> Array:
    """Per-position KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probabilities [..., V]."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def forward_kl_loss(
    student_logits: Array, teacher_logits: Array, mask: Array, temperature: float = 1.0
) -> LossOutput:
    """Token-weighted mean of KL(teacher || student) (mode-covering KD); teacher logits are not differentiated.

    Metrics: ``kl`` (same as the loss), ``tokens`` (``(count, 1)``).
    """
    _check_inputs(student_logits, teacher_logits, mask, temperature)
    teacher_log_probs = jax.lax.stop_gradient(_tempered_log_probs(teacher_logits, temperature))
    student_log_probs = _tempered_log_probs(student_logits, temperature)
    kl_sum, count = masked_sum_count(kl_divergence(teacher_log_probs, student_log_probs), mask)
    return kl_sum, count, {"kl": (kl_sum, count), "tokens": (count, jnp.ones((), jnp.float32))}


def generalized_jsd(teacher_log_probs: Array, student_log_probs: Array, beta: float) -> Array:
    """Per-position generalised JSD of GKD (Agarwal et al., 2024), with M = beta * teacher + (1 - beta) * student:

        JSD_beta = beta * KL(teacher || M) + (1 - beta) * KL(student || M)        for 0 < beta < 1.

    JSD_beta vanishes at both ends, but JSD_beta / beta -> KL(teacher || student) (forward KL) as beta -> 0 and
    JSD_beta / (1 - beta) -> KL(student || teacher) (reverse KL) as beta -> 1. Following GKD/TRL, beta == 0 returns
    the forward KL and beta == 1 the reverse KL exactly (the normalised limits), so the endpoints are the two KLs.
    """
    if beta == 0.0:
        return kl_divergence(teacher_log_probs, student_log_probs)
    if beta == 1.0:
        return kl_divergence(student_log_probs, teacher_log_probs)
    mixture_log_probs = jnp.logaddexp(teacher_log_probs + jnp.log(beta), student_log_probs + jnp.log1p(-beta))
    return beta * kl_divergence(teacher_log_probs, mixture_log_probs) + (1.0 - beta) * kl_divergence(
        student_log_probs, mixture_log_probs
    )


def generalized_jsd_loss(
    student_logits: Array, teacher_logits: Array, mask: Array, beta: float = 0.5, temperature: float = 1.0
) -> LossOutput:
    """Token-weighted mean generalised JSD (see :func:`generalized_jsd` for the beta convention and limits).

    beta = 0 -> KL(teacher || student) (forward, mode covering); beta = 1 -> KL(student || teacher) (reverse, mode
    seeking); teacher logits are not differentiated. Metrics: ``jsd`` (same as the loss), ``tokens``.
    """
    _check_inputs(student_logits, teacher_logits, mask, temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    teacher_log_probs = jax.lax.stop_gradient(_tempered_log_probs(teacher_logits, temperature))
    student_log_probs = _tempered_log_probs(student_logits, temperature)
    jsd_sum, count = masked_sum_count(generalized_jsd(teacher_log_probs, student_log_probs, beta), mask)
    return jsd_sum, count, {"jsd": (jsd_sum, count), "tokens": (count, jnp.ones((), jnp.float32))}
