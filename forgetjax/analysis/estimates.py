"""Estimates with paired item-bootstrap intervals: the forgetting statistics of a group of paired items, means with
intervals, Spearman correlations and the Pareto front. Items are the resampling unit of one cell's statistics;
statistics over groups of cells resample seeds, then items (`two_stage_bootstrap`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np
from scipy import stats as scipy_stats

from forgetjax.analysis.forgetting import (
    accuracy_delta,
    category_aggregate,
    chance_adjusted_transitions,
    relative_drift,
    transition_rates,
)
from forgetjax.analysis.stats import mcnemar_exact, paired_bootstrap_ci, resample_index_blocks


@dataclass(frozen=True)
class BootstrapSettings:
    """Paired item bootstrap settings shared by every interval in the analysis."""

    n_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_resamples, bool) or not isinstance(self.n_resamples, int) or self.n_resamples < 1:
            raise ValueError(f"n_resamples must be a positive integer, got {self.n_resamples!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def pareto_front(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Mask of points not dominated when maximising both x and y (dominated: another point >= on both, > on one)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xs.shape} and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError("x and y must be finite")
    no_worse = (xs[None, :] >= xs[:, None]) & (ys[None, :] >= ys[:, None])
    better = (xs[None, :] > xs[:, None]) | (ys[None, :] > ys[:, None])
    return ~np.any(no_worse & better, axis=1)


def spearman(x: Sequence[float], y: Sequence[float], min_n: int = 3) -> dict[str, Any]:
    """Spearman rho and two-sided p over the pairs where both values are finite; a note says why when undefined."""
    pairs = [(a, b) for a, b in zip(x, y) if is_number(a) and is_number(b)]
    result: dict[str, Any] = {"n": len(pairs), "rho": None, "p": None, "note": ""}
    if len(pairs) < min_n:
        result["note"] = f"not enough data: {len(pairs)} cell(s) with both values, need {min_n}"
        return result
    xs, ys = np.array(pairs, dtype=np.float64).T
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        result["note"] = "not enough data: one of the variables is constant across cells"
        return result
    rho, p = scipy_stats.spearmanr(xs, ys)
    result.update(rho=float(rho), p=float(p))
    return result


def spearman_interval(rho: float | None, n: int, confidence: float) -> tuple[float | None, float | None]:
    """Fisher-z interval of a Spearman rho over n pairs with the Fieller, Hartley & Pearson (1957) standard error
    sqrt(1.06 / (n - 3)): tanh(atanh(rho) -+ z * se); (None, None) for n <= 3 or no rho, (rho, rho) for |rho| = 1."""
    if rho is None or n <= 3:
        return None, None
    if abs(rho) >= 1.0:
        return float(rho), float(rho)
    z = scipy_stats.norm.ppf(0.5 + confidence / 2.0)
    center, se = math.atanh(rho), math.sqrt(1.06 / (n - 3))
    return math.tanh(center - z * se), math.tanh(center + z * se)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def mean_ci(values: Sequence[float], settings: BootstrapSettings) -> dict[str, Any]:
    """Mean of per-item values with an item-bootstrap interval (the paired bootstrap of the delta against zeros)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0}
    ci = paired_bootstrap_ci(
        np.zeros_like(array), array, "delta", settings.n_resamples, settings.confidence, settings.seed
    )
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "n": int(array.size)}


