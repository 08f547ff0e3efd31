"""CapTrack's capability-drift taxonomy over a study: knowledge, skills, robustness, default behaviour, protocol.

- Robustness (`robustness_table`): per cell and `<benchmark>_robust` benchmark, items grouped by their base item
  (`source_item`); an item is consistent when every perturbation has the same semantic choice, robust when every
  perturbation is correct. Post-trained cells compare with their baseline on the base items both evaluated.
- Default behaviour (`style_drift_table`): the style features (`policy.style_features`) of each neutral-prompt
  response, per feature the baseline and post means over paired items, their delta with a paired item-bootstrap
  interval and CapTrack's relative drift (post - pre) / pre.
- The dimensions (`captrack_table`): knowledge, skills and protocol are the off-target accuracy of their families
  (CAPTRACK_DIMENSIONS; in-domain benchmarks left out as everywhere), robustness the consistency rate, each with
  baseline, post, delta (paired item-bootstrap CI) and relative drift; default behaviour is minus the mean absolute
  relative drift over the style features (0 = unchanged), so for every dimension higher is better and 0 is no change.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from forgetjax.analysis.estimates import BootstrapSettings
from forgetjax.analysis.forgetting import relative_drift
from forgetjax.analysis.loading import OFF_TARGET_SQL, Study
from forgetjax.analysis.policy import STYLE_FEATURES, style_features
from forgetjax.analysis.stats import paired_bootstrap_ci

CAPTRACK_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "knowledge": ("knowledge", "truthfulness", "multilingual"),
    "skills": ("math", "code", "reasoning", "commonsense"),
    "robustness": ("robustness",),
    "default_behaviour": ("default_behaviour",),
    "protocol": ("instruction_following",),
}
ROBUSTNESS_FAMILY = "robustness"
STYLE_FAMILY = "default_behaviour"


def item_consistency(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per base item of one robustness benchmark: consistent (one semantic choice across perturbations), robust
    (every perturbation correct), original (the unperturbed variant correct) and perturbed (mean correctness of
    the other variants). Records need `correct` and `extra` (a JSON string or a dict with source_item,
    perturbation, semantic_choice)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        extra = record["extra"] if isinstance(record["extra"], Mapping) else json.loads(record["extra"])
        groups.setdefault(extra["source_item"], []).append({**extra, "correct": record["correct"]})
    out = {}
    for source, variants in groups.items():
        original = [v["correct"] for v in variants if v["perturbation"] == "original"]
        perturbed = [v["correct"] for v in variants if v["perturbation"] != "original"]
        if not original or not perturbed:
            continue
        out[source] = {
            "consistent": float(len({v["semantic_choice"] for v in variants}) == 1),
            "robust": float(all(v["correct"] == 1 for v in variants)),
            "original": float(original[0]),
            "perturbed": float(np.mean(perturbed)),
        }
    return out


def _delta_ci(pre: np.ndarray, post: np.ndarray, settings: BootstrapSettings) -> dict[str, Any]:
    """Baseline and post means, delta with a paired item-bootstrap interval, relative drift; None when empty."""
    if pre.size == 0:
        return {"n": 0, "pre": None, "post": None, "delta": None, "delta_ci_low": None, "delta_ci_high": None,
                "relative_drift": None}
    ci = paired_bootstrap_ci(pre, post, "delta", settings.n_resamples, settings.confidence, settings.seed)
    drift = relative_drift(float(pre.mean()), float(post.mean()))
    return {"n": int(pre.size), "pre": float(pre.mean()), "post": float(post.mean()), "delta": ci.estimate,
            "delta_ci_low": ci.low, "delta_ci_high": ci.high,
            "relative_drift": None if math.isnan(drift) else float(drift)}


def _cell_consistency(study: Study, cell_id: str) -> dict[str, dict[str, dict[str, float]]]:
    records = study.rows("SELECT benchmark, item_id, correct, extra FROM records WHERE cell_id = ? AND family = ? "
                         "AND correct IS NOT NULL ORDER BY benchmark, item_id", [cell_id, ROBUSTNESS_FAMILY])
    by_benchmark: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_benchmark.setdefault(record["benchmark"], []).append(record)
    return {bench: item_consistency(rows) for bench, rows in by_benchmark.items()}


def robustness_table(study: Study, settings: BootstrapSettings = BootstrapSettings()) -> list[dict[str, Any]]:
    """Per cell (baselines too) and robustness benchmark: consistency, robust accuracy, original vs perturbed
    accuracy; post-trained cells add the baseline's consistency on the same base items and the delta with its CI."""
    consistency = {cell.cell_id: _cell_consistency(study, cell.cell_id) for cell in study.cells}
    rows = []
    for cell in study.cells:
        baseline = None if cell.is_baseline else consistency[study.baselines[cell.baseline_key].cell_id]
        for benchmark, items in sorted(consistency[cell.cell_id].items()):
            row: dict[str, Any] = {**cell.meta(), "benchmark": benchmark, "n_items": len(items)}
            for name in ("consistent", "robust", "original", "perturbed"):
                row[name] = float(np.mean([v[name] for v in items.values()])) if items else None
            if baseline is not None:
                shared = sorted(set(items) & set(baseline.get(benchmark, {})))
                pre = np.array([baseline[benchmark][s]["consistent"] for s in shared])
                post = np.array([items[s]["consistent"] for s in shared])
                paired = _delta_ci(pre, post, settings)
                row.update(n_paired=paired["n"], baseline_consistent=paired["pre"],
                           consistency_delta=paired["delta"], consistency_ci_low=paired["delta_ci_low"],
                           consistency_ci_high=paired["delta_ci_high"])
            rows.append(row)
    return rows


