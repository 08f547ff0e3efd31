"""Forgetting, safety loss and target gain along a study's axes (LoRA vs full, weight interpolation, FRPO lambda,
budget, any run key; `forgetjax.study.axes`): one axis varied at a time, the others at their reference value.

For axis A and each of its values v, per (start point, scale, method): the post-trained cells whose A is v and whose
other axes are at their reference (a merge cell's parent at the reference too); with v the merge axis' alpha, the
merge cells of the reference cells. Each group gets the off-target forgetting F, the refusal drop on harmful prompts
and the target-task gain with their two-stage bootstrap intervals (`comparisons.group_estimate`), the mean KL to the
start model of its trained cells, and, for every value but the reference, the paired difference to the reference
group (`comparisons.compare_groups`; for the merge axis the difference to the trained cells, alpha = 1 without
interpolation)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from forgetjax.analysis.comparisons import compare_groups, group_estimate
from forgetjax.analysis.estimates import BootstrapSettings
from forgetjax.analysis.loading import Study
from forgetjax.results import Cell

MERGE_AXIS = "merge"
REFERENCE_LABEL = "trained"
STATISTICS = (("forgetting", "off_target", "F"), ("refusal_drop", "off_target", "refusal_drop"),
              ("delta", "target", "target_gain"))
"""(statistic, item scope, column prefix) of each estimate in the axis table."""


def axis_names(study: Study) -> list[str]:
    """The axes the analysed cells record, in name order (merge last)."""
    names = {name for cell in study.all_post_cells for name in cell.axes}
    return sorted(names - {MERGE_AXIS}) + ([MERGE_AXIS] if MERGE_AXIS in names else [])


def _others_at_reference(cell: Cell, axis: str) -> bool:
    return all(entry["reference"] for name, entry in cell.axes.items() if name not in (axis, MERGE_AXIS))


def _sort_key(entry: dict[str, Any]) -> tuple:
    value = entry["value"]
    number = value.get("value") if isinstance(value, dict) and "value" in value else value
    numeric = isinstance(number, (int, float)) and not isinstance(number, bool)
    return (not entry["reference"], not numeric, number if numeric else 0.0, entry["label"])


def axis_groups(study: Study, axis: str) -> dict[tuple[str, str, str], list[tuple[str, Any, list[Cell]]]]:
    """{(start_point, scale, method): [(value label, value, cells)]} along `axis` (module docstring), the reference
    value first (for the merge axis the trained cells, labelled REFERENCE_LABEL), then by value."""
    groups: dict[tuple[str, str, str], dict[str, tuple[dict, list[Cell]]]] = {}
    for cell in study.all_post_cells:
        key = (cell.start_point, cell.scale, cell.method)
        if axis == MERGE_AXIS:
            if not _others_at_reference(cell, MERGE_AXIS):
                continue
            entry = cell.axes.get(MERGE_AXIS) or {"value": None, "label": REFERENCE_LABEL, "reference": True}
        elif axis in cell.axes and MERGE_AXIS not in cell.axes and _others_at_reference(cell, axis):
            entry = cell.axes[axis]
        else:
            continue
        slot = groups.setdefault(key, {}).setdefault(entry["label"], (entry, []))
        slot[1].append(cell)
    out = {}
    for key, by_label in sorted(groups.items()):
        if len(by_label) < 2:
            continue
        ordered = sorted(by_label.values(), key=lambda item: _sort_key(item[0]))
        out[key] = [(entry["label"], entry["value"], cells) for entry, cells in ordered]
    return out


def _mean_kl(cells: Sequence[Cell]) -> float | None:
    values = [c.kl_to_start.get("last") for c in cells if c.kl_to_start.get("last") is not None]
    return float(np.mean(values)) if values else None


def axis_table(study: Study, settings: BootstrapSettings = BootstrapSettings()) -> list[dict[str, Any]]:
    """One row per (axis, start point, scale, method, value): the group's cells and seeds, F, refusal drop and
    target gain with intervals, the mean final KL to the start, and each statistic's difference to the reference
    value with its interval (None on the reference row)."""
    rows = []
    for axis in axis_names(study):
        for (start_point, scale, method), values in axis_groups(study, axis).items():
            reference_ids = [c.cell_id for c in values[0][2]]
            for index, (label, value, cells) in enumerate(values):
                ids = [c.cell_id for c in cells]
                row: dict[str, Any] = {"axis": axis, "start_point": start_point, "scale": scale, "method": method,
                                       "value": label, "reference": index == 0, "n_cells": len(cells),
                                       "seeds": ",".join(str(s) for s in sorted({c.seed for c in cells})),
                                       "kl_to_start": _mean_kl(cells), "cell_ids": ",".join(ids)}
                for statistic, scope, column in STATISTICS:
                    estimate = group_estimate(study, ids, statistic, settings, scope=scope)
                    row.update({column: estimate["estimate"], f"{column}_low": estimate["low"],
                                f"{column}_high": estimate["high"], f"{column}_n": estimate["n"]})
                    difference = (compare_groups(study, reference_ids, ids, statistic, settings, scope=scope)
                                  if index else {})
                    row.update({f"{column}_vs_reference": difference.get("difference"),
                                f"{column}_vs_reference_low": difference.get("low"),
                                f"{column}_vs_reference_high": difference.get("high"),
                                f"{column}_vs_reference_n": difference.get("n_items")})
                rows.append(row)
    return rows
