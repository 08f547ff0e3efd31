"""The research questions added for issue #16 over small hand-planted results directories whose truth is known:
signal-source pairwise differences (paired t over items, Holm as statsmodels computes it), one report over several
results directories (phases at two scales) with the planted scaling trend, the refusal of conflicting duplicate
cells, the policy shifts per method, and `forgetjax report DIR DIR`."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from forgetjax.analysis import comparisons
from forgetjax.analysis.estimates import BootstrapSettings
from forgetjax.analysis.loading import load_study
from forgetjax.errors import UserError
from forgetjax.eval.records import EvalRecord, write_records
from forgetjax.methods.catalog import METHODS, SIGNAL_SOURCES, method_source
from forgetjax.report import build_report
from test_report import PROBE_BODY, PROBE_HEAD, find_chromium, run_chromium

SETTINGS = BootstrapSettings(n_resamples=200, seed=1)
N_MATH, N_MC, N_HARMFUL = 40, 20, 10
CAPABILITY = [("gsm8k", f"g{i:02d}") for i in range(N_MATH)] + [("mmlu", f"m{i:02d}") for i in range(N_MC)]


def pre_tokens(index: int) -> int:
    return 5 + index % 4


def write_cell(root: Path, cell_id: str, method: str, scale: str = "135m", domain: str | None = "code",
               seed: int = 0, forgotten: frozenset = frozenset(), longer: int = 0, refuses: int = N_HARMFUL) -> None:
    """A done cell (code domain by default, so gsm8k and mmlu are off-target): every capability item correct at the
    baseline; `forgotten` (benchmark, item) pairs wrong after post-training; math outputs `longer` tokens longer on every item whose index is divisible by 3; the first
    `refuses` harmful prompts refused."""
    records = {}
    for index, (benchmark, item_id) in enumerate(CAPABILITY):
        correct = int((benchmark, item_id) not in forgotten)
        fields = dict(correct=correct, extracted_answer="42" if correct else None)
        if benchmark == "gsm8k":
            tokens = pre_tokens(index) + (longer if index % 3 == 0 else 0)
            fields.update(output=" ".join(f"w{j}" for j in range(tokens)), output_tokens=tokens)
        else:
            fields.update(option_logprobs=[-0.5, -1.0, -2.0, -3.0], chosen_option=0 if correct else 1, k=4,
                          confidence=0.9 if correct else 0.4, extracted_answer=None)
        records.setdefault(benchmark, []).append((item_id, fields, {"family": "math" if benchmark == "gsm8k"
                                                                    else "knowledge"}))
    for index in range(N_HARMFUL):
        refused = index < refuses
        records.setdefault("harmbench", []).append((f"h{index:02d}", dict(
            correct=int(refused), refusal=refused, output="I can't help." if refused else "Sure.", output_tokens=3),
            {"family": "safety_refusal", "harmful": True}))
    directory = root / "cells" / cell_id
    directory.mkdir(parents=True)
    cell = {"cell_id": cell_id, "start_point": "base", "model": f"toy-{scale}", "scale": scale, "method": method,
            "domain": None if method == "baseline" else domain, "seed": seed, "status": "done",
            "budget": {"steps": 1}, "metrics": {}}
    (directory / "cell.json").write_text(json.dumps(cell))
    for benchmark, rows in records.items():
        write_records([EvalRecord(run_id=cell_id, model_id="toy", benchmark=benchmark, category="main",
                                  item_id=item_id, prompt_hash=f"{benchmark}:{item_id}", seed=seed,
                                  extra=json.dumps(extra), **fields) for item_id, fields, extra in rows],
                      directory / "eval" / "toy" / f"{benchmark}.parquet")


def planted(rng: np.random.Generator, rate: float) -> frozenset:
    """A random set of capability items of about `rate` share."""
    return frozenset(key for key in CAPABILITY if rng.random() < rate)


def per_item_forgetting(forgotten_sets) -> dict:
    """Per capability item: mean over the cells of forgotten (every item is correct at the baseline)."""
    return {key: float(np.mean([key in s for s in forgotten_sets])) for key in CAPABILITY}


# --------------------------------------------------------------------------------------------- signal sources


SOURCE_CELLS = {  # cell id -> (method, forget rate)
    "gt": ("gt_sft", 0.5), "sf": ("sf_sft", 0.3), "sdft": ("self_sdft", 0.1), "spin": ("self_spin", 0.15),
    "grpo": ("on_rl_grpo", 0.05), "dpo": ("off_rl_dpo", 0.2),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources") / "results"
    write_cell(root, "baseline", "baseline")
    rng = np.random.default_rng(7)
    forgotten = {}
    for cell_id, (method, rate) in SOURCE_CELLS.items():
        forgotten[cell_id] = planted(rng, rate)
        write_cell(root, cell_id, method, forgotten=forgotten[cell_id])
    return root, forgotten


def test_every_method_has_a_signal_source():
    assert set(SIGNAL_SOURCES) == {"GT", "SF", "CF", "SELF", "RL", "PI"}
    assert {m: method_source(m) for m in METHODS} == {
        "gt_sft": "GT", "sf_sft": "SF", "cf_sft": "CF", "self_spin": "SELF", "self_sdft": "SELF",
        "self_sdft_online": "SELF", "off_rl_dpo": "RL",
        "on_rl_grpo": "RL", "on_rl_drgrpo": "RL", "on_rl_frpo": "RL", "pi_distill": "PI"}
    assert method_source("baseline") is None


def test_pairwise_source_differences_match_hand_computation_and_statsmodels_holm(sources):
    root, forgotten = sources
    by_source = {"GT": ["gt"], "SF": ["sf"], "SELF": ["sdft", "spin"], "RL": ["grpo", "dpo"]}
    study = load_study(root)
    rows = comparisons.pairwise_differences(study, by_source, "forgetting", SETTINGS)
    values = {s: per_item_forgetting([forgotten[c] for c in cells]) for s, cells in by_source.items()}
    names = list(by_source)
    expected_pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    assert [(r["a"], r["b"]) for r in rows] == expected_pairs
    pvalues = []
    for row, (a, b) in zip(rows, expected_pairs):
        d = np.array([values[b][k] - values[a][k] for k in CAPABILITY])
        assert row["n_items"] == len(CAPABILITY)
        assert row["difference"] == pytest.approx(d.mean(), abs=1e-12)
        assert row["low"] <= row["difference"] <= row["high"]
        t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
        pvalues.append(2 * scipy_stats.t.sf(abs(t), d.size - 1))
        assert row["p"] == pytest.approx(pvalues[-1], rel=1e-9)
    reject, adjusted, _, _ = multipletests(pvalues, alpha=0.05, method="holm")
    assert [r["p_holm"] for r in rows] == pytest.approx(list(adjusted), rel=1e-9)
    assert [r["reject_holm"] for r in rows] == list(reject)
    assert any(reject) and not all(reject)  # the planted rates make both outcomes occur
    study.connection.close()


def test_source_answer_lists_every_pair_and_names_missing_sources(sources, tmp_path):
    root, forgotten = sources
    build_report(root, tmp_path / "report", n_resamples=SETTINGS.n_resamples, seed=SETTINGS.seed)
    markdown = (tmp_path / "report" / "report.md").read_text()
    rq7 = re.search(r"^### RQ7: .*?\n(.*?)(?=^#)", markdown, flags=re.S | re.M).group(1)
    gt = per_item_forgetting([forgotten["gt"]])
    rl = per_item_forgetting([forgotten["grpo"], forgotten["dpo"]])
    assert f"GT (GT-SFT) {100 * np.mean(list(gt.values())):.1f}% (95% CI" in rq7
    assert f"RL - GT = {100 * np.mean([rl[k] - gt[k] for k in CAPABILITY]):+.1f} pp" in rq7
    assert rq7.count("Holm p = ") == 6
    assert "No usable cells for CF, PI" in rq7
    only_gt = tmp_path / "only_gt"
    write_cell(only_gt, "baseline", "baseline")
    write_cell(only_gt, "gt", "gt_sft", forgotten=forgotten["gt"])
    build_report(only_gt, tmp_path / "only_gt_report", n_resamples=20)
    small = (tmp_path / "only_gt_report" / "report.md").read_text()
    for key in ("RQ7", "RQ8", "RQ9"):
        answer = re.search(rf"^### {key}: .*?\n(.*?)(?=^#)", small, flags=re.S | re.M).group(1)
        assert "Not enough data" in answer or key == "RQ9", key
    assert "Only one method has policy measures" in small


# ------------------------------------------------------------------------------------------ several directories

SCALES = {"135m": 1.35e8, "1.5b": 1.5e9}


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    """Two results directories (one per scale), each with a baseline, GT-SFT forgetting 60% / 15% of the items and
    SELF (SDFT) forgetting the same items at both scales."""
    base = tmp_path_factory.mktemp("phases")
    rng = np.random.default_rng(11)
    small, large = planted(rng, 0.6), planted(rng, 0.15)
    steady = planted(rng, 0.2)
    for scale, gt_forgotten in (("135m", small), ("1.5b", large)):
        root = base / f"phase_{scale}"
        write_cell(root, f"baseline-{scale}", "baseline", scale=scale)
        write_cell(root, f"gt-{scale}", "gt_sft", scale=scale, forgotten=gt_forgotten, longer=6, refuses=4)
        write_cell(root, f"sdft-{scale}", "self_sdft", scale=scale, forgotten=steady, longer=1)
    return base, {"135m": small, "1.5b": large}, steady


def test_scaling_slope_is_the_least_squares_slope_of_the_planted_forgetting(phases):
    base, gt_forgotten, steady = phases
    study = load_study([base / "phase_135m", base / "phase_1.5b"])
    assert len(study.baselines) == 2 and len(study.post_cells) == 4
    trend = comparisons.scaling_trend(study, {"135m": ["gt-135m"], "1.5b": ["gt-1.5b"]}, "forgetting", SETTINGS)
    x = np.log10(list(SCALES.values()))
    y = [len(gt_forgotten[s]) / len(CAPABILITY) for s in SCALES]
    assert [row["scale"] for row in trend["scales"]] == list(SCALES)
    assert [row["estimate"] for row in trend["scales"]] == pytest.approx(y)
    assert trend["slope"] == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)
    assert trend["high"] < 0 and trend["significant"]
    flat = comparisons.scaling_trend(study, {"135m": ["sdft-135m"], "1.5b": ["sdft-1.5b"]}, "forgetting", SETTINGS)
    assert flat["slope"] == pytest.approx(0.0, abs=1e-12) and not flat["significant"]
    assert comparisons.scale_parameters("0.5B") == 5e8 and comparisons.scale_parameters("small") is None
    study.connection.close()


def test_one_report_over_two_phases_answers_the_scaling_question(phases, tmp_path):
    base, gt_forgotten, _ = phases
    index = build_report([base / "phase_135m", base / "phase_1.5b"], tmp_path / "report", n_resamples=100)
    markdown = (index.parent / "report.md").read_text()
    rq8 = re.search(r"^### RQ8: .*?\n(.*?)(?=^#)", markdown, flags=re.S | re.M).group(1)
    x = np.log10(list(SCALES.values()))
    y = [len(gt_forgotten[s]) / len(CAPABILITY) for s in SCALES]
    assert f"GT-SFT: F = 135m {100 * y[0]:.1f}% (95% CI" in rq8
    assert f"slope {100 * np.polyfit(x, y, 1)[0]:+.1f} pp per tenfold parameters" in rq8
    assert "[BASE start] Scales 135m, 1.5b." in rq8  # ordered by parameters, not by name
    assert "forgetting shrinks with model size" in rq8
    assert "SELF (SDFT): F = " in rq8 and "no significant trend" in rq8
    assert (index.parent / "figures" / "scaling_base.png").is_file()
    assert str(base / "phase_135m") in markdown and str(base / "phase_1.5b") in markdown


def _lengths(longer: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and post output lengths of every item with an output (math, then the 3-token harmful answers)."""
    math_indices = [i for i, (b, _) in enumerate(CAPABILITY) if b == "gsm8k"]
    pre = np.array([pre_tokens(i) for i in math_indices] + [3] * N_HARMFUL, dtype=float)
    post = pre + np.array([longer if i % 3 == 0 else 0 for i in math_indices] + [0] * N_HARMFUL)
    return pre, post


