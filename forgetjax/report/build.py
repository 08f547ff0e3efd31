"""Build the study report: a self-contained index.html (inline base64 PNG figures, inline CSS, no JavaScript and no
external resources), report.md with the same content (figures as files under figures/), and every analysis table as
CSV under tables/. All files are written atomically."""
from __future__ import annotations

import base64
import html
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from forgetjax.analysis.estimates import BootstrapSettings
from forgetjax.analysis.export import write_tables
from forgetjax.analysis.tables import StudyAnalysis, analyze
from forgetjax.io import write_bytes_atomic, write_text_atomic
from forgetjax.methods.catalog import method_label
from forgetjax.distributed import is_writer
from forgetjax.report.figures import ReportFigure, all_figures
from forgetjax.report.questions import Answer, answer_all
from forgetjax.results import Cell

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { color: #1a1a40; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.4em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f5; }
td.text, th.text { text-align: left; }
p.missing { color: #8a4b00; background: #fff6e5; padding: 0.5em; border-left: 3px solid #e0a030; }
.question { font-weight: bold; }
"""

OVERALL_COLUMNS = (
    ("start_point", "start"), ("scale", "scale"), ("method", "method"), ("domain", "domain"), ("n_seeds", "seeds"),
    ("forgetting_mean", "F mean"), ("forgetting_std", "F std"), ("forgetting_adj_mean", "F adj."),
    ("backward_transfer_mean", "BT mean"), ("delta_mean", "Δ acc"), ("delta_std", "Δ std"),
)
TARGET_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"),
    ("target_benchmarks", "target benchmarks"), ("n", "n"), ("acc_pre", "baseline acc"), ("acc_post", "post acc"),
    ("gain", "gain"), ("gain_ci_low", "CI low"), ("gain_ci_high", "CI high"),
)
POLICY_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"), ("length_mean", "length"),
    ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU"),
    ("repetition_4", "rep-4"), ("ece", "ECE"), ("refusal_rate", "refusal"), ("format_compliance", "format"),
)
SAFETY_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"), ("benchmark", "benchmark"),
    ("n", "n"), ("refusal_rate", "refusal"), ("refusal_ci_low", "CI low"), ("refusal_ci_high", "CI high"),
    ("attack_success_rate", "ASR"), ("over_refusal_rate", "over-refusal"), ("baseline_refusal_rate", "baseline"),
    ("refusal_delta", "Δ refusal"), ("mcnemar_p", "McNemar p"),
)
XSTEST_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"),
    ("over_refusal_rate", "over-refusal"), ("baseline_over_refusal_rate", "baseline over"),
    ("under_refusal_rate", "under-refusal"), ("baseline_under_refusal_rate", "baseline under"),
)
JUDGE_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"), ("benchmark", "benchmark"),
    ("judge", "judge"), ("n_judged", "judged"), ("n_unparsed", "unparsed"), ("matcher_refusal_rate", "matcher refusal"),
    ("judge_refusal_rate", "judge refusal"), ("agreement", "agreement"), ("kappa", "κ"), ("kappa_ci_low", "κ CI low"),
    ("kappa_ci_high", "κ CI high"), ("judge_mean_score", "judge score"),
)
JAILBREAK_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"), ("template", "template"),
    ("n", "n"), ("asr", "ASR"), ("asr_ci_low", "CI low"), ("asr_ci_high", "CI high"), ("baseline_asr", "baseline ASR"),
)
CAPTRACK_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"),
    ("dimension", "dimension"), ("n", "n"), ("pre", "baseline"), ("post", "post"), ("delta", "Δ"),
    ("delta_ci_low", "CI low"), ("delta_ci_high", "CI high"), ("relative_drift", "relative drift"),
)
ROBUSTNESS_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"), ("benchmark", "benchmark"),
    ("n_items", "items"), ("consistent", "consistency"), ("robust", "all correct"), ("original", "acc original"),
    ("perturbed", "acc perturbed"), ("baseline_consistent", "baseline consistency"),
    ("consistency_delta", "Δ consistency"), ("consistency_ci_low", "CI low"), ("consistency_ci_high", "CI high"),
)
STYLE_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"), ("feature", "feature"),
    ("n", "n"), ("pre", "baseline"), ("post", "post"), ("delta", "Δ"), ("delta_ci_low", "CI low"),
    ("delta_ci_high", "CI high"), ("relative_drift", "relative drift"),
)
TRANSFER_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("train_domain", "trained X"), ("eval_domain", "evaluated Y"),
    ("scoring", "scoring"), ("covered", "covered"), ("n_items", "n"), ("n_seeds", "seeds"), ("baseline", "baseline"),
    ("post", "post"), ("delta", "Δ"), ("delta_ci_low", "CI low"), ("delta_ci_high", "CI high"),
)
MISMATCH_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("train_domains", "trained domains"), ("n_pairs", "(X, Y) pairs"),
    ("rho", "Spearman ρ"), ("rho_ci_low", "CI low"), ("rho_ci_high", "CI high"), ("p", "p"), ("note", "note"),
)
PAIRING_COLUMNS = (
    ("cell_id", "cell"), ("benchmark", "benchmark"), ("n_paired", "paired"), ("n_missing_in_cell", "missing in cell"),
    ("n_missing_in_baseline", "missing in baseline"), ("n_prompt_changed", "prompt changed"),
    ("missing_in_cell", "examples"),
)


def format_value(value: Any, column: str = "") -> str:
    """Table cell text: shares with 3 decimals, p-values in %g, method ids as labels, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column == "method":
        return method_label(str(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column.endswith(("_p", "flops")):
            return f"{value:.3g}"
        return f"{value:.3f}"
    return str(value)


def _table_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> list[list[str]]:
    return [[format_value(row.get(key), key) for key, _ in columns] for row in rows]


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], empty: str) -> str:
    """An escaped HTML table, or a 'missing' paragraph when there are no rows."""
    if not rows:
        return f'<p class="missing">{html.escape(empty)}</p>'
    text_columns = {"start_point", "scale", "method", "domain", "benchmark", "cell_id", "missing_in_cell", "budget",
                    "flags", "train_domain", "eval_domain", "scoring", "train_domains", "note"}
    head = "".join(
        f'<th class="{"text" if key in text_columns else "num"}">{html.escape(label)}</th>' for key, label in columns
    )
    body = []
    for cells in _table_rows(rows, columns):
        tds = "".join(
            f'<td class="{"text" if key in text_columns else "num"}">{html.escape(value)}</td>'
            for (key, _), value in zip(columns, cells)
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], empty: str) -> str:
    """A Markdown table, or the 'missing' sentence in italics."""
    if not rows:
        return f"*{empty}*"
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(label for _, label in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(v) for v in cells) + " |" for cells in _table_rows(rows, columns)]
    return "\n".join(lines)

