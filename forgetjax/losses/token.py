"""Token-level building blocks shared by every loss: log-probabilities, masked reductions, cross-entropy.

Conventions used by all of ``forgetjax.losses``:

* ``logits`` [B, T, V] are already aligned with ``targets`` [B, T] (``logits[:, t]`` predicts ``targets[:, t]``).
  Training and scoring never build them: methods get per-token log-probs (and the other reductions) from
  :func:`forgetjax.models.vocab.token_stats`, chunk by chunk, and the losses take those (token-local losses, such
  as the SFT loss, take their sum and gradient from :func:`forgetjax.models.vocab.head_loss` instead, which forms
  the gradient in the same pass); the logits-level functions here apply the same reduction
  (:func:`forgetjax.models.vocab.logit_stats`) to logits given whole.
* ``mask`` [B, T] (bool or 0/1 float) marks the completion tokens that count.
* Every loss returns ``(loss_sum, loss_count, metrics)``; the loss is ``loss_sum / loss_count`` over the full batch,
  ``loss_count`` never depends on parameters, and ``metrics`` maps a name to a ``(sum, count)`` pair so that
  micro-batches and devices are reduced exactly (sum the pairs, divide once at the end). Counters such as
  ``tokens`` are ``(n, 1)`` pairs: the summed first entry is the total, the reduced mean is n per loss call.
* All math runs in float32 even when logits arrive in bfloat16.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from forgetjax.models.vocab import head_loss, logit_stats

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]
LossOutput = tuple[Array, Array, Metrics]


def check_same_shape(**arrays: Array) -> None:
    """Raise a ValueError naming the arguments when the given arrays do not all share one shape."""
    shapes = {name: tuple(jnp.shape(value)) for name, value in arrays.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name}{shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {described} must all have the same shape")


def check_rank(name: str, value: Array, rank: int) -> None:
    """Raise a ValueError naming ``name`` when ``value`` does not have ``rank`` dimensions."""
    if jnp.ndim(value) != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(jnp.shape(value))}")


def as_float_mask(mask: Array) -> Array:
    """A bool or 0/1 mask as float32 weights."""
    return jnp.asarray(mask).astype(jnp.float32)


def finalize(total: Array, count: Array) -> Array:
    """Mean from a ``(sum, count)`` pair; 0 when nothing was counted (avoids NaN for empty batches)."""
    total = jnp.asarray(total, jnp.float32)
    count = jnp.asarray(count, jnp.float32)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def finalize_metrics(metrics: Mapping[str, tuple[Array, Array]]) -> dict[str, Array]:
    """Turn every ``(sum, count)`` metric pair into its mean."""
    return {name: finalize(total, count) for name, (total, count) in metrics.items()}


def add_metrics(left: Mapping[str, tuple[Array, Array]], right: Mapping[str, tuple[Array, Array]]) -> Metrics:
    """Accumulate two metric dicts pair-wise (sum of sums, sum of counts); keys must match."""
    if set(left) != set(right):
        raise ValueError(f"metric keys differ: {sorted(set(left) ^ set(right))}")
    return {name: (left[name][0] + right[name][0], left[name][1] + right[name][1]) for name in left}


def masked_sum_count(values: Array, mask: Array) -> tuple[Array, Array]:
    """``(sum of values where mask, number of masked-in entries)`` in float32."""
    check_same_shape(values=values, mask=mask)
    weights = as_float_mask(mask)
    values = jnp.asarray(values, jnp.float32)
    return jnp.sum(jnp.where(weights > 0, values * weights, 0.0)), jnp.sum(weights)


def masked_mean(values: Array, mask: Array) -> Array:
    """Token-weighted mean of ``values`` over the masked-in entries (0 when the mask is empty)."""
    return finalize(*masked_sum_count(values, mask))


def _check_aligned(logits: Array, targets: Array) -> None:
    check_rank("logits", logits, 3)
    check_rank("targets", targets, 2)
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")


def token_logprobs(logits: Array, targets: Array) -> Array:
    """log p(targets[b, t]) as [B, T] float32: the gathered logit minus logsumexp (no full log-softmax kept)."""
    _check_aligned(logits, targets)
    return logit_stats(logits, targets=targets).logprobs


def nll_loss(token_logps: Array, correct: Array, mask: Array) -> LossOutput:
    """Token-weighted mean negative log-likelihood (SFT) from log p(target) [B, T] and whether the target was the
    argmax [B, T].

    Metrics: ``nll`` (same as the loss), ``accuracy`` (argmax == target), ``tokens`` (``(count, 1)``: counted tokens
    per call; summing the first entries over micro-batches gives the total).
    """
    check_same_shape(token_logps=token_logps, correct=correct, mask=mask)
    nll_sum, _ = masked_sum_count(-jnp.asarray(token_logps, jnp.float32), mask)
    return nll_output(nll_sum, correct, mask)


def nll_output(nll_sum: Array, correct: Array, mask: Array) -> LossOutput:
    """:func:`nll_loss`'s output from the masked sum of -log p(target) already taken."""
    correct_sum, count = masked_sum_count(jnp.asarray(correct).astype(jnp.float32), mask)
    metrics = {
        "nll": (nll_sum, count),
        "accuracy": (correct_sum, count),
        "tokens": (count, jnp.ones((), jnp.float32)),
    }
    return nll_sum, count, metrics