def _seed_weights(strata: Sequence[Hashable], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n_cells] times each cell is drawn when every configuration's seeds are resampled with
    replacement: per configuration (first-appearance order) with m cells, one `rng.integers(0, m, size=(n_resamples,
    m))` draw, row b for resample b."""
    weights = np.zeros((n_resamples, len(strata)))
    for stratum in dict.fromkeys(strata):
        columns = np.array([index for index, s in enumerate(strata) if s == stratum])
        draws = rng.integers(0, columns.size, size=(n_resamples, columns.size))
        for position, column in enumerate(columns):
            weights[:, column] = (draws == position).sum(axis=1)
    return weights


def two_stage_bootstrap(
    groups: Sequence[np.ndarray], strata: Sequence[Sequence[Hashable]], signs: Sequence[float],
    settings: BootstrapSettings,
) -> dict[str, Any]:
    """The signed sum over groups of (mean over items of the per-item mean over the group's cells), with a two-stage
    (cluster) bootstrap interval: seeds within each configuration, then items.

    groups[g] is [cells, items] (NaN where a cell lacks an item; every item needs a value in every group), with the
    same item columns in every group; strata[g] gives each cell's configuration (cells of one configuration are its
    seed replicates). A resample draws each group's seeds with replacement within every configuration
    (`_seed_weights`, generator `np.random.default_rng([settings.seed, 1])`, groups in order), then the items with
    replacement from `resample_index_blocks(n_items, n_resamples, settings.seed)`, one draw shared by the groups so
    differences stay paired on items; its value is the mean over drawn items of the signed sum of each group's
    seed-weighted per-item means (items no drawn cell has are skipped). With one seed per configuration the seed
    stage is a no-op and the interval is exactly the item bootstrap's. Percentile interval.
    """
    if not (len(groups) == len(strata) == len(signs)) or not groups:
        raise ValueError("groups, strata and signs need one entry per group, at least one group")
    values = [np.asarray(g, dtype=np.float64) for g in groups]
    n_items = values[0].shape[1]
    for index, (matrix, cells) in enumerate(zip(values, strata)):
        if matrix.ndim != 2 or matrix.shape[1] != n_items or matrix.shape[0] != len(cells) or not len(cells):
            raise ValueError(f"group {index}: values {matrix.shape} do not match {len(cells)} cells x {n_items} items")
        if n_items and not np.all(np.isfinite(matrix).any(axis=0)):
            raise ValueError(f"group {index}: some items have no value in any cell")
    result: dict[str, Any] = {"estimate": None, "low": None, "high": None, "n_items": n_items}
    if n_items == 0:
        return result
    present = [np.isfinite(m).astype(np.float64) for m in values]
    filled = [np.where(np.isfinite(m), m, 0.0) for m in values]
    per_item = sum(sign * f.sum(axis=0) / p.sum(axis=0) for sign, f, p in zip(signs, filled, present))
    seed_rng = np.random.default_rng([settings.seed, 1])
    weights = [_seed_weights(list(cells), settings.n_resamples, seed_rng) for cells in strata]
    replicates, start = [], 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for block in resample_index_blocks(n_items, settings.n_resamples, settings.seed):
            rows = slice(start, start + block.shape[0])
            start += block.shape[0]
            combined = sum(sign * (w[rows] @ f) / (w[rows] @ p)
                           for sign, w, f, p in zip(signs, weights, filled, present))
            replicates.append(np.nanmean(np.take_along_axis(combined, block, axis=1), axis=1))
    tail = (1.0 - settings.confidence) / 2.0
    low, high = np.nanquantile(np.concatenate(replicates), [tail, 1.0 - tail])
    result.update(estimate=float(per_item.mean()), low=float(low), high=float(high))
    return result


def seed_counts(strata: Sequence[Hashable], seeds: Sequence[int]) -> dict[str, Any]:
    """How many seeds a group of cells rests on: distinct seeds, configurations, and the fewest / most seeds of a
    configuration."""
    per_config: dict[Hashable, set[int]] = {}
    for stratum, seed in zip(strata, seeds):
        per_config.setdefault(stratum, set()).add(seed)
    sizes = [len(s) for s in per_config.values()]
    return {"n_seeds": len(set(seeds)), "n_configs": len(per_config), "min_seeds": min(sizes, default=0),
            "max_seeds": max(sizes, default=0)}


def _chance_adjusted(pre: np.ndarray, post: np.ndarray, k: np.ndarray) -> dict[str, float]:
    """Chance-adjusted F/BT over items that may mix option counts and open generation (k NaN: no adjustment).

    The items with a k and those without form separate groups; each is adjusted by `chance_adjusted_transitions`
    and the results are combined weighted by the group's share of items.
    """
    has_k = np.isfinite(k)
    parts = []
    if has_k.any():
        parts.append((has_k, chance_adjusted_transitions(pre[has_k], post[has_k], k[has_k].astype(np.int64))))
    if (~has_k).any():
        parts.append((~has_k, chance_adjusted_transitions(pre[~has_k], post[~has_k], None)))
    total = pre.size
    return {
        "spurious_rate": sum(mask.sum() / total * r.spurious_rate for mask, r in parts),
        "forgetting_adj": sum(mask.sum() / total * r.forgetting_true for mask, r in parts),
        "backward_transfer_adj": sum(mask.sum() / total * r.backward_transfer_true for mask, r in parts),
    }


def _k_label(k: np.ndarray) -> str:
    """The distinct option counts, e.g. "4" or "2,4"; empty for open generation."""
    values = sorted({int(v) for v in k if np.isfinite(v)})
    return ",".join(str(v) for v in values)


FORGETTING_STAT_COLUMNS = (
    "n", "n_binary", "acc_pre", "acc_post", "delta", "delta_ci_low", "delta_ci_high", "delta_macro",
    "relative_drift", "n11", "n10", "n01", "n00", "forgetting", "forgetting_ci_low", "forgetting_ci_high",
    "backward_transfer", "bt_ci_low", "bt_ci_high", "spurious_rate", "forgetting_adj", "backward_transfer_adj",
    "k", "mcnemar_p",
)


def paired_statistics(
    pre: np.ndarray, post: np.ndarray, is_binary: np.ndarray, k: np.ndarray, settings: BootstrapSettings
) -> dict[str, Any]:
    """Every forgetting statistic of one group of paired items.

    delta (with CI) uses all items; F, BT (with CIs), the chance-adjusted rates and the exact McNemar p use the
    binary items only (None when there are none).
    """
    acc = accuracy_delta(pre, post)
    delta_ci = paired_bootstrap_ci(pre, post, "delta", settings.n_resamples, settings.confidence, settings.seed)
    drift = relative_drift(acc.pre, acc.post) if acc.pre >= 0 and acc.post >= 0 else float("nan")
    row: dict[str, Any] = {name: None for name in FORGETTING_STAT_COLUMNS}
    row.update(
        n=acc.n, n_binary=int(is_binary.sum()), acc_pre=acc.pre, acc_post=acc.post, delta=acc.delta,
        delta_ci_low=delta_ci.low, delta_ci_high=delta_ci.high, relative_drift=drift, k=_k_label(k),
    )
    if is_binary.any():
        b_pre, b_post = pre[is_binary], post[is_binary]
        transitions = transition_rates(b_pre, b_post)
        f_ci = paired_bootstrap_ci(
            b_pre, b_post, "forgetting", settings.n_resamples, settings.confidence, settings.seed
        )
        bt_ci = paired_bootstrap_ci(
            b_pre, b_post, "backward_transfer", settings.n_resamples, settings.confidence, settings.seed
        )
        row.update(
            n11=transitions.n11, n10=transitions.n10, n01=transitions.n01, n00=transitions.n00,
            forgetting=transitions.forgetting, forgetting_ci_low=f_ci.low, forgetting_ci_high=f_ci.high,
            backward_transfer=transitions.backward_transfer, bt_ci_low=bt_ci.low, bt_ci_high=bt_ci.high,
            mcnemar_p=mcnemar_exact(transitions.n10, transitions.n01),
            **_chance_adjusted(b_pre, b_post, k[is_binary]),
        )
    return row


def macro_delta(labels: np.ndarray, pre: np.ndarray, post: np.ndarray) -> float:
    """Unweighted mean over labels of each label's delta."""
    aggregate = category_aggregate(labels, pre, post, statistic=lambda p, q: float(np.mean(q - p)))
    return aggregate.macro
