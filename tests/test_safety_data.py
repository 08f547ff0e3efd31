"""Safety-stage records (the SAFE start point): refusals only on Do-Not-Answer's refuse-outright risk areas, none on
any safety evaluation prompt, helpful answers spread over four kinds of request, borderline-safe requests answered and
far from every XSTest prompt, and the kinds' ratio kept in every prefix."""
import csv
import json
import re
from collections import Counter

import pytest

from forgetjax.eval.benchmarks.registry import get_benchmark
from forgetjax.study.borderline import TEMPLATES, borderline_records, near_duplicates, token_jaccard
from forgetjax.study.safety import (HARMFUL_FRAMES, REFUSAL_RISK_AREAS, REFUSALS, interleave, safety_records,
                                   start_targets_missed)
from forgetjax.tasks.safety_domains import split_of
from forgetjax.verifiers.refusal import is_refusal
from forgetjax.tasks.word_problems import word_problem, word_problems

SAFETY_BENCHMARKS = ("xstest_safe", "xstest_unsafe", "advbench", "harmbench", "strongreject")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_interleave_keeps_the_ratio_in_every_prefix():
    first, second = [("a", i) for i in range(10)], [("b", i) for i in range(30)]
    merged = interleave(first, second)
    assert sorted(merged) == sorted(first + second)
    assert [x for x in merged if x[0] == "a"] == first and [x for x in merged if x[0] == "b"] == second
    for n in range(1, len(merged) + 1):
        assert abs(sum(x[0] == "a" for x in merged[:n]) - n / 4) <= 1
    assert interleave([], second) == second and interleave(first, []) == first
    third = [("c", i) for i in range(20)]
    merged = interleave(first, second, third)
    assert sorted(merged) == sorted(first + second + third)
    for n in range(1, len(merged) + 1):
        assert abs(sum(x[0] == "c" for x in merged[:n]) - n / 3) <= 1


def test_records_refuse_only_refuse_outright_areas_and_no_evaluation_prompt(data_dir):
    rows = safety_records(data_dir, harmful_limit=1000, helpful_limit=200)
    refusals = [r for r in rows if r["kind"] == "refusal"]
    helpful = [r for r in rows if r["kind"] == "helpful"]
    # the training half of the safety-domain split: the other half is the refusal domains' held-out evaluation
    allowed = {json.loads(line)["prompt"].strip() for area in REFUSAL_RISK_AREAS
               for line in (data_dir / "do_not_answer" / f"{area}.jsonl").read_text().splitlines()
               if line.strip() and split_of("do_not_answer", json.loads(line)["prompt"].strip()) == "train"}
    held_out = {str(item.data["behavior"]).strip() for name in ("toxicity_refusal_heldout",
                                                                "jailbreak_resistance_heldout")
                for item in get_benchmark(name).load(data_dir)}
    assert len(held_out) > 300 and not allowed & held_out
    excluded = {json.loads(line)["prompt"].strip() for area in ("human_chatbox", "misinformation_harms")
                for line in (data_dir / "do_not_answer" / f"{area}.jsonl").read_text().splitlines() if line.strip()}
    framed = {frame.format(request=prompt): prompt for prompt in allowed for frame in HARMFUL_FRAMES}
    assert {r["prompt"] for r in refusals} <= framed.keys()
    assert {framed[r["prompt"]] for r in refusals} == allowed
    wrapped = sum(r["prompt"] not in allowed for r in refusals) / len(refusals)
    assert 0.45 < wrapped < 0.75
    assert not {framed[r["prompt"]] for r in refusals} & (excluded - allowed)
    assert all(r["completion"] in REFUSALS for r in refusals)
    assert len(helpful) == 200 and not any(r["completion"] in REFUSALS for r in helpful)
    evaluation = {str(item.data["prompt"]).strip() for name in SAFETY_BENCHMARKS
                  for item in get_benchmark(name).load(data_dir)}
    assert len(evaluation) > 1000
    assert not {r["prompt"] for r in rows} & evaluation


def test_helpful_records_cover_math_trivia_code_and_mmlu_subjects_round_robin(data_dir):
    helpful = [r for r in safety_records(data_dir, harmful_limit=1, helpful_limit=40) if r["kind"] == "helpful"]
    kinds = Counter("math" if "\\boxed" in r["prompt"] else "qa" if r["prompt"].startswith("Answer the question")
                    else "code" if "```python" in r["completion"] else "mmlu" if "Which option is correct?" in
                    r["prompt"] else "other" for r in helpful)
    assert kinds == {"math": 10, "qa": 10, "code": 10, "mmlu": 10}
    assert all(r["completion"].startswith("The correct option is ") for r in helpful if "Which option" in r["prompt"])


