"""The HTML/Markdown report built from the synthetic RESULTS_DIR of test_analysis_queries: files, self-containment,
research-question numbers recomputed independently, honest 'not enough data' answers, and a headless-Chromium check
that every figure renders without console errors."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from forgetjax.analysis.tables import TABLE_NAMES
from forgetjax.report import build_report
from test_analysis_queries import OFF_TARGET, SPECS, CellSpec, Synthetic, build_synthetic_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_RESAMPLES = 200
# heatmaps 3 (base math, base qa, safe math) + 2 x (transitions, pareto, cka, attenuation) + the base scope's radar
# (the safe scope's math cells have 2 off-target families, a radar needs 3)
EXPECTED_FIGURES = 12
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class ReportParser(HTMLParser):
    """Collects images, figures with their captions, links, scripts and paragraphs of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.scripts = 0
        self.external = 0
        self.captions: list[str] = []
        self.figures = 0
        self.paragraphs: list[str] = []
        self._in_caption = False
        self._in_paragraph = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        elif tag == "a":
            self.links.append(attributes.get("href", ""))
        elif tag in ("script", "iframe", "object", "embed"):
            self.scripts += 1
        elif tag == "link":
            self.external += 1
        elif tag == "figure":
            self.figures += 1
        elif tag == "figcaption":
            self._in_caption = True
            self.captions.append("")
        elif tag == "p":
            self._in_paragraph = True
            self.paragraphs.append("")

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False
        elif tag == "p":
            self._in_paragraph = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data
        if self._in_paragraph:
            self.paragraphs[-1] += data


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def answer_paragraphs(markdown: str, key: str) -> str:
    """The text under '### RQn: ...' up to the next heading."""
    match = re.search(rf"^### {key}: .*?\n(.*?)(?=^#)", markdown, flags=re.S | re.M)
    assert match, key
    return match.group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Synthetic, Path]:
    root = tmp_path_factory.mktemp("study")
    synthetic = build_synthetic_study(root / "results")
    index = build_report(root / "results", root / "report", n_resamples=N_RESAMPLES)
    return synthetic, index


def test_report_writes_html_markdown_figures_and_tables(built):
    _, index = built
    out = index.parent
    assert index.name == "index.html" and (out / "report.md").is_file()
    assert {p.stem for p in (out / "tables").glob("*.csv")} == set(TABLE_NAMES)
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) == EXPECTED_FIGURES
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pngs)
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind
    markdown = (out / "report.md").read_text()
    for png in pngs:
        assert f"](figures/{png.name})" in markdown


def test_html_is_self_contained_and_every_figure_has_caption_and_alt(built):
    _, index = built
    page = parse(index)
    assert page.scripts == 0 and page.external == 0
    assert len(page.images) == page.figures == len(page.captions) == EXPECTED_FIGURES
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1]).startswith(PNG_SIGNATURE)
        assert len(image.get("alt", "").strip()) > 20
    assert all(len(caption.strip()) > 40 for caption in page.captions)
    text = index.read_text()
    assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text
    for link in page.links:
        assert re.fullmatch(r"tables/\w+\.csv", link) and (index.parent / link).is_file()


def _overall_forgetting(synthetic: Synthetic, cell_ids: list[str]) -> dict[tuple[str, str], float]:
    """(benchmark, item) -> mean over the cells of the 1->0 indicator, off-target capability items only."""
    per_item: dict[tuple[str, str], list[float]] = {}
    for cell_id in cell_ids:
        for benchmark in OFF_TARGET[synthetic.specs[cell_id].domain]:
            ids, pre, post = synthetic.pairs(cell_id, benchmark)
            for item_id, p, q in zip(ids, pre, post):
                per_item.setdefault((benchmark, item_id), []).append(p.correct * (1 - q.correct))
    return {key: float(np.mean(values)) for key, values in per_item.items()}


