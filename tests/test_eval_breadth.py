"""The benchmarks added for evaluation breadth (ARC, HellaSwag, WinoGrande, XWinograd, HumanEval+, JailbreakBench,
HarmBench jailbreak templates) on the real data, their scorers on hand-computed cases, exact prompts, and pass@k in
the core battery against the binomial formula."""
from __future__ import annotations

import csv
import gzip
import json
import math
from collections import Counter

import pytest

from forgetjax.eval.benchmarks import Item, ScoringContext, get_benchmark


def item(**data):
    return Item(id="x", category="x", data=data)


# ------------------------------------------------------------------------------------------- loaders on the real data


def test_arc_loaders_find_the_gold_option_by_label(data_dir):
    challenge = get_benchmark("arc_challenge").load(data_dir)
    easy = get_benchmark("arc_easy").load(data_dir)
    assert (len(challenge), len(easy)) == (1172, 2376)
    raw = [json.loads(line) for line in open(data_dir / "arc" / "ARC-Challenge-Test.jsonl", encoding="utf-8")]
    numeric = [row for row in raw if row["answerKey"] in "12345"]
    assert len(numeric) == 22
    by_id = {it.id: it for it in challenge}
    for row in numeric + raw[:50]:
        gold_text = next(c["text"] for c in row["question"]["choices"] if c["label"] == row["answerKey"])
        loaded = by_id[row["id"]]
        assert loaded.data["options"][loaded.data["answer"]] == gold_text.strip()
    assert Counter(len(it.data["options"]) for it in challenge) == Counter(
        len(row["question"]["choices"]) for row in raw)
    test_questions = {it.data["question"] for it in challenge}
    assert not {q for q, _ in challenge[0].data["shots"]} & test_questions  # exemplars from the train split


