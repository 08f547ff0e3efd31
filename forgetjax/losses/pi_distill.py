"""pi-Distill (Penaloza et al., 2026, arXiv 2602.04942): privileged-information distillation with shared parameters.

One model plays two roles on the same sampled completion y: the teacher sees prompt + privileged information I, the
student sees the prompt only. Completions are sampled from the (old) teacher. The joint objective (maximised) is

    J = alpha * J_teacher + (1 - alpha) * J_student
    J_teacher = E_{y ~ pi_T}[R] - beta * KL(pi_T || sg[pi_S])
    J_student = E_{y ~ pi_T}[pi_S(y|x) / sg[pi_T(y|x,I)] * R] - beta * KL(sg[pi_T] || pi_S)

Implementation choices (documented because the paper states J at the sequence level):

* The reward enters through group-baseline advantages A_i (e.g. :func:`group_advantages`) in both terms.
* J_teacher uses the PPO clipped surrogate with r = pi_T / pi_T_old (old = the sampling teacher).
* Per-token importance ratios rho_t = pi_S(y_t | x, y_<t) / sg[pi_T(y_t | x, I, y_<t)] replace the sequence ratio
  prod_t rho_t, whose variance grows exponentially with length. At matched policies both give the same gradient
  (sum_t grad log pi_S(y_t) A); away from it the per-token form is the usual PPO-style biased, low-variance
  surrogate. As in the paper the denominator is the current teacher (stop-gradient), not the sampling teacher; the
  two coincide on the first update of each batch. For stability rho_t is PPO-clipped to
  [1 - student_clip_low, 1 + student_clip_high] in the min form (min(rho A, clip(rho) A)), as in the authors'
  released loss; ``None`` disables a side.
* Both KLs are estimated per token on the teacher's samples with the k3 estimator, which is unbiased for KL(T || S)
  when y ~ T: k3(logp=T, ref=sg S) for the teacher term, k3(logp=sg T, ref=S) for the student term (its gradient in
  expectation is the forward-KL / SFT gradient -E_T[grad log pi_S]).
* The loss is the token-weighted mean over all counted completion tokens, returned as ``(sum, count, metrics)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from forgetjax.losses.policy_gradient import clipped_surrogate, k3_kl
from forgetjax.losses.token import Array, LossOutput, Metrics, as_float_mask, check_rank, check_same_shape


def student_importance_objective(
    student_logp: Array,
    teacher_logp: Array,
    advantages: Array,
    clip_low: float | None = 0.2,
    clip_high: float | None = 0.2,
) -> tuple[Array, Array]:
    """Per-token student objective min(rho A, clip(rho) A), rho = exp(student_logp - sg[teacher_logp]).

    Returns ``(objective [B, T], clipped [B, T] bool)``. A ``None`` bound leaves that side unclipped.
    """
    sg_teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logp, jnp.float32))
    low = 1.0 if clip_low is None else clip_low
    high = float("inf") if clip_high is None else clip_high
    return clipped_surrogate(student_logp, sg_teacher, advantages, low, high)


def _check_inputs(
    teacher_logp: Array,
    student_logp: Array,
    old_teacher_logp: Array | None,
    advantages: Array,
    mask: Array,
    alpha: float,
    beta: float,
    clip_low: float,
    clip_high: float,
    student_clip_low: float | None,
    student_clip_high: float | None,
) -> None:
    check_rank("teacher_logp", teacher_logp, 2)
    check_rank("advantages", advantages, 1)
    optional = {} if old_teacher_logp is None else {"old_teacher_logp": old_teacher_logp}
    check_same_shape(teacher_logp=teacher_logp, student_logp=student_logp, mask=mask, **optional)
    if advantages.shape[0] != teacher_logp.shape[0]:
        raise ValueError(f"advantages has {advantages.shape[0]} rows but teacher_logp has {teacher_logp.shape[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    for name, value in (("clip_low", clip_low), ("student_clip_low", student_clip_low)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    for name, value in (("clip_high", clip_high), ("student_clip_high", student_clip_high)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def pi_distill_loss(
    teacher_logp: Array,
    student_logp: Array,
    old_teacher_logp: Array | None,
    advantages: Array,
    mask: Array,
    *,
    alpha: float = 0.5,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    student_clip_low: float | None = 0.2,
    student_clip_high: float | None = 0.2,
) -> LossOutput:
    """Token-weighted pi-Distill loss -(alpha J_teacher + (1 - alpha) J_student) on teacher-sampled completions.

    ``teacher_logp`` / ``student_logp`` [B, T]: log-probs of the same sampled tokens with / without the privileged
    context under the current (shared) parameters; ``old_teacher_logp``: under the sampling teacher (``None`` =
    on-policy). Per token, with o^T the PPO surrogate of r = pi_T / pi_T_old and o^S that of rho (module docstring):

        loss_t = -alpha (o^T_t - beta k3(T_t, sg S_t)) - (1 - alpha) (o^S_t - beta k3(sg T_t, S_t))

    and L = sum over counted tokens / number of counted tokens. alpha = 1 trains the teacher only, alpha = 0 the
    student only (terms with zero weight are not built). Metrics (``(sum, count)``): ``teacher_objective``,
    ``student_objective``, ``teacher_clip_fraction``, ``student_clip_fraction``, ``teacher_ratio``,
    ``student_ratio`` (unclipped rho), ``kl_teacher_student`` (k3 estimate of KL(T || S)), ``advantage``,
    ``tokens``, ``sequences``.
    """
    _check_inputs(
        teacher_logp, student_logp, old_teacher_logp, advantages, mask, alpha, beta, clip_low, clip_high,
        student_clip_low, student_clip_high,
    )
    f32 = jnp.float32
    teacher_logp = jnp.asarray(teacher_logp, f32)
    student_logp = jnp.asarray(student_logp, f32)
    old_teacher_logp = jax.lax.stop_gradient(
        teacher_logp if old_teacher_logp is None else jnp.asarray(old_teacher_logp, f32)
    )
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, f32))
    weights = as_float_mask(mask)
    sg_teacher = jax.lax.stop_gradient(teacher_logp)
    sg_student = jax.lax.stop_gradient(student_logp)

    teacher_objective, teacher_clipped = clipped_surrogate(
        teacher_logp, old_teacher_logp, advantages, clip_low, clip_high
    )
    student_objective, student_clipped = student_importance_objective(
        student_logp, teacher_logp, advantages, student_clip_low, student_clip_high
    )
    per_token_loss = jnp.zeros_like(teacher_logp)
    if alpha > 0:
        teacher_kl = k3_kl(teacher_logp, sg_student) if beta > 0 else 0.0
        per_token_loss = per_token_loss - alpha * (teacher_objective - beta * teacher_kl)
    if alpha < 1:
        student_kl = k3_kl(sg_teacher, student_logp) if beta > 0 else 0.0
        per_token_loss = per_token_loss - (1.0 - alpha) * (student_objective - beta * student_kl)

    def token_sum(values: Array) -> Array:
        return jnp.sum(jnp.where(weights > 0, values * weights, 0.0))

    tokens = jnp.sum(weights)
    valid = jnp.sum(weights, axis=-1) > 0
    sequences = jnp.sum(valid.astype(f32))
    metrics: Metrics = {
        "teacher_objective": (token_sum(teacher_objective), tokens),
        "student_objective": (token_sum(student_objective), tokens),
        "teacher_clip_fraction": (token_sum(teacher_clipped.astype(f32)), tokens),
        "student_clip_fraction": (token_sum(student_clipped.astype(f32)), tokens),
        "teacher_ratio": (token_sum(jnp.exp(sg_teacher - old_teacher_logp)), tokens),
        "student_ratio": (token_sum(jnp.exp(sg_student - sg_teacher)), tokens),
        "kl_teacher_student": (token_sum(k3_kl(sg_teacher, sg_student)), tokens),
        "advantage": (jnp.sum(jnp.where(valid, advantages, 0.0)), sequences),
        "tokens": (tokens, jnp.ones((), f32)),
        "sequences": (sequences, jnp.ones((), f32)),
    }
    return token_sum(per_token_loss), tokens, metrics
