"""Uncertainty and significance for paired pre/post evaluations: bootstrap, McNemar, multiplicity, Wilson."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from forgetjax.analysis.forgetting import paired_arrays

BuiltinStatistic = Literal["delta", "forgetting", "backward_transfer"]
Statistic = BuiltinStatistic | Callable[[np.ndarray, np.ndarray], float]

_RESAMPLE_BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class BootstrapCI:
    """Point estimate on all items, bootstrap interval [low, high] and bootstrap standard error."""

    estimate: float
    low: float
    high: float
    standard_error: float
    confidence: float
    method: str
    n_resamples: int


class Interval(NamedTuple):
    """A two-sided interval."""

    low: float | np.ndarray
    high: float | np.ndarray


class MultipleComparison(NamedTuple):
    """Adjusted p-values (same order as the input) and which hypotheses are rejected at level alpha."""

    adjusted: np.ndarray
    reject: np.ndarray


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1) over seeds; std is NaN when there is a single seed."""

    mean: float | np.ndarray
    std: float | np.ndarray
    n: int


def item_contributions(pre: ArrayLike, post: ArrayLike, statistic: BuiltinStatistic) -> np.ndarray:
    """Per-item values whose mean is the statistic: post - pre, pre(1 - post) (1→0) or (1 - pre)post (0→1)."""
    if statistic == "delta":
        pre_array, post_array = paired_arrays(pre, post, binary=False)
        return post_array - pre_array
    pre_array, post_array = paired_arrays(pre, post, binary=True)
    if statistic == "forgetting":
        return pre_array * (1.0 - post_array)
    if statistic == "backward_transfer":
        return (1.0 - pre_array) * post_array
    raise ValueError(f"statistic must be 'delta', 'forgetting', 'backward_transfer' or a callable, got {statistic!r}")


def _check_n_resamples(n_resamples: int) -> None:
    """Reject non-integer or non-positive resample counts."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")


def _check_confidence(confidence: float) -> None:
    """Reject confidence levels outside (0, 1)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def resample_index_blocks(n_items: int, n_resamples: int, seed: int):
    """Yield blocks of resampled item indices; row b is the b-th successive `rng.integers(0, n, size=n)` draw."""
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _RESAMPLE_BLOCK_ENTRIES // n_items)
    remaining = n_resamples
    while remaining > 0:
        rows = min(rows_per_block, remaining)
        yield rng.integers(0, n_items, size=(rows, n_items))
        remaining -= rows