def cross_entropy_loss(logits: Array, targets: Array, mask: Array) -> LossOutput:
    """:func:`nll_loss` of logits [B, T, V] given whole."""
    check_same_shape(targets=targets, mask=mask)
    _check_aligned(logits, targets)
    stats = logit_stats(logits, targets=targets, argmax=True)
    return nll_loss(stats.logprobs, stats.argmax == targets, mask)


def token_entropy(logits: Array) -> Array:
    """Per-position entropy H(softmax(logits)) as [B, T] float32 (logsumexp minus the expected logit)."""
    return logit_stats(logits, entropy=True).entropy


def entropy(logits: Array, mask: Array) -> tuple[Array, Array]:
    """``(sum, count)`` of the per-token predictive entropy over masked-in positions."""
    check_rank("logits", logits, 3)
    if logits.shape[:2] != jnp.shape(mask):
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(jnp.shape(mask))} disagree on [B, T]")
    return masked_sum_count(token_entropy(logits), mask)


def sequence_logprob(token_logps: Array, mask: Array) -> Array:
    """Sum of masked per-token log-probabilities: log p(completion) per row, [B] float32."""
    check_rank("token_logps", token_logps, 2)
    check_same_shape(token_logps=token_logps, mask=mask)
    weights = as_float_mask(mask)
    return jnp.sum(jnp.where(weights > 0, jnp.asarray(token_logps, jnp.float32) * weights, 0.0), axis=-1)


def weighted_nll(logprobs: Array, gathered: Array | None, weights: Array) -> Array:
    """Per-token -log p(target) x weight, 0 where the weight is not positive: the SFT loss as a token-local loss of
    :func:`forgetjax.models.vocab.head_loss` (``gathered`` is unused)."""
    return jnp.where(weights > 0, -jnp.asarray(logprobs, jnp.float32) * weights, 0.0)


def sft_loss(model, batch: Mapping[str, jax.Array]) -> tuple:
    """Masked token-level cross-entropy of the completion tokens of an SFT batch, log-probs computed chunk-wise
    over the vocabulary with the gradient formed in the same pass (`models.vocab.head_loss`): the loss every
    SFT-family method trains with."""
    check_same_shape(targets=batch["targets"], loss_mask=batch["loss_mask"])
    hidden, _, _ = model.forward_hidden(batch["input_ids"], batch["attention_mask"], batch["positions"],
                                        batch["segment_ids"])
    nll_sum, stats = head_loss(model, hidden, weighted_nll, (as_float_mask(batch["loss_mask"]),),
                               targets=batch["targets"])
    return nll_output(nll_sum, stats.argmax == batch["targets"], batch["loss_mask"])
