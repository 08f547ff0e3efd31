"""Problem loaders (counts from the data README, stable ids, train/held-out separation, prompts shared with the
evaluation battery, local GEM-format files) and the GEM environment round trip with forgetjax and GEM rewards."""

from __future__ import annotations

import json

import pytest

from forgetjax.envs import (
    HUMANEVAL_TEMPLATE,
    Problem,
    load_problems,
    make_gem_env,
    require_training_pool,
)
from forgetjax.eval.benchmarks import get_benchmark
from forgetjax.verifiers.rewards import RewardPool

# (domain, source, split, rows per the data README, held out)
SPLITS = [
    ("math", "gsm8k", "train", 7473, False),
    ("math", "gsm8k", "test", 1319, True),
    ("math", "math500", "test", 500, True),
    ("code", "mbpp", "train", 374, False),
    ("code", "mbpp", "validation", 90, False),
    ("code", "mbpp", "test", 500, True),
    ("code", "humaneval", "test", 164, True),
    ("qa", "efficientqa", "train", 1800 + 1769, False),
    ("qa", "nq_open", "dev", 3610, True),
]


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def pool():
    with RewardPool(max_workers=1, math_timeout_s=5.0, code_timeout_s=5.0) as reward_pool:
        yield reward_pool


@pytest.mark.parametrize("domain,source,split,rows,held_out", SPLITS)
def test_loader_counts_ids_and_held_out_flags(data_dir, domain, source, split, rows, held_out):
    problems = load_problems(domain, source, data_dir, split)
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    assert all(p.id.startswith(f"{source}/") and p.domain == domain for p in problems)
    assert all(p.held_out is held_out and p.metadata["split"] == split for p in problems)
    assert all(p.metadata["question"] in p.prompt for p in problems)


def test_ids_are_stable_under_limit_and_seed(data_dir):
    full = {p.id: p for p in load_problems("math", "gsm8k", data_dir, "train")}
    first = load_problems("math", "gsm8k", data_dir, "train", limit=25, seed=3)
    again = load_problems("math", "gsm8k", data_dir, "train", limit=25, seed=3)
    other = load_problems("math", "gsm8k", data_dir, "train", limit=25, seed=4)
    assert [p.id for p in first] == [p.id for p in again]
    assert len(first) == 25 and {p.id for p in first} != {p.id for p in other}
    assert all(full[p.id] == p for p in first + other)
    assert full["gsm8k/train-0000"].metadata["question"].startswith("Natalia sold clips")
    assert [p.id for p in load_problems("code", "mbpp", data_dir, "train")[:2]] == ["mbpp/601", "mbpp/602"]


def test_training_pools_are_disjoint_from_held_out_sets(data_dir):
    gsm_train = load_problems("math", "gsm8k", data_dir, "train")
    gsm_test = load_problems("math", "gsm8k", data_dir, "test")
    assert not {normalised(p.metadata["question"]) for p in gsm_train} & {
        normalised(p.metadata["question"]) for p in gsm_test}
    mbpp_train = {p.metadata["task_id"] for p in load_problems("code", "mbpp", data_dir, "train")}
    mbpp_test = {p.metadata["task_id"] for p in load_problems("code", "mbpp", data_dir, "test")}
    assert mbpp_train == set(range(601, 975)) and mbpp_test == set(range(11, 511))
    qa_train = load_problems("qa", "efficientqa", data_dir, "train")
    nq_dev = load_problems("qa", "nq_open", data_dir, "dev")
    assert not {normalised(p.metadata["question"]) for p in qa_train} & {
        normalised(p.metadata["question"]) for p in nq_dev}
    require_training_pool(gsm_train + qa_train)
    with pytest.raises(ValueError, match="gsm8k/test-0000.*held out"):
        require_training_pool(gsm_train[:3] + gsm_test[:1])