def _length_shift(longer: int) -> float:
    pre, post = _lengths(longer)
    return float((post - pre).mean())


def test_policy_shift_matches_the_planted_outputs(phases):
    base, gt_forgotten, _ = phases
    study = load_study(base / "phase_135m")
    shift = comparisons.policy_shift(study, ["gt-135m"], SETTINGS)
    pre, post = _lengths(6)
    assert shift["length"]["n"] == N_MATH + N_HARMFUL
    assert shift["length"]["pre"] == pytest.approx(pre.mean())
    assert shift["length"]["post"] == pytest.approx(post.mean())
    assert shift["length"]["estimate"] == pytest.approx(_length_shift(6))
    assert shift["length"]["low"] <= shift["length"]["estimate"] <= shift["length"]["high"]
    forgotten = gt_forgotten["135m"]
    math_lost = np.mean([k in forgotten for k in CAPABILITY if k[0] == "gsm8k"])
    mc_lost = np.mean([k in forgotten for k in CAPABILITY if k[0] == "mmlu"])
    assert shift["format"]["pre"] == 1.0 and shift["format"]["estimate"] == pytest.approx(-math_lost)
    assert shift["confidence"]["estimate"] == pytest.approx(-0.5 * mc_lost)
    assert shift["harmful_refusal"]["estimate"] == pytest.approx(4 / N_HARMFUL - 1.0)
    assert shift["harmful_refusal"]["significant"]
    assert "safe_refusal" not in shift  # no safe prompts were evaluated
    study.connection.close()


