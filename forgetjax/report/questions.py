"""The study's research questions answered as text from the analysis numbers, with their confidence intervals.

Every answer states the estimate, its two-stage bootstrap interval (seeds within each configuration, then items),
how many items and seeds it rests on, and what the interval allows one to claim; with a single seed for a
configuration the interval reflects items only and the answer says it is not a significance claim across seeds.
When the cells needed are missing the answer says "Not enough data: ..." and why, and claims nothing.
Forgetting here is off-target F = share of capability items outside the cell's training domain (benchmarks not
in-domain, `forgetjax.tasks.domains.is_in_domain`) correct at the baseline and wrong after post-training, averaged
per item over the cells of a group (seeds, domains) before averaging over items. The target task (the domain's target
benchmarks) is reported apart as the accuracy gain.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from forgetjax.analysis.axes import axis_groups, axis_names
from forgetjax.analysis.comparisons import (
    POLICY_SHIFT_METRICS,
    compare_groups,
    group_estimate,
    pairwise_differences,
    policy_shift,
    scale_parameters,
    scaling_trend,
)
from forgetjax.analysis.loading import OFF_TARGET_SQL
from forgetjax.analysis.tables import StudyAnalysis
from forgetjax.report.figures import transfer_column_label
from forgetjax.methods.catalog import (
    OFF_POLICY_SFT,
    ON_POLICY,
    SIGNAL_SOURCES,
    method_label,
    method_regime,
    method_source,
)
from forgetjax.results import BASELINE_METHOD, Cell
from forgetjax.study.safety import (OVER_REFUSAL_TARGET, REFUSAL_TARGET, TARGET_HARMFUL, TARGET_SAFE,
                                    start_targets_missed)

QUESTIONS = (
    ("RQ1", "Which post-training method forgets the most / least overall, and is the difference significant?"),
    ("RQ2", "Which capability categories are most fragile under each method?"),
    ("RQ3", "Does forgetting depend on the training domain (math vs code vs QA)?"),
    ("RQ4", "Does starting from a safety-aligned (SAFE) model change what is forgotten, and how much safety is lost?"),
    ("RQ5", "Do on-policy methods (ON-RL, SELF, PI) forget less than off-policy SFT on external data "
            "(GT-SFT, SF/CF-SFT)?"),
    ("RQ6", "Is forgetting visible in representations (CKA drift, refusal-direction attenuation) and does it track "
            "the behavioural forgetting?"),
    ("RQ7", "Does the source of the training signal (ground truth GT, same-family teacher SF, cross-family teacher "
            "CF, the model's own outputs SELF, a reward RL, privileged-information self-teacher PI) change how much "
            "is forgotten? Every pair of sources compared."),
    ("RQ8", "How does forgetting scale with model size?"),
    ("RQ9", "How does each method shape the output policy (length, repetition, answer format, confidence, "
            "refusals), and which shifts it most?"),
    ("RQ10", "What does post-training on one safety domain transfer to the others (toxicity, jailbreaks, deception, "
             "sycophancy, power seeking, corrigibility, self-preservation, coordination), and does safety regress "
             "more the further the evaluated domain is from the trained one?"),
    ("RQ11", "Does each mitigation (LoRA instead of full fine-tuning, weight interpolation towards the start, FRPO's "
             "lambda, the budget, any other study axis) reduce forgetting and safety loss, and at what cost in "
             "target-task accuracy?"),
)
DOMAINS = ("math", "code", "qa")
NOT_ENOUGH = "Not enough data: "


@dataclass(frozen=True)
class Answer:
    """One research question and its generated answer (one paragraph per scope)."""

    key: str
    question: str
    paragraphs: tuple[str, ...]


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def pp(value: float | None) -> str:
    """A difference of shares in signed percentage points."""
    return "n/a" if value is None else f"{100 * value:+.1f} pp"


def with_ci(estimate: Mapping[str, Any], fmt: Callable[[float | None], str], confidence: float) -> str:
    """"12.0% (95% CI 8.0% to 16.0%, n=250 items, 2 seeds)"; a comparison names both sides' seeds."""
    n = estimate.get("n", estimate.get("n_items"))
    value = estimate.get("estimate", estimate.get("difference"))
    if "seeds_a" in estimate:
        seeds = f", {seeds_text(estimate['seeds_a'])} vs {seeds_text(estimate['seeds_b'])}"
    else:
        seeds = f", {seeds_text(estimate)}" if "min_seeds" in estimate else ""
    return (f"{fmt(value)} ({int(round(100 * confidence))}% CI {fmt(estimate['low'])} to {fmt(estimate['high'])}, "
            f"n={n} items{seeds})")


def seeds_text(counts: Mapping[str, Any]) -> str:
    """"2 seeds", "1 seed per configuration x 3 configurations" or "1-3 seeds per configuration, 4 configurations"."""
    low, high, configs = counts["min_seeds"], counts["max_seeds"], counts["n_configs"]
    if configs <= 1:
        return f"{high} seed{'s' if high != 1 else ''}"
    if low == high:
        return f"{low} seed{'s' if low != 1 else ''} per configuration x {configs} configurations"
    return f"{low}-{high} seeds per configuration, {configs} configurations"


SINGLE_SEED = "single seed: not a significance claim across seeds"