@pytest.mark.parametrize("domain,source,split,benchmark,index", [
    ("math", "gsm8k", "test", "gsm8k", 0),
    ("math", "math500", "test", "math500", 7),
    ("code", "mbpp", "test", "mbpp", 0),
    ("code", "humaneval", "test", "humaneval", 3),
    ("qa", "nq_open", "dev", "nq_open", 5),
])
def test_default_prompts_are_the_evaluation_chat_prompts(data_dir, domain, source, split, benchmark, index):
    problem = load_problems(domain, source, data_dir, split)[index]
    bench = get_benchmark(benchmark)
    item = bench.load(data_dir)[index]
    (message,) = bench.build_prompt(item, "chat")
    assert problem.prompt == message["content"]
    assert problem.metadata["item_id"] == item.id


def test_templates_and_bad_arguments(data_dir):
    (problem,) = load_problems("qa", "nq_open", data_dir, "dev", limit=1, template="Q: {question}\nA:")
    assert problem.prompt == f"Q: {problem.metadata['question']}\nA:" and problem.metadata["question"].endswith("?")
    assert load_problems("code", "humaneval", data_dir, "test", limit=1)[0].prompt.startswith(
        HUMANEVAL_TEMPLATE.split("{question}")[0])
    with pytest.raises(ValueError, match="template"):
        load_problems("math", "gsm8k", data_dir, "train", template="no placeholder \\boxed{}")
    with pytest.raises(ValueError, match="source"):
        load_problems("math", "mbpp", data_dir, "train")
    with pytest.raises(ValueError, match="split"):
        load_problems("math", "math500", data_dir, "train")
    with pytest.raises(ValueError, match="domain"):
        load_problems("chess", "gsm8k", data_dir, "train")
    with pytest.raises(ValueError, match="limit"):
        load_problems("math", "gsm8k", data_dir, "train", limit=0)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_problems("math", "gsm8k", data_dir / "missing", "train")


def test_local_files_in_gem_record_format(tmp_path):
    stdio_tests = json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]})  # GEM stores tests as a JSON string
    rows = {
        "math": [{"problem": "What is 2+2?", "answer": "It is 2+2=4.\n#### 4"},
                 {"question": "1/2 + 1/4?", "answer": "\\frac{3}{4}"}],
        "code": [{"id": "double", "problem": "Double n.", "tests": stdio_tests}],
        "qa": [{"question": "capital of france", "answer": ["Paris"]}],
    }
    for domain, records in rows.items():
        path = tmp_path / f"my_{domain}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        problems = load_problems(domain, str(path), tmp_path, "train")
        assert [p.metadata["source"] for p in problems] == [f"my_{domain}"] * len(records)
        assert not any(p.held_out for p in problems)
        assert all(p.held_out for p in load_problems(domain, str(path), tmp_path, "test"))
        if domain == "math":
            assert [p.reference for p in problems] == ["4", "\\frac{3}{4}"]
            assert [p.id for p in problems] == ["my_math/train-0000", "my_math/train-0001"]
        elif domain == "code":
            assert problems[0].id == "my_code/double"
            assert problems[0].reference == {"kind": "stdio", "inputs": ["2\n"], "outputs": ["4\n"]}
        else:
            assert problems[0].reference == ["Paris"] and problems[0].prompt.endswith("capital of france?")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "q", "answer": []}) + "\n")
    with pytest.raises(TypeError, match="broken.jsonl item train-0000: qa reference"):
        load_problems("qa", str(broken), tmp_path, "train")


def serve_all(env, problems):
    """Reset once per problem, yielding the problem being served (the caller steps before the next reset); every
    problem is served once per epoch and its prompt is what reset returns."""
    by_id = {p.id: p for p in problems}
    served = []
    for _ in problems:
        observation, info = env.reset()
        problem = by_id[info["problem_id"]]
        assert observation == problem.prompt
        served.append(problem.id)
        yield problem
    assert sorted(served) == sorted(by_id)