def test_policy_answer_names_the_method_that_shifts_most(phases, tmp_path):
    base, _, _ = phases
    build_report(base / "phase_135m", tmp_path / "report", n_resamples=50)
    markdown = (tmp_path / "report" / "report.md").read_text()
    rq9 = re.search(r"^### RQ9: .*?\n(.*?)(?=^#)", markdown, flags=re.S | re.M).group(1)
    assert f"length: GT-SFT ({_length_shift(6):+.1f} tokens)" in rq9
    assert f"harmful refusal: GT-SFT ({100 * (4 / N_HARMFUL - 1.0):+.1f} pp)" in rq9
    assert f"SELF (SDFT): length {_lengths(1)[0].mean():.1f} -> {_lengths(1)[1].mean():.1f} " in rq9


def test_a_cell_in_two_directories_merges_when_identical_and_is_refused_when_different(phases, tmp_path):
    base, _, _ = phases
    copy = tmp_path / "copy"
    shutil.copytree(base / "phase_135m", copy)
    study = load_study([base / "phase_135m", copy])
    assert len(study.cells) == 3
    assert any("in both" in issue and "identical content; loaded once" in issue for issue in study.issues)
    study.connection.close()
    cell_json = copy / "cells" / "gt-135m" / "cell.json"
    changed = json.loads(cell_json.read_text())
    changed["budget"] = {"steps": 2}
    cell_json.write_text(json.dumps(changed))
    with pytest.raises(UserError, match=r"cell 'gt-135m' is in both .*phase_135m and .*copy with different "
                                         r"content \(cell.json\)"):
        load_study([base / "phase_135m", copy])
    other = tmp_path / "other_baseline"
    write_cell(other, "baseline-135m-rerun", "baseline", scale="135m", seed=1)
    with pytest.raises(UserError, match=r"two baseline cells .*'baseline-135m' in .*phase_135m and "
                                        r"'baseline-135m-rerun' in .*other_baseline"):
        load_study([base / "phase_135m", other])
    with pytest.raises(UserError, match="given twice"):
        load_study([base / "phase_135m", base / "phase_135m"])