def significance(comparison: Mapping[str, Any], confidence: float) -> str:
    """Whether the two-stage bootstrap interval of a difference excludes zero; with a single seed for some
    configuration of either side the interval reflects items only, and the sentence says so."""
    level = int(round(100 * confidence))
    single = min(comparison["seeds_a"]["min_seeds"], comparison["seeds_b"]["min_seeds"]) <= 1
    if single:
        side = "the interval" if comparison["significant"] is None else (
            f"the {level}% interval {'excludes' if comparison['significant'] else 'includes'} zero")
        return f"{side} over items, but some configuration rests on one seed ({SINGLE_SEED})"
    if comparison["significant"]:
        return f"the {level}% interval excludes zero, so the difference is significant at that level"
    return f"the {level}% interval includes zero, so the difference is not significant"


def _scopes(cells: Sequence[Cell]) -> list[tuple[str, str]]:
    return sorted({(c.start_point, c.scale) for c in cells})


def _scope_text(start_point: str, scale: str) -> str:
    return f"[{start_point.upper()} start, {scale}]"


def _ids(cells: Sequence[Cell]) -> list[str]:
    return [c.cell_id for c in cells]


def _by_method(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.method, []).append(cell)
    return dict(sorted(groups.items(), key=lambda kv: method_label(kv[0])))


def _no_cells() -> tuple[str, ...]:
    return (NOT_ENOUGH + "no finished post-trained cell with a finished baseline was found.",)


def _per_scope(answer_scope: Callable[..., str]) -> Callable[[StudyAnalysis], tuple[str, ...]]:
    """An answer made of one paragraph per (start point, scale) of the post-trained cells: `answer_scope(analysis,
    scope_text, start_point, scale, cells_of_that_scope)` writes each paragraph."""
    @functools.wraps(answer_scope)
    def answer(analysis: StudyAnalysis) -> tuple[str, ...]:
        post_cells = analysis.study.post_cells
        if not post_cells:
            return _no_cells()
        return tuple(
            answer_scope(analysis, _scope_text(start_point, scale), start_point, scale,
                         [c for c in post_cells if (c.start_point, c.scale) == (start_point, scale)])
            for start_point, scale in _scopes(post_cells))
    return answer


def _seed_spread(analysis: StudyAnalysis, start_point: str, scale: str, method: str) -> str:
    """"; over seeds: 12.0% ± 3.0% (domain math, 2 seeds)" for configurations with several seeds."""
    parts = []
    for row in analysis["forgetting_seeds"]:
        if (row["level"], row["start_point"], row["scale"], row["method"]) == ("overall", start_point, scale, method) \
                and row["n_seeds"] > 1 and row["forgetting_mean"] is not None:
            parts.append(f"{pct(row['forgetting_mean'])} ± {pct(row['forgetting_std'])} over {row['n_seeds']} seeds "
                         f"(domain {row['domain']})")
    return f"; mean ± std of per-cell F: {', '.join(parts)}" if parts else ""


def target_gain_text(analysis: StudyAnalysis, groups: Mapping[str, Sequence[Cell]]) -> str:
    """" Target-task gain (...): GT-SFT +5.0 pp (95% CI ...); ..." over the groups with paired target items."""
    parts = []
    for label, members in groups.items():
        estimate = group_estimate(analysis.study, _ids(members), "delta", analysis.settings, scope="target")
        if estimate["estimate"] is not None:
            parts.append(f"{label} {with_ci(estimate, pp, analysis.settings.confidence)}")
    if not parts:
        return " Target-task gain: not measured (no paired items of the domains' target benchmarks)."
    return (" Target-task gain (post - baseline accuracy on the training domain's target benchmarks, reported apart "
            f"from F): {'; '.join(parts)}.")


@_per_scope
def answer_rq1(analysis: StudyAnalysis, scope: str, start_point: str, scale: str, cells: list[Cell]) -> str:
    """Rank methods by off-target capability forgetting and test the most vs least forgetting method."""
    study, settings = analysis.study, analysis.settings
    estimates = {}
    for method, members in _by_method(cells).items():
        estimate = group_estimate(study, _ids(members), "forgetting", settings)
        if estimate["estimate"] is not None:
            estimates[method] = (estimate, members)
    if not estimates:
        return f"{scope} {NOT_ENOUGH}no binary off-target capability items are paired with the baseline."
    ranked = sorted(estimates, key=lambda m: estimates[m][0]["estimate"], reverse=True)
    listing = "; ".join(
        f"{method_label(m)} {with_ci(estimates[m][0], pct, settings.confidence)}"
        f"{_seed_spread(analysis, start_point, scale, m)}" for m in ranked
    )
    tested = [r for r in analysis["forgetting"] if r["level"] == "overall" and r["start_point"] == start_point
              and r["scale"] == scale and r["reject_holm"] is not None]
    rejected = sum(1 for r in tested if r["reject_holm"] and r["n10"] > r["n01"])
    holm = (f" Per cell, {rejected} of {len(tested)} cell(s) lose significantly more off-target capability items "
            f"than they gain (exact McNemar within the cell, Holm-corrected across cells).") if tested else ""
    target = target_gain_text(analysis, {method_label(m): members for m, members in _by_method(cells).items()})
    if len(ranked) < 2:
        only = ranked[0]
        return (
            f"{scope} {NOT_ENOUGH}only one post-training method ({method_label(only)}) has results, so no method "
            f"can be ranked against another. Its off-target capability forgetting is F = "
            f"{with_ci(estimates[only][0], pct, settings.confidence)}"
            f"{_seed_spread(analysis, start_point, scale, only)}.{holm}{target}")
    most, least = ranked[0], ranked[-1]
    comparison = compare_groups(study, _ids(estimates[least][1]), _ids(estimates[most][1]), "forgetting", settings)
    return (
        f"{scope} Off-target capability forgetting F (benchmarks outside the training domain) by method: {listing}. "
        f"{method_label(most)} forgets the most and "
        f"{method_label(least)} the least; on the {comparison['n_items']} items both were evaluated on, the "
        f"difference ({method_label(most)} - {method_label(least)}) is "
        f"{with_ci(comparison, pp, settings.confidence)}: {significance(comparison, settings.confidence)}.{holm}"
        f"{target}")