def test_gem_math_env_round_trip(data_dir, pool):
    problems = load_problems("math", "gsm8k", data_dir, "train")[:3]
    assert [p.reference for p in problems] == ["72", "10", "5"]  # by hand: 48 + 24; 12 * 50 / 60; 100 - 95 (Betty)
    env = make_gem_env(problems, reward_pool=pool, seed=1)
    for problem in serve_all(env, problems):
        _, reward, terminated, _, info = env.step(f"Working... the answer is $\\boxed{{{problem.reference}}}$.")
        assert (reward, terminated, info["correct"], info["extracted"]) == (1.0, True, True, problem.reference)
    env.reset()
    assert env.step("\\boxed{-7}")[1] == 0.0
    # GEM's own env and reward on the same records agree (its SIGALRM grader is fine on the main thread here)
    native = make_gem_env(problems, verifier="gem", use_mp=False, seed=1)
    for _ in problems:
        observation, _ = native.reset()
        problem = next(p for p in problems if p.prompt == observation)
        assert native.step(f"\\boxed{{{problem.reference}}}")[1] == 1.0
    native.reset()
    assert native.step("\\boxed{-7}")[1] == 0.0


def test_gem_code_env_round_trip(data_dir, pool, tmp_path, monkeypatch):
    problems = load_problems("code", "mbpp", data_dir, "train")[:2]
    env = make_gem_env(problems, reward_pool=pool)
    for problem in serve_all(env, problems):
        assert env.step(f"```python\n{problem.metadata['solution']}\n```")[1] == 1.0
    env.reset()
    _, reward, _, _, info = env.step("```python\ndef unrelated():\n    return 1\n```")
    assert reward == 0.0 and info["status"] == "failed"
    stdio = [Problem("local/double", "code", "Read n and print 2n.",
                     {"kind": "stdio", "inputs": ["3\n", "10\n"], "outputs": ["6\n", "20\n"]}, {"source": "local"})]
    right, wrong = "```python\nprint(int(input()) * 2)\n```", "```python\nprint(int(input()) + 3)\n```"
    ours = make_gem_env(stdio, reward_pool=pool)
    monkeypatch.chdir(tmp_path)  # GEM's run_python makes its temp dirs in the working directory
    native = make_gem_env(stdio, verifier="gem")
    for env_ in (ours, native):
        assert env_.reset()[0] == "Read n and print 2n."
        assert (env_.step(right)[1], env_.step(wrong)[1]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="stdin/stdout"):
        make_gem_env(problems, verifier="gem")


def test_gem_qa_env_serves_our_prompt_and_rewards_exact_match(data_dir, pool):
    problems = load_problems("qa", "efficientqa", data_dir, "train")[:3]
    env = make_gem_env(problems, reward_pool=pool)
    for problem in serve_all(env, problems):
        assert env.step(f"{problem.reference[0]}.")[1] == 1.0
    env.reset()
    assert env.step("certainly not this")[1] == 0.0
    native = make_gem_env(problems, verifier="gem")
    observation, _ = native.reset()
    problem = next(p for p in problems if f"Question: {p.prompt}" in observation)
    assert "<answer>" in observation  # GEM rewrites the prompt into its own think/answer template
    assert native.step(f"<think>...</think><answer>{problem.reference[0]}</answer>")[1] == 1.0


def test_make_gem_env_rejects_bad_input(data_dir):
    math_problems = load_problems("math", "gsm8k", data_dir, "train", limit=1)
    qa_problems = load_problems("qa", "efficientqa", data_dir, "train", limit=1)
    with pytest.raises(ValueError, match="one domain"):
        make_gem_env(math_problems + qa_problems)
    with pytest.raises(ValueError, match="non-empty"):
        make_gem_env([])
    with pytest.raises(ValueError, match="env_id 'qa:NaturalQuestions'"):
        make_gem_env(math_problems, env_id="qa:NaturalQuestions")
    with pytest.raises(ValueError, match="verifier"):
        make_gem_env(math_problems, verifier="sympy")
