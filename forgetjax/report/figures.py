"""The report's figures, drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no display).

Every builder returns `ReportFigure`s: PNG bytes with a title, caption and alt text, or, when the data needed is
absent, no image and a "not enough data: ..." sentence in `missing` (the report prints it instead of a figure).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from forgetjax.analysis.captrack import CAPTRACK_DIMENSIONS
from forgetjax.analysis.comparisons import group_estimate, scaling_trend
from forgetjax.analysis.loading import NON_CAPABILITY_FAMILIES
from forgetjax.analysis.tables import StudyAnalysis
from forgetjax.methods.catalog import method_label
from forgetjax.results import BASELINE_METHOD
from forgetjax.tasks.safety_domains import SAFETY_DOMAINS, evaluation_columns

DPI = 100
NO_DOMAIN = "no domain"


@dataclass(frozen=True)
class ReportFigure:
    """One figure (png) or the reason it could not be drawn (missing)."""

    key: str
    title: str
    caption: str
    alt: str
    png: bytes | None = None
    missing: str | None = None


def render_png(figure: Figure) -> bytes:
    """The figure as PNG bytes through the Agg canvas."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def percent(value: float | None, digits: int = 1) -> str:
    """0.123 -> "12.3%"; None/NaN -> "n/a"."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{100 * value:.{digits}f}%"


def _domain(value: str | None) -> str:
    return value if value else NO_DOMAIN


def _scope_label(start_point: str, scale: str) -> str:
    return f"start point {start_point.upper()}, scale {scale}"


def _slug(*parts: Any) -> str:
    return "_".join(str(p).replace(" ", "-").replace("/", "-") for p in parts)


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """A stable colour per method id (tab10 over the sorted ids; the baseline is black)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    ordered = sorted(m for m in set(methods) if m != BASELINE_METHOD)
    colors = {method: palette(index % 10) for index, method in enumerate(ordered)}
    colors[BASELINE_METHOD] = (0.0, 0.0, 0.0, 1.0)
    return colors


def _no_cells_figure(key: str, title: str) -> ReportFigure:
    return ReportFigure(key, title, "", "", missing="not enough data: no post-trained cells")


def _config_order(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The distinct (method, domain) pairs of the rows, ordered by method label then domain."""
    return sorted({(r["method"], _domain(r["domain"])) for r in rows}, key=lambda c: (method_label(c[0]), c[1]))


def _scopes(analysis: StudyAnalysis) -> list[tuple[str, str]]:
    """The (start_point, scale) pairs that have post-trained cells."""
    return sorted({(c.start_point, c.scale) for c in analysis.study.post_cells})


def _all_methods(analysis: StudyAnalysis) -> list[str]:
    return sorted({c.method for c in analysis.study.cells})


def _family_order(families: Sequence[str]) -> list[str]:
    """Capability families first (alphabetical), then the safety-related ones."""
    unique = sorted(set(families))
    return [f for f in unique if f not in NON_CAPABILITY_FAMILIES] + [f for f in unique if f in NON_CAPABILITY_FAMILIES]


def heatmap_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Forgetting F per method x family, one heatmap per (start point, scale, domain), mean over seeds."""
    rows = [r for r in analysis["forgetting_seeds"] if r["level"] == "family"]
    if not rows:
        return [ReportFigure("heatmap", "Forgetting heatmap", "", "", missing=(
            "not enough data: no post-trained cell has items paired with its baseline, so there is nothing to map"))]
    figures = []
    groups = sorted({(r["start_point"], r["scale"], _domain(r["domain"])) for r in rows})
    for start_point, scale, domain in groups:
        members = [r for r in rows
                   if (r["start_point"], r["scale"], _domain(r["domain"])) == (start_point, scale, domain)]
        methods = sorted({r["method"] for r in members}, key=method_label)
        families = _family_order([r["family"] for r in members])
        values = np.full((len(methods), len(families)), np.nan)
        seeds = np.zeros((len(methods), len(families)), dtype=int)
        for r in members:
            i, j = methods.index(r["method"]), families.index(r["family"])
            if r["forgetting_mean"] is not None:
                values[i, j] = 100 * r["forgetting_mean"]
                seeds[i, j] = r["n_seeds"]
        figure = Figure(figsize=(1.3 * len(families) + 2.5, 0.6 * len(methods) + 1.8), layout="constrained")
        axes = figure.add_subplot()
        shown = np.ma.masked_invalid(values)
        top = max(float(np.nanmax(values)) if np.isfinite(values).any() else 1.0, 1.0)
        image = axes.imshow(shown, cmap="Reds", vmin=0, vmax=top, aspect="auto")
        axes.set_xticks(range(len(families)), families, rotation=30, ha="right")
        axes.set_yticks(range(len(methods)), [method_label(m) for m in methods])
        for i in range(len(methods)):
            for j in range(len(families)):
                text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.1f}"
                color = "white" if np.isfinite(values[i, j]) and values[i, j] > 0.6 * top else "black"
                axes.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
        figure.colorbar(image, ax=axes, label="forgetting F (%)")
        axes.set_title(f"Forgetting F, {_scope_label(start_point, scale)}, domain {domain}", fontsize=10)
        finite = np.argwhere(np.isfinite(values))
        if finite.size:
            i, j = max(finite, key=lambda ij: values[ij[0], ij[1]])
            worst = f"The highest value is {values[i, j]:.1f}% for {method_label(methods[i])} on {families[j]}."
        else:
            worst = "No family has binary items, so every cell is n/a."
        figures.append(ReportFigure(
            key=_slug("heatmap", start_point, scale, domain),
            title=f"Forgetting heatmap: {_scope_label(start_point, scale)}, domain {domain}",
            caption=(f"Forgetting F (% of items correct at the baseline and wrong after post-training) per method "
                     f"(rows) and benchmark family (columns; off-target items only, the training domain's own "
                     f"benchmarks left out), mean over seeds (max {int(seeds.max())} seed(s)); "
                     f"{_scope_label(start_point, scale)}, training domain {domain}. For the safety families "
                     f"(safety_refusal, over_refusal) F is the share of prompts handled safely at the baseline and "
                     f"unsafely after. n/a: no binary items."),
            alt=(f"Heatmap of forgetting percentages for {len(methods)} method(s) by {len(families)} famil"
                 f"{'y' if len(families) == 1 else 'ies'}. {worst}"),
            png=render_png(figure),
        ))
    return figures