def _capability_families(analysis: StudyAnalysis, cell_ids: Sequence[str]) -> list[str]:
    """Families with binary off-target capability items among the cells' paired items."""
    rows = analysis.study.rows(
        f"SELECT DISTINCT family FROM paired WHERE list_contains(?, cell_id) AND {OFF_TARGET_SQL} AND is_binary "
        "AND pre_value IS NOT NULL AND post_value IS NOT NULL ORDER BY family",
        [list(cell_ids)],
    )
    return [r["family"] for r in rows]


@_per_scope
def answer_rq2(analysis: StudyAnalysis, scope: str, start_point: str, scale: str, cells: list[Cell]) -> str:
    """Per method: the capability family with the highest forgetting (and the runner-up)."""
    study, settings = analysis.study, analysis.settings
    sentences = []
    for method, members in _by_method(cells).items():
        families = _capability_families(analysis, _ids(members))
        if len(families) < 2:
            sentences.append(f"{method_label(method)}: {NOT_ENOUGH.lower()}only {len(families)} capability "
                             f"family with paired binary items ({', '.join(families) or 'none'}), nothing to rank")
            continue
        estimates = {
            f: group_estimate(study, _ids(members), "forgetting", settings, families=[f]) for f in families
        }
        ranked = sorted(families, key=lambda f: estimates[f]["estimate"], reverse=True)
        sentence = (f"{method_label(method)}: most fragile is {ranked[0]} with F = "
                    f"{with_ci(estimates[ranked[0]], pct, settings.confidence)}, then {ranked[1]} with F = "
                    f"{with_ci(estimates[ranked[1]], pct, settings.confidence)}")
        top, second = estimates[ranked[0]], estimates[ranked[1]]
        if top["low"] > second["high"]:
            sentence += " (the intervals do not overlap)"
        else:
            sentence += " (the intervals overlap, so the order of these two is uncertain)"
        sentences.append(sentence)
    return f"{scope} " + "; ".join(sentences) + "."


@_per_scope
def answer_rq3(analysis: StudyAnalysis, scope: str, start_point: str, scale: str, cells: list[Cell]) -> str:
    """Compare forgetting across training domains, using only methods trained in every compared domain."""
    study, settings = analysis.study, analysis.settings
    cells = [c for c in cells if c.domain]
    domains = sorted({c.domain for c in cells})
    absent = [d for d in DOMAINS if d not in domains]
    if len(domains) < 2:
        return (
            f"{scope} {NOT_ENOUGH}only the domain(s) {', '.join(domains) or 'none'} have post-trained cells"
            f"{' (missing: ' + ', '.join(absent) + ')' if absent else ''}; a domain effect needs at least two.")
    methods_per_domain = [{c.method for c in cells if c.domain == d} for d in domains]
    common = sorted(set.intersection(*methods_per_domain), key=method_label)
    if not common:
        return (
            f"{scope} {NOT_ENOUGH}no method was trained in all of {', '.join(domains)}, so domain and method "
            f"effects cannot be separated.")
    groups = {d: [c for c in cells if c.domain == d and c.method in common] for d in domains}
    estimates = {d: group_estimate(study, _ids(groups[d]), "forgetting", settings) for d in domains}
    usable = [d for d in domains if estimates[d]["estimate"] is not None]
    if len(usable) < 2:
        return f"{scope} {NOT_ENOUGH}fewer than two domains have paired binary off-target capability items."
    ranked = sorted(usable, key=lambda d: estimates[d]["estimate"], reverse=True)
    listing = "; ".join(f"{d} {with_ci(estimates[d], pct, settings.confidence)}" for d in ranked)
    comparison = compare_groups(study, _ids(groups[ranked[-1]]), _ids(groups[ranked[0]]), "forgetting", settings)
    missing_text = f" No cells for {', '.join(absent)}, so those domains are not compared." if absent else ""
    return (
        f"{scope} Using the method(s) trained in every domain ({', '.join(method_label(m) for m in common)}), "
        f"off-target capability forgetting (each domain's own benchmarks left out) by training domain is: {listing}. "
        f"Training on {ranked[0]} forgets more than on {ranked[-1]} by {with_ci(comparison, pp, settings.confidence)}"
        f": {significance(comparison, settings.confidence)}.{missing_text}"
        f"{target_gain_text(analysis, {d: groups[d] for d in usable})}")


def _safety_loss_text(analysis: StudyAnalysis, cells: Sequence[Cell], label: str) -> str:
    """Pooled and per-method loss of refusal on harmful prompts for a set of cells."""
    study, settings = analysis.study, analysis.settings
    pooled = group_estimate(study, _ids(cells), "refusal_drop", settings)
    if pooled["estimate"] is None:
        return f"{NOT_ENOUGH}the {label} cells have no harmful-prompt safety records paired with their baseline."
    per_method = []
    for method, members in _by_method(cells).items():
        estimate = group_estimate(study, _ids(members), "refusal_drop", settings)
        if estimate["estimate"] is not None:
            per_method.append(f"{method_label(method)} {with_ci(estimate, pp, settings.confidence)}")
    if pooled["min_seeds"] <= 1:
        verdict = (f"the interval {'excludes' if pooled['low'] > 0 or pooled['high'] < 0 else 'includes'} zero over "
                   f"items, but some configuration rests on one seed ({SINGLE_SEED})")
    elif pooled["low"] > 0:
        verdict = "a significant loss of safety"
    elif pooled["high"] < 0:
        verdict = "a significant gain in refusals"
    else:
        verdict = "the interval includes zero, so no significant change"
    return (f"Across the {label} cells, the refusal rate on harmful prompts drops by "
            f"{with_ci(pooled, pp, settings.confidence)} (baseline minus post-trained; positive = safety lost): "
            f"{verdict}. By method: {'; '.join(per_method)}.{_attack_erosion_text(analysis, cells)}")