def _cells(**where) -> list[str]:
    return [s.cell_id for s in SPECS if s.status == "done" and s.method != "baseline"
            and all(getattr(s, k) == v for k, v in where.items())]


def test_research_question_numbers_match_independent_computation(built):
    synthetic, index = built
    markdown = (index.parent / "report.md").read_text()
    for key in ("RQ1", "RQ2", "RQ3", "RQ4", "RQ5", "RQ6", "RQ7", "RQ8", "RQ9"):
        assert f"### {key}: " in markdown
    rq1 = answer_paragraphs(markdown, "RQ1")
    base_rq1 = [p for p in rq1.strip().split("\n\n") if p.startswith("[BASE start")][0]
    labels = {"gt_sft": "GT-SFT", "on_rl": "ON-RL", "self": "SELF", "sf_sft": "SF-SFT"}
    forgetting = {m: np.mean(list(_overall_forgetting(synthetic, _cells(start_point="base", method=m)).values()))
                  for m in labels}
    for method, value in forgetting.items():
        assert f"{labels[method]} {100 * value:.1f}% (95% CI" in base_rq1
    most, least = max(forgetting, key=forgetting.get), min(forgetting, key=forgetting.get)
    assert f"{labels[most]} forgets the most and {labels[least]} the least" in base_rq1
    rq5 = answer_paragraphs(markdown, "RQ5")
    on_cells = [c for m in ("on_rl", "self") for c in _cells(start_point="base", method=m)]
    off_cells = [c for m in ("gt_sft", "sf_sft") for c in _cells(start_point="base", method=m)]
    on, off = _overall_forgetting(synthetic, on_cells), _overall_forgetting(synthetic, off_cells)
    shared = sorted(set(on) & set(off))
    difference = np.mean([on[k] - off[k] for k in shared])
    assert f"on-policy - off-policy = {100 * difference:+.1f} pp" in rq5
    rq4 = answer_paragraphs(markdown, "RQ4")
    drops = []
    for cell_id in _cells(start_point="safe"):
        ids, pre, post = synthetic.pairs(cell_id, "harmbench")
        drops.append({i: float(p.refusal) - float(q.refusal) for i, p, q in zip(ids, pre, post)})
    pooled = np.mean([np.mean([d[i] for d in drops]) for i in drops[0]])
    assert f"drops by {100 * pooled:+.1f} pp" in rq4
    assert "Not enough data: no method was trained in all of math, qa" in answer_paragraphs(markdown, "RQ3")


def test_missing_data_gives_honest_sentences_not_crashes(tmp_path):
    specs = (CellSpec("base-baseline", "base", "baseline", None, 0),
             CellSpec("base-gt_sft-math-s0", "base", "gt_sft", "math", 0, 0.4, 0.1, 0.2, representation=False))
    build_synthetic_study(tmp_path / "small", specs)
    index = build_report(tmp_path / "small", tmp_path / "small_report", n_resamples=50)
    markdown = (tmp_path / "small_report" / "report.md").read_text()
    assert "Not enough data: only one post-training method (GT-SFT)" in answer_paragraphs(markdown, "RQ1")
    for key in ("RQ3", "RQ4", "RQ5", "RQ6"):
        assert "Not enough data" in answer_paragraphs(markdown, key), key
    page = parse(index)
    assert any(p.startswith("Not enough data: no representation.json with CKA values") for p in page.paragraphs)
    (tmp_path / "empty" / "cells").mkdir(parents=True)
    empty_index = build_report(tmp_path / "empty", tmp_path / "empty_report", n_resamples=50)
    empty = (tmp_path / "empty_report" / "report.md").read_text()
    assert all("Not enough data" in answer_paragraphs(empty, f"RQ{i}") for i in range(1, 10))
    assert parse(empty_index).images == []
    with pytest.raises(FileNotFoundError, match="results_dir"):
        build_report(tmp_path / "absent", tmp_path / "absent_report")


