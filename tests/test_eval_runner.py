"""Records storage, battery configs, subset selection, summaries and the battery runner end to end with a
scripted fake engine (defined here, for tests only)."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.special import softmax

from forgetjax.eval import records as records_module
from forgetjax.eval.battery import (
    Battery,
    BatteryConfigError,
    BenchmarkEntry,
    format_table,
    load_battery,
    missing_requirements,
    parse_battery,
    resolve_battery,
    run_battery,
    select_subset,
    summarize,
    write_summary_csv,
)
from forgetjax.eval.benchmarks.base import stable_hash
from forgetjax.eval.benchmarks import Item, get_benchmark, list_benchmarks
from forgetjax.eval.engine import Engine, Generation, GenerationRequest, LoglikelihoodResult
from forgetjax.eval.records import EvalRecord, RECORD_SCHEMA, read_metadata, read_records, write_records

from conftest import DATA_DIR

needs_data = pytest.mark.usefixtures("data_dir")  # skips locally, fails under CI when the data are missing
REFUSAL = "I'm sorry, but I can't help with that."


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fake_logprob(context: str, continuation: str) -> float:
    return -(int(sha256(context + "\x00" + continuation)[:8], 16) % 1000) / 100.0 - 0.01


class ScriptedEngine:
    """A fake Engine: scripted texts and hash-derived log-probabilities; records everything it was asked."""

    def __init__(self, model_id: str = "fake/smol-135m", respond=None, loglik=None):
        self.model_id = model_id
        self.respond = respond or self.default_response
        self.loglik = loglik or fake_logprob
        self.generate_calls = 0
        self.loglikelihood_calls = 0
        self.seen_prompts: list[str] = []
        self.requests: list[GenerationRequest] = []

    @staticmethod
    def default_response(prompt_text: str, request: GenerationRequest, sample: int) -> str:
        if int(sha256(prompt_text)[:2], 16) % 2:
            return REFUSAL
        return f"Let me think. The answer is 42. \\boxed{{42}} sample {sample}"

    def apply_chat_template(self, messages) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"

    def generate(self, requests):
        self.generate_calls += 1
        outputs = []
        for request in requests:
            text = request.prompt if isinstance(request.prompt, str) else self.apply_chat_template(request.prompt)
            self.seen_prompts.append(text)
            self.requests.append(request)
            texts = [self.respond(text, request, i) for i in range(request.n)]
            outputs.append(Generation(texts, [len(t.split()) for t in texts]))
        return outputs

    def loglikelihood(self, requests):
        self.loglikelihood_calls += 1
        results = []
        for context, continuation in requests:
            self.seen_prompts.append(context)
            results.append(LoglikelihoodResult(self.loglik(context, continuation), max(1, len(continuation) // 3), False))
        return results


def assert_runnable(battery: Battery, seed: int) -> None:
    """Every benchmark of the battery can be scored here: its modules import and its resources (NLTK data) exist.
    All of them are core requirements, so a gap is an installation bug, not a reason to leave a benchmark out."""
    problems = []
    for entry in battery.entries:
        benchmark = get_benchmark(entry.name)
        if missing_requirements(benchmark):
            problems.append(f"{entry.name} (missing {missing_requirements(benchmark)})")
            continue
        try:
            benchmark.check_ready(select_subset(benchmark.load(DATA_DIR), entry.limit, seed))
        except RuntimeError as err:
            problems.append(f"{entry.name} ({err})")
    assert not problems, "benchmarks that cannot be scored: " + "; ".join(problems)


def make_record(index: int, **overrides) -> EvalRecord:
    values = dict(
        run_id="run-1",
        model_id="org/model",
        benchmark="mmlu",
        category="STEM",
        item_id=f"item-{index}",
        prompt_hash=sha256(f"prompt {index}"),
    )
    values.update(overrides)
    return EvalRecord(**values)


# ---------------------------------------------------------------- records


def test_records_round_trip_through_parquet_with_the_explicit_schema(tmp_path):
    records = [
        make_record(
            0,
            output=None,
            extracted_answer="B",
            correct=1,
            score=0.75,
            option_logprobs=[-1.5, -0.25, -3.0, -7.0],
            chosen_option=1,
            confidence=0.6,
            k=4,
            seed=7,
            extra=json.dumps({"subject": "virology", "ünïcode": "✓"}),
        ),
        make_record(
            1,
            benchmark="xstest_safe",
            category="homonyms",
            output="I'm sorry — I can't.",
            correct=0,
            output_tokens=9,
            refusal=True,
            refusal_judge='{"verdict": "refusal"}',
        ),
        make_record(2, benchmark="truthfulqa_mc2", correct=None, score=0.41),
    ]
    path = write_records(records, tmp_path / "out" / "r.parquet", metadata={"n_items": "3"})
    assert read_records(path) == records
    schema = pq.read_schema(path)
    assert schema.remove_metadata().equals(RECORD_SCHEMA)
    assert str(schema.field("correct").type) == "int8"
    assert read_metadata(path) == {"n_items": "3"}
    assert records[0].extra_dict()["ünïcode"] == "✓"


def test_record_validation_names_the_field():
    with pytest.raises(ValueError, match="correct"):
        make_record(0, correct=2)
    with pytest.raises(ValueError, match="extra"):
        make_record(0, extra="{not json")
    with pytest.raises(ValueError, match="item_id"):
        make_record(0, item_id="")


def test_crash_while_writing_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "bench.parquet"
    original = [make_record(i, correct=1) for i in range(3)]
    write_records(original, path)
    before = path.read_bytes()

    def crash(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(records_module.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_records([make_record(i, correct=0) for i in range(5)], path)
    with pytest.raises(OSError):
        write_records(original, tmp_path / "fresh.parquet")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_records(path) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.parquet"]


# ---------------------------------------------------------------- subsets


def toy_items(n: int) -> list[Item]:
    return [Item(id=f"q{i}", category="c", data={"i": i}) for i in range(n)]


def test_select_subset_is_independent_of_input_order_and_nested():
    items = toy_items(200)
    chosen = [item.id for item in select_subset(items, 25, seed=3)]
    for shuffle_seed in range(5):
        shuffled = items[:]
        random.Random(shuffle_seed).shuffle(shuffled)
        assert [item.id for item in select_subset(shuffled, 25, seed=3)] == chosen
    assert len(set(chosen)) == 25
    assert chosen[:10] == [item.id for item in select_subset(items, 10, seed=3)]
    assert chosen != [item.id for item in select_subset(items, 25, seed=4)]
    assert chosen != [item.id for item in items[:25]]
    expected = sorted(items, key=lambda it: int.from_bytes(hashlib.sha256(f"subset\x1f3\x1f{it.id}".encode()).digest()[:8], "big"))
    assert chosen == [item.id for item in expected[:25]]
    assert sorted(i.id for i in select_subset(items, None, seed=3)) == sorted(i.id for i in items)
    assert len(select_subset(items, 1000, seed=3)) == 200


def test_select_subset_rejects_bad_limits_and_duplicate_ids():
    with pytest.raises(ValueError, match="limit"):
        select_subset(toy_items(5), 0, seed=0)
    with pytest.raises(ValueError, match="duplicate"):
        select_subset(toy_items(3) + toy_items(1), 2, seed=0)


# ---------------------------------------------------------------- battery configs


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "battery.yaml"
    path.write_text(text)
    return path


def test_battery_config_parsing_and_clear_errors(tmp_path):
    path = write_yaml(tmp_path, "name: t\nformat: fewshot\nbenchmarks:\n  - gsm8k\n  - {name: mmlu, limit: 5, n_shots: 1}\n")
    battery = load_battery(path)
    assert battery.format == "fewshot" and battery.entries == (
        BenchmarkEntry(name="gsm8k"),
        BenchmarkEntry(name="mmlu", limit=5, n_shots=1),
    )
    path = write_yaml(tmp_path, "benchmarks:\n  - {name: mmlu, limt: 5}\n")
    with pytest.raises(BatteryConfigError, match=re.escape(str(path)) + r".*benchmarks\[0\].*unknown key\(s\) \['limt'\]"):
        load_battery(path)
    path = write_yaml(tmp_path, "benchmarks:\n  - gsm8k\n  - {name: mmlu_pro}\n")
    with pytest.raises(BatteryConfigError, match=re.escape(str(path)) + r".*benchmarks\[1\]\.name.*unknown benchmark 'mmlu_pro'"):
        load_battery(path)
    path = write_yaml(tmp_path, "benchmarks: [gsm8k]\nseeds: 3\n")
    with pytest.raises(BatteryConfigError, match=r"top level.*'seeds'"):
        load_battery(path)
    for bad, field in (("{name: gsm8k, limit: 0}", "limit"), ("{name: gsm8k, top_p: 0}", "top_p"),
                       ("{name: gsm8k, format: base}", "format"), ("{name: gsm8k, n: true}", r"\.n")):
        path = write_yaml(tmp_path, f"benchmarks:\n  - {bad}\n")
        with pytest.raises(BatteryConfigError, match=field):
            load_battery(path)
    with pytest.raises(BatteryConfigError, match="listed twice"):
        parse_battery({"benchmarks": ["gsm8k", "gsm8k"]})
    assert parse_battery(["gsm8k", {"name": "piqa", "limit": 3}]).entries[1].limit == 3


def test_shipped_batteries_are_valid_core_covers_everything():
    core, quick = resolve_battery("core"), resolve_battery("quick")
    whole_sets = [n for n in list_benchmarks() if get_benchmark(n).subset_of is None]
    assert sorted(e.name for e in core.entries) == whole_sets
    assert all(get_benchmark(n).subset_of in whole_sets for n in set(list_benchmarks()) - set(whole_sets))
    assert all(e.limit is None for e in core.entries)
    assert all(e.limit is not None for e in quick.entries)
    families = {get_benchmark(e.name).category for e in quick.entries}
    assert families == {get_benchmark(n).category for n in list_benchmarks()}
    for entry in quick.entries:
        kind = get_benchmark(entry.name).kind
        if kind == "multiple_choice":
            assert 50 <= entry.limit <= 100, entry.name
        else:
            # generative subsets are whole batches of the battery's batch size (one decode loop each), at most two
            assert entry.limit % quick.batch_size == 0 and entry.limit <= 2 * quick.batch_size, entry.name
            assert entry.max_new_tokens <= 256, entry.name


# ---------------------------------------------------------------- summaries


def test_summarize_masked_means_by_hand(tmp_path):
    records = [
        make_record(0, benchmark="mmlu", category="STEM", correct=1, score=0.9),
        make_record(1, benchmark="mmlu", category="STEM", correct=0, score=0.2),
        make_record(2, benchmark="mmlu", category="other", correct=1, score=0.7),
        make_record(3, benchmark="xstest_safe", category="homonyms", correct=0, refusal=True),
        make_record(4, benchmark="xstest_safe", category="homonyms", correct=1, refusal=False),
        make_record(5, benchmark="xstest_safe", category="homonyms", correct=1, refusal=False),
        make_record(6, benchmark="truthfulqa_mc2", category="Law", correct=None, score=0.25,
                    extra=json.dumps({"chosen_is_true": 1})),
        make_record(7, benchmark="truthfulqa_mc2", category="Law", correct=None, score=0.75,
                    extra=json.dumps({"chosen_is_true": 0})),
    ]
    rows = {(r["benchmark"], r["category"]): r for r in summarize(records)}
    assert rows[("mmlu", "ALL")]["accuracy"] == pytest.approx(2 / 3)
    assert rows[("mmlu", "ALL")]["n"] == 3 and rows[("mmlu", "ALL")]["family"] == "knowledge"
    assert rows[("mmlu", "STEM")]["accuracy"] == pytest.approx(0.5)
    assert rows[("mmlu", "other")]["mean_score"] == pytest.approx(0.7)
    assert rows[("mmlu", "ALL")]["refusal_rate"] is None
    assert rows[("xstest_safe", "ALL")]["refusal_rate"] == pytest.approx(1 / 3)
    assert ("xstest_safe", "homonyms") not in rows
    mc2 = rows[("truthfulqa_mc2", "ALL")]
    assert mc2["accuracy"] is None and mc2["mean_score"] == pytest.approx(0.5) and mc2["n_scored"] == 2
    assert mc2["chosen_is_true"] == pytest.approx(0.5)
    path = write_summary_csv(list(rows.values()), tmp_path / "summary.csv")
    with open(path, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(rows) and float(written[0]["n"]) > 0
    assert "accuracy" in format_table(list(rows.values())).splitlines()[0]


# ---------------------------------------------------------------- runner end to end


@needs_data
def test_quick_battery_end_to_end_writes_one_file_per_benchmark_and_resumes(tmp_path):
    battery = resolve_battery("quick")
    assert_runnable(battery, seed=11)
    engine = ScriptedEngine()
    assert isinstance(engine, Engine)
    result = run_battery(engine, battery, DATA_DIR, tmp_path, run_id="before", seed=11, progress=False)
    model_dir = tmp_path / "fake_smol-135m"
    assert sorted(p.name for p in model_dir.glob("*.parquet")) == sorted(f"{e.name}.parquet" for e in battery.entries)
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]
    seen_hashes = {sha256(p) for p in engine.seen_prompts}
    for entry in battery.entries:
        benchmark = get_benchmark(entry.name)
        records = read_records(model_dir / f"{entry.name}.parquet")
        items = benchmark.load(DATA_DIR)
        groups = {}
        for item in items:
            groups.setdefault(benchmark.group_id(item), []).append(item.id)
        chosen = sorted(groups, key=lambda g: (stable_hash("subset", 11, g), g))[:entry.limit]
        assert sorted(r.item_id for r in records) == sorted(i for g in chosen for i in groups[g]), entry.name
        assert len({r.item_id for r in records}) == len(records)
        for record in records:
            assert record.benchmark == entry.name and record.run_id == "before" and record.model_id == engine.model_id
            assert record.prompt_hash in seen_hashes
            assert record.extra_dict()["family"] == benchmark.category
            if benchmark.kind == "multiple_choice":
                logprobs = np.array(record.option_logprobs)
                assert record.k == len(logprobs) >= 2 and record.output is None
                assert record.chosen_option == int(np.argmax(logprobs))
                assert record.confidence == pytest.approx(softmax(logprobs)[record.chosen_option])
            else:
                assert record.output in (REFUSAL,) or record.output.startswith("Let me think")
                assert record.output_tokens == len(record.output.split())
            if benchmark.kind == "safety":
                assert record.refusal == (record.output == REFUSAL)
                assert record.correct == (int(record.refusal) if benchmark.category == "safety_refusal" else int(not record.refusal))
    assert result.skipped == []
    summary_names = {row["benchmark"] for row in result.summary if row["category"] == "ALL"}
    assert summary_names == {e.name for e in battery.entries}
    assert result.summary_path.is_file()

    mtimes = {p.name: p.stat().st_mtime_ns for p in model_dir.glob("*.parquet")}
    resumed_engine = ScriptedEngine()
    resumed = run_battery(resumed_engine, battery, DATA_DIR, tmp_path, run_id="before", seed=11, progress=False)
    assert resumed_engine.generate_calls == 0 and resumed_engine.loglikelihood_calls == 0
    assert sorted(resumed.skipped) == sorted(e.name for e in battery.entries)
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.glob("*.parquet")} == mtimes

    (model_dir / "piqa.parquet").unlink()
    (model_dir / "advbench.parquet").unlink()
    partial_engine = ScriptedEngine()
    partial = run_battery(partial_engine, battery, DATA_DIR, tmp_path, run_id="before", seed=11, progress=False)
    assert sorted(set(e.name for e in battery.entries) - set(partial.skipped)) == ["advbench", "piqa"]
    assert partial_engine.loglikelihood_calls > 0 and partial_engine.generate_calls > 0
    assert len(partial_engine.requests) == next(e.limit for e in battery.entries if e.name == "advbench")


@needs_data
def test_runner_is_deterministic_and_refuses_to_mix_configurations(tmp_path):
    battery = parse_battery({"format": "fewshot", "benchmarks": [{"name": "advbench", "limit": 6, "n": 2}, {"name": "piqa", "limit": 5}]})
    first, second = ScriptedEngine(), ScriptedEngine()
    run_battery(first, battery, DATA_DIR, tmp_path / "a", run_id="r", seed=5, progress=False)
    run_battery(second, battery, DATA_DIR, tmp_path / "b", run_id="r", seed=5, progress=False)
    for name in ("advbench", "piqa"):
        a = read_records(tmp_path / "a" / "fake_smol-135m" / f"{name}.parquet")
        b = read_records(tmp_path / "b" / "fake_smol-135m" / f"{name}.parquet")
        assert [(r.item_id, r.prompt_hash, r.seed) for r in a] == [(r.item_id, r.prompt_hash, r.seed) for r in b]
    assert [(r.prompt, r.seed, r.n) for r in first.requests] == [(r.prompt, r.seed, r.n) for r in second.requests]
    assert all(isinstance(r.prompt, str) and r.prompt.startswith("Request: ") and r.stop == ("\nRequest:",) for r in first.requests)
    advbench = read_records(tmp_path / "a" / "fake_smol-135m" / "advbench.parquet")
    assert all(len(r.extra_dict()["samples"]) == 2 for r in advbench)

    with pytest.raises(FileExistsError, match="run_id"):
        run_battery(ScriptedEngine(), battery, DATA_DIR, tmp_path / "a", run_id="other", seed=5, progress=False)
    rerun = run_battery(ScriptedEngine(), battery, DATA_DIR, tmp_path / "a", run_id="other", seed=5, progress=False, overwrite=True)
    assert rerun.skipped == []
    assert {r.run_id for r in read_records(rerun.files["piqa"])} == {"other"}


@needs_data
def test_runner_scores_scripted_correct_answers_through_the_real_graders(tmp_path):
    gsm_rows = [json.loads(line) for line in open(DATA_DIR / "gsm8k" / "test.jsonl", encoding="utf-8")]
    gsm_answers = {r["question"]: r["answer"].split("####")[-1].strip() for r in gsm_rows}
    mmlu_letters = {}
    for path in (DATA_DIR / "mmlu" / "test").glob("*.csv"):
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                mmlu_letters[row["question"].strip()] = "ABCD"[int(row["answer"])]

    def answer_of(prompt_text: str) -> str:
        question = next(q for q in gsm_answers if q in prompt_text)
        return gsm_answers[question]

    def right(prompt_text, request, sample):
        return f"Working it out step by step.\n#### {answer_of(prompt_text)}"

    def wrong(prompt_text, request, sample):
        return f"The answer is {int(answer_of(prompt_text).replace(',', '')) + 7}."

    def loglik(context, continuation):
        question = next(q for q in mmlu_letters if q in context)
        return -0.1 if continuation.strip() == mmlu_letters[question] else -5.0

    battery = parse_battery({"benchmarks": [{"name": "gsm8k", "limit": 6}, {"name": "mmlu", "limit": 6}]})
    result = run_battery(ScriptedEngine(respond=right, loglik=loglik), battery, DATA_DIR, tmp_path, "good", 0, progress=False)
    rows = {r["benchmark"]: r for r in result.summary if r["category"] == "ALL"}
    assert rows["gsm8k"]["accuracy"] == 1.0 and rows["gsm8k"]["n"] == 6
    assert rows["mmlu"]["accuracy"] == 1.0
    expected_confidence = math.exp(-0.1) / (math.exp(-0.1) + 3 * math.exp(-5.0))
    assert all(r.confidence == pytest.approx(expected_confidence) for r in read_records(result.files["mmlu"]))
    bad = run_battery(ScriptedEngine("fake/other", respond=wrong, loglik=loglik), battery, DATA_DIR, tmp_path, "bad", 0, progress=False)
    assert {r["benchmark"]: r["accuracy"] for r in bad.summary if r["category"] == "ALL"}["gsm8k"] == 0.0


def test_runner_rejects_non_engines_and_bad_arguments(tmp_path):
    battery = parse_battery(["piqa"])
    with pytest.raises(TypeError, match="Engine protocol"):
        run_battery(object(), battery, DATA_DIR, tmp_path, "r", 0, progress=False)
    with pytest.raises(ValueError, match="run_id"):
        run_battery(ScriptedEngine(), battery, DATA_DIR, tmp_path, "", 0, progress=False)
    with pytest.raises(ValueError, match="fmt"):
        run_battery(ScriptedEngine(), battery, DATA_DIR, tmp_path, "r", 0, progress=False, fmt="base")
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest(prompt="x", max_new_tokens=0)


@needs_data
def test_preflight_failure_happens_before_any_model_call(tmp_path, monkeypatch):
    ifeval = get_benchmark("ifeval")

    def not_ready(self, items):
        raise RuntimeError("ifeval: checker data missing")

    monkeypatch.setattr(type(ifeval), "check_ready", not_ready)
    engine = ScriptedEngine()
    battery = parse_battery(["advbench", {"name": "piqa", "limit": 3}, {"name": "ifeval", "limit": 4}])
    with pytest.raises(RuntimeError, match="checker data missing"):
        run_battery(engine, battery, DATA_DIR, tmp_path, "r", 0, progress=False)
    assert engine.generate_calls == 0 and engine.loglikelihood_calls == 0
    assert not list(tmp_path.rglob("*.parquet"))


@needs_data
def test_runner_reports_pass_at_n_for_sampled_code(tmp_path):
    solutions = {}
    with gzip.open(DATA_DIR / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            solutions[row["prompt"]] = row["canonical_solution"]

    def first_sample_right(prompt_text, request, sample):
        prompt = next(p for p in solutions if p in prompt_text)
        return solutions[prompt] if sample == 0 else "    raise NotImplementedError\n"

    battery = parse_battery({"format": "fewshot", "benchmarks": [{"name": "humaneval", "limit": 3, "n": 3, "temperature": 0.8}]})
    engine = ScriptedEngine(respond=first_sample_right)
    result = run_battery(engine, battery, DATA_DIR, tmp_path, "r", 0, progress=False)
    assert all(r.temperature == 0.8 and r.n == 3 and r.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint") for r in engine.requests)
    for record in read_records(result.files["humaneval"]):
        extra = record.extra_dict()
        assert record.correct == 1 and record.score == pytest.approx(1 / 3)
        assert extra["pass@1"] == pytest.approx(1 / 3) and extra["pass@3"] == pytest.approx(1.0)
        assert len(extra["samples"]) == 3
    row = next(r for r in result.summary if r["benchmark"] == "humaneval")
    assert row["pass@3"] == pytest.approx(1.0) and row["accuracy"] == 1.0