ATTACK_LABELS = {"gcg": "GCG on the model itself", "gcg_transfer": "the start model's GCG suffixes replayed",
                 "autodan": "AutoDAN on the model itself", "autodan_transfer": "the start model's AutoDAN prompts replayed"}


def _attack_erosion_text(analysis: StudyAnalysis, cells: Sequence[Cell]) -> str:
    """Per optimised attack and method: the rise of the attack success rate from the start model (post - start on
    the same behaviours), two-stage bootstrap over seeds then behaviours; "" without attack records."""
    study, settings = analysis.study, analysis.settings
    parts = []
    for attack, label in ATTACK_LABELS.items():
        per_method = []
        for method, members in _by_method(cells).items():
            estimate = group_estimate(study, _ids(members), "attack_erosion", settings, benchmarks=[attack])
            if estimate["estimate"] is not None:
                seeds = f", {SINGLE_SEED}" if estimate["min_seeds"] <= 1 else f", {estimate['n_seeds']} seeds"
                per_method.append(f"{method_label(method)} {with_ci(estimate, pp, settings.confidence)} "
                                  f"({estimate['n']} behaviours{seeds})")
        if per_method:
            parts.append(f"{label}: {'; '.join(per_method)}")
    if not parts:
        return ""
    return (" Attack success rate, post-trained minus start model on the same behaviours (positive = the attack "
            f"succeeds more often after post-training): {'. '.join(parts)}.")


def _correlation_text(analysis: StudyAnalysis, x: str, y: str, subset: str) -> str:
    for row in analysis["correlations"]:
        if (row["x"], row["y"], row["subset"]) == (x, y, subset):
            if row["rho"] is None:
                return f"Spearman correlation of {y} with {x} ({subset}): {row['note']}."
            verdict = "significant" if row["p"] < 0.05 else "not significant"
            return (f"Spearman correlation of {y} with {x} across {row['n']} cells ({subset}): rho = "
                    f"{row['rho']:.2f}, p = {row['p']:.3g} ({verdict} at the 0.05 level).")
    return ""


def safe_start_text(analysis: StudyAnalysis, scale: str) -> str:
    """The SAFE start's own refusal and over-refusal (its baseline cell), with intervals, against its targets."""
    rows = {r["benchmark"]: r for r in analysis["safety"] if r["level"] == "benchmark" and r["start_point"] == "safe"
            and r["scale"] == scale and r["method"] == BASELINE_METHOD}
    wanted = (*TARGET_HARMFUL, TARGET_SAFE)
    if not any(b in rows for b in wanted):
        return (f"{NOT_ENOUGH}the SAFE start's baseline has no {', '.join(wanted)} records, so whether it meets its "
                f"targets is unknown.")
    confidence = analysis.settings.confidence

    def rate(benchmark: str) -> str:
        row = rows[benchmark]
        return with_ci({"estimate": row["refusal_rate"], "low": row["refusal_ci_low"], "high": row["refusal_ci_high"],
                        "n": row["n"]}, pct, confidence)

    parts = [f"refuses {rate(b)} of {b}" for b in TARGET_HARMFUL if b in rows]
    if TARGET_SAFE in rows:
        parts.append(f"over-refuses {rate(TARGET_SAFE)} of {TARGET_SAFE}")
    targets = (f"refusal >= {pct(REFUSAL_TARGET)} on {' and '.join(TARGET_HARMFUL)}, over-refusal <= "
               f"{pct(OVER_REFUSAL_TARGET)} on {TARGET_SAFE}")
    missed = start_targets_missed({b: row["refusal_rate"] for b, row in rows.items()})
    verdict = (f"it meets the SAFE-start targets ({targets})." if not missed else
               f"it misses the SAFE-start targets ({targets}): {'; '.join(missed)}, so read its safety deltas "
               f"against that baseline.")
    return f"The SAFE start {', '.join(parts)}: {verdict}"