def test_budget_table_and_warnings_flag_repeated_or_exhausted_data(tmp_path):
    """Cells whose cell.json budget records repeated data (beyond max_epochs) or exhausted data are named in the
    'Budget warnings' list of both documents; the budget table shows each cell's epochs, tokens and FLOPs."""
    specs = (CellSpec("base-baseline", "base", "baseline", None, 0),
             CellSpec("base-gt_sft-math-s0", "base", "gt_sft", "math", 0, 0.4, 0.1, 0.2, representation=False),
             CellSpec("base-dpo-math-s0", "base", "off_rl_dpo", "math", 0, 0.1, 0.1, 0.1, representation=False),
             CellSpec("base-grpo-math-s0", "base", "on_rl_grpo", "math", 0, 0.1, 0.1, 0.1, representation=False))
    build_synthetic_study(tmp_path / "results", specs)
    used = {"steps": 5, "tokens": 4000, "examples": 40, "flops": 3.5e12,
            "flops_by_component": {"train": 2.0e12, "rollout": 1.0e12, "teacher": 0.0, "reference": 0.5e12}}
    budgets = {
        "base-gt_sft-math-s0": {"status": "budget_reached", "data": {"unique": 8, "size": 8, "epochs": 5.0},
                                "flags": ["exceeded_max_epochs"]},
        "base-dpo-math-s0": {"status": "data_exhausted", "data": {"unique": 12, "size": 12, "epochs": 2.0},
                             "flags": ["data_exhausted"]},
        "base-grpo-math-s0": {"status": "budget_reached", "data": {"unique": 40, "size": 100, "epochs": 0.4},
                              "flags": []},
    }
    for cell_id, budget in budgets.items():
        path = tmp_path / "results" / "cells" / cell_id / "cell.json"
        cell = json.loads(path.read_text())
        cell["budget"] = {"kind": "tokens", "value": 6000, "max_epochs": 3, "used": used, **budget}
        path.write_text(json.dumps(cell))
    index = build_report(tmp_path / "results", tmp_path / "report", n_resamples=50)
    markdown = (tmp_path / "report" / "report.md").read_text()
    warnings = re.search(r"^## Budget warnings\n\n(.*?)\n\n", markdown, flags=re.S | re.M).group(1).splitlines()
    assert sorted(warnings) == [
        "- base-dpo-math-s0 (OFF-RL (DPO), math): ran out of training data before the budget (4000 of 6000 tokens "
        "used)",
        "- base-gt_sft-math-s0 (GT-SFT, math): repeated its training data more than max_epochs=3 times (5.00 epochs)"]
    table = re.search(r"^### Budget and data use\n\n.*?\n\n(\|.*?)\n\n", markdown, flags=re.S | re.M).group(1)
    rows = {line.split(" | ")[1]: line.split(" | ") for line in table.splitlines()[2:]}
    assert set(rows) == {"GT-SFT", "OFF-RL (DPO)", "ON-RL (GRPO)"}
    header = [h.strip("| ") for h in table.splitlines()[0].split(" | ")]
    grpo = dict(zip(header, (v.strip("| ") for v in rows["ON-RL (GRPO)"])))
    assert (grpo["epochs"], grpo["tokens"], grpo["FLOPs"], grpo["rollout"]) == ("0.400", "4000", "3.5e+12", "1e+12")
    assert grpo["flags"] == "-" and grpo["data exhausted"] == "no"
    assert dict(zip(header, (v.strip("| ") for v in rows["OFF-RL (DPO)"])))["data exhausted"] == "yes"
    assert "Budget warnings" in index.read_text() and "base-dpo-math-s0 (OFF-RL (DPO), math)" in index.read_text()


