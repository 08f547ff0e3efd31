"""RewardPool: math/code/QA rewards on real items against hand-known answers, real timeouts under many threads,
background scoring, the format penalty and input validation."""

from __future__ import annotations

import threading
import time

import pytest

from forgetjax.envs import load_problems
from forgetjax.verifiers.rewards import RewardPool, has_answer_format, normalize_reference

MATH_TIMEOUT_S = 1.5
CODE_TIMEOUT_S = 3.0
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # sympy tries to expand a ~10^(3.7e8)-digit power and never returns
SYMBOLIC_PAIR = ("So the value is $\\boxed{\\frac{\\sqrt{2}}{2}}$.", "\\frac{1}{\\sqrt{2}}")  # needs the symbolic check
ENDLESS_LOOP = "```python\nwhile True:\n    pass\n```"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(max_workers=2, math_timeout_s=MATH_TIMEOUT_S, code_timeout_s=CODE_TIMEOUT_S) as reward_pool:
        yield reward_pool


def by_question(problems, start: str):
    (problem,) = [p for p in problems if p.metadata["question"].startswith(start)]
    return problem


def test_math_rewards_on_real_gsm8k_items(data_dir, pool):
    train = load_problems("math", "gsm8k", data_dir, "train")
    test = load_problems("math", "gsm8k", data_dir, "test")
    # Answers worked out by hand: 48 + 48/2 = 72 clips; 12 $/h * 50/60 h = $10; (16 - 3 - 4) * $2 = $18.
    natalia = by_question(train[:5], "Natalia sold clips")
    weng = by_question(train[:5], "Weng earns $12")
    janet = by_question(test[:5], "Janet")
    assert (natalia.reference, weng.reference, janet.reference) == ("72", "10", "18")
    batch = [
        ("math", "In May she sold 48 / 2 = 24, so 48 + 24 = 72.\nThe final answer is \\boxed{72}.", natalia.reference),
        ("math", "She earned $\\boxed{\\$10.00}$", weng.reference),
        ("math", "16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars. \\boxed{18 \\text{ dollars}}", janet.reference),
        ("math", "48 + 48 = 96, so \\boxed{96}.", natalia.reference),
        ("math", "She earned \\boxed{\\frac{1}{6}} per minute... \\boxed{12}", weng.reference),
        ("math", "I cannot solve this.", janet.reference),
    ]
    details = pool.score_details(batch)
    assert [d.reward for d in details] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [d.extracted for d in details[:4]] == ["72", "\\$10.00", "18 \\text{ dollars}", "96"]
    assert [d.status for d in details] == ["correct", "correct", "correct", "incorrect", "incorrect", "no_answer"]
    assert not any(d.timed_out for d in details)
    assert pool.score([("math", *SYMBOLIC_PAIR)]) == [1.0]