def answer_rq4(analysis: StudyAnalysis) -> tuple[str, ...]:
    """SAFE vs BASE starts on matching (method, domain) configurations, and the safety lost from SAFE starts."""
    study, settings = analysis.study, analysis.settings
    safe = [c for c in study.post_cells if c.start_point == "safe"]
    if not safe:
        return (NOT_ENOUGH + "no post-trained cell starts from the SAFE model, so neither the change in what is "
                "forgotten nor the safety loss can be measured.",)
    paragraphs = []
    for scale in sorted({c.scale for c in safe}):
        safe_cells = [c for c in safe if c.scale == scale]
        base_cells = [c for c in study.post_cells if c.start_point == "base" and c.scale == scale]
        shared = {(c.method, c.domain) for c in safe_cells} & {(c.method, c.domain) for c in base_cells}
        if not shared:
            comparison_text = (f"{NOT_ENOUGH}no (method, domain) configuration at scale {scale} was run from both "
                               f"the BASE and the SAFE start, so what is forgotten cannot be compared.")
        else:
            a = [c for c in base_cells if (c.method, c.domain) in shared]
            b = [c for c in safe_cells if (c.method, c.domain) in shared]
            comparison = compare_groups(study, _ids(a), _ids(b), "forgetting", settings)
            if comparison["difference"] is None:
                comparison_text = f"{NOT_ENOUGH}the BASE and SAFE cells share no paired capability items."
            else:
                families = sorted(
                    set(_capability_families(analysis, _ids(a))) & set(_capability_families(analysis, _ids(b)))
                )
                per_family = []
                for family in families:
                    diff = compare_groups(study, _ids(a), _ids(b), "forgetting", settings, families=[family])
                    per_family.append((family, diff))
                per_family.sort(key=lambda fd: abs(fd[1]["difference"]), reverse=True)
                family_text = (f" The family whose forgetting changes most is {per_family[0][0]}: SAFE - BASE = "
                               f"{with_ci(per_family[0][1], pp, settings.confidence)}." if per_family else "")
                comparison_text = (
                    f"On the {len(shared)} configuration(s) run from both starts, off-target capability forgetting is "
                    f"{pct(comparison['mean_a'])} from BASE and {pct(comparison['mean_b'])} from SAFE; SAFE - BASE = "
                    f"{with_ci(comparison, pp, settings.confidence)}: {significance(comparison, settings.confidence)}."
                    f"{family_text}")
        paragraphs.append(
            f"[scale {scale}] {safe_start_text(analysis, scale)} {comparison_text} {_safety_loss_text(analysis, safe_cells, 'SAFE-start')} "
            f"{_correlation_text(analysis, 'capability_forgetting', 'safety_loss', 'start_point=safe')}".strip())
    return tuple(paragraphs)


@_per_scope
def answer_rq5(analysis: StudyAnalysis, scope: str, start_point: str, scale: str, cells: list[Cell]) -> str:
    """On-policy (ON-RL, SELF, PI) vs off-policy SFT on external data, within the domains both were run in."""
    study, settings = analysis.study, analysis.settings
    on = [c for c in cells if method_regime(c.method) == ON_POLICY]
    off = [c for c in cells if method_regime(c.method) == OFF_POLICY_SFT]
    if not on or not off:
        missing = "on-policy (ON-RL, SELF, PI)" if not on else "off-policy SFT (GT-SFT, SF-SFT, CF-SFT)"
        return f"{scope} {NOT_ENOUGH}no {missing} cells, so the two regimes cannot be compared."
    domains = sorted({c.domain for c in on} & {c.domain for c in off}, key=str)
    if not domains:
        return (f"{scope} {NOT_ENOUGH}the on-policy and off-policy cells were trained in different domains, so the "
                "regime effect would be confounded with the domain.")
    on_cells = [c for c in on if c.domain in domains]
    off_cells = [c for c in off if c.domain in domains]
    comparison = compare_groups(study, _ids(off_cells), _ids(on_cells), "forgetting", settings)
    if comparison["difference"] is None:
        return f"{scope} {NOT_ENOUGH}the two regimes share no paired binary off-target capability items."
    verdict = ("on-policy methods forget less" if comparison["difference"] < 0
               else "on-policy methods do not forget less")
    return (
        f"{scope} In the domain(s) {', '.join(str(d) for d in domains)}, on-policy cells "
        f"({', '.join(sorted({method_label(c.method) for c in on_cells}))}; {len(on_cells)} cell(s)) forget "
        f"F = {pct(comparison['mean_b'])} of off-target capability items and off-policy SFT cells "
        f"({', '.join(sorted({method_label(c.method) for c in off_cells}))}; {len(off_cells)} cell(s)) "
        f"F = {pct(comparison['mean_a'])}; on-policy - off-policy = "
        f"{with_ci(comparison, pp, settings.confidence)}. "
        f"Point estimate: {verdict}; {significance(comparison, settings.confidence)}."
        f"{target_gain_text(analysis, {'on-policy': on_cells, 'off-policy SFT': off_cells})}")


def answer_rq6(analysis: StudyAnalysis) -> tuple[str, ...]:
    """CKA drift and refusal-direction attenuation, and their rank correlation with behavioural forgetting."""
    rows = [r for r in analysis["cell_summary"] if r["method"] != "baseline"]
    with_cka = [r for r in rows if r["cka_drift"] is not None]
    with_refusal = [r for r in rows if r["refusal_attenuation"] is not None]
    if not with_cka and not with_refusal:
        return (NOT_ENOUGH + "no post-trained cell has a representation.json (CKA per layer, refusal-direction "
                "attenuation), so representational forgetting cannot be assessed.",)
    parts = []
    if with_cka:
        drifts = [r["cka_drift"] for r in with_cka]
        top = max(with_cka, key=lambda r: r["cka_drift"])
        parts.append(
            f"CKA drift (1 - mean linear CKA over layers) ranges from {min(drifts):.3f} to {max(drifts):.3f} over "
            f"{len(with_cka)} cell(s), largest for {method_label(top['method'])} ({top['domain']}, "
            f"seed {top['seed']}). "
            + _correlation_text(analysis, "cka_drift", "capability_forgetting", "all"))
    else:
        parts.append(NOT_ENOUGH + "no CKA values in any representation.json.")
    if with_refusal:
        values = [r["refusal_attenuation"] for r in with_refusal]
        parts.append(
            f"Refusal-direction attenuation ranges from {min(values):.3f} to {max(values):.3f} over "
            f"{len(with_refusal)} cell(s). " + _correlation_text(analysis, "refusal_attenuation", "safety_loss", "all"))
    else:
        parts.append(NOT_ENOUGH + "no refusal-direction values in any representation.json.")
    parts.append(_knowledge_probe_text(analysis))
    correlations = [r for r in analysis["correlations"] if r["x"] in ("cka_drift", "refusal_attenuation")
                    and r["rho"] is not None]
    if correlations and min(r["n"] for r in correlations) < 10:
        parts.append(f"With as few as {min(r['n'] for r in correlations)} cells these rank correlations are weak "
                     f"evidence either way.")
    return (" ".join(parts),)


