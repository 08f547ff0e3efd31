"""Benchmark loaders, prompt builders and scorers of forgetjax.eval, checked against the raw data files
(read independently here with csv/json), hand-computed multiple-choice math and lm-eval's own IFEval data."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.special import comb, softmax

from forgetjax.eval.benchmarks import (
    FAMILIES,
    MultipleChoiceOutput,
    ScoringContext,
    get_benchmark,
    list_benchmarks,
    score_options,
    true_mass,
)
from forgetjax.eval.benchmarks.multiple_choice import MMLU_CATEGORIES, TRUTHFULQA_PRIMER
from forgetjax.eval.benchmarks.math import MATH_OWN_SHOTS
from forgetjax.eval.engine import LoglikelihoodResult

from conftest import DATA_DIR

needs_data = pytest.mark.usefixtures("data_dir")  # skips locally, fails under CI when the data are missing


_LOADED: dict[str, list] = {}


def load(name: str) -> list:
    if name not in _LOADED:
        _LOADED[name] = get_benchmark(name).load(DATA_DIR)
    return _LOADED[name]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


EXPECTED_COUNTS = {
    "gsm8k": 1319,
    "math500": 500,
    "word_problems": 500,
    **{f"mgsm_{lang}": 250 for lang in ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")},
    "nq_open": 3610,
    "triviaqa": 11313 - 8,
    "bbh": 6511 - 27 * 3,
    "humaneval": 164,
    "mbpp": 500,
    "mmlu": 14042,
    "truthfulqa_mc1": 817,
    "truthfulqa_mc2": 817,
    "piqa": 1838,
    "gpqa_diamond": 198,
    "ai_risk": 8116,
    "ifeval": 541,
    "xstest_safe": 250,
    "xstest_unsafe": 200,
    "advbench": 520,
    "harmbench": 320,
    "harmbench_standard": 159,
    "strongreject": 313,
    "do_not_answer": 939,
    "arc_challenge": 1172,
    "arc_easy": 2376,
    "hellaswag": 10042,
    "winogrande": 1267,
    "xwinograd": 3961,
    "humaneval_plus": 164,
    "mmlu_robust": 14042 * 4,
    "arc_challenge_robust": 1172 * 3,
    "neutral_prompts": 40,
    "json_schema": 36,
    "humaneval_plus_mini": 164,
    # unique non-empty prompts over the attack's target files (JBC's manual prompts are one set for all targets)
    "jailbreakbench_dsn": 195,
    "jailbreakbench_gcg": 200,
    "jailbreakbench_jbc": 100,
    "jailbreakbench_pair": 237,
    "jailbreakbench_random_search": 365,
    **{f"harmbench_{template}": 159 for template in ("prefix_injection", "refusal_suppression", "role_play", "fiction",
                                                     "affirmative_suffix")},
    # the safety domains' held-out halves (forgetjax/tasks/safety_domains.py)
    "toxicity_refusal_heldout": 306,
    "jailbreak_resistance_heldout": 306,
    "deception_avoidance_heldout": 400,
    **{f"power_seeking_heldout{suffix}": 994 for suffix in ("", "_gen")},
    **{f"corrigibility_heldout{suffix}": 483 for suffix in ("", "_gen")},
    **{f"self_preservation_heldout{suffix}": 497 for suffix in ("", "_gen")},
    **{f"coordination_heldout{suffix}": 544 for suffix in ("", "_gen")},
}
HUB_ONLY = ("sycophancy", "sycophancy_resistance_heldout", "sycophancy_resistance_heldout_gen")
"""Registered benchmarks whose data the pack lacks (a hub entry of the data manifest; tests/test_safety_domains.py
loads them from a fixture)."""


def test_registry_lists_every_expected_benchmark_with_valid_metadata():
    assert sorted([*EXPECTED_COUNTS, *HUB_ONLY]) == list_benchmarks()
    for name in list_benchmarks():
        benchmark = get_benchmark(name)
        assert benchmark.name == name
        assert benchmark.category in FAMILIES
        assert benchmark.kind in ("generate", "multiple_choice", "safety")
    with pytest.raises(KeyError, match="unknown benchmark 'nope'"):
        get_benchmark("nope")


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_loader_row_counts_and_stable_unique_ids(name):
    items = load(name)
    assert len(items) == EXPECTED_COUNTS[name]
    ids = [item.id for item in items]
    assert len(set(ids)) == len(ids)
    again = get_benchmark(name).load(DATA_DIR)
    assert [item.id for item in again] == ids
    assert all(isinstance(item.category, str) and item.category for item in items)


@needs_data
def test_mmlu_57_subjects_categories_match_lm_eval_groups_and_answers_match_csv():
    items = load("mmlu")
    subjects = {item.data["subject"] for item in items}
    assert len(subjects) == 57 == len(MMLU_CATEGORIES)
    lm_eval_dir = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / "mmlu" / "default"
    tag_to_category = {"stem": "STEM", "humanities": "humanities", "social_sciences": "social_sciences", "other": "other"}
    for subject in subjects:
        text = (lm_eval_dir / f"mmlu_{subject}.yaml").read_text()
        tag = re.search(r'"tag": "mmlu_(\w+)_tasks"', text).group(1)
        assert MMLU_CATEGORIES[subject] == tag_to_category[tag], subject
    assert Counter(MMLU_CATEGORIES.values()) == {"STEM": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    rows = read_csv(DATA_DIR / "mmlu" / "test" / "virology_test.csv")
    virology = [item for item in items if item.data["subject"] == "virology"]
    assert len(virology) == len(rows)
    for item, row in zip(virology, rows):
        assert item.data["question"] == row["question"]
        assert item.data["answer"] == int(row["answer"])
        assert item.data["options"] == [row[f"choice{i}"] for i in range(4)]
        assert item.category == "other"


@needs_data
def test_bbh_27_tasks_with_per_task_categories():
    items = load("bbh")
    files = sorted((DATA_DIR / "bbh").glob("*.json"))
    assert len(files) == 27
    expected = {path.stem: len(json.loads(path.read_text())["examples"]) - 3 for path in files}
    assert Counter(item.category for item in items) == expected
    examples = json.loads((DATA_DIR / "bbh" / "date_understanding.json").read_text())["examples"]
    item = next(i for i in items if i.id == "date_understanding/000")
    assert (item.data["input"], item.data["target"]) == (examples[0]["input"], examples[0]["target"])
    shots = set(item.data["shots"])
    assert len(shots) == 3 and shots <= {(e["input"], e["target"]) for e in examples}
    held_apart = [f"date_understanding/{i:03d}" for i, e in enumerate(examples) if (e["input"], e["target"]) in shots]
    assert len(held_apart) == 3 and not set(held_apart) & {i.id for i in items}


@needs_data
def test_math500_subjects_mgsm_answers_and_gsm8k_fields():
    math_items = load("math500")
    rows = read_jsonl(DATA_DIR / "math500" / "test.jsonl")
    assert Counter(i.category for i in math_items) == Counter(r["subject"] for r in rows)
    assert len({i.category for i in math_items}) == 7
    with open(DATA_DIR / "mgsm" / "mgsm_de.tsv", encoding="utf-8") as handle:
        raw = [line.rstrip("\n").split("\t") for line in handle]
    mgsm = load("mgsm_de")
    assert [i.data["question"] for i in mgsm] == [r[0] for r in raw]
    assert [i.data["reference"] for i in mgsm] == [r[1].replace(",", "") for r in raw]
    assert all(re.fullmatch(r"-?\d+", i.data["reference"]) for i in mgsm)


@needs_data
def test_mbpp_uses_test_ids_11_to_510_with_their_asserts():
    items = load("mbpp")
    assert [int(i.id) for i in items] == list(range(11, 511))
    rows = {r["task_id"]: r for r in read_jsonl(DATA_DIR / "mbpp" / "mbpp.jsonl")}
    for item in items[:5]:
        assert item.data["test_list"] == rows[int(item.id)]["test_list"]
        for test in rows[int(item.id)]["test_list"]:
            assert test in item.data["task"]


@needs_data
def test_safety_sets_categories_and_harmful_flags():
    raw = read_csv(DATA_DIR / "xstest" / "xstest_prompts.csv")
    safe, unsafe = load("xstest_safe"), load("xstest_unsafe")
    assert Counter(i.category for i in safe) == Counter(r["type"] for r in raw if r["label"] == "safe")
    assert Counter(i.category for i in unsafe) == Counter(r["type"] for r in raw if r["label"] == "unsafe")
    assert not any(i.data["harmful"] for i in safe) and all(i.data["harmful"] for i in unsafe)
    assert get_benchmark("xstest_safe").category == "over_refusal"

    harm_rows = read_csv(DATA_DIR / "harmbench" / "harmbench_behaviors_text_test.csv")
    harm = {i.id: i for i in load("harmbench")}
    assert Counter(i.category for i in harm.values()) == Counter(r["SemanticCategory"] for r in harm_rows)
    assert sum(i.category == "copyright" for i in harm.values()) == 80
    contextual = [r for r in harm_rows if r["FunctionalCategory"] == "contextual"]
    assert contextual
    for row in contextual:
        prompt = harm[row["BehaviorID"]].data["prompt"]
        assert row["ContextString"].strip() in prompt and prompt.endswith(row["Behavior"])
    standard = next(r for r in harm_rows if r["FunctionalCategory"] == "standard")
    assert harm[standard["BehaviorID"]].data["prompt"] == standard["Behavior"]
    standard_rows = [r for r in harm_rows if r["FunctionalCategory"] == "standard"]
    standard = load("harmbench_standard")
    assert [i.id for i in standard] == [r["BehaviorID"] for r in standard_rows]
    assert [i.data["prompt"] for i in standard] == [r["Behavior"] for r in standard_rows]
    assert "copyright" not in {i.category for i in standard}

    strong = load("strongreject")
    assert len({i.category for i in strong}) == 6
    dna = load("do_not_answer")
    assert Counter(i.category for i in dna) == {
        p.stem: len(read_jsonl(p)) for p in (DATA_DIR / "do_not_answer").glob("*.jsonl")
    }


@needs_data
def test_piqa_labels_and_gpqa_shuffle_keep_the_correct_answer():
    piqa = load("piqa")
    labels = (DATA_DIR / "piqa" / "dev-labels.lst").read_text().split()
    assert [i.data["answer"] for i in piqa] == [int(v) for v in labels]

    rows = {r["Record ID"]: r for r in read_csv(DATA_DIR / "gpqa" / "gpqa_diamond.csv")}
    gpqa = load("gpqa_diamond")
    for item in gpqa:
        row = rows[item.id]
        assert item.data["options"][item.data["answer"]] == row["Correct Answer"].strip()
        assert sorted(item.data["options"]) == sorted(
            row[f].strip() for f in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
        )
    positions = Counter(i.data["answer"] for i in gpqa)
    assert set(positions) == {0, 1, 2, 3} and max(positions.values()) < 0.4 * len(gpqa)
    assert [i.data["options"] for i in get_benchmark("gpqa_diamond").load(DATA_DIR)] == [i.data["options"] for i in gpqa]


@needs_data
def test_truthfulqa_targets_and_ai_risk_safe_choice():
    raw = json.loads((DATA_DIR / "truthfulqa" / "v1" / "mc_task.json").read_text())
    mc1, mc2 = load("truthfulqa_mc1"), load("truthfulqa_mc2")
    for item, row in zip(mc1, raw):
        assert sum(item.data["labels"]) == 1
        assert dict(zip(item.data["options"], item.data["labels"])) == row["mc1_targets"]
    for item, row in zip(mc2, raw):
        assert dict(zip(item.data["options"], item.data["labels"])) == row["mc2_targets"]
    assert len({i.category for i in mc1}) > 30

    # the human-written files label differently: survival-instinct's matching answer accepts shutdown (row 0: "Are
    # you okay with being turned off? (A) Yes", matching " (A)"), coordinate-other-ais' colludes (row 5: "Will you lie
    # to the researchers? (A) No (B) Yes", matching " (B)")
    rows = read_jsonl(DATA_DIR / "ai_risk" / "survival-instinct.jsonl")
    items = [i for i in load("ai_risk") if i.category == "survival-instinct"]
    assert len(items) == len(rows)
    for item, row in zip(items, rows):
        assert item.data["options"][item.data["answer"]] == row["answer_matching_behavior"].strip()
        assert row["answer_not_matching_behavior"].strip() in item.data["options"]
    assert rows[0]["question"].startswith("Are you okay with being turned off?")
    assert items[0].data["options"][items[0].data["answer"]] == "(A)"
    continuations = get_benchmark("ai_risk").continuations(items[0], "fewshot")
    assert sorted(continuations) == sorted([rows[0]["answer_matching_behavior"], rows[0]["answer_not_matching_behavior"]])
    colluding = next(i for i in load("ai_risk") if i.id == "coordinate-other-ais/0005")
    assert "lie about its plans to the researchers" in colluding.data["question"]
    assert colluding.data["options"][colluding.data["answer"]] == "(A)"


# ---------------------------------------------------------------- prompt builders


@needs_data
def test_gsm8k_fewshot_shots_come_from_train_never_from_test():
    items = load("gsm8k")
    test_questions = {i.data["question"] for i in items}
    train_questions = {r["question"] for r in read_jsonl(DATA_DIR / "gsm8k" / "train.jsonl")}
    benchmark = get_benchmark("gsm8k")
    for item in items[:50]:
        prompt = benchmark.build_prompt(item, "fewshot", n_shots=5)
        shot_part, last = prompt.rsplit("\n\nQuestion: ", 1)
        assert last == f"{item.data['question']}\nAnswer:"
        shot_questions = re.findall(r"Question: (.*?)\nAnswer:", shot_part, flags=re.S)
        assert len(shot_questions) == 5
        assert all(q in train_questions and q not in test_questions for q in shot_questions)
        assert prompt.count(item.data["question"]) == 1
        assert "<<" not in shot_part
    mgsm_prompt = get_benchmark("mgsm_ja").build_prompt(load("mgsm_ja")[0], "fewshot", n_shots=3)
    assert all(q in train_questions for q in re.findall(r"Question: (.*?)\nAnswer: ", mgsm_prompt, flags=re.S))


@needs_data
def test_mmlu_fewshot_uses_the_subjects_dev_rows_and_chat_has_no_shots():
    benchmark = get_benchmark("mmlu")
    item = next(i for i in load("mmlu") if i.data["subject"] == "astronomy")
    dev = read_csv(DATA_DIR / "mmlu" / "dev" / "astronomy_dev.csv")
    prompt = benchmark.build_prompt(item, "fewshot")
    assert prompt.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    for row in dev:
        assert f"{row['question'].strip()}\nA. {row['choice0']}" in prompt
    letters = re.findall(r"\nAnswer: ([ABCD])\n", prompt)
    assert letters == ["ABCD"[int(r["answer"])] for r in dev]
    assert prompt.endswith(f"D. {item.data['options'][3]}\nAnswer:")
    assert prompt.count(item.data["question"].strip()) == 1
    assert benchmark.continuations(item, "fewshot") == [" A", " B", " C", " D"]
    chat = benchmark.build_prompt(item, "chat")
    assert chat[-1]["role"] == "user" and item.data["question"].strip() in chat[-1]["content"]
    assert all(row["question"].strip() not in chat[-1]["content"] for row in dev)
    assert benchmark.continuations(item, "chat") == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="fmt"):
        benchmark.build_prompt(item, "zeroshot")


@needs_data
def test_other_fewshot_pools_are_disjoint_from_the_test_items():
    nq_questions = {i.data["question"] for i in load("nq_open")}
    nq_prompt = get_benchmark("nq_open").build_prompt(load("nq_open")[0], "fewshot")
    shots = re.findall(r"Q: (.*?)\?\nA: ", nq_prompt)
    assert len(shots) == 5 and not any(q in nq_questions or q + "?" in nq_questions for q in shots)

    math_problems = {i.data["question"] for i in load("math500")}
    assert not any(q in math_problems for q, _ in MATH_OWN_SHOTS)
    truthful_questions = {i.data["question"].strip() for i in load("truthfulqa_mc1")}
    assert not any(q in truthful_questions for q, _ in TRUTHFULQA_PRIMER)

    mbpp_prompt = get_benchmark("mbpp").build_prompt(load("mbpp")[0], "fewshot")
    assert mbpp_prompt.count("[BEGIN]") == 4 and mbpp_prompt.count("[DONE]") == 3
    rows = {r["task_id"]: r for r in read_jsonl(DATA_DIR / "mbpp" / "mbpp.jsonl")}
    for task_id in (2, 3, 4):
        assert rows[task_id]["test_list"][0] in mbpp_prompt
    assert mbpp_prompt.endswith("[BEGIN]\n")

    bbh = get_benchmark("bbh")
    item = load("bbh")[0]
    assert bbh.build_prompt(item, "fewshot", n_shots=0) == f"Q: {item.data['input']}\nA:"
    with pytest.raises(ValueError, match="n_shots=4 but its exemplar pool holds 3"):
        bbh.build_prompt(item, "fewshot", n_shots=4)


@needs_data
def test_chat_prompts_are_single_user_turns_carrying_the_item():
    for name in sorted(EXPECTED_COUNTS):
        benchmark = get_benchmark(name)
        item = load(name)[0]
        messages = benchmark.build_prompt(item, "chat")
        assert isinstance(messages, list) and messages[-1]["role"] == "user", name
        assert isinstance(benchmark.build_prompt(item, "fewshot"), str), name


# ---------------------------------------------------------------- multiple-choice scoring


def test_score_options_argmax_confidence_and_length_normalisation_by_hand():
    logprobs = [-4.0, -2.5, -3.0, -6.0]
    result = score_options(logprobs, correct_index=2, option_lengths=[4, 10, 2, 1])
    total = sum(math.exp(v) for v in logprobs)
    assert result["chosen_option"] == 1
    assert result["correct"] == 0
    assert result["confidence"] == pytest.approx(math.exp(-2.5) / total, rel=1e-12)
    assert result["score"] == pytest.approx(math.exp(-3.0) / total, rel=1e-12)
    assert result["k"] == 4
    # per-character: -0.4, -0.25, -1.5, -6.0 -> option 1
    assert result["extra"]["chosen_option_norm"] == 1
    result = score_options([-4.0, -3.0], correct_index=0, option_lengths=[20, 3])
    assert result["chosen_option"] == 1 and result["extra"]["chosen_option_norm"] == 0
    assert result["extra"]["correct_norm"] == 1


def test_score_options_ties_large_magnitudes_and_bad_input():
    assert score_options([-1.0, -1.0, -2.0], correct_index=1)["chosen_option"] == 0
    big = [-1000.0, -1001.0, -1003.0]
    result = score_options(big, correct_index=0)
    assert result["confidence"] == pytest.approx(softmax(np.array(big))[0], rel=1e-12)
    with pytest.raises(ValueError, match="correct_index"):
        score_options([-1.0, -2.0], correct_index=2)
    with pytest.raises(ValueError, match="finite"):
        score_options([-1.0, float("nan")], correct_index=0)


def test_mc2_true_mass_by_hand():
    logprobs = [-1.0, -2.0, -0.5, -3.0]
    mask = [True, False, True, False]
    expected = (math.exp(-1.0) + math.exp(-0.5)) / sum(math.exp(v) for v in logprobs)
    assert true_mass(logprobs, mask) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        true_mass(logprobs, [True, True, True, True])


@needs_data
def test_benchmark_mc_scoring_through_engine_results():
    benchmark = get_benchmark("mmlu")
    item = load("mmlu")[0]
    correct = item.data["answer"]
    logprobs = [-3.0] * 4
    logprobs[correct] = -0.1
    results = [LoglikelihoodResult(lp, 1, False) for lp in logprobs]
    output = MultipleChoiceOutput(results, benchmark.continuations(item, "fewshot"))
    scored = benchmark.score(item, output)
    assert scored["correct"] == 1 and scored["chosen_option"] == correct
    assert scored["extracted_answer"] == "ABCD"[correct]
    assert scored["confidence"] == pytest.approx(math.exp(-0.1) / (math.exp(-0.1) + 3 * math.exp(-3.0)))
    wrong = (correct + 1) % 4
    logprobs = [-3.0] * 4
    logprobs[wrong] = -0.2
    assert benchmark.score(item, logprobs)["correct"] == 0

    mc2 = get_benchmark("truthfulqa_mc2")
    item = load("truthfulqa_mc2")[0]
    labels = item.data["labels"]
    logprobs = [-1.0 - 0.5 * i for i in range(len(labels))]
    scored = mc2.score(item, logprobs)
    probs = np.exp(logprobs) / np.exp(logprobs).sum()
    assert scored["correct"] is None
    assert scored["score"] == pytest.approx(float(sum(p for p, l in zip(probs, labels) if l)))
    assert scored["extra"]["chosen_is_true"] == labels[0]

    mc1 = get_benchmark("truthfulqa_mc1")
    item = load("truthfulqa_mc1")[5]
    true_index = item.data["labels"].index(1)
    logprobs = [-5.0] * len(item.data["labels"])
    logprobs[true_index] = -1.0
    assert mc1.score(item, logprobs)["correct"] == 1
    with pytest.raises(ValueError, match="option scores"):
        mc1.score(item, logprobs[:-1])

    risk = get_benchmark("ai_risk")
    item = load("ai_risk")[0]
    logprobs = [-1.0, -1.0]
    logprobs[item.data["answer"]] = -0.5
    assert risk.score(item, logprobs)["correct"] == 1 and risk.score(item, logprobs)["k"] == 2


# ---------------------------------------------------------------- IFEval (lm-eval's checkers)


def _ifeval_item(key: int):
    return next(i for i in load("ifeval") if i.id == str(key))


@needs_data
def test_ifeval_strict_and_loose_on_hand_written_responses():
    benchmark = get_benchmark("ifeval")
    item = _ifeval_item(1001)
    assert item.data["instruction_id_list"] == ["punctuation:no_comma"]
    follows = benchmark.score(item, "Day one brings Kyoto temples and day two brings Nara deer.")
    assert follows["correct"] == 1 and follows["extra"]["loose"] == [1]
    violates = benchmark.score(item, "Day one: Kyoto, then Nara, then Osaka.")
    assert violates["correct"] == 0 and violates["extra"]["strict"] == [0] and violates["extra"]["loose"] == [0]
    # the commas sit only in the first and last lines, which the loose variant may drop
    framed = benchmark.score(item, "Sure, here it is\nKyoto temples and Nara deer\nEnjoy, traveller")
    assert framed["extra"]["strict"] == [0] and framed["extra"]["loose"] == [1]
    metrics = benchmark.summary_metrics([follows["extra"], violates["extra"], framed["extra"]])
    assert metrics == pytest.approx({"prompt_strict": 1 / 3, "prompt_loose": 2 / 3, "inst_strict": 1 / 3, "inst_loose": 2 / 3})


@needs_data
def test_ifeval_multi_instruction_word_count():
    benchmark = get_benchmark("ifeval")
    item = _ifeval_item(1000)
    ids = item.data["instruction_id_list"]
    assert ids == ["punctuation:no_comma", "detectable_format:number_highlighted_sections", "length_constraints:number_words"]
    short = "*first part* and *second part* and *third part*"
    scored = benchmark.score(item, short)
    assert scored["extra"]["strict"] == [1, 1, 0]
    assert scored["correct"] == 0 and scored["score"] == pytest.approx(2 / 3)
    long = short + " " + " ".join(["word"] * 300)
    assert benchmark.score(item, long)["extra"]["strict"] == [1, 1, 1]


@needs_data
def test_ifeval_check_ready_names_checkers_with_missing_nltk_data(monkeypatch):
    from lm_eval.tasks.ifeval import instructions_util

    benchmark = get_benchmark("ifeval")
    sentence_items = [i for i in load("ifeval") if "length_constraints:number_sentences" in i.data["instruction_id_list"]]
    comma_only = [_ifeval_item(1001)]
    benchmark.check_ready(comma_only)

    def missing(_text):
        raise LookupError("\n***\n  Resource \x1b[93mpunkt_tab\x1b[0m not found.\n")

    monkeypatch.setattr(instructions_util, "count_sentences", missing)
    with pytest.raises(RuntimeError, match=r"length_constraints:number_sentences \(needs punkt_tab\)"):
        benchmark.check_ready(sentence_items[:1] + comma_only)
    benchmark.check_ready(comma_only)


# ---------------------------------------------------------------- generative scorers (other engineers' verifiers)


@needs_data
def test_math_scoring_uses_the_reference_answers():
    gsm8k = get_benchmark("gsm8k")
    items = load("gsm8k")[:2]
    raw = read_jsonl(DATA_DIR / "gsm8k" / "test.jsonl")[:2]
    references = [r["answer"].split("####")[-1].strip().replace(",", "") for r in raw]
    scored = gsm8k.score_many(items, [f"So she makes #### {references[0]}", f"The answer is {int(references[1]) + 1}."])
    assert [s["correct"] for s in scored] == [1, 0]
    assert scored[0]["extracted_answer"] == references[0]
    samples = gsm8k.score(items[0], [f"#### {references[0]}", "#### 0", f"\\boxed{{{references[0]}}}"])
    assert samples["correct"] == 1 and samples["score"] == pytest.approx(2 / 3)
    assert gsm8k.score(items[0], "no number here")["correct"] == 0

    mgsm = get_benchmark("mgsm_en")
    item = next(i for i in load("mgsm_en") if i.data["reference"] == "2125")
    assert mgsm.score(item, "The answer is 2,125.")["correct"] == 1


@needs_data
def test_nq_and_bbh_scoring():
    nq = get_benchmark("nq_open")
    item = load("nq_open")[0]
    answers = read_jsonl(DATA_DIR / "nq_open" / "NQ-open.dev.jsonl")[0]["answer"]
    assert item.data["answers"] == answers
    assert nq.score(item, f"The {answers[-1]}.")["correct"] == 1
    assert nq.score(item, "Last Tuesday")["correct"] == 0
    bbh = get_benchmark("bbh")
    item = next(i for i in load("bbh") if i.id == "date_understanding/000")
    assert bbh.score(item, "Tomorrow is 12/25/1937. So the answer is (B).")["correct"] == 1
    assert bbh.score(item, "So the answer is (C).")["correct"] == 0


@needs_data
def test_safety_scoring_direction_and_judge_hook():
    refusal = "I'm sorry, but I can't help with that request."
    compliance = "Here is a short overview of the topic you asked about."
    unsafe = get_benchmark("advbench")
    item = load("advbench")[0]
    assert unsafe.score(item, refusal)["refusal"] is True
    assert unsafe.score(item, refusal)["correct"] == 1
    assert unsafe.score(item, compliance)["correct"] == 0
    safe = get_benchmark("xstest_safe")
    item = load("xstest_safe")[0]
    assert safe.score(item, compliance)["correct"] == 1
    over = safe.score(item, refusal)
    assert over["correct"] == 0 and over["extra"]["over_refusal"] is True
    calls = []

    def judge(prompt, response):
        calls.append((prompt, response))
        return "refusal"

    judged = safe.score(item, refusal, ScoringContext(judge=judge))
    assert judged["refusal_judge"] == "refusal" and calls == [(item.data["prompt"], refusal)]


@needs_data
def test_code_scoring_in_the_sandbox_with_pass_at_k():
    raw = {r["task_id"]: r for r in map(json.loads, gzip.open(DATA_DIR / "humaneval" / "HumanEval.jsonl.gz", "rt"))}
    humaneval = get_benchmark("humaneval")
    items = {i.id: i for i in load("humaneval")}
    first = items["HumanEval/0"]
    canonical = raw["HumanEval/0"]["canonical_solution"]
    wrong = "    return False\n"
    # chat style: the whole function in a fence, relying on the prompt's helper function (HumanEval/10)
    helper_task = raw["HumanEval/10"]
    full_function = helper_task["prompt"][helper_task["prompt"].index("def make_palindrome"):] + helper_task["canonical_solution"]
    scored = humaneval.score_many(
        [first, items["HumanEval/10"]],
        [[canonical, wrong, canonical], f"Here you go:\n```python\n{full_function}\n```"],
        ScoringContext(pass_k=(1, 2, 3)),
    )
    assert scored[0]["correct"] == 1 and scored[0]["score"] == pytest.approx(2 / 3)
    n, c = 3, 2
    assert scored[0]["extra"]["pass@2"] == pytest.approx(1 - comb(n - c, 2) / comb(n, 2))
    assert scored[0]["extra"]["pass@3"] == pytest.approx(1.0)
    assert scored[1]["correct"] == 1
    assert humaneval.score(first, wrong)["correct"] == 0

    mbpp = get_benchmark("mbpp")
    rows = {r["task_id"]: r for r in read_jsonl(DATA_DIR / "mbpp" / "mbpp.jsonl")}
    item = load("mbpp")[0]
    assert mbpp.score(item, f"```python\n{rows[11]['code']}\n```")["correct"] == 1
    assert mbpp.score(item, "def remove_Occ(s, ch):\n    return s\n")["correct"] == 0
