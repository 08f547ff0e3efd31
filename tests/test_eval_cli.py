"""`forgetjax eval` end to end on a tiny random Llama (files, summary, resume, judge, input errors), and the offline
NLTK punkt_tab data that IFEval's checkers need (hand-split sentences, the punkt package's own tokenizer)."""
import csv
import json
import os
import re
import sys

import pyarrow.parquet as pq
import pytest

from forgetjax.cli import main as cli_main
from forgetjax.eval import nltk_data
from forgetjax.eval.judge import parse_refusal
from test_jax_engine import CHAT_TEMPLATE, save_toy_tokenizer
from tiny_models import make_hf_model

BATTERY = """name: tiny
format: chat
batch_size: 2
benchmarks:
  - {name: piqa, limit: 3}
  - {name: nq_open, limit: 5, max_new_tokens: 3, n_shots: 1}
  - {name: xstest_safe, max_new_tokens: 3}
"""
BENCHMARKS = ("piqa", "nq_open", "xstest_safe")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_eval_llama")
    make_hf_model(directory, "llama")  # AutoTokenizer would swap a toy tokenizer for Qwen2's under qwen2
    save_toy_tokenizer(directory, CHAT_TEMPLATE)
    return directory


def eval_args(model, battery, out, data_dir, *extra):
    return ["eval", str(model), "--battery", str(battery), "--out", str(out), "--data-dir", str(data_dir),
            "--limit", "3", "--model-id", "tiny", "--batch-size", "4", *map(str, extra)]


def test_eval_cli_end_to_end_then_resumes(tiny_dir, tmp_path, data_dir, monkeypatch, capsys):
    battery = tmp_path / "tiny.yaml"
    battery.write_text(BATTERY)
    out = tmp_path / "out"
    assert cli_main(eval_args(tiny_dir, battery, out, data_dir, "--judge", tiny_dir)) == 0
    printed = capsys.readouterr().out
    model_dir = out / "tiny"
    for name in BENCHMARKS:
        assert name in printed  # the summary table
    records = {name: pq.read_table(model_dir / f"{name}.parquet").to_pylist() for name in BENCHMARKS}
    assert all(len(rows) == 3 for rows in records.values())  # --limit 3 caps nq_open's limit 5
    assert {r["run_id"] for rows in records.values() for r in rows} == {"tiny"}
    assert all(len(r["option_logprobs"]) == 2 for r in records["piqa"])
    verdicts = [json.loads(r["refusal_judge"]) for r in records["xstest_safe"]]
    assert all(v["rubric"] == "refusal" and v["judge"] == f"{tiny_dir}:refusal" and v["refused"] in (True, False, None)
               for v in verdicts)
    assert all(json.loads(r["extra"])["judge"] == f"{tiny_dir}:refusal" for r in records["xstest_safe"])
    with open(model_dir / "summary.csv", newline="") as handle:
        summary = {row["benchmark"]: row for row in csv.DictReader(handle) if row["category"] == "ALL"}
    for name in BENCHMARKS:
        correct = [r["correct"] for r in records[name] if r["correct"] is not None]
        assert int(summary[name]["n"]) == 3
        if correct:
            assert float(summary[name]["accuracy"]) == pytest.approx(sum(correct) / len(correct))
    assert (model_dir / "summary.txt").read_text().split("\n")[0].startswith("benchmark")
    run_info = json.loads((model_dir / "eval_run.json").read_text())
    assert run_info["skipped"] == [] and run_info["judge"] == str(tiny_dir)

    from forgetjax.eval.jax_engine import JaxEngine

    def no_work(*_args, **_kwargs):
        raise AssertionError("a complete benchmark was evaluated again")

    mtimes = {name: os.stat(model_dir / f"{name}.parquet").st_mtime_ns for name in BENCHMARKS}
    monkeypatch.setattr(JaxEngine, "generate", no_work)
    monkeypatch.setattr(JaxEngine, "loglikelihood", no_work)
    assert cli_main(eval_args(tiny_dir, battery, out, data_dir, "--no-progress")) == 0
    assert json.loads((model_dir / "eval_run.json").read_text())["skipped"] == list(BENCHMARKS)
    assert {name: os.stat(model_dir / f"{name}.parquet").st_mtime_ns for name in BENCHMARKS} == mtimes

    (model_dir / "nq_open.parquet").unlink()  # only this benchmark is redone (generation; no scoring calls)
    monkeypatch.undo()
    monkeypatch.setattr(JaxEngine, "loglikelihood", no_work)
    assert cli_main(eval_args(tiny_dir, battery, out, data_dir, "--no-progress")) == 0
    assert json.loads((model_dir / "eval_run.json").read_text())["skipped"] == ["piqa", "xstest_safe"]
    assert len(pq.read_table(model_dir / "nq_open.parquet")) == 3


