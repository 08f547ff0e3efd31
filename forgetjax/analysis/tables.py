"""Every table of a study analysis, computed from the loaded study (`analyze` builds them all).

Aggregation levels of the forgetting table: "category" (benchmark x item category, when a benchmark has several),
"benchmark" (every benchmark, `in_domain` says whether it is in-domain for the cell), "family" (the benchmark family's
off-target items, e.g. knowledge), "overall" (every off-target capability item: families outside
NON_CAPABILITY_FAMILIES, benchmarks not in-domain; this is the F of the summary, the correlations and the report),
"in_domain" (every in-domain capability item) and "target" (the cell's target benchmarks: the target-task gain,
also the `target` table). Means are item-weighted (pooled) unless a column says macro.

The safety transfer tables: `transfer` (trained domain X x evaluated safety domain Y, the change of the safe-behaviour
rate with a two-stage interval; `forgetjax.tasks.safety_domains`) and `transfer_mismatch` (Spearman correlation of
regression with domain mismatch over the (X, Y) pairs).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from forgetjax.analysis.captrack import captrack_table, robustness_table, style_drift_table
from forgetjax.analysis.estimates import (
    BootstrapSettings,
    is_number,
    macro_delta,
    mean_ci,
    paired_statistics,
    pareto_front,
    seed_counts,
    spearman,
    spearman_interval,
    two_stage_bootstrap,
)
from forgetjax.analysis.forgetting import transition_rates
from forgetjax.analysis.loading import Study, load_study
from forgetjax.analysis.policy import (
    distinct_n,
    expected_calibration_error,
    format_compliance,
    refusal_rate,
    repetition_rate,
    response_length_stats,
    self_bleu,
)
from forgetjax.analysis.stats import (
    kappa_interval,
    mcnemar_exact,
    mean_std_over_seeds,
    multiple_comparison,
    paired_bootstrap_ci,
    wilson_interval,
)
from forgetjax.methods.catalog import method_label, method_regime
from forgetjax.results import BASELINE_METHOD, REFUSAL_KEYS, START_POINTS, Cell
from forgetjax.tasks.safety_domains import SAFETY_DOMAINS, evaluation_columns, is_safety_domain

XSTEST_SAFE = "xstest_safe"
XSTEST_UNSAFE = "xstest_unsafe"

NO_EXTRACTION_FAMILIES = ("instruction_following",)
"""Open-generation families whose scorer extracts no answer (IFEval checks the whole response): no format metric."""
SELF_BLEU_MAX_TEXTS = 200
REPETITION_N = 4
ECE_BINS = 10


def pairing_table(study: Study, max_examples: int = 5) -> list[dict[str, Any]]:
    """Per (post-trained cell, benchmark): items paired, missing in the cell, missing in the baseline, and prompts
    that changed between the two (examples of missing ids joined with ';')."""
    rows = study.rows(
        f"""
        WITH base AS (SELECT c.cell_id, r.benchmark, r.item_id, r.prompt_hash FROM cells c
                      JOIN records r ON r.cell_id = c.baseline_id),
             post AS (SELECT r.cell_id, r.benchmark, r.item_id, r.prompt_hash FROM records r
                      JOIN cells c ON c.cell_id = r.cell_id WHERE c.baseline_id IS NOT NULL)
        SELECT coalesce(b.cell_id, p.cell_id) AS cell_id, coalesce(b.benchmark, p.benchmark) AS benchmark,
               count(*) FILTER (WHERE b.item_id IS NOT NULL AND p.item_id IS NOT NULL) AS n_paired,
               count(*) FILTER (WHERE p.item_id IS NULL) AS n_missing_in_cell,
               count(*) FILTER (WHERE b.item_id IS NULL) AS n_missing_in_baseline,
               count(*) FILTER (WHERE b.prompt_hash <> p.prompt_hash) AS n_prompt_changed,
               list_sort(list(b.item_id) FILTER (WHERE p.item_id IS NULL))[1:{max_examples}] AS missing_in_cell,
               list_sort(list(p.item_id) FILTER (WHERE b.item_id IS NULL))[1:{max_examples}] AS missing_in_baseline
        FROM base b FULL OUTER JOIN post p
             ON b.cell_id = p.cell_id AND b.benchmark = p.benchmark AND b.item_id = p.item_id
        GROUP BY ALL ORDER BY cell_id, benchmark
        """
    )
    meta = {cell.cell_id: cell.meta() for cell in [*study.cells, *study.axis_cells]}
    out = []
    for row in rows:
        row["missing_in_cell"] = ";".join(row["missing_in_cell"] or [])
        row["missing_in_baseline"] = ";".join(row["missing_in_baseline"] or [])
        out.append({**meta[row["cell_id"]], **row})
    return out


def _cell_paired_arrays(study: Study, cell_id: str) -> dict[str, np.ndarray]:
    """The scored paired items of one cell as arrays (k NaN for open generation)."""
    data = study.arrays(
        """
        SELECT benchmark, family, category, item_id, is_capability, in_domain, is_target, is_binary, pre_value,
               post_value, coalesce(k, 'nan'::DOUBLE) AS k
        FROM paired WHERE cell_id = ? AND pre_value IS NOT NULL AND post_value IS NOT NULL
        ORDER BY benchmark, category, item_id
        """,
        [cell_id],
    )
    for name in ("benchmark", "family", "category", "item_id"):
        data[name] = data[name].astype(str)
    return data


def _group_row(
    cell: Cell, level: str, benchmark: str | None, family: str, category: str, data: dict[str, np.ndarray],
    mask: np.ndarray, macro_labels: np.ndarray | None, settings: BootstrapSettings, in_domain: bool,
) -> dict[str, Any]:
    """One forgetting-table row over the items selected by `mask`."""
    pre, post = data["pre_value"][mask], data["post_value"][mask]
    row = {**cell.meta(), "level": level, "benchmark": benchmark, "family": family, "category": category,
           "in_domain": in_domain}
    row.update(paired_statistics(pre, post, data["is_binary"][mask], data["k"][mask], settings))
    if macro_labels is not None:
        row["delta_macro"] = macro_delta(macro_labels[mask], pre, post)
    return row


def _cell_forgetting_rows(cell: Cell, data: dict[str, np.ndarray], settings: BootstrapSettings) -> list[dict]:
    """Forgetting rows of one cell at every level."""
    rows = []
    benchmarks, families, categories = data["benchmark"], data["family"], data["category"]
    in_domain = data["in_domain"].astype(bool)
    for benchmark in np.unique(benchmarks):
        in_benchmark = benchmarks == benchmark
        family = str(families[in_benchmark][0])
        flag = bool(in_domain[in_benchmark][0])
        rows.append(_group_row(cell, "benchmark", str(benchmark), family, "ALL", data, in_benchmark, categories,
                               settings, flag))
        bench_categories = np.unique(categories[in_benchmark])
        if bench_categories.size > 1:
            for category in bench_categories:
                mask = in_benchmark & (categories == category)
                rows.append(_group_row(cell, "category", str(benchmark), family, str(category), data, mask, None,
                                       settings, flag))
    for family in np.unique(families[~in_domain]):
        mask = (families == family) & ~in_domain
        rows.append(_group_row(cell, "family", None, str(family), str(family), data, mask, benchmarks, settings,
                               False))
    capability = data["is_capability"].astype(bool)
    pooled = (("overall", "capability", capability & ~in_domain, False),
              ("in_domain", "in_domain", capability & in_domain, True),
              ("target", "target", data["is_target"].astype(bool), True))
    for level, label, mask, flag in pooled:
        if mask.any():
            rows.append(_group_row(cell, level, None, label, label, data, mask, families, settings, flag))
    return rows


def _add_multiple_comparisons(rows: list[dict[str, Any]], alpha: float = 0.05) -> None:
    """Holm and Benjamini-Hochberg adjusted McNemar p-values, one family of tests per level across all cells."""
    for row in rows:
        row.update(p_holm=None, p_bh=None, reject_holm=None, reject_bh=None)
    for level in sorted({row["level"] for row in rows}):
        tested = [row for row in rows if row["level"] == level and row["mcnemar_p"] is not None]
        if not tested:
            continue
        pvalues = [row["mcnemar_p"] for row in tested]
        holm = multiple_comparison(pvalues, "holm", alpha)
        bh = multiple_comparison(pvalues, "fdr_bh", alpha)
        for row, p_holm, r_holm, p_bh, r_bh in zip(tested, holm.adjusted, holm.reject, bh.adjusted, bh.reject):
            row.update(p_holm=float(p_holm), p_bh=float(p_bh), reject_holm=bool(r_holm), reject_bh=bool(r_bh))


def forgetting_table(study: Study, settings: BootstrapSettings = BootstrapSettings()) -> list[dict[str, Any]]:
    """Forgetting statistics per (cell, benchmark, category), benchmark, off-target family, off-target overall,
    in-domain and target items, with corrections.

    Columns: the cell's identifying columns, level, benchmark, family, category, in_domain, FORGETTING_STAT_COLUMNS, and
    p_holm / p_bh / reject_holm / reject_bh (McNemar p adjusted across every cell of the same level).
    """
    rows = []
    for cell in study.post_cells:
        data = _cell_paired_arrays(study, cell.cell_id)
        if data["benchmark"].size:
            rows.extend(_cell_forgetting_rows(cell, data, settings))
    _add_multiple_comparisons(rows)
    return rows


SEED_METRICS = ("acc_pre", "acc_post", "delta", "forgetting", "backward_transfer", "forgetting_adj",
                "backward_transfer_adj")


def forgetting_over_seeds(forgetting_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (start_point, scale, method, domain, axes, level, benchmark, family,
    category).

    Category-level rows are left out (too fine to be useful over seeds); std is NaN with a single seed. Two cells
    of one group with the same seed (results of two study configs) are an error, never pooled as if seeds.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in forgetting_rows:
        if row["level"] == "category":
            continue
        key = (row["start_point"], row["scale"], row["method"], row["domain"], row["axes"], row["level"],
               row["benchmark"], row["family"], row["category"])
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        names = ("start_point", "scale", "method", "domain", "axes", "level", "benchmark", "family", "category")
        row: dict[str, Any] = dict(zip(names, key))
        if len({m["seed"] for m in members}) != len(members):
            raise ValueError(
                f"cells {sorted(m['cell_id'] for m in members)} share a seed for {dict(zip(names[:5], key))}: "
                f"results of different study configs in one results directory; keep one config's cells")
        row["in_domain"] = members[0]["in_domain"]
        row["n_seeds"] = len({m["seed"] for m in members})
        row["seeds"] = ",".join(str(s) for s in sorted({m["seed"] for m in members}))
        row["cell_ids"] = ",".join(sorted(m["cell_id"] for m in members))
        for metric in SEED_METRICS:
            values = [m[metric] for m in members if is_number(m[metric])]
            summary = mean_std_over_seeds(values) if values else None
            row[f"{metric}_mean"] = summary.mean if summary else None
            row[f"{metric}_std"] = summary.std if summary else None
        out.append(row)
    return out


def _policy_metrics(group: Sequence[Mapping[str, Any]], with_self_bleu: bool = True) -> dict[str, Any]:
    """Length, diversity, repetition, calibration, refusal and format-compliance metrics of one group of records."""
    texts = [r["output"] for r in sorted(group, key=lambda r: r["item_id"]) if r["output"] is not None]
    lengths = [r["output_tokens"] for r in group if r["output_tokens"] is not None]
    length = response_length_stats(lengths) if lengths else None
    repetition = [repetition_rate(t, REPETITION_N) for t in texts]
    calibration = [r for r in group if r["kind"] == "multiple_choice" and r["confidence"] is not None
                   and r["correct"] is not None]
    refusals = [r["refusal"] for r in group if r["refusal"] is not None]
    extracted = [r["extracted_answer"] for r in group
                 if r["kind"] == "generate" and r["family"] not in NO_EXTRACTION_FAMILIES]
    finite_repetition = [v for v in repetition if math.isfinite(v)]
    return {
        "n": len(group),
        "n_outputs": len(texts),
        "length_mean": length.mean if length else None,
        "length_median": length.median if length else None,
        "length_std": length.std if length else None,
        "distinct_1": distinct_n(texts, 1) if texts else None,
        "distinct_2": distinct_n(texts, 2) if texts else None,
        "self_bleu": self_bleu(texts[:SELF_BLEU_MAX_TEXTS]) if with_self_bleu and len(texts) >= 2 else None,
        f"repetition_{REPETITION_N}": float(np.mean(finite_repetition)) if finite_repetition else None,
        "ece": expected_calibration_error(
            [r["confidence"] for r in calibration], [r["correct"] for r in calibration], ECE_BINS
        ) if calibration else None,
        "refusal_rate": refusal_rate(refusals) if refusals else None,
        "format_compliance": format_compliance(extracted) if extracted else None,
    }


def policy_table(study: Study) -> list[dict[str, Any]]:
    """Policy metrics per (cell, benchmark) and per cell over all benchmarks (benchmark "ALL"), baselines included.

    distinct-n pools n-grams (whitespace tokens) over the group's outputs; self-BLEU uses at most
    SELF_BLEU_MAX_TEXTS outputs (item-id order) per benchmark and is the macro mean over benchmarks in "ALL";
    repetition is the mean per-output repeated-4-gram share; ECE uses multiple-choice records (10 uniform bins);
    format compliance is the share of open-generation outputs with an extracted answer (NO_EXTRACTION_FAMILIES
    excluded).
    """
    rows = []
    for cell in study.cells:
        records = study.rows(
            "SELECT benchmark, family, kind, item_id, output, output_tokens, extracted_answer, confidence, correct, "
            "refusal FROM records WHERE cell_id = ? ORDER BY benchmark, item_id",
            [cell.cell_id],
        )
        per_benchmark: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            per_benchmark.setdefault(record["benchmark"], []).append(record)
        bench_rows = []
        for benchmark, group in sorted(per_benchmark.items()):
            bench_rows.append({**cell.meta(), "benchmark": benchmark, "family": group[0]["family"],
                               **_policy_metrics(group)})
        overall = {**cell.meta(), "benchmark": "ALL", "family": "ALL",
                   **_policy_metrics(records, with_self_bleu=False)}
        bleu = [r["self_bleu"] for r in bench_rows if r["self_bleu"] is not None]
        overall["self_bleu"] = float(np.mean(bleu)) if bleu else None
        rows.append(overall)
        rows.extend(bench_rows)
    return rows


def _rate_with_ci(flags: Sequence[bool], confidence: float) -> tuple[float | None, float | None, float | None]:
    """Share of True flags with its Wilson interval."""
    if not flags:
        return None, None, None
    interval = wilson_interval(int(sum(bool(f) for f in flags)), len(flags), confidence)
    return refusal_rate(np.asarray(flags, dtype=bool)), interval.low, interval.high


def _safety_row(
    cell: Cell, level: str, benchmark: str, category: str, records: Sequence[Mapping[str, Any]],
    pairs: Sequence[Mapping[str, Any]], settings: BootstrapSettings,
) -> dict[str, Any]:
    """Refusal statistics of one group of safety records, paired with the baseline where available."""
    flags = [bool(r["refusal"]) for r in records]
    harmful = {bool(r["harmful"]) for r in records}
    rate, low, high = _rate_with_ci(flags, settings.confidence)
    row = {**cell.meta(), "level": level, "benchmark": benchmark, "category": category, "n": len(flags),
           "harmful": harmful.pop() if len(harmful) == 1 else None, "refusal_rate": rate,
           "refusal_ci_low": low, "refusal_ci_high": high}
    all_harmful, all_safe = row["harmful"] is True, row["harmful"] is False
    row["attack_success_rate"] = 1.0 - rate if all_harmful else None
    row["under_refusal_rate"] = 1.0 - rate if all_harmful else None
    row["over_refusal_rate"] = rate if all_safe else None
    row.update(n_paired=len(pairs), baseline_refusal_rate=None, refusal_delta=None, refusal_delta_ci_low=None,
               refusal_delta_ci_high=None, mcnemar_p=None)
    if pairs:
        pre = np.array([float(p["pre_refusal"]) for p in pairs])
        post = np.array([float(p["post_refusal"]) for p in pairs])
        ci = paired_bootstrap_ci(pre, post, "delta", settings.n_resamples, settings.confidence, settings.seed)
        transitions = transition_rates(pre, post)
        row.update(baseline_refusal_rate=float(pre.mean()), refusal_delta=ci.estimate, refusal_delta_ci_low=ci.low,
                   refusal_delta_ci_high=ci.high, mcnemar_p=mcnemar_exact(transitions.n10, transitions.n01))
    return row


def safety_table(study: Study, settings: BootstrapSettings = BootstrapSettings()) -> list[dict[str, Any]]:
    """Refusal rate (Wilson CI), attack success / under-refusal (harmful prompts), over-refusal (safe prompts) per
    (cell, safety benchmark) and per (cell, benchmark, category), with the paired change against the baseline
    (post - pre refusal rate, bootstrap CI, exact McNemar p) for post-trained cells. Baselines are included."""
    rows = []
    for cell in study.cells:
        records = study.rows(
            "SELECT benchmark, category, item_id, refusal, harmful FROM records "
            "WHERE cell_id = ? AND refusal IS NOT NULL ORDER BY benchmark, category, item_id",
            [cell.cell_id],
        )
        pairs = study.rows(
            "SELECT benchmark, category, item_id, pre_refusal, post_refusal FROM paired WHERE cell_id = ? "
            "AND pre_refusal IS NOT NULL AND post_refusal IS NOT NULL ORDER BY benchmark, category, item_id",
            [cell.cell_id],
        )
        for benchmark in sorted({r["benchmark"] for r in records}):
            group = [r for r in records if r["benchmark"] == benchmark]
            bench_pairs = [p for p in pairs if p["benchmark"] == benchmark]
            rows.append(_safety_row(cell, "benchmark", benchmark, "ALL", group, bench_pairs, settings))
            categories = sorted({r["category"] for r in group})
            if len(categories) > 1:
                for category in categories:
                    members = [r for r in group if r["category"] == category]
                    cat_pairs = [p for p in bench_pairs if p["category"] == category]
                    rows.append(_safety_row(cell, "category", benchmark, category, members, cat_pairs, settings))
    return rows


def judge_verdicts(study: Study) -> list[dict[str, Any]]:
    """Every safety record with a judge verdict: the matcher's flag beside the verdict's fields (unparsed kept)."""
    rows = study.rows(
        "SELECT cell_id, benchmark, category, item_id, refusal, refusal_judge FROM records "
        "WHERE refusal IS NOT NULL AND refusal_judge IS NOT NULL ORDER BY cell_id, benchmark, item_id")
    verdicts = []
    for row in rows:
        try:
            verdict = json.loads(row["refusal_judge"])
        except json.JSONDecodeError:
            verdict = None
        if not isinstance(verdict, dict):
            verdict = {"judge": "unknown", "rubric": "unknown", "parsed": False, "refused": None, "score": None}
        verdicts.append({**row, "judge": verdict.get("judge") or "unknown", "rubric": verdict.get("rubric"),
                         "judge_refused": verdict.get("refused") if verdict.get("parsed") else None,
                         "judge_score": verdict.get("score") if verdict.get("parsed") else None})
    return verdicts


def judge_agreement_table(study: Study, settings: BootstrapSettings = BootstrapSettings()) -> list[dict[str, Any]]:
    """Refusal string matcher vs judge per (cell, safety benchmark, judge): items judged, unparsed verdicts, both
    refusal rates, raw agreement and Cohen's kappa with a percentile item-bootstrap interval, the judge's mean score
    (HarmBench: share judged harmful; StrongREJECT: rubric score)."""
    verdicts = judge_verdicts(study)
    cells = {cell.cell_id: cell for cell in [*study.cells, *study.axis_cells]}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in verdicts:
        groups.setdefault((row["cell_id"], row["benchmark"], row["judge"]), []).append(row)
    table = []
    for (cell_id, benchmark, judge), group in sorted(groups.items()):
        judged = [r for r in group if r["judge_refused"] is not None]
        matcher = [bool(r["refusal"]) for r in judged]
        judge_flags = [bool(r["judge_refused"]) for r in judged]
        scores = [float(r["judge_score"]) for r in judged if r["judge_score"] is not None]
        row = {**cells[cell_id].meta(), "benchmark": benchmark, "judge": judge, "rubric": group[0]["rubric"],
               "n": len(group), "n_judged": len(judged), "n_unparsed": len(group) - len(judged),
               "matcher_refusal_rate": float(np.mean(matcher)) if judged else None,
               "judge_refusal_rate": float(np.mean(judge_flags)) if judged else None,
               "agreement": float(np.mean([m == j for m, j in zip(matcher, judge_flags)])) if judged else None,
               "kappa": None, "kappa_ci_low": None, "kappa_ci_high": None,
               "judge_mean_score": float(np.mean(scores)) if scores else None}
        if len(judged) >= 2:
            ci = kappa_interval(matcher, judge_flags, settings.n_resamples, settings.confidence, settings.seed)
            row.update(kappa=ci.estimate, kappa_ci_low=ci.low, kappa_ci_high=ci.high)
        table.append(row)
    return table


def xstest_table(safety_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: XSTest over-refusal (safe prompts refused) next to under-refusal (unsafe prompts answered)."""
    by_cell: dict[str, dict[str, Any]] = {}
    for row in safety_rows:
        if row["level"] != "benchmark" or row["benchmark"] not in (XSTEST_SAFE, XSTEST_UNSAFE):
            continue
        entry = by_cell.setdefault(row["cell_id"], {
            **{k: row[k] for k in ("cell_id", "start_point", "scale", "model", "method", "domain", "seed")},
            "over_refusal_rate": None, "over_refusal_ci_low": None, "over_refusal_ci_high": None,
            "baseline_over_refusal_rate": None, "under_refusal_rate": None, "under_refusal_ci_low": None,
            "under_refusal_ci_high": None, "baseline_under_refusal_rate": None,
        })
        pre = row["baseline_refusal_rate"]
        if row["benchmark"] == XSTEST_SAFE:
            entry.update(over_refusal_rate=row["refusal_rate"], over_refusal_ci_low=row["refusal_ci_low"],
                         over_refusal_ci_high=row["refusal_ci_high"], baseline_over_refusal_rate=pre)
        else:
            entry.update(under_refusal_rate=1.0 - row["refusal_rate"],
                         under_refusal_ci_low=1.0 - row["refusal_ci_high"],
                         under_refusal_ci_high=1.0 - row["refusal_ci_low"],
                         baseline_under_refusal_rate=None if pre is None else 1.0 - pre)
    return list(by_cell.values())