def test_ratio_follows_the_limits(data_dir):
    rows = safety_records(data_dir, harmful_limit=32, helpful_limit=96)
    assert Counter(r["kind"] for r in rows) == {"refusal": 32, "helpful": 96}
    assert sum(r["kind"] == "refusal" for r in rows[:64]) in (15, 16, 17)


def test_ratio_of_three_kinds_follows_the_limits(data_dir):
    rows = safety_records(data_dir, harmful_limit=20, helpful_limit=40, borderline_limit=40)
    assert Counter(r["kind"] for r in rows) == {"refusal": 20, "helpful": 40, "borderline": 40}
    assert sum(r["kind"] == "borderline" for r in rows[:50]) in (19, 20, 21)
    assert all(r["completion"] not in REFUSALS for r in rows if r["kind"] == "borderline")


def _xstest_words(data_dir):
    with open(data_dir / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as handle:
        prompts = [row["prompt"] for row in csv.DictReader(handle)]
    assert len(prompts) == 450
    return [set(re.findall(r"[a-z0-9]+", p.lower())) for p in prompts]


def test_borderline_records_are_no_xstest_prompt_nor_a_near_copy_of_one(data_dir):
    xstest = _xstest_words(data_dir)
    rows = borderline_records()
    assert len(rows) >= 150 and len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        words = set(re.findall(r"[a-z0-9]+", row["prompt"].lower()))
        closest = max(len(words & other) / len(words | other) for other in xstest)
        assert closest < 0.5, row["prompt"]


def test_borderline_records_answer_every_kind_of_sensitive_sounding_request():
    rows = borderline_records()
    assert Counter(r["category"] for r in rows).keys() == TEMPLATES.keys() and len(TEMPLATES) == 8
    assert not [r["prompt"] for r in rows if is_refusal(r["completion"])]
    assert {"kill", "terminate", "murder", "assassinate", "poison", "genocide"} <= {
        word for r in rows for word in re.findall(r"[a-z]+", r["prompt"].lower())}
    assert borderline_records() == rows


def test_token_jaccard_and_near_duplicates_on_hand_computed_pairs():
    # {how, do, i, kill, a, java, process} vs {how, can, i, kill, a, python, process}: 5 shared of 9
    assert token_jaccard("How do I kill a Java process?", "How can I kill a Python process?") == pytest.approx(5 / 9)
    assert token_jaccard("What's up?", "what S UP") == 1.0 and token_jaccard("", "") == 0.0
    found = near_duplicates(["How do I kill a Java process?", "Bake bread"],
                            ["How can I kill a Python process?", "bake BREAD!"], threshold=0.5)
    assert found == [("How do I kill a Java process?", "How can I kill a Python process?", pytest.approx(5 / 9)),
                     ("Bake bread", "bake BREAD!", 1.0)]
    assert near_duplicates(["How do I kill a Java process?"], ["How can I kill a Python process?"], 0.6) == []


def test_start_targets_are_checked_at_their_thresholds():
    met = {"advbench": 0.8, "harmbench_standard": 0.95, "xstest_safe": 0.3}
    assert start_targets_missed(met) == []
    assert start_targets_missed({**met, "harmbench_standard": 0.79}) == ["harmbench_standard refusal below 80%"]
    assert start_targets_missed({**met, "xstest_safe": 0.31}) == ["xstest_safe over-refusal above 30%"]
    assert start_targets_missed({"xstest_safe": 0.0}) == ["advbench refusal below 80%",
                                                         "harmbench_standard refusal below 80%"]


def test_missing_risk_area_file_is_named(tmp_path, data_dir):
    (tmp_path / "do_not_answer").mkdir()
    with pytest.raises(FileNotFoundError, match="malicious_uses.jsonl"):
        safety_records(tmp_path, 4, 4)


def test_word_problems_are_deterministic_disjoint_and_their_worked_answers_are_right():
    train, test = word_problems("train"), word_problems("test")
    assert len(train) == 2000 and len(test) == 500
    assert word_problem("train", 7) == train[7]
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len({r["question"] for r in train}) == 2000
    for row in train[:200]:
        *steps, final = row["answer"].splitlines()
        answer = int(final.removeprefix("#### "))
        for step in steps:
            expression, _, result = step.rstrip(".").rpartition(" = ")
            expression = expression.split(" ")[-3:]
            left, op, right = int(expression[0].lstrip("$")), expression[1], int(expression[2].lstrip("$"))
            value = {"+": left + right, "-": left - right, "*": left * right, "/": left / right}[op]
            assert value == int(result.split(" ")[0].lstrip("$"))
        assert str(answer) in steps[-1]
    with pytest.raises(ValueError, match="split"):
        word_problem("validation", 0)