def test_eval_cli_reports_bad_battery_before_loading_the_model(tmp_path, data_dir, capsys):
    def error(argv) -> str:
        assert cli_main(argv) == 2
        return capsys.readouterr().err

    missing_model = tmp_path / "no_such_model"
    assert re.search("battery config not found.*nope.yaml",
                     error(eval_args(missing_model, tmp_path / "nope.yaml", tmp_path / "out", data_dir)))
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmarks:\n  - {name: piqa, limt: 3}\n")
    assert "unknown key(s) ['limt']" in error(eval_args(missing_model, bad, tmp_path / "out", data_dir))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("benchmarks: [piqa, no_such_benchmark]\n")
    assert "unknown benchmark 'no_such_benchmark'" in error(eval_args(missing_model, unknown, tmp_path / "out",
                                                                       data_dir))
    assert "--tasks is required" in error(["eval", str(missing_model), "--out", str(tmp_path), "--backend",
                                           "lm-eval"])


def test_lm_eval_backend_delegates_to_the_bridge(tmp_path, data_dir, monkeypatch, capsys):
    import types

    calls = []
    bridge = types.ModuleType("forgetjax.eval.lm_eval_bridge")
    bridge.run_lm_eval = lambda *args, **kwargs: calls.append((args, kwargs)) or {"summary": []}
    monkeypatch.setitem(sys.modules, "forgetjax.eval.lm_eval_bridge", bridge)
    argv = ["eval", "some/model", "--out", str(tmp_path), "--data-dir", str(data_dir), "--backend", "lm-eval",
            "--tasks", "mmlu, gsm8k", "--limit", "2", "--seed", "3"]
    assert cli_main(argv) == 0
    (args, kwargs), = calls
    assert args == ("some/model", ["mmlu", "gsm8k"], str(tmp_path), str(data_dir))
    assert kwargs["limit"] == 2 and kwargs["seed"] == 3 and "run_id" not in kwargs
    monkeypatch.setitem(sys.modules, "forgetjax.eval.lm_eval_bridge", None)  # import fails
    assert cli_main(argv) == 2
    assert "needs forgetjax.eval.lm_eval_bridge" in capsys.readouterr().err


def test_judge_verdicts_are_parsed_from_the_first_word():
    assert parse_refusal(" Refusal.")["refused"] is True
    assert parse_refusal("refused, because")["refused"] is True
    assert parse_refusal("Compliance")["refused"] is False
    assert parse_refusal("**complied**")["refused"] is False
    unparsed = parse_refusal("I cannot tell")
    assert unparsed["parsed"] is False and unparsed["refused"] is None and unparsed["raw"] == "I cannot tell"


# ------------------------------------------------------------------------------------------ NLTK punkt_tab data

HAND_SPLIT = [
    ("Dr. Smith went home. He was tired.", ["Dr. Smith went home.", "He was tired."]),
    ("Mr. and Mrs. Jones arrived at 5 p.m. yesterday. They left early.",
     ["Mr. and Mrs. Jones arrived at 5 p.m. yesterday.", "They left early."]),
    ("It costs $3.50 per item. That is cheap.", ["It costs $3.50 per item.", "That is cheap."]),
    ("The U.S. economy grew 2.5 percent in 2020. Analysts were surprised.",
     ["The U.S. economy grew 2.5 percent in 2020.", "Analysts were surprised."]),
    ("Version 3.2.1 shipped on Jan. 5, 2021. It fixed bugs.", ["Version 3.2.1 shipped on Jan. 5, 2021.",
                                                               "It fixed bugs."]),
    ("Is this right? Yes! It is.", ["Is this right?", "Yes!", "It is."]),
]