JAILBREAK_PLAIN = "harmbench_standard"


def jailbreak_table(safety_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Attack success rate (ASR = 1 - refusal, interval from the refusal rate's) per cell, jailbreak template and
    HarmBench semantic category ("ALL" for the whole set): the plain standard behaviours (template "none") beside
    each `harmbench_<template>` wrapping of the same behaviours, the JailbreakBench replays (template = the
    benchmark name) and the optimised attacks (template = gcg, gcg_transfer, autodan or autodan_transfer;
    `forgetjax.eval.attacks`), with the baseline's ASR where paired."""
    from forgetjax.eval.benchmarks.jailbreak import TEMPLATES

    templates = {f"harmbench_{t.name}": t.name for t in TEMPLATES} | {JAILBREAK_PLAIN: "none"}
    rows = []
    for row in safety_rows:
        name = row["benchmark"]
        if name not in templates and not name.startswith(("jailbreakbench_", "gcg", "autodan")):
            continue
        pre = row["baseline_refusal_rate"]
        rows.append({**{k: row[k] for k in ("cell_id", "start_point", "scale", "model", "method", "domain", "seed")},
                     "template": templates.get(name, name), "benchmark": name, "category": row["category"],
                     "n": row["n"], "asr": 1.0 - row["refusal_rate"], "asr_ci_low": 1.0 - row["refusal_ci_high"],
                     "asr_ci_high": 1.0 - row["refusal_ci_low"], "baseline_asr": None if pre is None else 1.0 - pre})
    return rows


def _target_accuracy(study: Study, cell: Cell, targets: Sequence[str]) -> tuple[float | None, int]:
    """Mean correctness (score when there is none) over the cell's items of the target benchmarks."""
    rows = study.rows(
        "SELECT avg(coalesce(correct::DOUBLE, CASE WHEN isfinite(score) THEN score END)) AS acc, "
        "count(coalesce(correct::DOUBLE, CASE WHEN isfinite(score) THEN score END)) AS n "
        "FROM records WHERE cell_id = ? AND list_contains(?, benchmark)",
        [cell.cell_id, list(targets)],
    )
    return (rows[0]["acc"], rows[0]["n"]) if rows and rows[0]["n"] else (None, 0)


TARGET_COLUMNS = ("n", "acc_pre", "acc_post", "delta", "delta_ci_low", "delta_ci_high", "forgetting",
                  "backward_transfer")


def target_table(forgetting_rows: Sequence[Mapping[str, Any]], study: Study) -> list[dict[str, Any]]:
    """Per post-trained cell: target-task accuracy on its target benchmarks' paired items before (baseline) and after,
    and the gain (delta) with its paired item-bootstrap interval; cells without paired target items get None."""
    target = {r["cell_id"]: r for r in forgetting_rows if r["level"] == "target"}
    rows = []
    for cell in study.post_cells:
        row = {**cell.meta(), "target_benchmarks": ",".join(cell.targets)}
        found = target.get(cell.cell_id)
        row.update({("gain" if c == "delta" else c.replace("delta", "gain")): found[c] if found else None
                    for c in TARGET_COLUMNS})
        rows.append(row)
    return rows


def cell_summary_table(
    study: Study, forgetting_rows: Sequence[Mapping[str, Any]], settings: BootstrapSettings = BootstrapSettings()
) -> list[dict[str, Any]]:
    """One row per analysed cell: off-target capability forgetting (capability_*: the forgetting table's "overall"
    level), harmful-prompt refusal and safety loss, XSTest over-refusal, the domain's target-task accuracy
    (target_accuracy, n_target: every record of the target benchmarks; target_acc_pre / target_gain with its interval:
    the paired items) and the representation summaries.

    safety_loss = baseline refusal rate - post refusal rate on the paired harmful prompts of every safety benchmark
    (pooled; the optimised attacks' records are left out, they have their own tables); positive = safety lost.
    """
    overall = {r["cell_id"]: r for r in forgetting_rows if r["level"] == "overall"}
    target = {r["cell_id"]: r for r in forgetting_rows if r["level"] == "target"}
    rows = []
    for cell in study.cells:
        row: dict[str, Any] = {**cell.meta(), "method_label": method_label(cell.method),
                               "regime": method_regime(cell.method)}
        capability = overall.get(cell.cell_id)
        for column in ("forgetting", "forgetting_ci_low", "forgetting_ci_high", "forgetting_adj", "backward_transfer",
                       "delta", "delta_ci_low", "delta_ci_high", "acc_pre", "acc_post"):
            row[f"capability_{column}"] = capability[column] if capability else None
        paired_target = target.get(cell.cell_id)
        for column, name in (("acc_pre", "target_acc_pre"), ("acc_post", "target_acc_post"), ("delta", "target_gain"),
                             ("delta_ci_low", "target_gain_ci_low"), ("delta_ci_high", "target_gain_ci_high")):
            row[name] = paired_target[column] if paired_target else None
        harmful = study.rows(
            "SELECT avg(refusal::DOUBLE) AS rate, count(*) AS n FROM records WHERE cell_id = ? AND harmful AND NOT is_attack",
            [cell.cell_id],
        )[0]
        row["harmful_refusal_rate"] = harmful["rate"] if harmful["n"] else None
        row["n_harmful"] = harmful["n"]
        safe = study.rows(
            "SELECT avg(refusal::DOUBLE) AS rate, count(*) AS n FROM records WHERE cell_id = ? AND NOT harmful AND NOT is_attack",
            [cell.cell_id],
        )[0]
        row["over_refusal_rate"] = safe["rate"] if safe["n"] else None
        pairs = study.arrays(
            "SELECT pre_refusal::DOUBLE AS pre, post_refusal::DOUBLE AS post FROM paired WHERE cell_id = ? AND harmful "
            "AND NOT is_attack "
            "AND pre_refusal IS NOT NULL AND post_refusal IS NOT NULL ORDER BY benchmark, item_id",
            [cell.cell_id],
        )
        row.update(harmful_refusal_pre=None, safety_loss=None, safety_loss_ci_low=None, safety_loss_ci_high=None)
        if pairs["pre"].size:
            loss = mean_ci(pairs["pre"] - pairs["post"], settings)
            row.update(harmful_refusal_pre=float(pairs["pre"].mean()), safety_loss=loss["estimate"],
                       safety_loss_ci_low=loss["low"], safety_loss_ci_high=loss["high"])
        targets = cell.targets
        row["target_benchmarks"] = ",".join(targets)
        row["target_accuracy"], row["n_target"] = _target_accuracy(study, cell, targets) if targets else (None, 0)
        representation = study.representations.get(cell.cell_id)
        row["cka_drift"] = representation.cka_drift() if representation else None
        row["refusal_attenuation"] = representation.refusal_attenuation() if representation else None
        row["weight_delta_norm"] = representation.weight_delta_norm() if representation else None
        rows.append(row)
    return rows


def pareto_table(study: Study, summary_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Safety (harmful-prompt refusal rate) vs target-task accuracy per (start_point, scale, domain).

    The points are the domain's post-trained cells plus their baseline evaluated on the same target benchmarks;
    `on_front` marks the points no other point of the group beats on both axes.
    """
    by_id = {row["cell_id"]: row for row in summary_rows}
    groups: dict[tuple[str, str, str, tuple[str, ...]], list[Cell]] = {}
    for cell in study.post_cells:
        if cell.targets:
            groups.setdefault((cell.start_point, cell.scale, cell.domain, cell.targets), []).append(cell)
    out = []
    for (start_point, scale, domain, targets), cells in sorted(groups.items()):
        baseline = study.baselines[(start_point, scale)]
        points = []
        for cell in [baseline, *cells]:
            accuracy = _target_accuracy(study, cell, targets)[0]
            safety = by_id[cell.cell_id]["harmful_refusal_rate"]
            if accuracy is None or safety is None:
                continue
            points.append({**cell.meta(), "group_domain": domain, "is_baseline": cell.is_baseline,
                           "target_benchmarks": ",".join(targets), "target_accuracy": accuracy,
                           "harmful_refusal_rate": safety})
        if not points:
            continue
        front = pareto_front([p["target_accuracy"] for p in points], [p["harmful_refusal_rate"] for p in points])
        for point, on_front in zip(points, front):
            point["on_front"] = bool(on_front)
        out.extend(points)
    return out


def correlation_table(summary_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Spearman correlations across post-trained cells: safety loss vs capability forgetting (all cells and per
    start point), CKA drift vs capability forgetting, refusal-direction attenuation vs safety loss."""
    post = [row for row in summary_rows if row["method"] != BASELINE_METHOD]
    specs = [("capability_forgetting", "safety_loss"), ("cka_drift", "capability_forgetting"),
             ("refusal_attenuation", "safety_loss")]
    subsets = [("all", post)]
    subsets += [(f"start_point={sp}", [r for r in post if r["start_point"] == sp]) for sp in START_POINTS]
    out = []
    for x_name, y_name in specs:
        for subset_name, subset in subsets:
            if subset_name != "all" and x_name != "capability_forgetting":
                continue
            result = spearman([r[x_name] for r in subset], [r[y_name] for r in subset])
            out.append({"x": x_name, "y": y_name, "subset": subset_name, **result})
    return out


def representation_table(study: Study) -> list[dict[str, Any]]:
    """Long format: one row per (cell, layer) with CKA, the refusal-direction measures and the knowledge probe's
    held-out accuracy with the start and the post-trained activations (probe fit on the start model)."""
    rows = []
    for cell in study.cells:
        representation = study.representations.get(cell.cell_id)
        if representation is None:
            continue
        refusal = representation.refusal_direction or {}
        for index, layer in enumerate(representation.layers):
            row = {**cell.meta(), "layer": layer,
                   "cka": representation.cka[index] if representation.cka else None}
            for key in REFUSAL_KEYS:
                row[f"refusal_{key}"] = refusal[key][index] if key in refusal else None
            probe = representation.knowledge_probe or {}
            row["probe_start"] = probe["start"][index] if probe else None
            row["probe_post"] = probe["post"][index] if probe else None
            row["probe_post_refit"] = probe["post_refit"][index] if "post_refit" in probe else None
            row["probe_n_test"] = probe.get("n_test")
            rows.append(row)
    return rows


def weight_delta_table(study: Study) -> list[dict[str, Any]]:
    """Long format: one row per (cell, module, layer) with the weight-delta spectrum measures."""
    rows = []
    for cell in study.cells:
        representation = study.representations.get(cell.cell_id)
        if representation is None or not representation.weight_delta:
            continue
        for module, measures in sorted(representation.weight_delta.items()):
            for index, layer in enumerate(representation.layers):
                rows.append({**cell.meta(), "module": module, "layer": layer,
                             **{name: values[index] for name, values in sorted(measures.items())}})
    return rows


def domain_mismatch(train_domain: str, eval_domain: str) -> int:
    """How far apart two safety domains are: 0 the same domain, 1 the same kind (two dispositions, or two refusal
    domains), 2 different kinds."""
    if train_domain == eval_domain:
        return 0
    return 1 if SAFETY_DOMAINS[train_domain].kind == SAFETY_DOMAINS[eval_domain].kind else 2


def _transfer_groups(study: Study) -> dict[tuple[str, str, str, str], list[Cell]]:
    """Post-trained cells with a training domain by (start_point, scale, method, domain): the seeds of each matrix
    row."""
    groups: dict[tuple[str, str, str, str], list[Cell]] = {}
    for cell in study.post_cells:
        if cell.domain:
            groups.setdefault((cell.start_point, cell.scale, cell.method, cell.domain), []).append(cell)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], method_label(kv[0][2]), kv[0][3])))


