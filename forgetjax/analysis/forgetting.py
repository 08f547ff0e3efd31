"""Item-level forgetting metrics from paired pre/post evaluations.

Every function takes one entry per benchmark item, evaluated once before and once after post-training
(same items, same order). Correctness arrays hold 0/1 (bools accepted); score arrays hold any finite numbers.
Items that could not be evaluated must be dropped by the caller: NaN is rejected, never silently averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class AccuracyDelta:
    """Mean score before and after post-training, and their difference (post - pre)."""

    pre: float
    post: float
    delta: float
    n: int


@dataclass(frozen=True)
class Transitions:
    """Paired item transitions; `forgetting` = n10 / n and `backward_transfer` = n01 / n (shares of ALL items)."""

    n: int
    n11: int
    n10: int
    n01: int
    n00: int
    forgetting: float
    backward_transfer: float


@dataclass(frozen=True)
class ChanceAdjustedTransitions:
    """Raw transition rates, the rate expected from random guessing, and the chance-adjusted (floored) rates."""

    n: int
    forgetting: float
    backward_transfer: float
    spurious_rate: float
    forgetting_true: float
    backward_transfer_true: float


@dataclass(frozen=True)
class CategoryAggregate:
    """A statistic per category, its unweighted (macro) mean over categories, and the statistic on all items."""

    per_category: dict[Hashable, float]
    counts: dict[Hashable, int]
    macro: float
    overall: float


def score_array(name: str, values: ArrayLike) -> np.ndarray:
    """Validate a non-empty 1-D array of finite per-item scores and return it as float64."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D per-item array, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; need at least one evaluated item")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric or boolean, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values; drop unevaluated items first")
    return array


def binary_array(name: str, values: ArrayLike) -> np.ndarray:
    """Validate a non-empty 1-D array of 0/1 correctness values and return it as float64."""
    array = score_array(name, values)
    if not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name} must contain only 0/1 (or bool) correctness values")
    return array


