"""On-policy RL losses on sampled completions: GRPO, Dr.GRPO and FRPO (robust max-min GRPO).

Inputs are per-token log-probabilities [B, T] of the sampled tokens under the current policy (``logp``, carries the
gradient), the sampling policy (``old_logp``) and the reference policy (``ref_logp``), one advantage per sequence [B]
and the completion ``mask`` [B, T]. Sequences of one prompt form contiguous groups of ``group_size`` rows. Rows whose
mask is all zero (padding rows of a fixed-shape batch) are ignored and not counted. Every loss returns
``(loss_sum, loss_count, metrics)``; ``loss_count`` is the number of counted sequences, so summing both over
micro-batches reproduces the full-batch loss exactly (for FRPO, micro-batches must hold whole groups).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from forgetjax.losses.token import Array, LossOutput, Metrics, as_float_mask, check_rank, check_same_shape

AdvantageMode = Literal["grpo", "drgrpo"]
PolicyVariant = Literal["grpo", "drgrpo", "frpo"]

_MASKED_LOG = -1e30


def group_advantages(rewards: Array, group_size: int, mode: AdvantageMode = "grpo", eps: float = 1e-6) -> Array:
    """Group-relative advantages for contiguous groups of ``group_size`` rewards, [N] float32.

    ``"grpo"``: (r - group mean) / (group std + eps) with the population std (ddof=0; TRL uses ddof=1, which is
    sqrt((G-1)/G) smaller, i.e. advantages differ by that constant factor). ``"drgrpo"``: r - group mean (no std
    scaling, Liu et al., 2025).
    """
    check_rank("rewards", rewards, 1)
    if mode not in ("grpo", "drgrpo"):
        raise ValueError(f"mode must be 'grpo' or 'drgrpo', got {mode!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards length {rewards.shape[0]} is not a multiple of group_size {group_size}")
    grouped = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if mode == "grpo":
        centred = centred / (jnp.std(grouped, axis=1, keepdims=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp: Array, ref_logp: Array) -> Array:
    """Per-token k3 estimator of KL(pi || ref) on samples of pi: exp(ref - logp) - (ref - logp) - 1.

    Non-negative and 0 at equality; written as expm1(d) - d, which is accurate near d = 0 and never rounds below 0.
    """
    delta = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    return jnp.expm1(delta) - delta


def clipped_surrogate(
    logp: Array, old_logp: Array, advantages: Array, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[Array, Array]:
    """PPO per-token objective (to maximise) min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = exp(logp - old_logp),
    with one advantage per row [B] or per token [B, T].

    Returns ``(objective [B, T], clipped [B, T] bool)``; ``clipped`` marks tokens where the clipped branch binds
    (zero gradient): r > 1 + clip_high with A > 0, or r < 1 - clip_low with A < 0.
    """
    ratio = jnp.exp(jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32))
    adv = jnp.asarray(advantages, jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    return jnp.minimum(unclipped, clipped), clipped < unclipped


def token_scale(mask: Array, variant: AdvantageMode, generation_budget: int | None = None) -> Array:
    """Each counted token's weight [B, T] in the GRPO / Dr.GRPO loss: its mask weight over its row's denominator
    (the row's counted tokens T_i for ``grpo``, ``generation_budget`` for ``drgrpo``), 0 elsewhere."""
    weights = as_float_mask(mask)
    if variant == "grpo":
        denominator = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
    else:
        denominator = float(generation_budget)
    return jnp.where(weights > 0, weights / denominator, 0.0)


def clipped_token_loss(logp: Array, gathered: Array | None, old_logp: Array, ref_logp: Array | None,
                       advantages: Array, scale: Array, *, beta: float = 0.0, clip_low: float = 0.2,
                       clip_high: float = 0.2) -> Array:
    """Per-token GRPO / Dr.GRPO loss [B, T], scale x (-min(r A, clip(r) A) + beta k3(logp, ref_logp)): its sum is
    :func:`policy_loss` for those variants, and it is token-local (advantages [B, T] repeat each row's advantage;
    scale from :func:`token_scale`), so it is a loss for :func:`forgetjax.models.vocab.head_loss` (``gathered`` is
    unused there)."""
    objective, _ = clipped_surrogate(logp, jax.lax.stop_gradient(old_logp), jax.lax.stop_gradient(advantages),
                                     clip_low, clip_high)
    loss = -objective
    if beta > 0:
        loss = loss + beta * k3_kl(logp, jax.lax.stop_gradient(ref_logp))
    return jnp.where(scale > 0, loss * scale, 0.0)


def _row_sums(values: Array, weights: Array) -> Array:
    """Per-row masked sums [B] (masked-out entries cannot leak NaN/inf)."""
    return jnp.sum(jnp.where(weights > 0, values * weights, 0.0), axis=-1)


def _row_means(values: Array, weights: Array) -> Array:
    """Per-row masked means [B]; 0 for rows without tokens."""
    counts = jnp.sum(weights, axis=-1)
    return _row_sums(values, weights) / jnp.maximum(counts, 1.0)


def frpo_group_objective(
    surrogate_means: Array,
    advantages: Array,
    valid: Array,
    group_size: int,
    frpo_lambda: float,
    jackknife: bool = False,
) -> tuple[Array, Array]:
    """FRPO's robust per-group loss X_g and counted sequences n_g (see :func:`policy_loss` for the formula).

    ``surrogate_means`` [N] are s_i, the token means of min(r, clip(r)); ``valid`` [N] marks counted sequences.
    """
    f32 = jnp.float32
    valid = valid.reshape(-1, group_size)
    counts = jnp.sum(valid.astype(f32), axis=1)
    safe_s = jnp.where(valid, surrogate_means.reshape(-1, group_size), 1.0)
    log_terms = -jnp.asarray(advantages, f32).reshape(-1, group_size) / frpo_lambda + jnp.log(safe_s)
    log_terms = jnp.where(valid, log_terms, _MASKED_LOG)
    log_u = jax.nn.logsumexp(log_terms, axis=1) - jnp.log(jnp.maximum(counts, 1.0))
    robust = log_u
    if jackknife:
        leave_out = jnp.eye(group_size, dtype=bool)[None]
        loo_log_sums = jax.nn.logsumexp(jnp.where(leave_out, _MASKED_LOG, log_terms[:, None, :]), axis=-1)
        loo_log_u = loo_log_sums - jnp.log(jnp.maximum(counts - 1.0, 1.0))[:, None]
        mean_loo = jnp.sum(jnp.where(valid, loo_log_u, 0.0), axis=1) / jnp.maximum(counts, 1.0)
        robust = counts * log_u - (counts - 1.0) * mean_loo
    baseline = jnp.sum(jnp.where(valid, safe_s, 0.0), axis=1) / jnp.maximum(counts, 1.0)
    scale = max(float(frpo_lambda), 1.0)
    objective = scale * (robust - baseline + 1.0)
    return jnp.where(counts > 0, objective, 0.0), counts


def _check_policy_inputs(
    logp: Array,
    old_logp: Array | None,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    variant: str,
    beta: float,
    clip_low: float,
    clip_high: float,
    generation_budget: int | None,
    frpo_lambda: float,
    group_size: int | None,
) -> None:
    check_rank("logp", logp, 2)
    check_rank("advantages", advantages, 1)
    others = {"old_logp": old_logp, "ref_logp": ref_logp}
    check_same_shape(logp=logp, mask=mask, **{k: v for k, v in others.items() if v is not None})
    if advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages has {advantages.shape[0]} rows but logp has {logp.shape[0]}")
    if variant not in ("grpo", "drgrpo", "frpo"):
        raise ValueError(f"variant must be 'grpo', 'drgrpo' or 'frpo', got {variant!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta > 0")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if variant == "drgrpo" and (not isinstance(generation_budget, int) or generation_budget < 1):
        raise ValueError(
            f"generation_budget (max new tokens) must be a positive int for drgrpo, got {generation_budget!r}"
        )
    if variant == "frpo":
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int for frpo, got {group_size!r}")
        if logp.shape[0] % group_size:
            raise ValueError(f"batch of {logp.shape[0]} rows is not a multiple of group_size {group_size}")
        if not frpo_lambda > 0:
            raise ValueError(f"frpo_lambda must be > 0, got {frpo_lambda}")


def policy_loss(
    logp: Array,
    old_logp: Array | None,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    *,
    variant: PolicyVariant = "grpo",
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    generation_budget: int | None = None,
    frpo_lambda: float = 1.0,
    frpo_jackknife: bool = False,
    group_size: int | None = None,
) -> LossOutput:
    """Clipped policy-gradient loss (to minimise) for GRPO, Dr.GRPO or FRPO.

    With o_it = min(r A_i, clip(r) A_i), r = exp(logp - old_logp), k_it = k3_kl(logp, ref_logp) (only when beta > 0),
    T_i the counted tokens of row i and N the counted rows:

    * ``grpo``:   L = 1/N sum_i 1/T_i sum_t (-o_it + beta k_it)          (per-sequence token mean, mean over rows)
    * ``drgrpo``: L = 1/N sum_i 1/L_max sum_t (-o_it + beta k_it)        (L_max = ``generation_budget``, constant)
    * ``frpo`` (Sabbaghi et al., 2026, arXiv 2602.08813, "robust max-min"; follows the authors' reference trainer):
      per group g with n_g counted rows, w_i = exp(-A_i / lambda), s_i = 1/T_i sum_t min(r_it, clip(r_it)),
      u_g = 1/n_g sum_i w_i s_i (importance-sampled E[exp(-A/lambda)]), a_g = 1/n_g sum_i s_i,
      R_g = log u_g, or with ``frpo_jackknife`` R_g = n_g log u_g - (n_g - 1)/n_g sum_i log u_g^(-i) (leave-one-out
      bias correction of the log of a sample mean; it reduces to log u_g when n_g = 1),
      X_g = max(lambda, 1) * (R_g - a_g + 1), and
      L = 1/N [sum_g n_g X_g + beta sum_i 1/T_i sum_t k_it].
      The "- a_g" term is the derived baseline: on-policy its gradient turns lambda * grad log u_g into the REINFORCE
      form with per-sample advantage max(lambda, 1) * (1 - w_i / mean_g(w)), which tends to A_i - mean_g(A) as
      lambda -> infinity (GRPO for zero-mean group advantages); the "+ 1" only shifts the value so that it also
      tends to the GRPO value on-policy. Off-policy (ratio != 1), the baseline gradient grows like
      lambda (1/a_g - 1), exactly as in the reference code, so use large lambda only with on-policy updates.

    ``old_logp=None`` means on-policy (stop_gradient(logp)). Metrics (all ``(sum, count)``): ``pg_loss`` (loss
    without the KL term), ``clip_fraction``, ``ratio``, ``entropy_proxy`` (mean -logp of sampled tokens),
    ``kl`` (when ``ref_logp`` is given), ``advantage`` / ``advantage_sq`` (over rows), ``tokens``, ``sequences``.
    """
    _check_policy_inputs(
        logp, old_logp, ref_logp, advantages, mask, variant, beta, clip_low, clip_high, generation_budget,
        frpo_lambda, group_size,
    )
    f32 = jnp.float32
    logp = jnp.asarray(logp, f32)
    old_logp = jax.lax.stop_gradient(logp if old_logp is None else jnp.asarray(old_logp, f32))
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, f32))
    weights = as_float_mask(mask)
    token_counts = jnp.sum(weights, axis=-1)
    valid = token_counts > 0
    sequences = jnp.sum(valid.astype(f32))
    tokens = jnp.sum(weights)

    objective, clipped = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    kl = None if ref_logp is None else k3_kl(logp, jax.lax.stop_gradient(ref_logp))
    kl_per_token = kl if beta > 0 else jnp.zeros_like(logp)

    if variant == "frpo":
        ratio = jnp.exp(logp - old_logp)
        ratio_term = jnp.minimum(ratio, jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))
        group_loss, group_counts = frpo_group_objective(
            _row_means(ratio_term, weights), advantages, valid, group_size, frpo_lambda, frpo_jackknife
        )
        pg_sum = jnp.sum(group_counts * group_loss)
        total = pg_sum + beta * jnp.sum(jnp.where(valid, _row_means(kl_per_token, weights), 0.0))
    else:
        scale = token_scale(mask, variant, generation_budget)
        total = jnp.sum(clipped_token_loss(logp, None, old_logp, ref_logp, advantages[:, None], scale, beta=beta,
                                           clip_low=clip_low, clip_high=clip_high))
        pg_sum = jnp.sum(jnp.where(scale > 0, -objective * scale, 0.0))

    row_adv = jnp.where(valid, advantages, 0.0)
    metrics: Metrics = {
        "pg_loss": (pg_sum, sequences),
        "clip_fraction": (jnp.sum(jnp.where(weights > 0, clipped.astype(f32) * weights, 0.0)), tokens),
        "ratio": (jnp.sum(_row_sums(jnp.exp(logp - old_logp), weights)), tokens),
        "entropy_proxy": (jnp.sum(_row_sums(-logp, weights)), tokens),
        "advantage": (jnp.sum(row_adv), sequences),
        "advantage_sq": (jnp.sum(row_adv**2), sequences),
        "tokens": (tokens, jnp.ones((), f32)),
        "sequences": (sequences, jnp.ones((), f32)),
    }
    if kl is not None:
        metrics["kl"] = (jnp.sum(_row_sums(kl, weights)), tokens)
    return total, sequences, metrics