def _knowledge_probe_text(analysis: StudyAnalysis) -> str:
    """Per method: at each cell's best start-probe layer, how much held-out accuracy the start model's read-out loses
    on the post-trained activations and how much a probe refit on them loses (moved vs lost knowledge)."""
    by_cell: dict[str, list[Mapping[str, Any]]] = {}
    for row in analysis["representation"]:
        if row["method"] != BASELINE_METHOD and row["probe_post"] is not None:
            by_cell.setdefault(row["cell_id"], []).append(row)
    if not by_cell:
        return ""
    per_method: dict[str, list[tuple[float, float | None]]] = {}
    n_test = 0
    for rows in by_cell.values():
        best = max(rows, key=lambda r: r["probe_start"])
        refit = None if best["probe_post_refit"] is None else best["probe_start"] - best["probe_post_refit"]
        per_method.setdefault(best["method"], []).append((best["probe_start"] - best["probe_post"], refit))
        n_test = max(n_test, best["probe_n_test"] or 0)
    texts = []
    for method, drops in sorted(per_method.items(), key=lambda kv: method_label(kv[0])):
        refits = [r for _, r in drops if r is not None]
        refit_text = f", refit probe {100 * float(np.mean(refits)):+.1f} pp" if refits else ""
        texts.append(f"{method_label(method)} {100 * float(np.mean([d for d, _ in drops])):+.1f} pp{refit_text} "
                     f"({len(drops)} cell(s))")
    return (f"Knowledge probes (true vs false statements, {n_test} held out; at each cell's best layer for the start "
            f"model's probe, accuracy lost = start - post, mean over cells, no interval at this sample size): "
            f"{'; '.join(texts)}. A start read-out that loses accuracy while the refit probe does not points to "
            f"knowledge that moved in representation space rather than knowledge lost.")


