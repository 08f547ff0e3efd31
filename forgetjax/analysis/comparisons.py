"""Group comparisons for the research questions: a statistic over the items of a group of cells (seeds, domains)
and the paired difference between two groups, with two-stage bootstrap intervals (seeds within each configuration,
then items: `forgetjax.analysis.estimates.two_stage_bootstrap`); the differences between every pair of several
groups (Holm-corrected), the trend over model scales and how a group's output policy moved from its baselines.

Capability statistics (F, BT, delta) are measured on one scope of items: "off_target" (the default: capability
items not in-domain for the cell, `loading.OFF_TARGET_SQL`) or "target" (the cell's target benchmarks).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from forgetjax.analysis.estimates import BootstrapSettings, mean_ci, seed_counts, two_stage_bootstrap
from forgetjax.analysis.loading import OFF_TARGET_SQL, Study
from forgetjax.analysis.policy import repetition_rate
from forgetjax.analysis.stats import multiple_comparison
from forgetjax.analysis.tables import NO_EXTRACTION_FAMILIES, REPETITION_N


_SCORED = "pre_value IS NOT NULL AND post_value IS NOT NULL"
ITEM_STATISTICS: dict[str, tuple[str, str]] = {
    "forgetting": ("pre_value * (1 - post_value)", f"is_binary AND {_SCORED}"),
    "backward_transfer": ("(1 - pre_value) * post_value", f"is_binary AND {_SCORED}"),
    "delta": ("post_value - pre_value", _SCORED),
    "refusal_drop": ("pre_refusal::DOUBLE - post_refusal::DOUBLE",
                     "harmful AND NOT is_attack AND pre_refusal IS NOT NULL AND post_refusal IS NOT NULL"),
    "attack_erosion": ("pre_refusal::DOUBLE - post_refusal::DOUBLE",
                       "is_attack AND pre_refusal IS NOT NULL AND post_refusal IS NOT NULL"),
}
"""Per-item values whose mean is the named statistic (refusal_drop: baseline minus post refusal on harmful prompts;
attack_erosion: the same on the optimised attacks' behaviours, i.e. post minus baseline attack success rate)."""
SAFETY_STATISTICS = ("refusal_drop", "attack_erosion")
SCOPES = {"off_target": OFF_TARGET_SQL, "target": "is_target"}
"""The items a capability statistic (every statistic but the SAFETY_STATISTICS) is measured on."""


def item_values(
    study: Study, cell_ids: Sequence[str], statistic: str, families: Sequence[str] | None = None,
    scope: str = "off_target", benchmarks: Sequence[str] | None = None,
) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """(cells, items, values): the statistic's per-item value per cell as [cells, items] (NaN where a cell lacks
    the item), over the cells that have any such item and the (benchmark, item_id) items any of them has.

    Capability statistics use the scope's items (of `families` when given); refusal_drop every harmful safety prompt,
    attack_erosion every attacked behaviour (of `families` / `benchmarks` when given).
    """
    if statistic not in ITEM_STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(ITEM_STATISTICS)}, got {statistic!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {sorted(SCOPES)}, got {scope!r}")
    if not cell_ids:
        return [], [], np.zeros((0, 0))
    expression, condition = ITEM_STATISTICS[statistic]
    params: list[Any] = [list(cell_ids)]
    if statistic not in SAFETY_STATISTICS:
        condition += f" AND {SCOPES[scope]}"
    if families is not None:
        condition += " AND list_contains(?, family)"
        params.append(list(families))
    if benchmarks is not None:
        condition += " AND list_contains(?, benchmark)"
        params.append(list(benchmarks))
    rows = study.connection.execute(
        f"SELECT cell_id, benchmark, item_id, {expression} FROM paired "
        f"WHERE list_contains(?, cell_id) AND {condition} ORDER BY cell_id, benchmark, item_id",
        params,
    ).fetchall()
    cells = sorted({r[0] for r in rows}, key=list(cell_ids).index)
    items = sorted({(r[1], r[2]) for r in rows})
    cell_index = {c: i for i, c in enumerate(cells)}
    item_index = {k: i for i, k in enumerate(items)}
    values = np.full((len(cells), len(items)), np.nan)
    for cell_id, benchmark, item_id, value in rows:
        values[cell_index[cell_id], item_index[(benchmark, item_id)]] = float(value)
    return cells, items, values


def item_means(
    study: Study, cell_ids: Sequence[str], statistic: str, families: Sequence[str] | None = None,
    scope: str = "off_target",
) -> dict[tuple[str, str], float]:
    """(benchmark, item_id) -> the statistic's per-item value averaged over the given cells (e.g. seeds, domains)."""
    _, items, values = item_values(study, cell_ids, statistic, families, scope)
    if not items:
        return {}
    return dict(zip(items, (float(v) for v in np.nanmean(values, axis=0))))


def _strata(study: Study, cell_ids: Sequence[str]) -> tuple[list[tuple], list[int]]:
    """Each cell's configuration (start_point, scale, method, domain, axis values) and seed."""
    cells = [study.cell(c) for c in cell_ids]
    return [(c.start_point, c.scale, c.method, c.domain, c.axes_label) for c in cells], [c.seed for c in cells]


def group_estimate(
    study: Study, cell_ids: Sequence[str], statistic: str, settings: BootstrapSettings = BootstrapSettings(),
    families: Sequence[str] | None = None, scope: str = "off_target", benchmarks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The statistic over the cells' items (per-item mean over cells, then mean over items) with a two-stage
    bootstrap interval (seeds within each configuration, then items), and how many seeds it rests on (n_seeds,
    min_seeds / max_seeds per configuration; min_seeds 1 means some configuration's variation over seeds is unknown)."""
    cells, items, values = item_values(study, cell_ids, statistic, families, scope, benchmarks)
    strata, seeds = _strata(study, cells)
    result: dict[str, Any] = {"estimate": None, "low": None, "high": None, "n": len(items),
                              "n_cells": len(cell_ids), **seed_counts(strata, seeds)}
    if items:
        interval = two_stage_bootstrap([values], [strata], [1.0], settings)
        result.update(estimate=interval["estimate"], low=interval["low"], high=interval["high"])
    return result


def compare_groups(
    study: Study, cells_a: Sequence[str], cells_b: Sequence[str], statistic: str,
    settings: BootstrapSettings = BootstrapSettings(), families: Sequence[str] | None = None,
    scope: str = "off_target",
) -> dict[str, Any]:
    """B - A on the items both groups share, with a paired two-stage bootstrap CI (each group's seeds resampled
    within its configurations, then the shared items); `significant` = CI excludes 0; seeds_a / seeds_b say how many
    seeds each side rests on."""
    ids_a, items_a, values_a = item_values(study, cells_a, statistic, families, scope)
    ids_b, items_b, values_b = item_values(study, cells_b, statistic, families, scope)
    shared = sorted(set(items_a) & set(items_b))
    strata_a, seeds_a = _strata(study, ids_a)
    strata_b, seeds_b = _strata(study, ids_b)
    result: dict[str, Any] = {"n_items": len(shared), "mean_a": None, "mean_b": None, "difference": None,
                              "low": None, "high": None, "significant": None,
                              "seeds_a": seed_counts(strata_a, seeds_a), "seeds_b": seed_counts(strata_b, seeds_b)}
    if not shared:
        return result
    column_a = {k: i for i, k in enumerate(items_a)}
    column_b = {k: i for i, k in enumerate(items_b)}
    a = values_a[:, [column_a[k] for k in shared]]
    b = values_b[:, [column_b[k] for k in shared]]
    interval = two_stage_bootstrap([a, b], [strata_a, strata_b], [-1.0, 1.0], settings)
    result.update(mean_a=float(np.nanmean(a, axis=0).mean()), mean_b=float(np.nanmean(b, axis=0).mean()),
                  difference=interval["estimate"], low=interval["low"], high=interval["high"],
                  significant=bool(interval["low"] > 0 or interval["high"] < 0))
    return result


def pairwise_differences(
    study: Study, groups: Mapping[str, Sequence[str]], statistic: str,
    settings: BootstrapSettings = BootstrapSettings(), alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """Every pair (a, b) of the named groups (in the given order, a before b): b - a on their shared items with the
    paired item-bootstrap interval (`compare_groups`), a two-sided paired t-test p over the per-item differences and
    its Holm adjustment across all pairs (`p_holm`, `reject_holm` at alpha). Pairs sharing no items get None."""
    names = list(groups)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row = {"a": a, "b": b, **compare_groups(study, groups[a], groups[b], statistic, settings),
                   "p": None, "p_holm": None, "reject_holm": None}
            if row["n_items"] >= 2:
                values_a = item_means(study, groups[a], statistic)
                values_b = item_means(study, groups[b], statistic)
                shared = sorted(set(values_a) & set(values_b))
                row["p"] = paired_t_pvalue([values_a[k] for k in shared], [values_b[k] for k in shared])
            rows.append(row)
    tested = [row for row in rows if row["p"] is not None]
    if tested:
        holm = multiple_comparison([row["p"] for row in tested], "holm", alpha)
        for row, adjusted, reject in zip(tested, holm.adjusted, holm.reject):
            row.update(p_holm=float(adjusted), reject_holm=bool(reject))
    return rows


def paired_t_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p of mean(b - a) = 0; identical pairs give 1, a constant nonzero difference 0."""
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if np.ptp(differences) == 0:
        return 1.0 if differences[0] == 0 else 0.0
    return float(scipy_stats.ttest_rel(b, a).pvalue)


_SCALE_UNITS = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def scale_parameters(scale: str) -> float | None:
    """The parameter count a scale name states ("135m" -> 1.35e8, "1.5b" -> 1.5e9); None when it states none."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmbt])\s*", str(scale), flags=re.I)
    return float(match.group(1)) * _SCALE_UNITS[match.group(2).lower()] if match else None


def scaling_trend(
    study: Study, cells_by_scale: Mapping[str, Sequence[str]], statistic: str,
    settings: BootstrapSettings = BootstrapSettings(),
) -> dict[str, Any]:
    """The statistic per scale (`group_estimate`) and its least-squares slope against log10(parameters) on the items
    every scale shares, per tenfold increase in parameters. The slope is linear in the per-scale means, so it is the
    mean over items of each item's own slope, and its interval is the item bootstrap of that mean (`mean_ci`).
    Scales whose name states no parameter count are left out (listed in `unparsed`)."""
    sizes = {scale: scale_parameters(scale) for scale in cells_by_scale}
    usable = sorted((s for s in sizes if sizes[s] is not None), key=lambda s: sizes[s])
    result: dict[str, Any] = {
        "scales": [{"scale": s, "parameters": sizes[s], **group_estimate(study, cells_by_scale[s], statistic, settings)}
                   for s in usable],
        "unparsed": sorted(s for s in sizes if sizes[s] is None),
        "slope": None, "low": None, "high": None, "n": 0, "significant": None,
    }
    if len(usable) < 2:
        return result
    values = [item_means(study, cells_by_scale[s], statistic) for s in usable]
    shared = sorted(set.intersection(*(set(v) for v in values)))
    if not shared:
        return result
    x = np.log10([sizes[s] for s in usable])
    weights = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    per_item = np.array([[v[key] for v in values] for key in shared]) @ weights
    ci = mean_ci(per_item, settings)
    result.update(slope=ci["estimate"], low=ci["low"], high=ci["high"], n=ci["n"],
                  significant=bool(ci["low"] > 0 or ci["high"] < 0))
    return result


POLICY_SHIFT_METRICS: dict[str, str] = {
    "length": "output length in tokens",
    "repetition": f"repeated {REPETITION_N}-gram share per output",
    "format": "share of open-generation outputs with an extracted answer",
    "confidence": "multiple-choice confidence in the chosen option",
    "harmful_refusal": "refusal rate on harmful prompts",
    "safe_refusal": "refusal rate on safe prompts (over-refusal)",
}
"""The per-item policy measures `policy_shift` compares between a cell and its baseline."""


def _policy_values(row: Mapping[str, Any], side: str) -> dict[str, float]:
    """The policy measures one record (side "pre" or "post" of a paired row) has."""
    out: dict[str, float] = {}
    if row[f"{side}_tokens"] is not None:
        out["length"] = float(row[f"{side}_tokens"])
    if row[f"{side}_output"] is not None:
        repetition = repetition_rate(row[f"{side}_output"], REPETITION_N)
        if math.isfinite(repetition):
            out["repetition"] = repetition
    if row["kind"] == "generate" and row["family"] not in NO_EXTRACTION_FAMILIES:
        out["format"] = float(row[f"{side}_answer"])
    if row["kind"] == "multiple_choice" and row[f"{side}_confidence"] is not None:
        out["confidence"] = float(row[f"{side}_confidence"])
    if row[f"{side}_refusal"] is not None and row["harmful"] is not None:
        out["harmful_refusal" if row["harmful"] else "safe_refusal"] = float(row[f"{side}_refusal"])
    return out


def policy_shift(
    study: Study, cell_ids: Sequence[str], settings: BootstrapSettings = BootstrapSettings()
) -> dict[str, dict[str, Any]]:
    """Per POLICY_SHIFT_METRICS measure: the baseline (`pre`) and post-trained (`post`) mean and post - pre with its
    item-bootstrap interval, over the items both sides measure (per item averaged over the cells first, as in
    `group_estimate`). Measures no item has are absent."""
    if not cell_ids:
        return {}
    rows = study.rows(
        """
        SELECT post.benchmark, post.item_id, pre.family, pre.kind, pre.harmful,
               pre.output_tokens AS pre_tokens, post.output_tokens AS post_tokens,
               pre.output AS pre_output, post.output AS post_output,
               pre.extracted_answer IS NOT NULL AS pre_answer, post.extracted_answer IS NOT NULL AS post_answer,
               pre.confidence AS pre_confidence, post.confidence AS post_confidence,
               pre.refusal AS pre_refusal, post.refusal AS post_refusal
        FROM cells c
        JOIN records pre ON pre.cell_id = c.baseline_id
        JOIN records post ON post.cell_id = c.cell_id AND post.benchmark = pre.benchmark AND post.item_id = pre.item_id
        WHERE list_contains(?, c.cell_id) AND NOT pre.is_attack
        """,
        [list(cell_ids)],
    )
    per_item: dict[str, dict[tuple[str, str], list[tuple[float, float]]]] = {}
    for row in rows:
        pre, post = _policy_values(row, "pre"), _policy_values(row, "post")
        for metric in pre.keys() & post.keys():
            per_item.setdefault(metric, {}).setdefault((row["benchmark"], row["item_id"]), []).append(
                (pre[metric], post[metric]))
    out = {}
    for metric in POLICY_SHIFT_METRICS:
        if metric not in per_item:
            continue
        means = np.array([np.mean(pairs, axis=0) for _, pairs in sorted(per_item[metric].items())])
        shift = mean_ci(means[:, 1] - means[:, 0], settings)
        out[metric] = {"pre": float(means[:, 0].mean()), "post": float(means[:, 1].mean()), **shift,
                       "significant": bool(shift["low"] > 0 or shift["high"] < 0)}
    return out