def paired_bootstrap_distribution(
    pre: ArrayLike,
    post: ArrayLike,
    statistic: Statistic = "delta",
    n_resamples: int = 10_000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap replicates of the statistic, resampling ITEMS with replacement so (pre, post) pairs stay together.

    Seed semantics: `rng = np.random.default_rng(seed)`; replicate b uses the indices of the b-th successive
    `rng.integers(0, n_items, size=n_items)` call. A callable statistic receives (pre[idx], post[idx]).
    """
    _check_n_resamples(n_resamples)
    if callable(statistic):
        pre_array, post_array = paired_arrays(pre, post, binary=False)
        replicates = [
            float(statistic(pre_array[indices], post_array[indices]))
            for block in resample_index_blocks(pre_array.size, n_resamples, seed)
            for indices in block
        ]
        return np.asarray(replicates, dtype=np.float64)
    contributions = item_contributions(pre, post, statistic)
    blocks = [
        contributions[block].mean(axis=1)
        for block in resample_index_blocks(contributions.size, n_resamples, seed)
    ]
    return np.concatenate(blocks)


def _jackknife(pre: ArrayLike, post: ArrayLike, statistic: Statistic) -> np.ndarray:
    """Leave-one-item-out values of the statistic (closed form for the built-in mean statistics)."""
    if callable(statistic):
        pre_array, post_array = paired_arrays(pre, post, binary=False)
        keep = np.ones(pre_array.size, dtype=bool)
        values = np.empty(pre_array.size)
        for item in range(pre_array.size):
            keep[item] = False
            values[item] = statistic(pre_array[keep], post_array[keep])
            keep[item] = True
        return values
    contributions = item_contributions(pre, post, statistic)
    return (contributions.sum() - contributions) / (contributions.size - 1)


def _bca_levels(replicates: np.ndarray, estimate: float, jackknife: np.ndarray, confidence: float) -> np.ndarray:
    """Bias-corrected and accelerated quantile levels (Efron 1987); NaN when the bias correction is infinite."""
    share_below = (np.sum(replicates < estimate) + np.sum(replicates <= estimate)) / (2.0 * replicates.size)
    bias = special.ndtri(share_below)
    deviations = jackknife.mean() - jackknife
    spread = np.sum(deviations**2)
    acceleration = np.sum(deviations**3) / (6.0 * spread**1.5) if spread > 0 else 0.0
    tail = (1.0 - confidence) / 2.0
    normal_quantiles = special.ndtri(np.array([tail, 1.0 - tail]))
    shifted = bias + normal_quantiles
    return special.ndtr(bias + shifted / (1.0 - acceleration * shifted))


def paired_bootstrap_ci(
    pre: ArrayLike,
    post: ArrayLike,
    statistic: Statistic = "delta",
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    method: Literal["percentile", "bca"] = "percentile",
) -> BootstrapCI:
    """Paired item bootstrap interval for delta (post - pre), forgetting (1→0 share), backward transfer or a callable.

    `percentile` takes the (1-c)/2 and (1+c)/2 quantiles of the replicates; `bca` adjusts those levels for bias
    and skew using a leave-one-item-out jackknife. Deterministic for a given seed (see
    `paired_bootstrap_distribution`). BCa bounds are NaN if every replicate lies on one side of the estimate.
    """
    _check_n_resamples(n_resamples)
    _check_confidence(confidence)
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    if callable(statistic):
        pre_array, post_array = paired_arrays(pre, post, binary=False)
        estimate = float(statistic(pre_array, post_array))
    else:
        pre_array, post_array = np.asarray(pre), np.asarray(post)
        estimate = float(item_contributions(pre_array, post_array, statistic).mean())
    replicates = paired_bootstrap_distribution(pre_array, post_array, statistic, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0
    if method == "percentile":
        levels = np.array([tail, 1.0 - tail])
    else:
        if pre_array.size < 2:
            raise ValueError("method='bca' needs at least 2 items for the jackknife")
        levels = _bca_levels(replicates, estimate, _jackknife(pre_array, post_array, statistic), confidence)
    low, high = np.quantile(replicates, levels) if np.all(np.isfinite(levels)) else (np.nan, np.nan)
    return BootstrapCI(
        estimate=estimate,
        low=float(low),
        high=float(high),
        standard_error=float(np.std(replicates, ddof=1)) if n_resamples > 1 else float("nan"),
        confidence=confidence,
        method=method,
        n_resamples=n_resamples,
    )


def _count(name: str, value: int) -> int:
    """Validate a non-negative integer count."""
    if isinstance(value, (bool, np.bool_)) or not float(value).is_integer() or value < 0:
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    return int(value)


def mcnemar_exact(n10: int, n01: int, mid_p: bool = False) -> float:
    """Exact two-sided McNemar p-value: 2 * P(X <= min(n10, n01)), X ~ Binomial(n10 + n01, 1/2), capped at 1.

    mid_p=True gives the mid-p variant (Fagerland et al. 2013): the exact value minus P(X = min(n10, n01)),
    uncapped before subtraction, which is less conservative. No discordant pairs gives p = 1.
    """
    forgot, gained = _count("n10", n10), _count("n01", n01)
    discordant = forgot + gained
    if discordant == 0:
        return 1.0
    smaller = min(forgot, gained)
    two_sided_tail = 2.0 * stats.binom.cdf(smaller, discordant, 0.5)
    if mid_p:
        return float(min(two_sided_tail - stats.binom.pmf(smaller, discordant, 0.5), 1.0))
    return float(min(two_sided_tail, 1.0))


def multiple_comparison(
    pvalues: ArrayLike,
    method: Literal["holm", "bonferroni", "fdr_bh"] = "holm",
    alpha: float = 0.05,
) -> MultipleComparison:
    """Adjust p-values for multiple testing (Holm step-down, Bonferroni, Benjamini-Hochberg FDR).

    reject = adjusted <= alpha, which equals each procedure's own step-down/step-up rejection rule.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-D, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("pvalues must be finite and within [0, 1]")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    if method == "bonferroni":
        adjusted = np.minimum(p * m, 1.0)
    elif method == "holm":
        adjusted_ranked = np.minimum(np.maximum.accumulate((m - np.arange(m)) * ranked), 1.0)
        adjusted = np.empty(m)
        adjusted[order] = adjusted_ranked
    elif method == "fdr_bh":
        scaled = ranked * m / np.arange(1, m + 1)
        adjusted_ranked = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
        adjusted = np.empty(m)
        adjusted[order] = adjusted_ranked
    else:
        raise ValueError(f"method must be 'holm', 'bonferroni' or 'fdr_bh', got {method!r}")
    return MultipleComparison(adjusted=adjusted, reject=adjusted <= alpha)


def mean_std_over_seeds(values: ArrayLike, axis: int = 0) -> MeanStd:
    """Mean and sample std (ddof=1) across seeds along `axis`; with one seed the std is NaN (spread unknown)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0 or array.shape[axis] == 0:
        raise ValueError("values must hold at least one seed along the given axis")
    if not np.all(np.isfinite(array)):
        raise ValueError("values must be finite (a failed seed should be dropped explicitly)")
    n = int(array.shape[axis])
    mean = array.mean(axis=axis)
    std = array.std(axis=axis, ddof=1) if n > 1 else np.full_like(mean, np.nan)
    if np.ndim(mean) == 0:
        return MeanStd(mean=float(mean), std=float(std), n=n)
    return MeanStd(mean=mean, std=std, n=n)


def wilson_interval(successes: ArrayLike, n: ArrayLike, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion (elementwise); well-behaved near 0 and 1."""
    k = np.asarray(successes, dtype=np.float64)
    total = np.asarray(n, dtype=np.float64)
    _check_confidence(confidence)
    if not np.all(np.isfinite(total)) or np.any(total <= 0) or np.any(total != np.round(total)):
        raise ValueError("n must be positive integer trial counts")
    if np.any(k < 0) or np.any(k > total) or np.any(k != np.round(k)):
        raise ValueError("successes must be integers within [0, n]")
    z = special.ndtri(0.5 + confidence / 2.0)
    proportion = k / total
    shrink = 1.0 + z**2 / total
    centre = (proportion + z**2 / (2.0 * total)) / shrink
    half_width = z * np.sqrt(proportion * (1.0 - proportion) / total + z**2 / (4.0 * total**2)) / shrink
    low, high = np.clip(centre - half_width, 0.0, 1.0), np.clip(centre + half_width, 0.0, 1.0)
    if low.ndim == 0:
        return Interval(low=float(low), high=float(high))
    return Interval(low=low, high=high)


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters' labels over the same items: (p_o - p_e) / (1 - p_e), p_o the observed agreement,
    p_e the agreement expected from each rater's label shares; 1.0 when both raters give one and the same label."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"cohen_kappa needs two equally long, non-empty label lists, got {len(a)} and {len(b)}")
    labels = sorted(set(a) | set(b), key=repr)
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((list(a).count(label) / n) * (list(b).count(label) / n) for label in labels)
    if expected == 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)


def kappa_interval(a: Sequence[Any], b: Sequence[Any], n_resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> BootstrapCI:
    """Cohen's kappa with a percentile item-bootstrap interval (items resampled with both raters' labels)."""
    _check_n_resamples(n_resamples)
    _check_confidence(confidence)
    a_array, b_array = np.asarray(list(a), dtype=object), np.asarray(list(b), dtype=object)
    estimate = cohen_kappa(list(a_array), list(b_array))
    replicates = np.array([cohen_kappa(list(a_array[indices]), list(b_array[indices]))
                           for block in resample_index_blocks(len(a_array), n_resamples, seed) for indices in block])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return BootstrapCI(float(estimate), float(low), float(high), float(replicates.std(ddof=1)) if n_resamples > 1
                       else 0.0, confidence, "percentile", n_resamples)