def _p_text(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


@_per_scope
def answer_rq7(analysis: StudyAnalysis, scope: str, start_point: str, scale: str, cells: list[Cell]) -> str:
    """Forgetting per signal source and every pairwise difference, Holm-corrected over the pairs of the scope."""
    study, settings = analysis.study, analysis.settings
    groups = {source: [c for c in cells if method_source(c.method) == source] for source in SIGNAL_SOURCES}
    estimates = {source: group_estimate(study, _ids(members), "forgetting", settings)
                 for source, members in groups.items() if members}
    usable = [source for source, estimate in estimates.items() if estimate["estimate"] is not None]
    absent = [source for source in SIGNAL_SOURCES if source not in usable]
    missing_text = f" No usable cells for {', '.join(absent)}, so those sources are not compared." if absent else ""
    if len(usable) < 2:
        return (f"{scope} {NOT_ENOUGH}only the signal source(s) {', '.join(usable) or 'none'} have post-trained cells "
                f"with paired capability items; a comparison needs at least two.{missing_text}")
    listing = "; ".join(
        f"{source} ({', '.join(sorted({method_label(c.method) for c in groups[source]}))}) "
        f"{with_ci(estimates[source], pct, settings.confidence)}" for source in usable)
    pairs = pairwise_differences(study, {source: _ids(groups[source]) for source in usable}, "forgetting", settings)
    compared = [row for row in pairs if row["difference"] is not None]
    pair_text = "; ".join(
        f"{row['b']} - {row['a']} = {with_ci(row, pp, settings.confidence)}, Holm p = {_p_text(row['p_holm'])}"
        f"{' (significant)' if row['reject_holm'] else ''}" for row in compared)
    significant = [row for row in compared if row["reject_holm"]]
    verdict = (f"{len(significant)} of {len(compared)} pairwise difference(s) are significant at the 0.05 level after "
               f"Holm's correction (paired t-test over items)." if compared else
               "No two sources share paired items, so no difference can be estimated.")
    domains = {source: sorted({str(c.domain) for c in groups[source]}) for source in usable}
    confound = ("" if len({tuple(d) for d in domains.values()}) == 1 else
                " The sources were trained in different domains (" +
                ", ".join(f"{source}: {'/'.join(d)}" for source, d in domains.items()) +
                "), so source and domain effects are mixed.")
    return (f"{scope} Overall capability forgetting F by signal source: {listing}. Pairwise differences (later - "
            f"earlier source): {pair_text}. {verdict}{confound}{missing_text}")


def _scaling_paragraph(analysis: StudyAnalysis, start_point: str, cells: Sequence[Cell]) -> str:
    settings = analysis.settings
    scope = f"[{start_point.upper()} start]"
    scales = sorted({c.scale for c in cells}, key=lambda s: (scale_parameters(s) is None, scale_parameters(s) or 0, s))
    if len(scales) < 2:
        return (f"{scope} {NOT_ENOUGH}every post-trained cell is at scale {scales[0]}; pass the results directories "
                f"of several phases to `forgetjax report DIR [DIR ...]` to compare model sizes.")
    sentences = []
    for method, members in _by_method(cells).items():
        by_scale = {scale: _ids([c for c in members if c.scale == scale]) for scale in {c.scale for c in members}}
        trend = scaling_trend(analysis.study, by_scale, "forgetting", settings)
        points = [row for row in trend["scales"] if row["estimate"] is not None]
        per_scale = ", ".join(f"{row['scale']} {with_ci(row, pct, settings.confidence)}" for row in points)
        unparsed = (f" (scale name(s) {', '.join(trend['unparsed'])} state no parameter count, left out)"
                    if trend["unparsed"] else "")
        if len(points) < 2:
            sentences.append(f"{method_label(method)}: {NOT_ENOUGH.lower()}results at "
                             f"{len(points)} scale(s) ({per_scale or 'none'}){unparsed}, a trend needs two")
            continue
        if trend["slope"] is None:
            sentences.append(f"{method_label(method)}: F = {per_scale}; {NOT_ENOUGH.lower()}no capability item was "
                             f"evaluated at every scale, so no slope over the same items{unparsed}")
            continue
        if trend["significant"]:
            direction = "grows" if trend["slope"] > 0 else "shrinks"
            verdict = f"forgetting {direction} with model size (the interval excludes zero)"
        else:
            verdict = "no significant trend (the interval includes zero)"
        sentences.append(
            f"{method_label(method)}: F = {per_scale}; slope {pp(trend['slope'])} per tenfold parameters "
            f"({int(round(100 * settings.confidence))}% CI {pp(trend['low'])} to {pp(trend['high'])}, "
            f"n={trend['n']} items shared by every scale): {verdict}{unparsed}")
    return f"{scope} Scales {', '.join(scales)}. " + "; ".join(sentences) + "."


def answer_rq8(analysis: StudyAnalysis) -> tuple[str, ...]:
    """Per start point and method: F at every scale and its slope against log10(parameters) over shared items."""
    post_cells = analysis.study.post_cells
    if not post_cells:
        return _no_cells()
    return tuple(_scaling_paragraph(analysis, start_point, [c for c in post_cells if c.start_point == start_point])
                 for start_point in sorted({c.start_point for c in post_cells}))


def _policy_value(metric: str, value: float | None, signed: bool = False) -> str:
    if metric == "length":
        return "n/a" if value is None else (f"{value:+.1f} tokens" if signed else f"{value:.1f}")
    return (pp if signed else pct)(value)


@_per_scope
def answer_rq9(analysis: StudyAnalysis, scope: str, start_point: str, scale: str, cells: list[Cell]) -> str:
    """Per method: each policy measure baseline -> post with the paired shift; the largest shift per measure."""
    settings = analysis.settings
    shifts = {method: policy_shift(analysis.study, _ids(members), settings)
              for method, members in _by_method(cells).items()}
    shifts = {method: shift for method, shift in shifts.items() if shift}
    if not shifts:
        return f"{scope} {NOT_ENOUGH}no post-trained cell has outputs, answers or refusals paired with its baseline."
    level = int(round(100 * settings.confidence))
    sentences = []
    for method, shift in shifts.items():
        parts = [
            f"{metric.replace('_', ' ')} {_policy_value(metric, s['pre'])} -> {_policy_value(metric, s['post'])} "
            f"({_policy_value(metric, s['estimate'], True)}, {level}% CI {_policy_value(metric, s['low'], True)} to "
            f"{_policy_value(metric, s['high'], True)}, n={s['n']}{', significant' if s['significant'] else ''})"
            for metric, s in shift.items()]
        sentences.append(f"{method_label(method)}: " + "; ".join(parts))
    most = []
    for metric in POLICY_SHIFT_METRICS:
        measured = {m: shift[metric] for m, shift in shifts.items() if metric in shift}
        if len(measured) >= 2:
            top = max(measured, key=lambda m: abs(measured[m]["estimate"]))
            if measured[top]["estimate"] == 0:
                most.append(f"{metric.replace('_', ' ')}: no method moves it")
                continue
            most.append(f"{metric.replace('_', ' ')}: {method_label(top)} "
                        f"({_policy_value(metric, measured[top]['estimate'], True)})")
    ranking = (" Largest shift per measure: " + "; ".join(most) + "." if most else
               " Only one method has policy measures, so no method is ranked.")
    return (f"{scope} Baseline -> post-trained on the same items (" +
            "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in POLICY_SHIFT_METRICS.items()) + "). " +
            ". ".join(sentences) + "." + ranking)


def _transfer_entry(row: Mapping[str, Any], confidence: float) -> str:
    column = transfer_column_label(row["eval_domain"], row["scoring"])
    estimate = {"estimate": row["delta"], "low": row["delta_ci_low"], "high": row["delta_ci_high"],
                "n": row["n_items"], "min_seeds": row["min_seeds"], "max_seeds": row["max_seeds"],
                "n_configs": row["n_configs"]}
    return f"{row['train_domain']} -> {column} {with_ci(estimate, pp, confidence)}"


def _excludes_zero(row: Mapping[str, Any]) -> bool:
    return row["delta_ci_low"] > 0 or row["delta_ci_high"] < 0