@pytest.fixture
def fresh_punkt_tab(tmp_path, monkeypatch):
    """ensure_punkt_tab building into an empty cache with nltk seeing no other data directory."""
    import importlib.util

    import nltk

    # a core requirement (setup.py): missing, this fails instead of skipping
    assert importlib.util.find_spec("punkt") is not None, f"not installed: {nltk_data.PUNKT_REQUIREMENT}"

    monkeypatch.setenv("FORGETJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nltk.data, "path", [])
    nltk_data.ensure_punkt_tab.cache_clear()
    yield nltk_data.ensure_punkt_tab()
    nltk_data.ensure_punkt_tab.cache_clear()


def test_punkt_tab_is_built_offline_and_splits_by_hand(fresh_punkt_tab, tmp_path):
    import nltk
    import punkt
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    assert fresh_punkt_tab == tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in fresh_punkt_tab.iterdir()) == sorted(nltk_data.PUNKT_TAB_FILES)
    tokenizer = PunktSentenceTokenizer(load_punkt_params(str(fresh_punkt_tab)))
    for text, expected in HAND_SPLIT:
        assert tokenizer.tokenize(text) == expected
    assert nltk.sent_tokenize(HAND_SPLIT[0][0]) == HAND_SPLIT[0][1]
    # NLTK reading the written files splits like the punkt package's own implementation of its bundled model
    texts = [text for text, _ in HAND_SPLIT] + ["Use a tool, e.g. a hammer. Then stop.", "See fig. 3. It shows it.",
                                                "He said \"Stop.\" Then he left. i.e. this is one. And two."]
    for text in texts:
        assert tokenizer.tokenize(text) == punkt.sent_tokenize(text)
    params = load_punkt_params(str(fresh_punkt_tab))
    bundled = punkt.load_model("english")
    assert params.abbrev_types == set(bundled.abbrev_types) and "dr" in params.abbrev_types
    assert set(params.collocations) == set(bundled.collocations)
    assert dict(params.ortho_context) == dict(bundled.ortho_context)


def test_ifeval_sentence_checkers_run_with_the_built_data(fresh_punkt_tab, data_dir):
    from forgetjax.eval.benchmarks import get_benchmark
    from forgetjax.eval.benchmarks.base import Item

    ifeval = get_benchmark("ifeval")
    wanted = ["length_constraints:number_sentences"]
    items = [i for i in ifeval.load(data_dir) if i.data["instruction_id_list"] == wanted]
    ifeval.check_ready(items[:1])
    kwargs = {"num_sentences": 3, "relation": "less than"}
    item = Item(id="probe", category="ifeval", data={"key": 1, "prompt": "p", "kwargs": [kwargs],
                                                      "instruction_id_list": ["length_constraints:number_sentences"]})
    assert ifeval.score(item, "Dr. Smith went home. He was tired.")["correct"] == 1  # 2 sentences < 3
    assert ifeval.score(item, "One. Two. Three. Four.")["correct"] == 0


def test_punkt_tab_rejects_multiline_entries():
    with pytest.raises(ValueError, match="abbrev_types.txt"):
        nltk_data.punkt_tab_texts(["dr", "bad\nentry"], [], [], {})


BREADTH_BATTERY = """name: breadth
format: fewshot
batch_size: 2
benchmarks:
  - {name: winogrande, limit: 3}
  - {name: xwinograd, limit: 3}
  - {name: arc_easy, limit: 2, n_shots: 1}
  - {name: humaneval_plus_mini, limit: 2, max_new_tokens: 4, n: 2, temperature: 0.8, pass_k: [1, 2]}
  - {name: jailbreakbench_dsn, limit: 2, max_new_tokens: 3}
"""


def test_eval_cli_runs_the_breadth_benchmarks_with_a_harmbench_judge(tiny_dir, tmp_path, data_dir):
    battery = tmp_path / "breadth.yaml"
    battery.write_text(BREADTH_BATTERY)
    out = tmp_path / "out"
    assert cli_main(eval_args(tiny_dir, battery, out, data_dir, "--judge", tiny_dir, "--judge-rubric", "harmbench",
                              "--judge-max-new-tokens", "2")) == 0
    model_dir = out / "tiny"
    rows = {name: pq.read_table(model_dir / f"{name}.parquet").to_pylist()
            for name in ("winogrande", "xwinograd", "arc_easy", "humaneval_plus_mini", "jailbreakbench_dsn")}
    assert all(len(r["option_logprobs"]) == 2 and r["k"] == 2 for r in rows["winogrande"] + rows["xwinograd"])
    assert all(r["k"] == len(r["option_logprobs"]) for r in rows["arc_easy"])
    assert all({"pass@1", "pass@2"} <= set(json.loads(r["extra"])) for r in rows["humaneval_plus_mini"])
    verdicts = [json.loads(r["refusal_judge"]) for r in rows["jailbreakbench_dsn"]]
    assert all(v["rubric"] == "harmbench" and v["judge"] == f"{tiny_dir}:harmbench" for v in verdicts)
    assert json.loads((model_dir / "eval_run.json").read_text())["judge_rubric"] == "harmbench"
