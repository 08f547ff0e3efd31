"""Group comparisons for the research questions: a statistic over the items of a group of cells (seeds, domains)
and the paired difference between two groups, with two-stage bootstrap intervals (seeds within each configuration,
then items: `forgetjax.analysis.estimates.two_stage_bootstrap`).

Capability statistics (F, BT, delta) are measured on one scope of items: "off_target" (the default: capability
items not in-domain for the cell, `loading.OFF_TARGET_SQL`) or "target" (the cell's target benchmarks).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from forgetjax.analysis.estimates import BootstrapSettings, seed_counts, two_stage_bootstrap
from forgetjax.analysis.loading import OFF_TARGET_SQL, Study


_SCORED = "pre_value IS NOT NULL AND post_value IS NOT NULL"
ITEM_STATISTICS: dict[str, tuple[str, str]] = {
    "forgetting": ("pre_value * (1 - post_value)", f"is_binary AND {_SCORED}"),
    "backward_transfer": ("(1 - pre_value) * post_value", f"is_binary AND {_SCORED}"),
    "delta": ("post_value - pre_value", _SCORED),
    "refusal_drop": ("pre_refusal::DOUBLE - post_refusal::DOUBLE",
                     "harmful AND pre_refusal IS NOT NULL AND post_refusal IS NOT NULL"),
}
"""Per-item values whose mean is the named statistic (refusal_drop: baseline minus post refusal on harmful prompts)."""
SCOPES = {"off_target": OFF_TARGET_SQL, "target": "is_target"}
"""The items a capability statistic (every statistic but refusal_drop) is measured on."""


def item_values(
    study: Study, cell_ids: Sequence[str], statistic: str, families: Sequence[str] | None = None,
    scope: str = "off_target",
) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """(cells, items, values): the statistic's per-item value per cell as [cells, items] (NaN where a cell lacks
    the item), over the cells that have any such item and the (benchmark, item_id) items any of them has.

    Capability statistics use the scope's items (of `families` when given); refusal_drop every harmful safety prompt
    (of `families` when given).
    """
    if statistic not in ITEM_STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(ITEM_STATISTICS)}, got {statistic!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {sorted(SCOPES)}, got {scope!r}")
    if not cell_ids:
        return [], [], np.zeros((0, 0))
    expression, condition = ITEM_STATISTICS[statistic]
    params: list[Any] = [list(cell_ids)]
    if statistic != "refusal_drop":
        condition += f" AND {SCOPES[scope]}"
    if families is not None:
        condition += " AND list_contains(?, family)"
        params.append(list(families))
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
    """Each cell's configuration (start_point, scale, method, domain) and seed."""
    cells = [study.cell(c) for c in cell_ids]
    return [(c.start_point, c.scale, c.method, c.domain) for c in cells], [c.seed for c in cells]


def group_estimate(
    study: Study, cell_ids: Sequence[str], statistic: str, settings: BootstrapSettings = BootstrapSettings(),
    families: Sequence[str] | None = None, scope: str = "off_target",
) -> dict[str, Any]:
    """The statistic over the cells' items (per-item mean over cells, then mean over items) with a two-stage
    bootstrap interval (seeds within each configuration, then items), and how many seeds it rests on (n_seeds,
    min_seeds / max_seeds per configuration; min_seeds 1 means some configuration's variation over seeds is unknown)."""
    cells, items, values = item_values(study, cell_ids, statistic, families, scope)
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