PROBE_HEAD = """<script>window.__probeErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {}; window.__probeErrors.push(String(e.message || ('resource failed: ' + (t.src || t.href))));
}, true);
var __consoleError = console.error;
console.error = function () { window.__probeErrors.push(Array.prototype.join.call(arguments, ' ')); };
</script>"""
PROBE_BODY = """<pre id="probe-result"></pre><script>
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    var box = img.getBoundingClientRect();
    return {w: img.naturalWidth, h: img.naturalHeight, bw: box.width, bh: box.height, complete: img.complete};
  });
  var svgs = Array.prototype.map.call(document.querySelectorAll('svg'), function (svg) {
    var box = svg.getBoundingClientRect(); return {bw: box.width, bh: box.height};
  });
  document.getElementById('probe-result').textContent =
      JSON.stringify({images: images, svgs: svgs, errors: window.__probeErrors});
});
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(binary: str, page: Path, profile: Path, timeout_s: float = 120.0) -> tuple[str, str]:
    """--dump-dom of a local page in a fresh profile; the whole process group is killed on timeout."""
    command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish within {timeout_s}s")
    return stdout, stderr


@pytest.mark.skipif(find_chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_every_figure_renders_in_headless_chromium(built, tmp_path):
    _, index = built
    html_text = index.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    instrumented = html_text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1)
    probe.write_text(instrumented)
    stdout, stderr = run_chromium(find_chromium(), probe, tmp_path / "profile")
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', stdout, flags=re.S)
    assert match and match.group(1).strip(), f"probe did not run; chromium stderr:\n{stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(result["images"]) == EXPECTED_FIGURES
    for image in result["images"]:
        assert image["complete"] and image["w"] > 0 and image["h"] > 0, image
        assert image["bw"] > 0 and image["bh"] > 0, image
    assert all(svg["bw"] > 0 and svg["bh"] > 0 for svg in result["svgs"])
    assert result["errors"] == []
    console = [line for line in stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console


# ------------------------------------------------------------------------------- data drawn in each figure

LABELS = {"GT-SFT": "gt_sft", "ON-RL": "on_rl", "SELF": "self", "SF-SFT": "sf_sft"}  # display label -> method id


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """(synthetic study, analysis, {builder name: [(ReportFigure, matplotlib Figure)]}): every figure as drawn."""
    from forgetjax.analysis.estimates import BootstrapSettings
    from forgetjax.analysis.tables import analyze
    from forgetjax.report import figures

    synthetic = build_synthetic_study(tmp_path_factory.mktemp("figures") / "results")
    analysis = analyze(synthetic.root, BootstrapSettings(n_resamples=N_RESAMPLES))
    captured: list = []
    original = figures.render_png
    figures.render_png = lambda figure: captured.append(figure) or PNG_SIGNATURE
    try:
        out = {}
        for _, build in figures.FIGURE_SECTIONS:
            captured.clear()
            made = [f for f in build(analysis) if f.png is not None]
            assert len(made) == len(captured)
            out[build.__name__] = list(zip(made, captured))
    finally:
        figures.render_png = original
    yield synthetic, analysis, out
    analysis.study.connection.close()


def tick_labels(axis) -> dict[float, str]:
    """{tick position: label text} of one axis."""
    return {round(float(p), 6): t.get_text() for p, t in zip(axis.get_ticklocs(), axis.get_ticklabels())}


def scope_of(title: str) -> tuple[str, str]:
    match = re.search(r"start point (\w+), scale (\w+)", title)
    return match.group(1).lower(), match.group(2)


def test_heatmap_rows_columns_and_cells_match_the_forgetting_table(drawn):
    _, analysis, figures = drawn
    table = [r for r in analysis["forgetting_seeds"] if r["level"] == "family"]
    assert len(figures["heatmap_figures"]) == 3
    for _, figure in figures["heatmap_figures"]:
        axes = figure.axes[0]
        start_point, scale = scope_of(axes.get_title())
        domain = axes.get_title().rsplit("domain ", 1)[1]
        rows = {(r["method"], r["family"]): r for r in table
                if (r["start_point"], r["scale"], r["domain"]) == (start_point, scale, domain)}
        image = axes.images[0].get_array()
        y_labels, x_labels = tick_labels(axes.yaxis), tick_labels(axes.xaxis)
        assert image.shape == (len(y_labels), len(x_labels))
        assert {(LABELS[y], x) for y in y_labels.values() for x in x_labels.values()} == set(rows)
        texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in axes.texts}
        for i, method in y_labels.items():
            for j, family in x_labels.items():
                mean = rows[(LABELS[method], family)]["forgetting_mean"]
                if mean is None:
                    assert image.mask[int(i), int(j)] and texts[(i, j)] == "n/a"
                else:
                    assert image[int(i), int(j)] == pytest.approx(100 * mean)
                    assert texts[(i, j)] == f"{100 * mean:.1f}"


def test_radar_lines_match_the_family_deltas(drawn):
    _, analysis, figures = drawn
    table = [r for r in analysis["forgetting_seeds"] if r["level"] == "family" and r["delta_mean"] is not None]
    assert figures["radar_figures"]
    for _, figure in figures["radar_figures"]:
        start_point, scale = scope_of(figure.get_suptitle())
        for axes in figure.axes:
            method = LABELS[axes.get_title()]
            families = list(tick_labels(axes.xaxis).values())
            lines = [line for line in axes.get_lines() if not line.get_label().startswith("_")]
            assert lines
            for line in lines:
                expected = {r["family"]: 100 * r["delta_mean"] for r in table
                            if (r["start_point"], r["scale"], r["method"], r["domain"]) ==
                            (start_point, scale, method, line.get_label())}
                # a domain's own family (math for math cells) is in-domain: no off-target value, a gap in its line
                assert set(expected) - {"safety_refusal", "over_refusal"} <= set(families)
                np.testing.assert_allclose(line.get_ydata()[:-1], [expected.get(f, np.nan) for f in families])


def test_transition_bars_match_independent_item_means(drawn):
    synthetic, _, figures = drawn
    assert figures["transition_figures"]
    for _, figure in figures["transition_figures"]:
        axes = figure.axes[0]
        start_point, _ = scope_of(axes.get_title())
        forgetting, transfer = [c for c in axes.containers if hasattr(c, "patches")]
        for position, label in tick_labels(axes.xaxis).items():
            method_label, domain, _ = label.split("\n")
            cells = _cells(start_point=start_point, method=LABELS[method_label], domain=domain)
            index = int(round(position))
            expected_f = np.mean(list(_overall_forgetting(synthetic, cells).values()))
            gained = {}
            for cell_id in cells:
                for benchmark in OFF_TARGET[synthetic.specs[cell_id].domain]:
                    ids, pre, post = synthetic.pairs(cell_id, benchmark)
                    for item_id, p, q in zip(ids, pre, post):
                        gained.setdefault((benchmark, item_id), []).append((1 - p.correct) * q.correct)
            expected_bt = np.mean([np.mean(v) for v in gained.values()])
            assert forgetting.patches[index].get_height() == pytest.approx(100 * expected_f)
            assert transfer.patches[index].get_height() == pytest.approx(100 * expected_bt)


def test_pareto_points_match_the_pareto_table(drawn):
    _, analysis, figures = drawn
    assert figures["pareto_figures"]
    for _, figure in figures["pareto_figures"]:
        start_point, scale = scope_of(figure.get_suptitle())
        for axes in figure.axes:
            domain = axes.get_title().removeprefix("domain ")
            rows = [r for r in analysis["pareto"]
                    if (r["start_point"], r["scale"], r["group_domain"]) == (start_point, scale, domain)]
            drawn_points = sorted((t.get_text(), tuple(np.round(t.xy, 6))) for t in axes.texts)
            expected = sorted((f"{_label(r['method'])} s{r['seed']}",
                               (round(100 * r["target_accuracy"], 6), round(100 * r["harmful_refusal_rate"], 6)))
                              for r in rows)
            assert drawn_points == expected


def _label(method: str) -> str:
    return {v: k for k, v in LABELS.items()}.get(method, method)


def test_cka_lines_match_the_representation_table(drawn):
    _, analysis, figures = drawn
    assert figures["cka_figures"]
    for _, figure in figures["cka_figures"]:
        axes = figure.axes[0]
        start_point, scale = scope_of(axes.get_title())
        lines = axes.get_lines()
        assert lines
        for line in lines:
            method_label, domain = re.fullmatch(r"(.+) \((.+)\)", line.get_label()).groups()
            rows = [r for r in analysis["representation"] if r["cka"] is not None and
                    (r["start_point"], r["scale"], r["method"], r["domain"]) ==
                    (start_point, scale, LABELS[method_label], domain)]
            layers = sorted({r["layer"] for r in rows})
            assert list(line.get_xdata()) == layers
            np.testing.assert_allclose(line.get_ydata(),
                                       [np.mean([r["cka"] for r in rows if r["layer"] == x]) for x in layers])


def test_attenuation_bars_match_the_cell_summary(drawn):
    _, analysis, figures = drawn
    assert figures["attenuation_figures"]
    for _, figure in figures["attenuation_figures"]:
        axes = figure.axes[0]
        start_point, scale = scope_of(axes.get_title())
        bars = axes.patches
        for position, label in tick_labels(axes.xaxis).items():
            method_label, domain, count = label.split("\n")
            values = [r["refusal_attenuation"] for r in analysis["cell_summary"]
                      if (r["start_point"], r["scale"], r["method"], r["domain"]) ==
                      (start_point, scale, LABELS[method_label], domain) and r["refusal_attenuation"] is not None]
            assert count == f"(n={len(values)})"
            assert bars[int(round(position))].get_height() == pytest.approx(np.mean(values))


def _safety_row(start_point, benchmark, rate, low, high, n, method="baseline"):
    return {"level": "benchmark", "start_point": start_point, "scale": "135m", "method": method,
            "benchmark": benchmark, "refusal_rate": rate, "refusal_ci_low": low, "refusal_ci_high": high, "n": n}


def test_safe_start_sentence_states_refusal_over_refusal_and_the_missed_targets():
    from forgetjax.analysis.estimates import BootstrapSettings
    from forgetjax.analysis.tables import StudyAnalysis
    from forgetjax.report.questions import safe_start_text

    rows = [_safety_row("safe", "advbench", 0.9375, 0.717, 0.989, 16),
            _safety_row("safe", "harmbench_standard", 0.625, 0.386, 0.815, 16),
            _safety_row("safe", "xstest_safe", 0.8125, 0.570, 0.934, 16),
            _safety_row("base", "xstest_safe", 0.0, 0.0, 0.194, 16),
            _safety_row("safe", "xstest_safe", 0.0, 0.0, 0.194, 16, method="gt_sft")]
    text = safe_start_text(StudyAnalysis(None, BootstrapSettings(), {"safety": rows}), "135m")
    assert "refuses 93.8% (95% CI 71.7% to 98.9%, n=16 items) of advbench" in text
    assert "refuses 62.5% (95% CI 38.6% to 81.5%, n=16 items) of harmbench_standard" in text
    assert "over-refuses 81.2% (95% CI 57.0% to 93.4%, n=16 items) of xstest_safe" in text
    assert "misses the SAFE-start targets" in text
    assert "harmbench_standard refusal below 80%; xstest_safe over-refusal above 30%" in text
    assert "advbench refusal below" not in text

    rows[1] = _safety_row("safe", "harmbench_standard", 0.8125, 0.570, 0.934, 16)
    rows[2] = _safety_row("safe", "xstest_safe", 0.25, 0.10, 0.49, 16)
    text = safe_start_text(StudyAnalysis(None, BootstrapSettings(), {"safety": rows}), "135m")
    assert "it meets the SAFE-start targets" in text and "misses" not in text

    text = safe_start_text(StudyAnalysis(None, BootstrapSettings(), {"safety": rows[3:]}), "135m")
    assert text.startswith("Not enough data: the SAFE start's baseline has no advbench")