def test_hellaswag_winogrande_xwinograd_loaders(data_dir):
    hellaswag = get_benchmark("hellaswag").load(data_dir)
    assert len(hellaswag) == 10042
    with gzip.open(data_dir / "hellaswag" / "hellaswag_val.jsonl.gz", "rt", encoding="utf-8") as handle:
        labels = [json.loads(line)["label"] for line in handle]
    assert [it.data["answer"] for it in hellaswag] == labels

    winogrande = get_benchmark("winogrande").load(data_dir)
    lst = (data_dir / "winogrande" / "dev-labels.lst").read_text().split()
    assert len(winogrande) == 1267 and [str(it.data["answer"] + 1) for it in winogrande] == lst

    xwinograd = get_benchmark("xwinograd").load(data_dir)
    assert Counter(it.category for it in xwinograd) == {"en": 2325, "jp": 959, "ru": 315, "pt": 263, "fr": 83,
                                                        "zh": 16}
    with open(data_dir / "xwinograd" / "dataset.tsv", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    benchmark = get_benchmark("xwinograd")
    for loaded, row in zip(xwinograd, rows):
        pronoun = json.loads(row[5])[0]
        assert benchmark.gap_text(loaded).replace(" ", "") == pronoun.replace(" ", ""), loaded.id
        candidates = json.loads(row[6])
        assert loaded.data["options"][loaded.data["answer"]] == next(c[0] for c in candidates if c[3])


def test_humaneval_plus_jailbreakbench_and_templates_load(data_dir):
    plus = get_benchmark("humaneval_plus").load(data_dir)
    base = get_benchmark("humaneval").load(data_dir)
    assert [it.id for it in plus] == [it.id for it in base]
    with gzip.open(data_dir / "humaneval_plus" / "HumanEvalPlus.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert sum(it.data["n_inputs"] for it in plus) == sum(len(r["base_input"]) + len(r["plus_input"]) for r in rows)

    for attack, folder in (("dsn", "DSN"), ("gcg", "GCG"), ("jbc", "JBC"), ("pair", "PAIR"),
                           ("random_search", "prompt_with_random_search")):
        items = get_benchmark(f"jailbreakbench_{attack}").load(data_dir)
        prompts = set()
        for path in sorted((data_dir / "jailbreakbench" / folder).glob("*/*.json")):
            prompts |= {row["prompt"] for row in json.loads(path.read_text())["jailbreaks"] if row["prompt"]}
        assert {it.data["prompt"] for it in items} == prompts and len(items) == len(prompts), attack
        assert len({it.category for it in items}) == 10 and all(it.data["behavior"] for it in items)

    standard = get_benchmark("harmbench_standard").load(data_dir)
    wrapped = get_benchmark("harmbench_refusal_suppression").load(data_dir)
    assert len(standard) == len(wrapped) == 159
    for plain, jailbreak in zip(standard, wrapped):
        assert (jailbreak.id, jailbreak.category, jailbreak.data["behavior"]) == (plain.id, plain.category,
                                                                                  plain.data["prompt"])
        assert f"Request: {plain.data['prompt'].strip()}\n\n" in jailbreak.data["prompt"]


# ------------------------------------------------------------------------------------------ exact prompts and scoring


def test_arc_and_winogrande_prompts_written_out_by_hand():
    arc = item(question="Which gas do plants take in?", options=["oxygen", "carbon dioxide", "helium"], answer=1,
               shots=(("What melts ice?", "heat"), ("What is H2O?", "water")))
    benchmark = get_benchmark("arc_challenge")
    assert benchmark.build_prompt(arc, "fewshot", n_shots=2) == (
        "Question: What melts ice?\nAnswer: heat\n\nQuestion: What is H2O?\nAnswer: water\n\n"
        "Question: Which gas do plants take in?\nAnswer:")
    assert benchmark.continuations(arc, "fewshot") == [" oxygen", " carbon dioxide", " helium"]
    assert benchmark.build_prompt(arc, "chat") == [{"role": "user", "content": "Which gas do plants take in?"}]

    sentence = "The trophy doesn't fit in the case because _ is too big."
    wino = item(sentence=sentence, span=(sentence.index("_"), sentence.index("_") + 1),
                options=["the trophy", "the case"], answer=0)
    benchmark = get_benchmark("winogrande")
    assert benchmark.option_requests(wino, "fewshot") == [
        ("The trophy doesn't fit in the case because the trophy", " is too big."),
        ("The trophy doesn't fit in the case because the case", " is too big.")]
    assert benchmark.option_requests(wino, "chat") == [
        ([{"role": "user", "content": f'{sentence}\n\nIn this sentence, who or what does "_" refer to: the trophy or '
                                      'the case? Answer with the option only.'}], option)
        for option in ("the trophy", "the case")]
    end = item(sentence="Ana thanked Mia because she", span=(24, 27), options=["Ana", "Mia"], answer=1)
    assert get_benchmark("xwinograd").option_requests(end, "fewshot") == [
        ("Ana thanked Mia because", " Ana"), ("Ana thanked Mia because", " Mia")]


def test_hellaswag_cleaning_and_cloze_scoring_by_hand():
    from forgetjax.eval.benchmarks.commonsense import hellaswag_text

    assert hellaswag_text(" Making a cake: [header] How to bake [title] Mix flour.  Then stir. ") == (
        "Making a cake: How to bake. Mix flour. Then stir.")
    arc = item(question="q", options=["a", "bb", "ccc"], answer=2)
    # log-probs -3, -1, -2: argmax is option 1 (wrong); softmax p(2) = e^-2 / (e^-3 + e^-1 + e^-2)
    scored = get_benchmark("arc_challenge").score(arc, [-3.0, -1.0, -2.0])
    assert (scored["correct"], scored["chosen_option"], scored["k"]) == (0, 1, 3)
    assert scored["score"] == pytest.approx(math.exp(-2) / (math.exp(-3) + math.exp(-1) + math.exp(-2)))
    # length-normalised: -3/1, -1/2, -2/3 -> option 1 still (-0.5 > -0.667)
    assert scored["extra"]["correct_norm"] == 0
    wino = item(sentence="a _ b", span=(2, 3), options=["x", "y"], answer=1)
    assert get_benchmark("winogrande").score(wino, [-4.0, -2.5])["correct"] == 1


PLUS_TASK = {
    "prompt": "def halve(x):\n    \"\"\"Half of x.\"\"\"\n",
    "canonical_solution": "    return x / 2\n",
    "entry_point": "halve",
}


@pytest.mark.parametrize("completion, passes", [
    ("    return x * 0.5\n", True),
    ("    return x / 2 + 1e-9\n", True),   # within the 1e-6 float tolerance
    ("    return x / 2 + 1e-3\n", False),
    ("    return x // 2\n", False),         # 3 // 2 = 1, not 1.5
])
def test_humaneval_plus_differential_check_in_the_sandbox(completion, passes):
    from forgetjax.eval.benchmarks.code import plus_check

    test = plus_check(PLUS_TASK["prompt"], PLUS_TASK["canonical_solution"], "halve", [[4], [3], [-7.5]], 0)
    task = Item(id="t", category="humaneval_plus", data={**PLUS_TASK, "test": test, "n_inputs": 3})
    result = get_benchmark("humaneval_plus").score(task, completion, ScoringContext(code_workers=1))
    assert result["correct"] == int(passes)


# --------------------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_from_samples_matches_the_binomial_formula():
    from forgetjax.eval.benchmarks.code import pass_metrics

    passed = [False] * 20
    passed[3] = passed[11] = True
    metrics = pass_metrics(passed, (1, 10))
    assert metrics["extra"]["pass@1"] == pytest.approx(2 / 20)
    # 1 - C(18, 10) / C(20, 10) = 1 - 43758 / 184756
    assert metrics["extra"]["pass@10"] == pytest.approx(1 - 43758 / 184756)
    for c in range(21):
        flags = [True] * c + [False] * (20 - c)
        expected = 1 - math.comb(20 - c, 10) / math.comb(20, 10)
        assert pass_metrics(flags, (10,))["extra"]["pass@10"] == pytest.approx(expected, abs=1e-12)
    assert (metrics["correct"], metrics["score"]) == (0, 0.1)


def test_core_battery_samples_code_for_pass_at_1_and_10():
    from forgetjax.eval.battery import resolve_battery

    code = [e for e in resolve_battery("core").entries if get_benchmark(e.name).category == "code"]
    assert {e.name for e in code} == {"humaneval", "humaneval_plus", "mbpp"}
    assert all((e.n, e.temperature, e.pass_k) == (20, 0.8, (1, 10)) for e in code)