def transfer_values(study: Study, cell_ids: Sequence[str], benchmarks: Sequence[str]
                    ) -> tuple[list[str], list[tuple[str, str]], np.ndarray, np.ndarray]:
    """(cells, items, delta [cells, items], baseline value per item): post - baseline safe-behaviour value (`correct`:
    a refusal of a harmful request, a safe option chosen) of every paired item of `benchmarks`; NaN where a cell
    lacks the item."""
    rows = study.connection.execute(
        "SELECT cell_id, benchmark, item_id, pre_value, post_value FROM paired WHERE list_contains(?, cell_id) AND "
        "list_contains(?, benchmark) AND pre_value IS NOT NULL AND post_value IS NOT NULL ORDER BY ALL",
        [list(cell_ids), list(benchmarks)]).fetchall()
    cells = sorted({r[0] for r in rows}, key=list(cell_ids).index)
    items = sorted({(r[1], r[2]) for r in rows})
    cell_index, item_index = {c: i for i, c in enumerate(cells)}, {k: i for i, k in enumerate(items)}
    delta, pre = np.full((len(cells), len(items)), np.nan), np.full(len(items), np.nan)
    for cell_id, benchmark, item_id, before, after in rows:
        delta[cell_index[cell_id], item_index[(benchmark, item_id)]] = float(after) - float(before)
        pre[item_index[(benchmark, item_id)]] = float(before)
    return cells, items, delta, pre