def answer_rq10(analysis: StudyAnalysis) -> tuple[str, ...]:
    """Per (start point, scale, method): the covered (X = Y) changes, the off-diagonal entries whose interval excludes
    zero (the largest gain and regression named), and the regression-mismatch correlation."""
    rows = [r for r in analysis["transfer"] if r["delta"] is not None and r["mismatch"] is not None]
    if not rows:
        return (NOT_ENOUGH + "no post-trained cell trained on a safety domain has paired items of a safety domain's "
                "evaluation benchmarks (configs/studies/safety_transfer.yaml trains every safety domain and evaluates "
                "each on every other).",)
    confidence = analysis.settings.confidence
    correlations = {(r["start_point"], r["scale"], r["method"]): r for r in analysis["transfer_mismatch"]}
    paragraphs = []
    for key in sorted({(r["start_point"], r["scale"], r["method"]) for r in rows}):
        members = [r for r in rows if (r["start_point"], r["scale"], r["method"]) == key]
        covered = [r for r in members if r["covered"]]
        off = [r for r in members if not r["covered"]]
        text = f"{_scope_text(key[0], key[1])} {method_label(key[2])}: change of the safe-behaviour rate (post - "
        text += "baseline) from training domain X to evaluated safety domain Y. "
        text += ("Trained domain on its own held-out items: " + "; ".join(_transfer_entry(r, confidence)
                                                                         for r in covered) + ". ") if covered else (
            "No trained domain was evaluated on its own held-out items. ")
        if off:
            clear = [r for r in off if _excludes_zero(r)]
            gain, loss = max(off, key=lambda r: r["delta"]), min(off, key=lambda r: r["delta"])
            text += (f"Off-diagonal (uncovered) entries: {len(off)}, of which {len(clear)} have an interval excluding "
                     f"zero ({sum(r['delta'] > 0 for r in clear)} safer, {sum(r['delta'] < 0 for r in clear)} "
                     f"regressed); largest gain {_transfer_entry(gain, confidence)}; largest regression "
                     f"{_transfer_entry(loss, confidence)}. ")
        else:
            text += "No uncovered (X != Y) entry was measured, so nothing is said about transfer. "
        correlation = correlations.get(key)
        if correlation is None or correlation["rho"] is None:
            why = correlation["note"] if correlation else "no (X, Y) pair of safety domains"
            text += f"Regression vs domain mismatch: {NOT_ENOUGH.lower()}{why.removeprefix('not enough data: ')}."
        else:
            level = int(round(100 * confidence))
            ci = ("" if correlation["rho_ci_low"] is None else
                  f", {level}% CI {correlation['rho_ci_low']:+.2f} to {correlation['rho_ci_high']:+.2f}")
            text += (f"Regression vs domain mismatch (0 same, 1 same kind, 2 disposition vs refusal): Spearman rho "
                     f"{correlation['rho']:+.2f}{ci}, p = {_p_text(correlation['p'])}, n = {correlation['n_pairs']} "
                     f"(X, Y) pairs; a positive rho means safety regresses more on domains further from the trained "
                     f"one.")
        if min(r["min_seeds"] for r in members) <= 1:
            text += f" Some entries rest on one seed ({SINGLE_SEED})."
        paragraphs.append(text)
    return tuple(paragraphs)


def _mitigation_sentence(analysis: StudyAnalysis, reference: Sequence[Cell], label: str,
                         cells: Sequence[Cell]) -> str:
    """"lora(...) vs full: F -2.0 pp (CI ...: significance); refusal drop ...; target gain ..."."""
    study, settings = analysis.study, analysis.settings
    parts = []
    for statistic, scope, name in (("forgetting", "off_target", "off-target F"),
                                   ("refusal_drop", "off_target", "refusal drop on harmful prompts"),
                                   ("delta", "target", "target-task gain")):
        comparison = compare_groups(study, _ids(reference), _ids(cells), statistic, settings, scope=scope)
        if comparison["difference"] is None:
            parts.append(f"{name}: not measured (no shared items)")
            continue
        parts.append(f"{name} {pct(comparison['mean_a']) if statistic != 'delta' else pp(comparison['mean_a'])} -> "
                     f"{pct(comparison['mean_b']) if statistic != 'delta' else pp(comparison['mean_b'])}, difference "
                     f"{with_ci(comparison, pp, settings.confidence)}: {significance(comparison, settings.confidence)}")
    return f"{label}: " + "; ".join(parts)


def answer_rq11(analysis: StudyAnalysis) -> tuple[str, ...]:
    """Per axis, scope and method: every value against the axis' reference value (for weight interpolation: every
    alpha against the trained cells), on F, the refusal drop and the target gain, one axis varied at a time."""
    study = analysis.study
    names = axis_names(study)
    if not names:
        return (NOT_ENOUGH + "the analysed cells record no study axes (a study without an axes: section).",)
    paragraphs = []
    for axis in names:
        groups = axis_groups(study, axis)
        if not groups:
            paragraphs.append(f"[axis {axis}] {NOT_ENOUGH}no method has finished cells at two values of this axis "
                              "with every other axis at its reference.")
            continue
        for (start_point, scale, method), values in groups.items():
            reference_label, _, reference = values[0]
            sentences = [_mitigation_sentence(analysis, reference, f"{label} vs {reference_label}", cells)
                         for label, _, cells in values[1:]]
            what = ("each interpolation alpha (WiSE-FT: (1 - alpha) start + alpha post-trained) against the trained "
                    "cells" if axis == "merge" else f"each value against the reference {reference_label}")
            paragraphs.append(
                f"{_scope_text(start_point, scale)} [axis {axis}, {method_label(method)}] Baseline -> post-trained "
                f"statistics for {what} (other axes at their reference; a negative F or refusal-drop difference means "
                f"the mitigation forgets less, a negative target-gain difference is its cost): "
                + ". ".join(sentences) + ".")
    return tuple(paragraphs)


ANSWERERS = (answer_rq1, answer_rq2, answer_rq3, answer_rq4, answer_rq5, answer_rq6, answer_rq7, answer_rq8,
             answer_rq9, answer_rq10, answer_rq11)


def answer_all(analysis: StudyAnalysis) -> list[Answer]:
    """Every answer in QUESTIONS order."""
    return [Answer(key, question, tuple(answer(analysis)))
            for (key, question), answer in zip(QUESTIONS, ANSWERERS)]