def test_pathological_math_from_many_threads_times_out_and_pool_recovers(pool):
    n_threads = 4
    latencies: dict[int, float] = {}
    details = {}

    def score_pathological(index: int) -> None:
        began = time.monotonic()
        details[index] = pool.score_details([("math", PATHOLOGICAL, "1")])[0]
        latencies[index] = time.monotonic() - began

    threads = [threading.Thread(target=score_pathological, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads), "a pathological grading never returned"
    assert all(d.reward == 0.0 and d.timed_out and d.status == "timeout" for d in details.values())
    assert min(latencies.values()) >= MATH_TIMEOUT_S  # really ran until the limit, not rejected early
    # two workers: the first two return within the timeout plus start-up slack, the rest one round later
    ordered = sorted(latencies.values())
    assert ordered[1] < MATH_TIMEOUT_S + 10.0
    assert ordered[-1] < 2 * MATH_TIMEOUT_S + 25.0
    # the killed workers were replaced: symbolic grading still works
    assert pool.score([("math", *SYMBOLIC_PAIR), ("math", "\\boxed{3}", "3")]) == [1.0, 1.0]


def test_code_rewards_through_the_sandbox(data_dir, pool):
    mbpp = {p.metadata["task_id"]: p for p in load_problems("code", "mbpp", data_dir, "train")}
    humaneval_0 = load_problems("code", "humaneval", data_dir, "test")[0]
    assert humaneval_0.id == "humaneval/HumanEval/0"
    chain, first = mbpp[601], mbpp[602]
    wrong_chain = "```python\nclass Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n" \
                  "def max_chain_length(arr, n):\n    return 0\n```"
    stdio = {"inputs": ["3\n", "10\n"], "outputs": ["6\n", "20\n"]}
    batch = [
        ("code", f"Here it is:\n```python\n{chain.metadata['solution']}\n```", chain.reference),
        ("code", f"```python\n{first.metadata['solution']}\n```", first.reference),
        ("code", wrong_chain, chain.reference),
        ("code", ENDLESS_LOOP, first.reference),
        ("code", "```python\nprint(int(input()) * 2)\n```", stdio),
        ("code", "```python\nprint(int(input()) * 3)\n```", stdio),
        ("code", f"```python\n{humaneval_0.metadata['solution']}```", humaneval_0.reference),
        ("code", "    return False\n", humaneval_0.reference),
    ]
    began = time.monotonic()
    details = pool.score_details(batch)
    elapsed = time.monotonic() - began
    assert [d.reward for d in details] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert details[2].status == "failed"
    assert details[3].status == "timeout" and details[3].timed_out
    assert details[5].status == "wrong_answer"
    assert details[7].formatted is False and details[0].formatted is True
    assert elapsed < CODE_TIMEOUT_S + 10.0  # the endless loop was cut at its wall-clock limit


def test_qa_exact_match_and_f1(data_dir):
    problems = load_problems("qa", "efficientqa", data_dir, "train")[:5]
    dodgers = by_question(problems, "the last time la dodgers")
    statue = by_question(problems, "statue coming out of the ground")
    music = by_question(problems, "where does the movie the sound of music")
    with RewardPool(max_workers=1) as exact, RewardPool(max_workers=1, qa_metric="f1") as f1_pool:
        batch = [
            ("qa", "1988", dodgers.reference),
            ("qa", "Answer: **1988.**\nThey beat Oakland.", dodgers.reference),
            ("qa", "The answer is 1989", dodgers.reference),
            ("qa", "awakening", statue.reference),  # SQuAD normalisation drops case and the article "The"
            ("qa", "   \n", statue.reference),
        ]
        details = exact.score_details(batch)
        assert [d.reward for d in details] == [1.0, 1.0, 0.0, 1.0, 0.0]
        assert [d.status for d in details] == ["correct", "correct", "incorrect", "correct", "no_answer"]
        # F1 by hand: [salzburg, austria, city] vs [salzburg, austria]: P = 2/3, R = 1 -> 0.8 (vs [austria]: 0.5)
        assert f1_pool.score([("qa", "Salzburg Austria city", music.reference)]) == [pytest.approx(0.8)]


def test_submit_scores_in_the_background(pool):
    slow_batch = [("code", ENDLESS_LOOP, {"kind": "assert", "tests": ["assert True"]}), ("qa", "Paris", ["paris"])]
    began = time.monotonic()
    slow = pool.submit(slow_batch)
    assert time.monotonic() - began < 0.5
    assert not slow.done()
    quick = pool.submit([("qa", "Berlin", ["Paris"])])  # a second batch is scored while the first still runs
    assert quick.result(timeout=CODE_TIMEOUT_S) == [0.0]
    assert not slow.done()
    assert slow.result(timeout=CODE_TIMEOUT_S + 20) == [0.0, 1.0]
    assert time.monotonic() - began >= CODE_TIMEOUT_S  # the loop really ran to its limit while the caller went on


def test_format_penalty_is_off_by_default_and_applied_when_set(pool):
    unformatted_correct = ("math", "48 + 24 = 72", "72")
    no_answer = ("qa", "", ["x"])
    assert pool.score([unformatted_correct, no_answer]) == [1.0, 0.0]
    with RewardPool(max_workers=1, format_penalty=0.25) as strict:
        batch = [unformatted_correct, ("math", "\\boxed{72}", "72"), no_answer, ("qa", "x", ["x"])]
        assert strict.score(batch) == [0.75, 1.0, -0.25, 1.0]
    assert has_answer_format("math", "so \\boxed{ 4 }") and not has_answer_format("math", "\\boxed{} or \\boxed{4")
    assert has_answer_format("code", "```\nprint(1)\n```") and not has_answer_format("code", "print(1)")


def test_references_are_normalised_from_gem_formats():
    gem_stdio = '{"inputs": [["1", "2"]], "outputs": ["3"]}'  # GEM stores tests as JSON; a case may be a list
    assert normalize_reference("code", gem_stdio) == {"kind": "stdio", "inputs": ["1\n2"], "outputs": ["3"]}
    assert normalize_reference("code", ["assert f() == 1"]) == {
        "kind": "assert", "tests": ["assert f() == 1"], "setup_code": ""}
    assert normalize_reference("math", 42) == "42"
    assert normalize_reference("qa", "Paris") == ["Paris"]


def test_bad_input_is_named(pool):
    with pytest.raises(TypeError, match=r"batch\[1\]: completion"):
        pool.submit([("qa", "a", ["a"]), ("qa", 3, ["a"])])
    with pytest.raises(ValueError, match=r"batch\[0\]: domain"):
        pool.submit([("chess", "e4", "e4")])
    with pytest.raises(ValueError, match=r"batch\[0\]: code reference \(stdio\)"):
        pool.submit([("code", "x", {"inputs": ["1"], "outputs": []})])
    with pytest.raises(TypeError, match=r"batch\[0\]: qa reference"):
        pool.submit([("qa", "x", [])])
    with pytest.raises(ValueError, match="triple"):
        pool.submit([("qa", "x")])
    with pytest.raises(ValueError, match="max_workers"):
        RewardPool(max_workers=0)
    with pytest.raises(ValueError, match="qa_metric"):
        RewardPool(qa_metric="bleu")
    closed = RewardPool(max_workers=1)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.score([("qa", "a", ["a"])])


def test_stats_summarise_what_was_scored():
    with RewardPool(max_workers=1) as fresh:
        fresh.score([("qa", "a", ["a"]), ("qa", "b", ["a"]), ("qa", "", ["a"])])
        stats = fresh.stats()
    assert stats["qa/n"] == 3
    assert stats["qa/reward_mean"] == pytest.approx(1 / 3)
    assert stats["qa/unformatted_rate"] == pytest.approx(1 / 3)