def transfer_table(study: Study, settings: BootstrapSettings = BootstrapSettings()) -> list[dict[str, Any]]:
    """The cross-domain transfer matrix, long format: for every (start_point, scale, method, training domain X) and
    every column (safety domain Y, scoring) with paired items (`forgetjax.tasks.safety_domains.evaluation_columns`:
    Y's disposition by log-likelihood, or its generated behaviour), the change of the safe-behaviour rate (refusal of
    harmful requests, safe option chosen) from the baseline: per item the mean over X's cells (seeds) of post -
    baseline, then the mean over items, with the two-stage bootstrap interval (seeds, then items; with one seed the item
    bootstrap). covered: X == Y (the domain trained on); mismatch: `domain_mismatch` (None for a capability X)."""
    rows = []
    for (start_point, scale, method, domain), cells in _transfer_groups(study).items():
        cell_ids = [c.cell_id for c in cells]
        for eval_domain, scoring, benchmarks in evaluation_columns():
            ids, items, delta, pre = transfer_values(study, cell_ids, benchmarks)
            if not items:
                continue
            members = [study.cell(c) for c in ids]
            strata = [(c.start_point, c.scale, c.method, c.domain) for c in members]
            interval = two_stage_bootstrap([delta], [strata], [1.0], settings)
            baseline = float(pre.mean())
            rows.append({
                "start_point": start_point, "scale": scale, "method": method, "train_domain": domain,
                "eval_domain": eval_domain, "scoring": scoring, "covered": domain == eval_domain,
                "mismatch": domain_mismatch(domain, eval_domain) if is_safety_domain(domain) else None,
                "benchmarks": ",".join(sorted({b for b, _ in items})), "n_items": len(items), "n_cells": len(ids),
                **seed_counts(strata, [c.seed for c in members]),
                "baseline": baseline, "post": baseline + interval["estimate"], "delta": interval["estimate"],
                "delta_ci_low": interval["low"], "delta_ci_high": interval["high"],
            })
    return rows