def _style_pairs(study: Study, cell_id: str, baseline_id: str) -> list[tuple[str, str]]:
    return [(r["pre"], r["post"]) for r in study.rows(
        "SELECT pre.output AS pre, post.output AS post FROM records pre JOIN records post "
        "ON post.benchmark = pre.benchmark AND post.item_id = pre.item_id "
        "WHERE pre.cell_id = ? AND post.cell_id = ? AND pre.family = ? "
        "AND pre.output IS NOT NULL AND post.output IS NOT NULL ORDER BY pre.benchmark, pre.item_id",
        [baseline_id, cell_id, STYLE_FAMILY])]


def style_drift_table(study: Study, settings: BootstrapSettings = BootstrapSettings()) -> list[dict[str, Any]]:
    """Per post-trained cell and style feature: baseline and post means over paired neutral-prompt responses, the
    delta with its paired item-bootstrap interval and the relative drift (post - pre) / pre."""
    rows = []
    for cell in study.post_cells:
        pairs = _style_pairs(study, cell.cell_id, study.baselines[cell.baseline_key].cell_id)
        if not pairs:
            continue
        pre_features = [style_features(pre) for pre, _ in pairs]
        post_features = [style_features(post) for _, post in pairs]
        for feature in STYLE_FEATURES:
            pre = np.array([f[feature] for f in pre_features])
            post = np.array([f[feature] for f in post_features])
            rows.append({**cell.meta(), "feature": feature, **_delta_ci(pre, post, settings)})
    return rows


def _off_target_family_values(study: Study, cell_id: str, families: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    placeholders = ", ".join("?" for _ in families)
    data = study.arrays(
        f"SELECT pre_value, post_value FROM paired WHERE cell_id = ? AND family IN ({placeholders}) AND is_binary "
        f"AND {OFF_TARGET_SQL} AND pre_value IS NOT NULL AND post_value IS NOT NULL ORDER BY benchmark, item_id",
        [cell_id, *families])
    return data["pre_value"].astype(np.float64), data["post_value"].astype(np.float64)


def captrack_table(
    study: Study, style_rows: Sequence[Mapping[str, Any]], settings: BootstrapSettings = BootstrapSettings()
) -> list[dict[str, Any]]:
    """Per post-trained cell, one row per CapTrack dimension (CAPTRACK_DIMENSIONS): n, baseline, post, delta with
    CI and relative drift; default behaviour carries only `relative_drift` = -mean |relative drift| of the style
    features with a finite drift, and n = paired responses."""
    rows = []
    for cell in study.post_cells:
        for dimension, families in CAPTRACK_DIMENSIONS.items():
            row: dict[str, Any] = {**cell.meta(), "dimension": dimension}
            if dimension == "robustness":
                consistency = _cell_consistency(study, cell.cell_id)
                baseline = _cell_consistency(study, study.baselines[cell.baseline_key].cell_id)
                pre, post = [], []
                for benchmark, items in consistency.items():
                    for source in sorted(set(items) & set(baseline.get(benchmark, {}))):
                        pre.append(baseline[benchmark][source]["consistent"])
                        post.append(items[source]["consistent"])
                row.update(_delta_ci(np.array(pre), np.array(post), settings))
            elif dimension == "default_behaviour":
                drifts = [abs(r["relative_drift"]) for r in style_rows
                          if r["cell_id"] == cell.cell_id and r["relative_drift"] is not None]
                n = max((r["n"] for r in style_rows if r["cell_id"] == cell.cell_id), default=0)
                row.update(n=n, pre=None, post=None, delta=None, delta_ci_low=None, delta_ci_high=None,
                           relative_drift=-float(np.mean(drifts)) if drifts else None)
            else:
                row.update(_delta_ci(*_off_target_family_values(study, cell.cell_id, families), settings))
            rows.append(row)
    return rows