def paired_arrays(pre: ArrayLike, post: ArrayLike, *, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate two per-item arrays of equal length (binary 0/1 if `binary`)."""
    check = binary_array if binary else score_array
    pre_array, post_array = check("pre", pre), check("post", post)
    if pre_array.shape != post_array.shape:
        raise ValueError(
            f"pre and post must be paired item by item: lengths {pre_array.size} and {post_array.size} differ"
        )
    return pre_array, post_array


def accuracy_delta(pre: ArrayLike, post: ArrayLike) -> AccuracyDelta:
    """Mean per-item score before/after and delta = post - pre (scores may be 0/1 or continuous)."""
    pre_array, post_array = paired_arrays(pre, post, binary=False)
    pre_mean, post_mean = float(pre_array.mean()), float(post_array.mean())
    return AccuracyDelta(pre=pre_mean, post=post_mean, delta=post_mean - pre_mean, n=int(pre_array.size))


def relative_drift(pre_acc: ArrayLike, post_acc: ArrayLike) -> float | np.ndarray:
    """CapTrack-style relative drift (post - pre) / pre, elementwise.

    Rule for pre == 0: drift is 0.0 when post == 0 too (nothing changed) and NaN otherwise (a relative change
    from zero is undefined); NaN marks the cell for the report instead of an infinite or arbitrary number.
    """
    pre_values = np.asarray(pre_acc, dtype=np.float64)
    post_values = np.asarray(post_acc, dtype=np.float64)
    for name, values in (("pre_acc", pre_values), ("post_acc", post_values)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be finite")
        if np.any(values < 0):
            raise ValueError(f"{name} must be non-negative (an accuracy or score >= 0)")
    pre_b, post_b = np.broadcast_arrays(pre_values, post_values)
    safe_pre = np.where(pre_b == 0, 1.0, pre_b)
    drift = np.where(pre_b == 0, np.where(post_b == 0, 0.0, np.nan), (post_b - pre_b) / safe_pre)
    return float(drift) if drift.ndim == 0 else drift


def transition_rates(pre: ArrayLike, post: ArrayLike) -> Transitions:
    """Counts of 1→1, 1→0, 0→1, 0→0 items and the forgetting / backward-transfer shares of all items."""
    pre_array, post_array = paired_arrays(pre, post, binary=True)
    n = int(pre_array.size)
    n11 = int(np.sum((pre_array == 1) & (post_array == 1)))
    n10 = int(np.sum((pre_array == 1) & (post_array == 0)))
    n01 = int(np.sum((pre_array == 0) & (post_array == 1)))
    n00 = n - n11 - n10 - n01
    return Transitions(
        n=n, n11=n11, n10=n10, n01=n01, n00=n00, forgetting=n10 / n, backward_transfer=n01 / n
    )


def spurious_transition_rate(acc_pre: float, acc_post: float, k: float) -> float:
    """Expected share of items flipping in one direction by random guessing: (1 - a_pre)(1 - a_post) / (k - 1)."""
    if k < 2:
        raise ValueError(f"k (number of options) must be >= 2, got {k}")
    return (1.0 - acc_pre) * (1.0 - acc_post) / (k - 1.0)


def chance_adjusted_rate(rate: float, acc_pre: float, acc_post: float, k: float | None) -> float:
    """max(rate - spurious_transition_rate, 0); k=None (open generation) means no adjustment."""
    if k is None:
        return rate
    return max(rate - spurious_transition_rate(acc_pre, acc_post, k), 0.0)


def _option_counts(k: int | ArrayLike, n: int) -> np.ndarray:
    """Per-item option counts as a validated int array of length n (a scalar k is broadcast)."""
    k_array = np.asarray(k)
    if k_array.ndim == 0:
        k_array = np.full(n, k_array)
    if k_array.shape != (n,):
        raise ValueError(f"k must be a scalar or have one entry per item ({n}), got shape {k_array.shape}")
    if not np.issubdtype(k_array.dtype, np.number) or not np.all(np.isfinite(k_array)):
        raise ValueError("k must be finite numbers of answer options")
    if np.any(k_array != np.round(k_array)) or np.any(k_array < 2):
        raise ValueError("k must be integers >= 2 (number of answer options); use k=None for open generation")
    return k_array.astype(np.int64)


def chance_adjusted_transitions(
    pre: ArrayLike, post: ArrayLike, k: int | ArrayLike | None
) -> ChanceAdjustedTransitions:
    """Forgetting and backward transfer corrected for flips expected from random guessing among k options.

    F_true = max(F - (1 - a_pre)(1 - a_post)/(k - 1), 0), BT_true likewise. When k varies per item, items are
    grouped by k; each group is adjusted with its own accuracies (the guessing rate depends on the group's
    accuracy and option count), floored at 0, and the groups are combined weighted by their share of items.
    A single k is the one-group case. k=None (open generation) applies no adjustment.
    """
    pre_array, post_array = paired_arrays(pre, post, binary=True)
    n = int(pre_array.size)
    raw = transition_rates(pre_array, post_array)
    if k is None:
        return ChanceAdjustedTransitions(
            n=n,
            forgetting=raw.forgetting,
            backward_transfer=raw.backward_transfer,
            spurious_rate=0.0,
            forgetting_true=raw.forgetting,
            backward_transfer_true=raw.backward_transfer,
        )
    k_array = _option_counts(k, n)
    spurious = forgetting_true = backward_true = 0.0
    for k_value in np.unique(k_array):
        in_group = k_array == k_value
        weight = in_group.sum() / n
        group = transition_rates(pre_array[in_group], post_array[in_group])
        acc_pre, acc_post = pre_array[in_group].mean(), post_array[in_group].mean()
        spurious += weight * spurious_transition_rate(acc_pre, acc_post, k_value)
        forgetting_true += weight * chance_adjusted_rate(group.forgetting, acc_pre, acc_post, k_value)
        backward_true += weight * chance_adjusted_rate(group.backward_transfer, acc_pre, acc_post, k_value)
    return ChanceAdjustedTransitions(
        n=n,
        forgetting=raw.forgetting,
        backward_transfer=raw.backward_transfer,
        spurious_rate=float(spurious),
        forgetting_true=float(forgetting_true),
        backward_transfer_true=float(backward_true),
    )


def _mean_statistic(values: np.ndarray, *_: np.ndarray) -> float:
    """Default category statistic: the mean of the first array."""
    return float(np.mean(values))


def category_aggregate(
    categories: ArrayLike,
    *arrays: ArrayLike,
    statistic: Callable[..., float] = _mean_statistic,
) -> CategoryAggregate:
    """Apply `statistic(*arrays_subset)` per category, plus the macro mean over categories and the all-item value.

    Example: `category_aggregate(subjects, pre, post, statistic=lambda p, q: transition_rates(p, q).forgetting)`.
    With no `statistic`, the per-category mean of the single array is returned. The macro mean weights every
    category equally; a NaN category value (e.g. an undefined relative drift) makes the macro mean NaN.
    """
    if not arrays:
        raise ValueError("category_aggregate needs at least one per-item array after categories")
    labels = np.asarray(categories)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"categories must be a non-empty 1-D array, got shape {labels.shape}")
    columns = [np.asarray(array) for array in arrays]
    for position, column in enumerate(columns):
        if column.shape[:1] != labels.shape:
            raise ValueError(
                f"arrays[{position}] has {column.shape[:1]} items but categories has {labels.size}"
            )
    per_category: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for label in np.unique(labels):
        in_category = labels == label
        key = label.item()
        per_category[key] = float(statistic(*(column[in_category] for column in columns)))
        counts[key] = int(in_category.sum())
    return CategoryAggregate(
        per_category=per_category,
        counts=counts,
        macro=float(np.mean(list(per_category.values()))),
        overall=float(statistic(*columns)),
    )