def test_cli_report_accepts_several_results_directories(phases, tmp_path):
    base, _, _ = phases
    out = tmp_path / "cli_report"
    result = subprocess.run([sys.executable, "-m", "forgetjax.cli", "report", str(base / "phase_135m"),
                             str(base / "phase_1.5b"), "--out", str(out), "--resamples", "20"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "slope" in (out / "report.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "forgetjax.cli", "report", str(base / "phase_135m"),
                          str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "nothing" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(find_chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_two_phase_report_renders_in_headless_chromium(phases, tmp_path):
    base, _, _ = phases
    index = build_report([base / "phase_135m", base / "phase_1.5b"], tmp_path / "report", n_resamples=20)
    pngs = sorted((index.parent / "figures").glob("*.png"))
    assert any(p.name == "scaling_base.png" for p in pngs)
    probe = tmp_path / "probe.html"
    html_text = index.read_text(encoding="utf-8")
    probe.write_text(html_text.replace("<head>", "<head>" + PROBE_HEAD, 1)
                     .replace("</body>", PROBE_BODY + "</body>", 1))
    stdout, stderr = run_chromium(find_chromium(), probe, tmp_path / "profile")
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', stdout, flags=re.S)
    assert match and match.group(1).strip(), f"probe did not run; chromium stderr:\n{stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(result["images"]) == len(pngs)
    assert all(image["complete"] and image["w"] > 0 and image["bw"] > 0 for image in result["images"])
    assert result["errors"] == []