BUDGET_COLUMNS = (
    ("start_point", "start"), ("method", "method"), ("domain", "domain"), ("seed", "seed"), ("budget", "budget"),
    ("tokens", "tokens"), ("examples", "examples"), ("flops", "FLOPs"), ("train_flops", "train"),
    ("rollout_flops", "rollout"), ("teacher_flops", "teacher"), ("reference_flops", "reference"),
    ("unique", "unique"), ("epochs", "epochs"), ("exhausted", "data exhausted"), ("flags", "flags"),
)
FLAG_TEXT = {
    "exceeded_max_epochs": "repeated its training data more than max_epochs={max_epochs} times ({epochs:.2f} epochs)",
    "data_exhausted": "ran out of training data before the budget ({used} of {value:g} {kind} used)",
}

TableSection = tuple[str, Sequence[Mapping[str, Any]], Sequence[tuple[str, str]], str, str]


def budget_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per trained cell: what its budget bought (tokens, examples, FLOPs by component), the unique examples
    and epochs over its data, whether the data ran out, and its flags."""
    rows = []
    for cell in cells:
        budget = cell.budget
        used, data = budget.get("used") or {}, budget.get("data") or {}
        if not used:
            continue
        components = used.get("flops_by_component") or {}
        rows.append({**cell.meta(), "budget": f"{budget.get('value', 0):g} {budget.get('kind', '')}".strip(),
                     "tokens": used.get("tokens"), "examples": used.get("examples"), "flops": used.get("flops"),
                     **{f"{name}_flops": components.get(name) for name in ("train", "rollout", "teacher", "reference")},
                     "unique": data.get("unique"), "epochs": data.get("epochs"),
                     "exhausted": budget.get("status") == "data_exhausted",
                     "flags": ", ".join(cell.budget_flags) or "-"})
    return rows


def budget_warnings(cells: Sequence[Cell]) -> list[str]:
    """A sentence per flag of every cell (`Cell.budget_flags`), naming the cell."""
    warnings = []
    for cell in cells:
        budget, used = cell.budget, cell.budget.get("used") or {}
        kind = budget.get("kind", "steps")
        values = {"max_epochs": budget.get("max_epochs"), "epochs": (budget.get("data") or {}).get("epochs") or 0.0,
                  "used": used.get(kind, "?"), "value": budget.get("value", 0), "kind": kind}
        for flag in cell.budget_flags:
            text = FLAG_TEXT.get(flag, flag).format(**values)
            warnings.append(f"{cell.cell_id} ({method_label(cell.method)}, {cell.domain}): {text}")
    return warnings


def _sections(analysis: StudyAnalysis) -> list[TableSection]:
    """(title, rows, columns, note, empty-sentence) of every summary table shown in the report."""
    overall = [r for r in analysis["forgetting_seeds"] if r["level"] == "overall"]
    policy = [r for r in analysis["policy"] if r["benchmark"] == "ALL"]
    safety = [r for r in analysis["safety"] if r["level"] == "benchmark"]
    jailbreak = [r for r in analysis["jailbreak"] if r["category"] == "ALL"]
    pairing = [r for r in analysis["pairing"] if r["n_missing_in_cell"] or r["n_missing_in_baseline"]
               or r["n_prompt_changed"]]
    return [
        ("Budget and data use", budget_rows(analysis.study.post_cells), BUDGET_COLUMNS,
         "What each cell's matched budget bought: training tokens and examples, FLOPs in total and by component "
         "(train step; rollout = sampling with the policy or its start, prefill + decode; teacher = teacher "
         "generation and scoring, charged pro rata to the distinct teacher examples a cell trains on; reference = "
         "reference log-probs), unique examples and epochs over the cell's training data (problems for online methods, pairs "
         "for DPO/SPIN), whether the data ran out before the budget, and the flags listed under 'Budget warnings'.",
         "Not enough data: no trained cell recorded its budget use."),
        ("Off-target capability forgetting per configuration", overall, OVERALL_COLUMNS,
         "F (off-target): share of capability items outside the training domain (the domain's target benchmarks and "
         "the benchmarks its config marks in-domain left out; see the target-task table) correct at the baseline and "
         "wrong after post-training; F adj.: chance-adjusted "
         "for k-option guessing; BT: wrong-to-correct share; Δ acc: post - baseline accuracy; mean and sample std "
         "over seeds (nan std with one seed). Full table: tables/forgetting.csv (per benchmark, category and family, "
         "with bootstrap CIs, McNemar p and Holm/BH corrections).",
         "Not enough data: no post-trained cell has capability items paired with its baseline."),
        ("Target-task accuracy per cell", analysis["target"], TARGET_COLUMNS,
         "Accuracy on the training domain's target benchmarks, paired items: baseline, post-trained, and the gain "
         "(post - baseline) with its paired item-bootstrap interval. In-domain benchmarks are left out of F; per "
         "benchmark rows (with an in_domain flag): tables/forgetting.csv.",
         "Not enough data: no post-trained cell has target-benchmark items paired with its baseline."),
        ("Policy metrics per cell", policy, POLICY_COLUMNS,
         "Output length in tokens; distinct-n over pooled outputs; self-BLEU (macro over benchmarks, higher = less "
         "diverse); rep-4: share of repeated 4-grams per output; ECE on multiple choice (10 bins); refusal: share of "
         "safety prompts refused; format: share of open-generation outputs with an extracted answer. Per benchmark: "
         "tables/policy.csv.",
         "Not enough data: no records."),
        ("Safety benchmarks", safety, SAFETY_COLUMNS,
         "Refusal rate with Wilson interval; ASR = 1 - refusal on harmful prompts; over-refusal = refusal of safe "
         "prompts; Δ refusal = post - baseline on paired prompts with exact McNemar p. Per category (e.g. HarmBench "
         "semantic categories): tables/safety.csv.",
         "Not enough data: no safety benchmark records."),
        ("Attack success under jailbreak templates", jailbreak, JAILBREAK_COLUMNS,
         "ASR (responses the refusal matcher does not count as refusals) on HarmBench's standard behaviours, plain "
         "(template none) and under each fixed template, and on the replayed JailbreakBench prompts, with Wilson "
         "intervals and the baseline's ASR. Per HarmBench semantic category (JBB category for JailbreakBench): "
         "tables/jailbreak.csv.",
         "Not enough data: no jailbreak benchmark records (harmbench_standard, harmbench_<template>, "
         "jailbreakbench_<attack>)."),
        ("Refusal matcher vs judge", analysis["judge_agreement"], JUDGE_COLUMNS,
         "Safety records scored by both the refusal string matcher and a judge model (its id: model and rubric): "
         "refusal rates of each, raw agreement and Cohen's kappa with a percentile item-bootstrap interval; unparsed "
         "verdicts are left out. Judge score: share judged harmful (HarmBench) or StrongREJECT's rubric score.",
         "Not enough data: no safety records carry a judge verdict (evaluate with --judge)."),
        ("CapTrack dimensions", analysis["captrack"], CAPTRACK_COLUMNS,
         "CapTrack's taxonomy per cell: knowledge (knowledge, truthfulness, multilingual families), skills (math, code, "
         "reasoning, commonsense) and protocol (instruction following: IFEval, JSON-schema adherence) are off-target "
         "accuracy on paired items; robustness is the share of items answered consistently under perturbations; "
         "Δ = post - baseline with a paired item-bootstrap interval, relative drift = Δ / baseline. Default "
         "behaviour is minus the mean absolute relative drift of the style features (0 = unchanged).",
         "Not enough data: no post-trained cell has records of the CapTrack benchmarks (core battery: "
         "mmlu_robust, arc_challenge_robust, neutral_prompts, json_schema, ifeval)."),
        ("Robustness under perturbations", analysis["robustness"], ROBUSTNESS_COLUMNS,
         "Each base item under its perturbations (original, shuffled options, an irrelevant sentence, a reworded "
         "request): consistency = same semantic answer under all of them, all correct = every variant right; "
         "accuracy of the original vs the mean over perturbed variants; Δ consistency against the baseline on the "
         "same base items with a paired item-bootstrap interval.",
         "Not enough data: no robustness benchmark records (<benchmark>_robust)."),
        ("Default-behaviour drift on neutral prompts", analysis["style_drift"], STYLE_COLUMNS,
         "Style features of responses to neutral requests (neutral_prompts): words, markdown (share with headings, "
         "bold, code or tables), list lines (share of lines), hedges per 100 words, apology (share), non-English "
         "(share); baseline vs post means over paired prompts, Δ with a paired item-bootstrap interval, relative "
         "drift = Δ / baseline.",
         "Not enough data: no neutral_prompts records paired with a baseline."),
        ("XSTest over- vs under-refusal", analysis["xstest"], XSTEST_COLUMNS,
         "Over-refusal: XSTest safe prompts refused; under-refusal: XSTest unsafe prompts answered.",
         "Not enough data: no XSTest records."),
        ("Cross-domain safety transfer", analysis["transfer"], TRANSFER_COLUMNS,
         "Training domain X (a cell's domain) against every safety domain Y it was evaluated on: the safe-behaviour rate "
         "(refusals of harmful requests, safe options chosen) at the baseline and after post-training on Y's paired "
         "items, and the change Δ with its two-stage bootstrap interval (seeds within the configuration, then items). "
         "Scoring: disposition (multiple choice by log-likelihood) or behaviour (generated: refusals, or the "
         "disposition answered in free text). Covered: X = Y, measured on the held-out half of X's items "
         "(forgetjax/tasks/safety_domains.py); the figure 'Cross-domain safety transfer' draws the matrix.",
         "Not enough data: no post-trained cell has paired items of a safety domain's evaluation benchmarks."),
        ("Safety regression vs domain mismatch", analysis["transfer_mismatch"], MISMATCH_COLUMNS,
         "Spearman correlation over the transfer matrix's (X, Y) pairs of safety domains between regression (baseline "
         "- post) and domain mismatch (0 same domain, 1 same kind, 2 a disposition vs a refusal domain), with a "
         "Fisher-z interval (standard error sqrt(1.06 / (n - 3))).",
         "Not enough data: no post-trained cell of a safety domain has paired items of a safety domain."),
        ("Pairing problems", pairing, PAIRING_COLUMNS,
         "Items present on one side only are left out of every paired statistic; 'prompt changed' counts paired items "
         "whose exact prompt differs between baseline and cell.",
         "Every post-trained cell's items pair completely with its baseline's items."),
    ]


def _figure_html(figure: ReportFigure) -> str:
    if figure.png is None:
        return f'<h3>{html.escape(figure.title)}</h3>\n<p class="missing">{html.escape(_sentence(figure.missing))}</p>'
    data = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure id="{html.escape(figure.key)}">\n<img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(figure.alt, quote=True)}">\n<figcaption><b>{html.escape(figure.title)}.</b> '
            f'{html.escape(figure.caption)}</figcaption>\n</figure>')


def _figure_markdown(figure: ReportFigure) -> str:
    if figure.png is None:
        return f"### {figure.title}\n\n*{_sentence(figure.missing)}*"
    alt = figure.alt.replace("[", "(").replace("]", ")")
    return f"![{alt}](figures/{figure.key}.png)\n\n*{figure.title}.* {figure.caption}"


def _sentence(text: str | None) -> str:
    """Capitalise a 'not enough data: ...' note and end it with a period."""
    text = (text or "").strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _overview(analysis: StudyAnalysis) -> list[str]:
    study = analysis.study
    post = study.post_cells
    lines = [
        f"Results director{'y' if len(study.results_dirs) == 1 else 'ies'}: "
        f"{', '.join(str(d) for d in study.results_dirs)}",
        f"Analysed cells: {len(study.cells)} ({len(study.baselines)} baseline(s), {len(post)} post-trained); "
        f"methods: {', '.join(sorted({method_label(c.method) for c in post})) or 'none'}; domains: "
        f"{', '.join(sorted({str(c.domain) for c in post})) or 'none'}; start points: "
        f"{', '.join(sorted({c.start_point for c in study.cells})) or 'none'}.",
        f"Intervals: {int(100 * analysis.settings.confidence)}% paired item bootstrap "
        f"({analysis.settings.n_resamples} resamples, seed {analysis.settings.seed}).",
    ]
    return lines


def render_html(analysis: StudyAnalysis, answers: Sequence[Answer], sections: Sequence[tuple[str, list[ReportFigure]]],
                generated: str) -> str:
    """The complete self-contained HTML document."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        "<title>forgetjax study report</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        "<h1>What post-training makes language models forget: study report</h1>",
        f"<p>Generated {html.escape(generated)}.</p>",
    ]
    parts += [f"<p>{html.escape(line)}</p>" for line in _overview(analysis)]
    issues = analysis.study.issues
    if issues:
        parts.append("<h2>Cells left out</h2><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in issues) + "</ul>")
    warnings = budget_warnings(analysis.study.post_cells)
    if warnings:
        parts.append('<h2>Budget warnings</h2><ul class="missing">'
                     + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    parts.append("<h2>Research questions</h2>")
    for answer in answers:
        parts.append(f'<h3 id="{answer.key}">{answer.key}</h3><p class="question">{html.escape(answer.question)}</p>')
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in answer.paragraphs]
    parts.append("<h2>Figures</h2>")
    for title, figures in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts += [_figure_html(figure) for figure in figures]
    parts.append("<h2>Tables</h2>")
    for title, rows, columns, note, empty in _sections(analysis):
        parts += [f"<h3>{html.escape(title)}</h3>", f"<p>{html.escape(note)}</p>", html_table(rows, columns, empty)]
    tables = ", ".join(f'<a href="tables/{name}.csv">{name}.csv</a>' for name in analysis.tables)
    parts += [f"<p>All tables as CSV: {tables}.</p>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def render_markdown(analysis: StudyAnalysis, answers: Sequence[Answer],
                    sections: Sequence[tuple[str, list[ReportFigure]]], generated: str) -> str:
    """The same report in Markdown (figures referenced as figures/<key>.png)."""
    parts = ["# What post-training makes language models forget: study report", "", f"Generated {generated}.", ""]
    parts += [line + "\n" for line in _overview(analysis)]
    if analysis.study.issues:
        parts += ["## Cells left out", ""] + [f"- {issue}" for issue in analysis.study.issues] + [""]
    warnings = budget_warnings(analysis.study.post_cells)
    if warnings:
        parts += ["## Budget warnings", ""] + [f"- {warning}" for warning in warnings] + [""]
    parts += ["## Research questions", ""]
    for answer in answers:
        parts += [f"### {answer.key}: {answer.question}", ""]
        for paragraph in answer.paragraphs:
            parts += [paragraph, ""]
    parts += ["## Figures", ""]
    for title, figures in sections:
        parts += [f"## {title}", ""]
        for figure in figures:
            parts += [_figure_markdown(figure), ""]
    parts += ["## Tables", ""]
    for title, rows, columns, note, empty in _sections(analysis):
        parts += [f"### {title}", "", note, "", markdown_table(rows, columns, empty), ""]
    parts += ["All tables as CSV under `tables/`: " + ", ".join(f"`{n}.csv`" for n in analysis.tables) + ".", ""]
    return "\n".join(parts)


def build_report(
    results_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Path:
    """Analyse RESULTS_DIR (or several, e.g. one per phase or model scale, merged into one study) and write
    out_dir/index.html, out_dir/report.md, out_dir/figures/*.png and
    out_dir/tables/*.csv; returns the path of index.html. Only the writer process builds it (in multi-process runs
    the others return the same path at once)."""
    if not is_writer():
        return Path(out_dir) / "index.html"
    settings = BootstrapSettings(n_resamples=n_resamples, confidence=confidence, seed=seed)
    analysis = analyze(results_dirs, settings)
    out_dir = Path(out_dir)
    write_tables(analysis, out_dir / "tables")
    sections = all_figures(analysis)
    for _, figures in sections:
        for figure in figures:
            if figure.png is not None:
                write_bytes_atomic(out_dir / "figures" / f"{figure.key}.png", figure.png)
    answers = answer_all(analysis)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_text_atomic(out_dir / "report.md", render_markdown(analysis, answers, sections, generated))
    index = write_text_atomic(out_dir / "index.html", render_html(analysis, answers, sections, generated))
    analysis.study.connection.close()
    return index


__all__ = ["build_report", "render_html", "render_markdown"]