def radar_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per (start point, scale): one radar per method of the accuracy change per capability family, by domain."""
    rows = [r for r in analysis["forgetting_seeds"]
            if r["level"] == "family" and r["family"] not in NON_CAPABILITY_FAMILIES and r["delta_mean"] is not None]
    figures = []
    for start_point, scale in _scopes(analysis):
        members = [r for r in rows if (r["start_point"], r["scale"]) == (start_point, scale)]
        families = _family_order([r["family"] for r in members])
        key = _slug("radar", start_point, scale)
        title = f"Category deltas per method: {_scope_label(start_point, scale)}"
        if len(families) < 3:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: a radar plot needs at least 3 capability families with paired items, "
                f"{_scope_label(start_point, scale)} has {len(families)} ({', '.join(families) or 'none'})")))
            continue
        methods = sorted({r["method"] for r in members}, key=method_label)
        domains = sorted({_domain(r["domain"]) for r in members})
        angles = np.linspace(0, 2 * np.pi, len(families), endpoint=False)
        values_all = [100 * r["delta_mean"] for r in members]
        low, high = min(min(values_all), -1.0), max(max(values_all), 1.0)
        columns = min(3, len(methods))
        n_rows = int(np.ceil(len(methods) / columns))
        figure = Figure(figsize=(3.6 * columns, 3.6 * n_rows + 0.4), layout="constrained")
        for index, method in enumerate(methods):
            axes = figure.add_subplot(n_rows, columns, index + 1, projection="polar")
            for domain in domains:
                lookup = {r["family"]: 100 * r["delta_mean"] for r in members
                          if r["method"] == method and _domain(r["domain"]) == domain}
                if not lookup:
                    continue
                radius = np.array([lookup.get(f, np.nan) for f in families])
                closed_angles = np.append(angles, angles[0])
                axes.plot(closed_angles, np.append(radius, radius[0]), marker="o", label=domain)
            axes.plot(np.linspace(0, 2 * np.pi, 100), np.zeros(100), color="grey", linewidth=0.8, linestyle="--")
            axes.set_ylim(low - 1, high + 1)
            axes.set_xticks(angles, families, fontsize=7)
            axes.yaxis.set_major_locator(MaxNLocator(4))
            axes.tick_params(axis="y", labelsize=6)
            axes.set_title(method_label(method), fontsize=9)
            axes.legend(fontsize=6, loc="lower right", bbox_to_anchor=(1.25, -0.1))
        figure.suptitle(f"Accuracy change (pp) per capability family, {_scope_label(start_point, scale)}", fontsize=10)
        worst = min(members, key=lambda r: r["delta_mean"])
        figures.append(ReportFigure(
            key, title,
            caption=(f"Change in accuracy (post - baseline, percentage points, mean over seeds) per capability family "
                     f"(off-target items only); "
                     f"one radar per method, one line per training domain; the dashed circle is zero change. "
                     f"{_scope_label(start_point, scale)}."),
            alt=(f"{len(methods)} radar chart(s) over the families {', '.join(families)}. The largest drop is "
                 f"{100 * worst['delta_mean']:.1f} pp for {method_label(worst['method'])} on {worst['family']} "
                 f"(domain {_domain(worst['domain'])})."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("radar", "Category deltas per method")]


def captrack_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per (start point, scale): one radar per method over CapTrack's dimensions (relative drift, %), by domain."""
    rows = [r for r in analysis["captrack"] if r["relative_drift"] is not None]
    dimensions = list(CAPTRACK_DIMENSIONS)
    figures = []
    for start_point, scale in _scopes(analysis):
        members = [r for r in rows if (r["start_point"], r["scale"]) == (start_point, scale)]
        present = [d for d in dimensions if any(r["dimension"] == d for r in members)]
        key = _slug("captrack", start_point, scale)
        title = f"CapTrack dimensions: {_scope_label(start_point, scale)}"
        if len(present) < 3:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: a CapTrack radar needs at least 3 of the dimensions {', '.join(dimensions)} with "
                f"paired records, {_scope_label(start_point, scale)} has {len(present)} ({', '.join(present) or 'none'})")))
            continue
        methods = sorted({r["method"] for r in members}, key=method_label)
        domains = sorted({_domain(r["domain"]) for r in members})
        means: dict[tuple[str, str, str], float] = {}
        for method in methods:
            for domain in domains:
                for dimension in present:
                    values = [r["relative_drift"] for r in members if r["method"] == method
                              and _domain(r["domain"]) == domain and r["dimension"] == dimension]
                    if values:
                        means[(method, domain, dimension)] = 100 * float(np.mean(values))
        angles = np.linspace(0, 2 * np.pi, len(present), endpoint=False)
        low, high = min(min(means.values()), -1.0), max(max(means.values()), 1.0)
        columns = min(3, len(methods))
        n_rows = int(np.ceil(len(methods) / columns))
        figure = Figure(figsize=(max(3.6 * columns, 6.5), 3.6 * n_rows + 0.4), layout="constrained")
        for index, method in enumerate(methods):
            axes = figure.add_subplot(n_rows, columns, index + 1, projection="polar")
            for domain in domains:
                radius = np.array([means.get((method, domain, d), np.nan) for d in present])
                if np.all(np.isnan(radius)):
                    continue
                axes.plot(np.append(angles, angles[0]), np.append(radius, radius[0]), marker="o", label=domain)
            axes.plot(np.linspace(0, 2 * np.pi, 100), np.zeros(100), color="grey", linewidth=0.8, linestyle="--")
            axes.set_ylim(low - 1, high + 1)
            axes.set_xticks(angles, [d.replace("_", " ") for d in present], fontsize=7)
            axes.yaxis.set_major_locator(MaxNLocator(4))
            axes.tick_params(axis="y", labelsize=6)
            axes.set_title(method_label(method), fontsize=9)
            axes.legend(fontsize=6, loc="lower right", bbox_to_anchor=(1.25, -0.1))
        figure.suptitle(f"Relative drift (%) per CapTrack dimension, {_scope_label(start_point, scale)}", fontsize=10)
        worst_key = min(means, key=means.get)
        figures.append(ReportFigure(
            key, title,
            caption=("Relative drift (post - baseline) / baseline in percent, mean over seeds, per CapTrack dimension: "
                     "knowledge, skills and protocol from off-target accuracy, robustness from answer consistency under "
                     "perturbations, default behaviour as minus the mean absolute drift of the style features; one "
                     f"radar per method, one line per training domain; the dashed circle is no change. "
                     f"{_scope_label(start_point, scale)}; intervals: the CapTrack table."),
            alt=(f"{len(methods)} radar chart(s) over {', '.join(present)}. The largest drop is {means[worst_key]:.1f}% "
                 f"for {method_label(worst_key[0])} on {worst_key[2]} (domain {worst_key[1]})."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("captrack", "CapTrack dimensions")]


def _configs(analysis: StudyAnalysis, start_point: str, scale: str) -> dict[tuple[str, str], list[str]]:
    """(method, domain) -> cell ids of the post-trained cells of one scope."""
    configs: dict[tuple[str, str], list[str]] = {}
    for cell in analysis.study.post_cells:
        if (cell.start_point, cell.scale) == (start_point, scale):
            configs.setdefault((cell.method, _domain(cell.domain)), []).append(cell.cell_id)
    return dict(sorted(configs.items(), key=lambda kv: (method_label(kv[0][0]), kv[0][1])))


def transition_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per scope: forgetting (1->0) and backward-transfer (0->1) shares of off-target capability items with
    bootstrap CIs."""
    figures = []
    for start_point, scale in _scopes(analysis):
        configs = _configs(analysis, start_point, scale)
        estimates = []
        for (method, domain), cell_ids in configs.items():
            forgetting = group_estimate(analysis.study, cell_ids, "forgetting", analysis.settings)
            transfer = group_estimate(analysis.study, cell_ids, "backward_transfer", analysis.settings)
            if forgetting["estimate"] is not None:
                estimates.append((method, domain, len(cell_ids), forgetting, transfer))
        key = _slug("transitions", start_point, scale)
        title = f"Transitions: {_scope_label(start_point, scale)}"
        if not estimates:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: no binary off-target capability items paired for "
                f"{_scope_label(start_point, scale)}")))
            continue
        figure = Figure(figsize=(max(5.0, 1.1 * len(estimates) + 2), 3.8), layout="constrained")
        axes = figure.add_subplot()
        positions = np.arange(len(estimates))
        width = 0.38
        for offset, name, index, color in ((-width / 2, "1→0 (forgetting)", 3, "#c0392b"),
                                           (width / 2, "0→1 (backward transfer)", 4, "#2e86c1")):
            heights = np.array([100 * e[index]["estimate"] for e in estimates])
            lows = np.array([100 * e[index]["low"] for e in estimates])
            highs = np.array([100 * e[index]["high"] for e in estimates])
            error = np.vstack([np.maximum(heights - lows, 0), np.maximum(highs - heights, 0)])
            axes.bar(positions + offset, heights, width, yerr=error, capsize=3, label=name, color=color)
        labels = [f"{method_label(m)}\n{d}\n({n} seed{'s' if n > 1 else ''})" for m, d, n, _, _ in estimates]
        axes.set_xticks(positions, labels, fontsize=7)
        axes.set_ylabel("share of off-target capability items (%)")
        axes.legend(fontsize=8)
        axes.set_title(f"Item transitions vs baseline, {_scope_label(start_point, scale)}", fontsize=10)
        worst = max(estimates, key=lambda e: e[3]["estimate"])
        level = int(round(100 * analysis.settings.confidence))
        figures.append(ReportFigure(
            key, title,
            caption=(f"Share of off-target capability items (benchmarks outside the training domain) that flip from "
                     f"correct to wrong (1→0, forgetting) and from wrong to correct (0→1, backward transfer) after "
                     f"post-training, per method and training domain; per-item shares are averaged over seeds, error "
                     f"bars are {level}% two-stage bootstrap intervals (seeds, then items; items only with one "
                     f"seed). {_scope_label(start_point, scale)}."),
            alt=(f"Grouped bar chart of 1→0 and 0→1 shares for {len(estimates)} method/domain configuration(s); "
                 f"the largest forgetting is {percent(worst[3]['estimate'])} for {method_label(worst[0])} "
                 f"({worst[1]})."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("transitions", "Transitions")]


def _front_line(points: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """The front's points sorted by x, as a staircase line."""
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["target_accuracy"])
    return [100 * p["target_accuracy"] for p in front], [100 * p["harmful_refusal_rate"] for p in front]


def pareto_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per scope: harmful-prompt refusal rate vs the domain's target-task accuracy, the Pareto front drawn."""
    rows = analysis["pareto"]
    colors = method_colors(_all_methods(analysis))
    figures = []
    for start_point, scale in _scopes(analysis):
        members = [r for r in rows if (r["start_point"], r["scale"]) == (start_point, scale)]
        key = _slug("pareto", start_point, scale)
        title = f"Safety vs target task: {_scope_label(start_point, scale)}"
        domains = sorted({r["group_domain"] for r in members})
        if not domains:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: {_scope_label(start_point, scale)} has no cell with both harmful-prompt "
                f"refusal records and records of its domain's target benchmark")))
            continue
        figure = Figure(figsize=(4.2 * len(domains), 3.8), layout="constrained")
        for index, domain in enumerate(domains):
            axes = figure.add_subplot(1, len(domains), index + 1)
            points = [r for r in members if r["group_domain"] == domain]
            for point in points:
                marker = "*" if point["is_baseline"] else ("o" if point["on_front"] else "x")
                axes.scatter(100 * point["target_accuracy"], 100 * point["harmful_refusal_rate"], marker=marker,
                             s=120 if point["is_baseline"] else 50, color=colors.get(point["method"], "grey"))
                axes.annotate(f"{method_label(point['method'])} s{point['seed']}",
                              (100 * point["target_accuracy"], 100 * point["harmful_refusal_rate"]),
                              fontsize=7, xytext=(3, 3), textcoords="offset points")
            xs, ys = _front_line(points)
            axes.plot(xs, ys, linestyle="--", color="grey", linewidth=1, label="Pareto front")
            axes.set_xlabel(f"target accuracy, {points[0]['target_benchmarks']} (%)")
            axes.set_ylabel("refusal rate on harmful prompts (%)")
            axes.set_title(f"domain {domain}", fontsize=9)
            axes.legend(fontsize=7)
        figure.suptitle(f"Safety vs target task, {_scope_label(start_point, scale)}", fontsize=10)
        on_front = [r for r in members if r["on_front"]]
        figures.append(ReportFigure(
            key, title,
            caption=(f"Each point is one cell (star: the baseline; circle: on the Pareto front; cross: dominated): "
                     f"x = accuracy on the training domain's held-out target benchmark, y = refusal rate on harmful "
                     f"prompts of all safety benchmarks (pooled). The dashed line joins the non-dominated cells. "
                     f"{_scope_label(start_point, scale)}."),
            alt=(f"Scatter plot per domain ({', '.join(domains)}) of target accuracy against harmful-prompt refusal; "
                 f"{len(on_front)} of {len(members)} point(s) are on the Pareto front: "
                 + ", ".join(f"{method_label(r['method'])} seed {r['seed']} ({r['group_domain']})" for r in on_front)
                 + "."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("pareto", "Safety vs target task")]


def cka_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per scope: linear CKA between baseline and post-trained activations by layer, one line per configuration."""
    rows = [r for r in analysis["representation"] if r["cka"] is not None and np.isfinite(r["cka"])]
    colors = method_colors(_all_methods(analysis))
    figures = []
    for start_point, scale in _scopes(analysis):
        members = [r for r in rows
                   if (r["start_point"], r["scale"]) == (start_point, scale) and r["method"] != BASELINE_METHOD]
        key = _slug("cka", start_point, scale)
        title = f"CKA by layer: {_scope_label(start_point, scale)}"
        if not members:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: no representation.json with CKA values for {_scope_label(start_point, scale)}")))
            continue
        figure = Figure(figsize=(5.5, 3.6), layout="constrained")
        axes = figure.add_subplot()
        configs = _config_order(members)
        lowest = (None, 2.0)
        for method, domain in configs:
            chosen = [r for r in members if r["method"] == method and _domain(r["domain"]) == domain]
            layers = sorted({r["layer"] for r in chosen})
            means = [float(np.mean([r["cka"] for r in chosen if r["layer"] == layer])) for layer in layers]
            styles = ["-", "--", ":", "-."]
            axes.plot(layers, means, marker="o", color=colors.get(method, "grey"),
                      linestyle=styles[sorted({c[1] for c in configs}).index(domain) % 4],
                      label=f"{method_label(method)} ({domain})")
            if min(means) < lowest[1]:
                lowest = (f"{method_label(method)} ({domain}) at layer {layers[int(np.argmin(means))]}", min(means))
        axes.set_xlabel("layer")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("linear CKA vs start model")
        axes.legend(fontsize=7)
        axes.set_title(f"Representation similarity by layer, {_scope_label(start_point, scale)}", fontsize=10)
        figures.append(ReportFigure(
            key, title,
            caption=(f"Linear CKA between the start model's and the post-trained model's activations on a fixed probe "
                     f"set, per layer (1 = unchanged), mean over seeds; line style marks the training domain. "
                     f"{_scope_label(start_point, scale)}."),
            alt=(f"Line chart of CKA against layer for {len(configs)} configuration(s); the lowest similarity is "
                 f"{lowest[1]:.3f} for {lowest[0]}."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("cka", "CKA by layer")]


def probe_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per scope: knowledge-probe accuracy by layer on held-out statements, the start model's activations (dashed,
    the probe's own model) against each configuration's post-trained activations."""
    rows = [r for r in analysis["representation"] if r["probe_post"] is not None and r["method"] != BASELINE_METHOD]
    colors = method_colors(_all_methods(analysis))
    figures = []
    for start_point, scale in _scopes(analysis):
        members = [r for r in rows if (r["start_point"], r["scale"]) == (start_point, scale)]
        key = _slug("probe", start_point, scale)
        title = f"Knowledge probes by layer: {_scope_label(start_point, scale)}"
        if not members:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: no representation.json with knowledge probes for {_scope_label(start_point, scale)}")))
            continue
        figure = Figure(figsize=(5.5, 3.6), layout="constrained")
        axes = figure.add_subplot()
        layers = sorted({r["layer"] for r in members})
        start = [float(np.mean([r["probe_start"] for r in members if r["layer"] == layer])) for layer in layers]
        axes.plot(layers, start, color="black", linestyle="--", marker=".", label="start model")
        worst = (None, 0.0)
        for method, domain in _config_order(members):
            chosen = [r for r in members if r["method"] == method and _domain(r["domain"]) == domain]
            post = [float(np.mean([r["probe_post"] for r in chosen if r["layer"] == layer])) for layer in layers]
            axes.plot(layers, post, marker="o", color=colors.get(method, "grey"),
                      label=f"{method_label(method)} ({domain})")
            refit = [[r["probe_post_refit"] for r in chosen if r["layer"] == layer] for layer in layers]
            if all(values and None not in values for values in refit):
                axes.plot(layers, [float(np.mean(values)) for values in refit], linestyle="-.", linewidth=1.0,
                          color=colors.get(method, "grey"), label=f"{method_label(method)} ({domain}), refit")
            drop = max(s - q for s, q in zip(start, post))
            if drop > worst[1]:
                worst = (f"{method_label(method)} ({domain})", drop)
        axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        axes.set_xlabel("layer")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("held-out probe accuracy")
        axes.set_ylim(0.0, 1.05)
        axes.legend(fontsize=7)
        n_test = max(r["probe_n_test"] or 0 for r in members)
        axes.set_title(f"Linear knowledge probes, {_scope_label(start_point, scale)}", fontsize=10)
        figures.append(ReportFigure(
            key, title,
            caption=(f"A logistic-regression probe per layer, fit on the start model's activations of true vs false "
                     f"statements (NQ-open items), scored on {n_test} held-out statements with the start model's "
                     f"activations (dashed) and with each post-trained model's (mean over seeds); dash-dotted: probes refit "
                     f"on the post-trained model's own training statements (a read-out that fails while the refit one "
                     f"holds means the knowledge moved rather than vanished); the dotted line is chance. "
                     f"{_scope_label(start_point, scale)}."),
            alt=("Line chart of probe accuracy against layer; " + (
                f"the largest drop from the start is {100 * worst[1]:.1f} pp for {worst[0]}." if worst[0]
                else "no configuration falls below the start model.")),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("probe", "Knowledge probes by layer")]


ATTACK_TEMPLATES = ("gcg", "gcg_transfer", "autodan", "autodan_transfer")


def attack_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per scope: attack success rate of each optimised attack and replay, baseline vs each post-trained
    configuration, with Wilson intervals (all behaviours; per HarmBench category in tables/jailbreak.csv)."""
    rows = [r for r in analysis["jailbreak"] if r["template"] in ATTACK_TEMPLATES and r["category"] == "ALL"]
    colors = method_colors(_all_methods(analysis))
    figures = []
    for start_point, scale in _scopes(analysis):
        members = [r for r in rows if (r["start_point"], r["scale"]) == (start_point, scale)]
        key = _slug("attacks", start_point, scale)
        title = f"Attack success before and after post-training: {_scope_label(start_point, scale)}"
        post = [r for r in members if r["method"] != BASELINE_METHOD and r["baseline_asr"] is not None]
        if not post:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: no GCG/AutoDAN records paired with a baseline for "
                f"{_scope_label(start_point, scale)} (enable the study's attacks section)")))
            continue
        templates = [t for t in ATTACK_TEMPLATES if any(r["template"] == t for r in post)]
        configs = _config_order(post)
        figure = Figure(figsize=(max(5.5, 1.6 * len(templates) * (1 + len(configs)) / 2), 3.8), layout="constrained")
        axes = figure.add_subplot()
        width = 0.8 / (1 + len(configs))
        for t_index, template in enumerate(templates):
            base = next((r for r in members if r["template"] == template and r["method"] == BASELINE_METHOD), None)
            bars = [("baseline", "grey", base)] + [
                (f"{method_label(m)} ({d})", colors.get(m, "grey"),
                 next((r for r in post if r["template"] == template and r["method"] == m and _domain(r["domain"]) == d),
                      None)) for m, d in configs]
            for b_index, (label, color, row) in enumerate(bars):
                if row is None:
                    continue
                x = t_index + (b_index - len(configs) / 2) * width
                err = [[max(row["asr"] - row["asr_ci_low"], 0.0)], [max(row["asr_ci_high"] - row["asr"], 0.0)]]
                axes.bar(x, 100 * row["asr"], width, color=color, label=label if t_index == 0 else None)
                axes.errorbar(x, 100 * row["asr"], yerr=100 * np.array(err), color="black", capsize=2, linewidth=0.8)
        axes.set_xticks(range(len(templates)), templates, fontsize=8)
        axes.set_ylabel("attack success rate (%)")
        axes.set_ylim(0, 105)
        axes.legend(fontsize=7)
        axes.set_title(f"GCG / AutoDAN ASR, {_scope_label(start_point, scale)}", fontsize=10)
        n = max(r["n"] for r in post)
        figures.append(ReportFigure(
            key, title,
            caption=("Attack success rate (responses the refusal matcher does not count as refusals) of the attacks "
                     "optimised against each model (gcg, autodan) and of the baseline's findings replayed on it "
                     "(_transfer), baseline vs each post-trained configuration, with 95% Wilson intervals; "
                     f"up to {n} behaviours per bar. Per HarmBench category and the paired erosion: the jailbreak and "
                     f"safety tables. {_scope_label(start_point, scale)}."),
            alt=(f"Bar chart of attack success for {', '.join(templates)}: baseline and {len(configs)} "
                 f"post-trained configuration(s)."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("attacks", "Attack success before and after post-training")]


def attenuation_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per scope: refusal-direction attenuation (1 - mean projection-gap ratio) per configuration, std over seeds."""
    rows = [r for r in analysis["cell_summary"]
            if r["method"] != BASELINE_METHOD and r["refusal_attenuation"] is not None]
    colors = method_colors(_all_methods(analysis))
    figures = []
    for start_point, scale in _scopes(analysis):
        members = [r for r in rows if (r["start_point"], r["scale"]) == (start_point, scale)]
        key = _slug("attenuation", start_point, scale)
        title = f"Refusal-direction attenuation: {_scope_label(start_point, scale)}"
        if not members:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: no representation.json with refusal-direction values for "
                f"{_scope_label(start_point, scale)}")))
            continue
        configs = _config_order(members)
        means, stds, counts = [], [], []
        for method, domain in configs:
            values = [r["refusal_attenuation"] for r in members
                      if r["method"] == method and _domain(r["domain"]) == domain]
            means.append(float(np.mean(values)))
            stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))
            counts.append(len(values))
        figure = Figure(figsize=(max(4.5, 1.0 * len(configs) + 2), 3.6), layout="constrained")
        axes = figure.add_subplot()
        positions = np.arange(len(configs))
        axes.bar(positions, means, color=[colors.get(m, "grey") for m, _ in configs])
        spread = [i for i, n in enumerate(counts) if n > 1]
        if spread:
            axes.errorbar(positions[spread], np.array(means)[spread], yerr=np.array(stds)[spread], fmt="none",
                          ecolor="black", capsize=3)
        axes.axhline(0, color="grey", linewidth=0.8)
        labels = [f"{method_label(m)}\n{d}\n(n={n})" for (m, d), n in zip(configs, counts)]
        axes.set_xticks(positions, labels, fontsize=7)
        axes.set_ylabel("1 - projection-gap ratio")
        axes.set_title(f"Refusal-direction attenuation, {_scope_label(start_point, scale)}", fontsize=10)
        top = int(np.argmax(means))
        figures.append(ReportFigure(
            key, title,
            caption=(f"Refusal-direction attenuation = 1 - (harmful-minus-harmless projection gap on the start model's "
                     f"refusal direction after post-training / before), mean over layers; 0 = intact, 1 = erased. "
                     f"Bars are means over seeds, error bars the sample std when there are several seeds (n = seeds). "
                     f"{_scope_label(start_point, scale)}."),
            alt=(f"Bar chart of refusal-direction attenuation for {len(configs)} configuration(s); the largest is "
                 f"{means[top]:.3f} for {method_label(configs[top][0])} ({configs[top][1]})."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("attenuation", "Refusal-direction attenuation")]


def scaling_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per start point: overall capability forgetting against model parameters (log axis), one line per method with
    results at two or more scales, with item-bootstrap intervals."""
    figures = []
    colors = method_colors(_all_methods(analysis))
    level = int(round(100 * analysis.settings.confidence))
    for start_point in sorted({c.start_point for c in analysis.study.post_cells}):
        cells = [c for c in analysis.study.post_cells if c.start_point == start_point]
        lines = {}
        for method in sorted({c.method for c in cells}, key=method_label):
            members = [c for c in cells if c.method == method]
            by_scale = {scale: [c.cell_id for c in members if c.scale == scale] for scale in {c.scale for c in members}}
            points = [row for row in scaling_trend(analysis.study, by_scale, "forgetting", analysis.settings)["scales"]
                      if row["estimate"] is not None]
            if len(points) >= 2:
                lines[method] = points
        key = _slug("scaling", start_point)
        title = f"Forgetting vs model size: start point {start_point.upper()}"
        if not lines:
            figures.append(ReportFigure(key, title, "", "", missing=(
                f"not enough data: no method of the {start_point.upper()} start has results at two or more scales "
                f"with a parameter count in the name (e.g. 135m, 1.5b)")))
            continue
        figure = Figure(figsize=(6.0, 4.0), layout="constrained")
        axes = figure.add_subplot()
        for method, points in lines.items():
            x = np.array([row["parameters"] for row in points])
            y = np.array([100 * row["estimate"] for row in points])
            error = np.vstack([np.maximum(y - 100 * np.array([row["low"] for row in points]), 0),
                               np.maximum(100 * np.array([row["high"] for row in points]) - y, 0)])
            axes.errorbar(x, y, yerr=error, marker="o", capsize=3, label=method_label(method),
                          color=colors.get(method, "grey"))
        axes.set_xscale("log")
        scales = sorted({(row["parameters"], row["scale"]) for points in lines.values() for row in points})
        axes.set_xticks([p for p, _ in scales], [name for _, name in scales])
        axes.minorticks_off()
        axes.set_xlabel("model parameters (log scale)")
        axes.set_ylabel("capability items forgotten F (%)")
        axes.legend(fontsize=8)
        axes.set_title(f"Forgetting vs model size, start point {start_point.upper()}", fontsize=10)
        figures.append(ReportFigure(
            key, title,
            caption=(f"Overall capability forgetting F (share of capability items correct at the baseline and wrong "
                     f"after post-training) at each model scale, one line per method with results at two or more "
                     f"scales; per-item shares are averaged over seeds and domains, error bars are {level}% item-"
                     f"bootstrap intervals. Start point {start_point.upper()}."),
            alt=(f"Line chart of forgetting against model size for {len(lines)} method(s) over the scales "
                 f"{', '.join(name for _, name in scales)}."),
            png=render_png(figure),
        ))
    return figures or [_no_cells_figure("scaling", "Forgetting vs model size")]


def transfer_column_label(eval_domain: str, scoring: str) -> str:
    """A matrix column: the safety domain, "(gen)" for a disposition answered in free text."""
    generated = scoring == "behaviour" and SAFETY_DOMAINS[eval_domain].kind != "refusal"
    return eval_domain + (" (gen)" if generated else "")


def transfer_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """The cross-domain transfer matrix per (start point, scale, method): training domain X (rows) x safety
    evaluation column Y (columns), the change of the safe-behaviour rate in percentage points with its interval in each
    cell, the covered cells (X == Y) outlined; the mismatch correlation in the caption."""
    rows = [r for r in analysis["transfer"] if r["delta"] is not None]
    if not rows:
        return [ReportFigure("transfer", "Cross-domain safety transfer", "", "", missing=(
            "not enough data: no post-trained cell has paired items of a safety domain's evaluation benchmarks "
            "(the <domain>_heldout sets of forgetjax/tasks/safety_domains.py; configs/studies/safety_transfer.yaml)"))]
    correlations = {(r["start_point"], r["scale"], r["method"]): r for r in analysis["transfer_mismatch"]}
    level = int(round(100 * analysis.settings.confidence))
    order = {(name, scoring): index for index, (name, scoring, _) in enumerate(evaluation_columns())}
    figures = []
    for start_point, scale, method in sorted({(r["start_point"], r["scale"], r["method"]) for r in rows},
                                             key=lambda g: (g[0], g[1], method_label(g[2]))):
        members = [r for r in rows if (r["start_point"], r["scale"], r["method"]) == (start_point, scale, method)]
        train = sorted({r["train_domain"] for r in members},
                       key=lambda d: (list(SAFETY_DOMAINS).index(d) if d in SAFETY_DOMAINS else -1, d))
        columns = sorted({(r["eval_domain"], r["scoring"]) for r in members}, key=order.get)
        values = np.full((len(train), len(columns)), np.nan)
        texts = [["n/a"] * len(columns) for _ in train]
        for r in members:
            i, j = train.index(r["train_domain"]), columns.index((r["eval_domain"], r["scoring"]))
            values[i, j] = 100 * r["delta"]
            texts[i][j] = (f"{100 * r['delta']:+.1f}\n[{100 * r['delta_ci_low']:+.1f}, "
                           f"{100 * r['delta_ci_high']:+.1f}]")
        figure = Figure(figsize=(1.25 * len(columns) + 3.0, 0.75 * len(train) + 2.2), layout="constrained")
        axes = figure.add_subplot()
        span = max(float(np.nanmax(np.abs(values))), 1.0)
        image = axes.imshow(np.ma.masked_invalid(values), cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
        axes.set_xticks(range(len(columns)), [transfer_column_label(*c) for c in columns], rotation=30, ha="right")
        axes.set_yticks(range(len(train)), train)
        for i, domain in enumerate(train):
            for j, (eval_domain, _) in enumerate(columns):
                color = "white" if np.isfinite(values[i, j]) and abs(values[i, j]) > 0.6 * span else "black"
                axes.text(j, i, texts[i][j], ha="center", va="center", fontsize=7, color=color)
                if domain == eval_domain:
                    axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.0))
        figure.colorbar(image, ax=axes, label="change of the safe-behaviour rate (pp)")
        axes.set_xlabel("evaluated safety domain Y")
        axes.set_ylabel("trained domain X")
        axes.set_title(f"Safety transfer, {method_label(method)}, {_scope_label(start_point, scale)}", fontsize=10)
        correlation = correlations.get((start_point, scale, method))
        if correlation is None or correlation["rho"] is None:
            why = correlation["note"] if correlation else "not enough data: no (X, Y) pair of safety domains"
            mismatch = f"Correlation of regression with domain mismatch: {why}."
        else:
            mismatch = (f"Spearman correlation of regression (baseline - post) with domain mismatch (0 same domain, 1 "
                        f"same kind, 2 disposition vs refusal): rho = {correlation['rho']:+.2f} ({level}% CI "
                        f"{correlation['rho_ci_low']:+.2f} to {correlation['rho_ci_high']:+.2f}, n = "
                        f"{correlation['n_pairs']} (X, Y) pairs).")
        seeds = max(r["n_seeds"] for r in members)
        covered = [r for r in members if r["covered"]]
        figures.append(ReportFigure(
            key=_slug("transfer", start_point, scale, method),
            title=f"Cross-domain safety transfer: {method_label(method)}, {_scope_label(start_point, scale)}",
            caption=(f"Change of the safe-behaviour rate (post - baseline, percentage points: refusals of harmful "
                     f"requests, safe options chosen) on each evaluated safety domain Y (columns; (gen): the "
                     f"disposition answered in free text) after post-training on domain X (rows), paired items, "
                     f"{level}% two-stage bootstrap interval in brackets (seeds, then items; {seeds} seed(s) at most). "
                     f"Outlined: covered cells (X = Y, evaluated on the held-out half of X's items); blue = safer, "
                     f"red = regression. {mismatch}"),
            alt=(f"Heatmap of {len(train)} trained domain(s) by {len(columns)} evaluated safety domain column(s) with "
                 f"{len(covered)} covered cell(s) outlined; values are changes in percentage points with intervals."),
            png=render_png(figure),
        ))
    return figures


AXIS_TITLES = {"adapter": "LoRA vs full fine-tuning", "merge": "Interpolation frontier (WiSE-FT)",
               "frpo_lambda": "FRPO lambda", "frpo_jackknife": "FRPO jackknife", "budget": "Budget"}


def _pp(value: float | None) -> float:
    return np.nan if value is None else 100 * value


def _errors(rows: Sequence[Mapping[str, Any]], column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, [2, n] error-bar lengths) in percentage points of a column and its interval."""
    values = np.array([_pp(r[column]) for r in rows])
    low = np.array([_pp(r[f"{column}_low"]) for r in rows])
    high = np.array([_pp(r[f"{column}_high"]) for r in rows])
    return values, np.nan_to_num(np.vstack([values - low, high - values]))


def axis_figures(analysis: StudyAnalysis) -> list[ReportFigure]:
    """Per axis and (start point, scale): off-target F, refusal drop and target gain against the axis value, one
    line per method with interval bars; for the merge axis the interpolation frontier, capability kept (1 - F) against
    target gain per alpha."""
    rows = analysis["axes"]
    if not rows:
        return [ReportFigure("axes", "Mitigation axes", "", "", missing=(
            "not enough data: no axis has two values with finished cells (a study without axes, or cells missing)"))]
    figures = []
    for axis, start_point, scale in sorted({(r["axis"], r["start_point"], r["scale"]) for r in rows}):
        members = [r for r in rows if (r["axis"], r["start_point"], r["scale"]) == (axis, start_point, scale)]
        methods = sorted({r["method"] for r in members}, key=method_label)
        colors = method_colors(_all_methods(analysis) + methods)
        key = _slug("axis", axis, start_point, scale)
        title = f"{AXIS_TITLES.get(axis, f'Axis {axis}')}, {_scope_label(start_point, scale)}"
        if axis == "merge":
            figure = Figure(figsize=(6.0, 4.2), layout="constrained")
            plot = figure.add_subplot()
            for method in methods:
                line = [r for r in members if r["method"] == method]
                line = [r for r in line if not r["reference"]] + [r for r in line if r["reference"]]  # trained: a=1 end
                gain, gain_err = _errors(line, "target_gain")
                forgetting, f_err = _errors(line, "F")
                plot.errorbar(gain, 100 - forgetting, xerr=gain_err, yerr=f_err[::-1], marker="o", capsize=3,
                              color=colors[method], label=method_label(method))
                for r, x, y in zip(line, gain, 100 - forgetting):
                    if np.isfinite(x) and np.isfinite(y):
                        plot.annotate(r["value"].replace("interpolate=", "a="), (x, y), fontsize=7,
                                      textcoords="offset points", xytext=(4, 4))
            plot.set_xlabel("target-task gain (pp)")
            plot.set_ylabel("off-target capability kept, 100 - F (%)")
            plot.legend(fontsize=8)
            caption = ("Each point is one interpolation alpha between the start (alpha 0) and the post-trained weights "
                       "(alpha 1; the trained cells are the point labelled 'trained'); bars are "
                       f"{int(100 * analysis.settings.confidence)}% two-stage bootstrap intervals. Up and right is "
                       "better: capability kept while the target is gained.")
        else:
            figure = Figure(figsize=(11.0, 3.6), layout="constrained")
            labels = [r["value"] for r in sorted(members, key=lambda r: not r["reference"])]
            order = list(dict.fromkeys(labels))
            for index, (column, name) in enumerate((("F", "off-target forgetting F (%)"),
                                                    ("refusal_drop", "refusal drop on harmful prompts (pp)"),
                                                    ("target_gain", "target-task gain (pp)"))):
                plot = figure.add_subplot(1, 3, index + 1)
                for shift, method in enumerate(methods):
                    line = sorted((r for r in members if r["method"] == method), key=lambda r: order.index(r["value"]))
                    values, errors = _errors(line, column)
                    x = np.array([order.index(r["value"]) for r in line]) + 0.06 * (shift - len(methods) / 2)
                    plot.errorbar(x, values, yerr=errors, marker="o", capsize=3, color=colors[method],
                                  label=method_label(method))
                plot.set_xticks(range(len(order)), order, rotation=20, fontsize=7)
                plot.set_ylabel(name, fontsize=8)
                plot.axhline(0, color="#999", linewidth=0.6)
            figure.axes[0].legend(fontsize=7)
            caption = (f"One value of axis '{axis}' at a time, every other axis at its reference (the first value "
                       "listed); per method, with " f"{int(100 * analysis.settings.confidence)}% two-stage bootstrap "
                       "intervals (seeds, then items). Numbers and differences to the reference: tables/axes.csv.")
        figures.append(ReportFigure(key, title, caption, f"{title}: forgetting and target gain by axis value",
                                    png=render_png(figure)))
    return figures


FIGURE_SECTIONS = (
    ("Forgetting heatmaps", heatmap_figures),
    ("Category deltas per method", radar_figures),
    ("CapTrack dimensions per method", captrack_figures),
    ("Item transitions", transition_figures),
    ("Safety vs target-task Pareto front", pareto_figures),
    ("Representation similarity (CKA) by layer", cka_figures),
    ("Refusal-direction attenuation", attenuation_figures),
    ("Linear knowledge probes by layer", probe_figures),
    ("Optimised attacks (GCG, AutoDAN) before and after", attack_figures),
    ("Forgetting vs model size", scaling_figures),
    ("Cross-domain safety transfer", transfer_figures),
    ("Mitigation axes", axis_figures),
)


def all_figures(analysis: StudyAnalysis) -> list[tuple[str, list[ReportFigure]]]:
    """Every section title with its figures, in report order."""
    return [(title, build(analysis)) for title, build in FIGURE_SECTIONS]
