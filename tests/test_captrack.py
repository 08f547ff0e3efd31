"""CapTrack dimensions: robustness variants, default-behaviour style features, JSON-schema adherence, the tables.

References are written out by hand (expected prompts, rotations, consistency, feature values, drift) or come from
an independent library (scipy for the bootstrap-free means, jsonschema's own validator is the scorer so its
verdicts are checked against hand-labelled responses)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forgetjax.analysis import tables
from forgetjax.analysis.captrack import item_consistency
from forgetjax.analysis.policy import style_features
from forgetjax.eval.battery import select_subset
from forgetjax.eval.benchmarks import Item, get_benchmark
from forgetjax.eval.benchmarks.base import stable_hash
from forgetjax.eval.benchmarks.protocol import SCHEMAS, extract_json, schema_errors
from forgetjax.eval.benchmarks.robustness import DISTRACTORS, REWORDINGS, perturb, rotation
from forgetjax.eval.records import EvalRecord, write_records
from forgetjax.paths import default_data_dir

DATA_DIR = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA_DIR / "mmlu").is_dir(), reason="benchmark data not available")


# ------------------------------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_rotation_moves_every_option_and_perturb_remaps_the_answer(n):
    for item_id in ("a", "b", "c", "subject/0001"):
        order = rotation(n, item_id)
        assert sorted(order) == list(range(n))
        assert all(order[i] != i for i in range(n))
        data = {"question": "Q?", "options": [f"o{i}" for i in range(n)], "answer": n - 1}
        shown = perturb(data, item_id, "shuffled")
        assert shown["options"][shown["answer"]] == f"o{n - 1}"
        assert [shown["options"][i] for i in range(n)] == [f"o{order[i]}" for i in range(n)]


def test_distractor_and_reworded_prefix_the_question_and_keep_the_options():
    data = {"question": "What is 2+2?", "options": ["3", "4"], "answer": 1}
    distractor = perturb(data, "x", "distractor")
    reworded = perturb(data, "x", "reworded")
    assert distractor["question"] == f"{DISTRACTORS[stable_hash('robust-distractor', 'x') % len(DISTRACTORS)]} What is 2+2?"
    assert reworded["question"] == f"{REWORDINGS[stable_hash('robust-reworded', 'x') % len(REWORDINGS)]} What is 2+2?"
    assert distractor["options"] == reworded["options"] == ["3", "4"] and distractor["answer"] == 1
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(data, "x", "typos")


def test_select_subset_keeps_groups_whole_and_counts_them():
    items = [Item(id=f"{g}::{v}", category="c", data={"g": g}) for g in range(10) for v in ("original", "shuffled")]
    chosen = select_subset(items, 3, seed=7, group=lambda item: str(item.data["g"]))
    expected_groups = sorted(map(str, range(10)), key=lambda g: (stable_hash("subset", 7, g), g))[:3]
    assert [item.id for item in chosen] == [f"{g}::{v}" for g in expected_groups for v in ("original", "shuffled")]
    plain = [Item(id=str(i), category="c", data={}) for i in range(10)]
    assert [i.id for i in select_subset(plain, 4, seed=1)] == \
        sorted(map(str, range(10)), key=lambda i: (stable_hash("subset", 1, i), i))[:4]


@needs_data
def test_mmlu_robust_prompts_and_semantic_choice():
    bench = get_benchmark("mmlu_robust")
    base = get_benchmark("mmlu")
    items = bench.load(DATA_DIR)
    first = get_benchmark("mmlu").load(DATA_DIR)[0]
    variants = {item.data["perturbation"]: item for item in items[:4]}
    assert set(variants) == {"original", "shuffled", "distractor", "reworded"}
    assert all(item.data["source_item"] == first.id and bench.group_id(item) == first.id for item in variants.values())
    assert bench.build_prompt(variants["original"], "fewshot") == base.build_prompt(first, "fewshot")
    shuffled = variants["shuffled"]
    order = rotation(4, first.id)
    prompt = bench.build_prompt(shuffled, "chat")[-1]["content"]
    for shown, letter in enumerate("ABCD"):
        assert f"{letter}. {first.data['options'][order[shown]]}" in prompt
    # the model picks the shown option holding the base answer: correct, semantic choice = the base answer index
    logprobs = [-5.0] * 4
    logprobs[shuffled.data["answer"]] = -0.1
    scored = bench.score(shuffled, logprobs)
    assert scored["correct"] == 1
    assert scored["extra"]["semantic_choice"] == first.data["answer"]
    assert scored["extra"]["perturbation"] == "shuffled" and scored["extra"]["source_item"] == first.id


def test_item_consistency_by_hand():
    def rec(source, perturbation, choice, correct):
        return {"correct": correct, "extra": json.dumps({"source_item": source, "perturbation": perturbation,
                                                         "semantic_choice": choice})}
    records = [rec("a", "original", 1, 1), rec("a", "shuffled", 1, 1), rec("a", "distractor", 1, 1),
               rec("b", "original", 2, 1), rec("b", "shuffled", 0, 0), rec("b", "distractor", 2, 1),
               rec("c", "original", 3, 0), rec("c", "shuffled", 3, 0)]
    out = item_consistency(records)
    assert out["a"] == {"consistent": 1.0, "robust": 1.0, "original": 1.0, "perturbed": 1.0}
    assert out["b"] == {"consistent": 0.0, "robust": 0.0, "original": 1.0, "perturbed": 0.5}
    assert out["c"] == {"consistent": 1.0, "robust": 0.0, "original": 0.0, "perturbed": 0.0}


# ------------------------------------------------------------------------------------------- default behaviour


def test_style_features_by_hand():
    text = "## Plan\n\nI think this might work, perhaps.\n- buy flour\n- bake\n\n1) eat"
    features = style_features(text)
    assert features["words"] == 15.0  # "##", "-", "1)" count as whitespace tokens
    assert features["markdown"] == 1.0
    assert features["list_lines"] == pytest.approx(3 / 5)
    assert features["hedges_per_100_words"] == pytest.approx(100 * 3 / 15)  # "i think", "might", "perhaps"
    assert features["apology"] == 0.0 and features["non_english"] == 0.0
    plain = style_features("Sorry, as an AI I cannot say. The sky is blue because air scatters blue light more.")
    assert plain["markdown"] == 0.0 and plain["list_lines"] == 0.0 and plain["apology"] == 1.0
    german = style_features("Der Himmel ist blau, weil die Luft das blaue Licht stärker streut als das rote Licht.")
    assert german["non_english"] == 1.0
    assert style_features("")["words"] == 0.0 and style_features("ok")["non_english"] == 0.0
    assert style_features("**bold** text")["markdown"] == 1.0
    assert style_features("mightily maybe")["hedges_per_100_words"] == pytest.approx(50.0)  # "mightily" is not "might"


# ---------------------------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("response, parsed, strict, valid", [
    ('{"answer": "Ottawa", "confidence": 0.9}', True, True, True),
    ('```json\n{"answer": "Ottawa", "confidence": 0.9}\n```', True, True, True),
    ('Sure! {"answer": "Ottawa", "confidence": 0.9} Hope it helps.', True, False, True),
    ('{"answer": "Ottawa", "confidence": 1.5}', True, True, False),
    ('{"answer": "Ottawa"}', True, True, False),
    ('{"answer": "Ottawa", "confidence": 0.5, "source": "me"}', True, True, False),
    ('{"answer": 3, "confidence": 0.5}', True, True, False),
    ("The capital is Ottawa.", False, False, False),
    ('{"answer": "Ottawa", "confidence": 0.9', False, False, False),
])
def test_json_extraction_and_schema_verdicts_by_hand(response, parsed, strict, valid):
    value, is_strict = extract_json(response)
    assert (value is not None) == parsed
    if parsed:
        assert is_strict == strict
        assert (not schema_errors(value, SCHEMAS["answer"])) == valid
    bench = get_benchmark("json_schema")
    item = Item(id="answer/00", category="answer", data={"request": "Answer the question: x", "schema": "answer"})
    scored = bench.score(item, response)
    assert scored["correct"] == int(valid) and scored["extra"]["parsed"] == parsed
    assert scored["extra"]["strict"] == (valid and strict)


def test_json_schema_items_prompts_and_plan_schema():
    bench = get_benchmark("json_schema")
    items = bench.load("unused")
    assert len(items) == 36 and len({i.id for i in items}) == 36
    prompt = bench.build_prompt(items[0], "chat")[-1]["content"]
    assert json.dumps(SCHEMAS["profile"], separators=(", ", ": ")) in prompt
    assert bench.build_prompt(items[0], "fewshot").endswith("\n\nJSON:")
    good = {"goal": "bake", "steps": [{"n": 1, "action": "mix"}, {"n": 2, "action": "bake"}], "difficulty": "easy"}
    assert schema_errors(good, SCHEMAS["plan"]) == []
    bad = {**good, "steps": [{"n": 0, "action": "mix"}]}
    assert len(schema_errors(bad, SCHEMAS["plan"])) == 2  # too few steps, n below its minimum


# ------------------------------------------------------------------------------------------------ the tables


STYLE_TEXTS = {"pre": ["Short answer.", "Another plain answer here.", "Plain text."],
               "post": ["## Heading\n- a\n- b", "I think maybe yes.", "Plain text."]}


def _write_cell(root: Path, cell_id: str, method: str, robust: dict, style: list[str], mmlu: list[int]) -> None:
    directory = root / "cells" / cell_id
    directory.mkdir(parents=True)
    cell = {"cell_id": cell_id, "start_point": "base", "model": "toy", "scale": "135m", "method": method,
            "domain": None if method == "baseline" else "code", "seed": 0, "status": "done",
            "budget": {"steps": 1}, "metrics": {}}
    (directory / "cell.json").write_text(json.dumps(cell))
    rows = {"mmlu_robust": [], "neutral_prompts": [], "mmlu": [], "ifeval": [], "arc_challenge": []}
    for source, variants in robust.items():
        for perturbation, (choice, correct) in variants.items():
            rows["mmlu_robust"].append(EvalRecord(
                run_id=cell_id, model_id="toy", benchmark="mmlu_robust", category="c",
                item_id=f"{source}::{perturbation}", prompt_hash=f"{source}{perturbation}", correct=correct, k=4,
                extra=json.dumps({"source_item": source, "perturbation": perturbation, "semantic_choice": choice})))
    for index, text in enumerate(style):
        rows["neutral_prompts"].append(EvalRecord(run_id=cell_id, model_id="toy", benchmark="neutral_prompts",
                                                  category="explain", item_id=f"{index:03d}", prompt_hash=str(index),
                                                  output=text))
    for bench in ("mmlu", "ifeval", "arc_challenge"):
        for index, correct in enumerate(mmlu):
            rows[bench].append(EvalRecord(run_id=cell_id, model_id="toy", benchmark=bench, category="c",
                                          item_id=str(index), prompt_hash=str(index), correct=correct, k=4))
    for bench, records in rows.items():
        write_records(records, directory / "eval" / "toy" / f"{bench}.parquet")


def test_captrack_tables_on_a_toy_study(tmp_path):
    robust_pre = {"a": {"original": (1, 1), "shuffled": (1, 1)}, "b": {"original": (2, 1), "shuffled": (2, 1)},
                  "c": {"original": (0, 0), "shuffled": (3, 0)}}
    robust_post = {"a": {"original": (1, 1), "shuffled": (0, 0)}, "b": {"original": (2, 1), "shuffled": (2, 1)},
                   "c": {"original": (3, 0), "shuffled": (3, 0)}}
    mmlu_pre, mmlu_post = [1, 1, 1, 0], [1, 0, 1, 0]
    _write_cell(tmp_path, "base0", "baseline", robust_pre, STYLE_TEXTS["pre"], mmlu_pre)
    _write_cell(tmp_path, "cell1", "gt_sft", robust_post, STYLE_TEXTS["post"], mmlu_post)
    analysis = tables.analyze(tmp_path)

    robustness = {r["cell_id"]: r for r in analysis["robustness"]}
    assert robustness["base0"]["consistent"] == pytest.approx(2 / 3)
    assert robustness["cell1"]["consistent"] == pytest.approx(2 / 3)
    assert robustness["cell1"]["robust"] == pytest.approx(1 / 3)
    assert robustness["cell1"]["original"] == pytest.approx(2 / 3) and robustness["cell1"]["perturbed"] == 1 / 3
    assert robustness["cell1"]["consistency_delta"] == pytest.approx(0.0)

    drift = {r["feature"]: r for r in analysis["style_drift"]}
    pre = [style_features(t) for t in STYLE_TEXTS["pre"]]
    post = [style_features(t) for t in STYLE_TEXTS["post"]]
    for feature in ("words", "list_lines", "markdown", "hedges_per_100_words"):
        pre_mean = np.mean([f[feature] for f in pre])
        post_mean = np.mean([f[feature] for f in post])
        assert drift[feature]["pre"] == pytest.approx(pre_mean) and drift[feature]["post"] == pytest.approx(post_mean)
        assert drift[feature]["delta"] == pytest.approx(post_mean - pre_mean)
        expected = (post_mean - pre_mean) / pre_mean if pre_mean else (0.0 if post_mean == 0 else None)
        assert drift[feature]["relative_drift"] == (pytest.approx(expected) if expected is not None else None)
        assert drift[feature]["delta_ci_low"] <= drift[feature]["delta"] <= drift[feature]["delta_ci_high"]

    captrack = {r["dimension"]: r for r in analysis["captrack"]}
    assert captrack["knowledge"]["pre"] == pytest.approx(0.75) and captrack["knowledge"]["post"] == 0.5
    assert captrack["knowledge"]["relative_drift"] == pytest.approx((0.5 - 0.75) / 0.75)
    assert captrack["skills"]["n"] == 4  # arc_challenge (reasoning); code-domain cell: nothing in-domain here
    assert captrack["protocol"]["delta"] == pytest.approx(-0.25)
    assert captrack["robustness"]["relative_drift"] == pytest.approx(0.0)
    finite = [abs(r["relative_drift"]) for r in analysis["style_drift"] if r["relative_drift"] is not None]
    assert captrack["default_behaviour"]["relative_drift"] == pytest.approx(-np.mean(finite))
    # robustness and style items stay out of pooled capability forgetting (their base benchmark counts each item)
    overall = [r for r in analysis["forgetting"] if r["cell_id"] == "cell1" and r["level"] == "overall"][0]
    assert overall["n"] == 12


def test_captrack_report_sections_render_in_headless_chromium(tmp_path):
    """The CapTrack table sections and radar are in the report and the page renders without errors."""
    from test_report import PROBE_BODY, PROBE_HEAD, find_chromium, run_chromium

    from forgetjax.report.build import build_report

    results = tmp_path / "results"
    _write_cell(results, "base0", "baseline", {"a": {"original": (1, 1), "shuffled": (1, 1)}}, STYLE_TEXTS["pre"],
                [1, 1, 1, 0])
    _write_cell(results, "cell1", "gt_sft", {"a": {"original": (1, 1), "shuffled": (0, 0)}}, STYLE_TEXTS["post"],
                [1, 0, 1, 0])
    index = build_report(results, tmp_path / "report", n_resamples=200)
    html_text = index.read_text(encoding="utf-8")
    for title in ("CapTrack dimensions", "Robustness under perturbations", "Default-behaviour drift on neutral prompts",
                  "CapTrack dimensions per method"):
        assert title in html_text, title
    assert (tmp_path / "report" / "figures" / "captrack_base_135m.png").is_file()
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not installed")
    probe = tmp_path / "probe.html"
    probe.write_text(html_text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1))
    stdout, stderr = run_chromium(binary, probe, tmp_path / "profile")
    import re

    match = re.search(r'<pre id="probe-result">(.*?)</pre>', stdout, flags=re.S)
    assert match, stderr[-2000:]
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["images"] and all(i["complete"] and i["w"] > 0 for i in result["images"])
    assert result["errors"] == []