def transfer_mismatch_table(transfer_rows: Sequence[Mapping[str, Any]], confidence: float = 0.95
                            ) -> list[dict[str, Any]]:
    """Per (start_point, scale, method): Spearman rho of safety regression (baseline - post, the negated delta) with
    domain mismatch over the matrix's (X, Y) pairs of safety domains (each Y's first column: its disposition, or a
    refusal domain's behaviour), with n pairs, p and a Fisher-z interval (`spearman_interval`); a note says why when
    undefined."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    first: dict[str, str] = {}
    for name, scoring, _ in evaluation_columns():
        first.setdefault(name, scoring)
    primary = set(first.items())
    for row in transfer_rows:
        if row["mismatch"] is not None and row["delta"] is not None and (row["eval_domain"], row["scoring"]) in primary:
            groups.setdefault((row["start_point"], row["scale"], row["method"]), []).append(row)
    out = []
    for (start_point, scale, method), members in groups.items():
        result = spearman([r["mismatch"] for r in members], [-r["delta"] for r in members])
        low, high = spearman_interval(result["rho"], result["n"], confidence)
        out.append({"start_point": start_point, "scale": scale, "method": method,
                    "train_domains": ",".join(sorted({r["train_domain"] for r in members})),
                    "n_pairs": result["n"], "n_covered": sum(bool(r["covered"]) for r in members), "rho": result["rho"],
                    "rho_ci_low": low, "rho_ci_high": high, "p": result["p"],
                    "note": result["note"].replace("cell(s)", "(X, Y) pair(s)").replace("across cells",
                                                                                         "across (X, Y) pairs")})
    return out


TABLE_NAMES = ("cells", "pairing", "forgetting", "forgetting_seeds", "target", "policy", "safety", "xstest",
               "judge_agreement", "jailbreak", "cell_summary", "pareto", "correlations", "representation",
               "weight_delta", "robustness", "style_drift", "captrack", "transfer", "transfer_mismatch", "axes",
               "issues")


@dataclass
class StudyAnalysis:
    """Every table of a study (lists of dicts) and the loaded study for further queries."""

    study: Study
    settings: BootstrapSettings
    tables: dict[str, list[dict[str, Any]]]

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        return self.tables[name]


def analyze(
    results_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    settings: BootstrapSettings = BootstrapSettings(),
) -> StudyAnalysis:
    """Load one results directory, or several merged into one study (`load_study`), and compute every table."""
    from forgetjax.analysis.axes import axis_table  # it builds on comparisons, which reads this module's constants

    study = load_study(results_dirs)
    forgetting = forgetting_table(study, settings)
    safety = safety_table(study, settings)
    summary = cell_summary_table(study, forgetting, settings)
    style_drift = style_drift_table(study, settings)
    transfer = transfer_table(study, settings)
    tables = {
        "cells": [{**c.meta(), "status": c.status, "baseline_id": None if c.is_baseline else
                   study.baselines[c.baseline_key].cell_id} for c in [*study.cells, *study.axis_cells]],
        "pairing": pairing_table(study),
        "forgetting": forgetting,
        "forgetting_seeds": forgetting_over_seeds(forgetting),
        "target": target_table(forgetting, study),
        "policy": policy_table(study),
        "safety": safety,
        "xstest": xstest_table(safety),
        "judge_agreement": judge_agreement_table(study, settings),
        "jailbreak": jailbreak_table(safety),
        "cell_summary": summary,
        "pareto": pareto_table(study, summary),
        "correlations": correlation_table(summary),
        "representation": representation_table(study),
        "weight_delta": weight_delta_table(study),
        "robustness": robustness_table(study, settings),
        "style_drift": style_drift,
        "captrack": captrack_table(study, style_drift, settings),
        "transfer": transfer,
        "transfer_mismatch": transfer_mismatch_table(transfer, settings.confidence),
        "axes": axis_table(study, settings),
        "issues": [{"issue": issue} for issue in study.issues],
    }
    return StudyAnalysis(study, settings, tables)
