"""GEM environments for the math, code and QA domains, built from local problems.

:func:`make_gem_env` turns a list of :class:`~forgetjax.envs.problems.Problem` into a GEM single-turn environment
with ``gem.make(env_id, dataset=...)``: the problems become a ``datasets.Dataset`` in the record format of GEM's env
class (math ``MathEnv``: ``problem``/``answer``; code ``CodeEnv``: ``problem``/``tests`` as a JSON string; qa
``QaEnv``: ``problem``/``answer`` list), so nothing is fetched from the hub. GEM keeps what it is good at: the
dataset, seeded shuffling per epoch, ``reset()`` / ``step()`` and the env registry. The env ids (GEM's own):

- math: ``math:GSM8K`` (gsm8k), ``eval:MATH500`` (math500), else ``math:Math12K`` -- all ``gem.envs.math_env:MathEnv``;
- code: ``code:CodeContest`` -- ``gem.envs.code_env:CodeEnv``, GEM's only code env;
- qa: ``eval:QaOpen`` (nq_open), else ``qa:NaturalQuestions`` -- ``gem.envs.qa_env:QaEnv``.

Where forgetjax replaces GEM's reward (``verifier="forgetjax"``, the default): the env is wrapped in
:class:`VerifiedRewardEnv`, whose ``step()`` scores the action with a
:class:`~forgetjax.verifiers.rewards.RewardPool` instead of GEM's checker, because GEM's checkers are not safe in
a multi-threaded trainer:

- ``MathEnv.step``: with ``use_mp=True`` it forks a one-process ``multiprocessing.Pool`` when the env is built
  (forking a process that runs JAX threads can deadlock) and, after its 1 s ``get`` timeout, leaves the hung worker
  running, so every later answer queues behind it and scores 0; with ``use_mp=False`` it times out with
  ``SIGALRM`` (``run_with_timeout_signal``, and ``math_grader.timeout``), which raises outside the main thread.
  forgetjax grades in a :class:`~forgetjax.verifiers.math.MathGrader` whose timed-out processes are killed.
- ``CodeEnv.step``: ``gem.utils.sandbox.run_python`` does not pass its ``timeout`` on (every program may run the
  default 10 s), runs code unsandboxed in the working directory behind a string blacklist, and only stdin/stdout
  tests are supported (MBPP/HumanEval assert tests raise ``NotImplementedError``). forgetjax runs every program in
  its own sandbox (:mod:`forgetjax.verifiers.sandbox`) with a real wall-clock limit, for all three test kinds.
- ``QaEnv``: rewrites every question into its ``<think>``/``<answer>`` template and only rewards ``<answer>``-tagged
  text (a reply without the tag makes ``step`` raise ``UnboundLocalError``). forgetjax serves the problem's own
  prompt and scores the short answer with :func:`~forgetjax.verifiers.qa.exact_match`.

``verifier="gem"`` returns GEM's env unwrapped (GEM's prompt and reward) for comparison; code then needs
stdin/stdout problems. Note that GEM's ``reset(seed=s)`` reseeds Python's and NumPy's global generators and picks
a random problem; ``reset()`` without a seed walks the seeded shuffle. The wrapper's ``step`` is synchronous like
any GEM env; a trainer that scores G completions
per prompt should call :meth:`RewardPool.submit` on the whole batch instead, which overlaps with the next rollout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from forgetjax.envs.problems import Problem
from forgetjax.verifiers.rewards import RewardDetail, RewardPool


def _import_gem() -> Any:
    """Import gem without keeping the root-logger configuration (``logging.basicConfig``) its import installs."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import gem

    root.handlers[:] = handlers
    root.setLevel(level)
    return gem


gem = _import_gem()
from datasets import Dataset  # noqa: E402  (imported after gem, whose import pulls in datasets anyway)
from gem.core import EnvWrapper  # noqa: E402
from gem.envs.registration import ENV_REGISTRY  # noqa: E402
from gem.utils.constants import TERMINAL_STATE  # noqa: E402

__all__ = ["GEM_ENV_IDS", "VERIFIERS", "VerifiedRewardEnv", "gem_env_id", "gem_records", "make_gem_env"]

VERIFIERS = ("forgetjax", "gem")
GEM_ENV_IDS: dict[str, dict[str | None, str]] = {
    "math": {"gsm8k": "math:GSM8K", "math500": "eval:MATH500", None: "math:Math12K"},
    "code": {None: "code:CodeContest"},
    "qa": {"nq_open": "eval:QaOpen", None: "qa:NaturalQuestions"},
}
_ENTRY_POINTS = {
    "math": "gem.envs.math_env:MathEnv",
    "code": "gem.envs.code_env:CodeEnv",
    "qa": "gem.envs.qa_env:QaEnv",
}
_COLUMNS = {
    "math": {"question_key": "problem", "answer_key": "answer"},
    "code": {"question_key": "problem", "test_key": "tests"},
    "qa": {"question_key": "problem", "answer_key": "answer"},
}


def gem_env_id(domain: str, source: str | None = None) -> str:
    """GEM's registered env id for a domain and source (the domain's default for other sources)."""
    if domain not in GEM_ENV_IDS:
        raise ValueError(f"domain must be one of {tuple(GEM_ENV_IDS)} (GEM has no env for the safety domains), "
                         f"got {domain!r}")
    ids = GEM_ENV_IDS[domain]
    return ids.get(source, ids[None])


def _reference_key(prompt: str, reference: Any) -> tuple[str, str]:
    """Lookup key of a served problem (GEM's reset reports no row id)."""
    return prompt, json.dumps(reference, sort_keys=True)


def gem_records(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Problems as rows in the record format of GEM's env class for their domain (plus an ``id`` column)."""
    records = []
    for problem in problems:
        reference = problem.reference
        if problem.domain == "code":
            records.append({"id": problem.id, "problem": problem.prompt, "tests": json.dumps(reference)})
        elif problem.domain == "math" and isinstance(reference, str):
            records.append({"id": problem.id, "problem": problem.prompt, "answer": reference})
        else:
            records.append({"id": problem.id, "problem": problem.prompt, "answer": list(reference)})
    return records


def _check_problems(problems: Sequence[Problem]) -> str:
    """The common domain of a non-empty problem list (mixed domains need one env each)."""
    if isinstance(problems, (str, bytes)) or not isinstance(problems, Sequence) or not problems:
        raise ValueError("problems must be a non-empty sequence of Problem")
    for index, problem in enumerate(problems):
        if not isinstance(problem, Problem):
            raise TypeError(f"problems[{index}] must be a Problem, got {type(problem).__name__}")
    domains = sorted({problem.domain for problem in problems})
    if len(domains) != 1:
        raise ValueError(f"problems must all share one domain (one env per domain), got {domains}")
    domain = domains[0]
    if domain == "math" and len({isinstance(problem.reference, str) for problem in problems}) > 1:
        raise ValueError("math problems must all have a single reference answer or all a list of answers")
    return domain


class VerifiedRewardEnv(EnvWrapper):
    """A GEM env whose ``step`` reward comes from a forgetjax :class:`RewardPool` instead of GEM's checker.

    ``reset`` is GEM's (the wrapped env picks and shuffles the problems) and adds ``problem_id`` to its info;
    ``step`` returns GEM's single-turn tuple ``(TERMINAL_STATE, reward, True, True, info)`` with info holding the
    reward details (correct, status, extracted answer, timed_out, formatted). Without a ``reward_pool`` the env
    creates one and closes it in :meth:`close`.
    """

    def __init__(self, env: Any, domain: str, reward_pool: RewardPool | None = None,
                 problem_ids: dict[tuple[str, str], str] | None = None) -> None:
        super().__init__(env)
        if domain not in GEM_ENV_IDS:
            raise ValueError(f"domain must be one of {tuple(GEM_ENV_IDS)} (GEM has no env for the safety domains), "
                             f"got {domain!r}")
        self.domain = domain
        self._owns_pool = reward_pool is None
        self.reward_pool = RewardPool() if reward_pool is None else reward_pool
        self._problem_ids = problem_ids or {}
        self.last_detail: RewardDetail | None = None

    def _reference(self) -> Any:
        inner = self.env.unwrapped
        return inner.tests if self.domain == "code" else inner.answer

    def reset(self, seed: int | None = None, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        observation, info = self.env.reset(seed=seed, **kwargs)
        info = dict(info)
        problem_id = self._problem_ids.get(_reference_key(observation, self._reference()))
        if problem_id is not None:
            info["problem_id"] = problem_id
        return observation, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        detail = self.reward_pool.score_details([(self.domain, action, self._reference())])[0]
        self.last_detail = detail
        info = {"correct": detail.correct, "status": detail.status, "extracted": detail.extracted,
                "timed_out": detail.timed_out, "formatted": detail.formatted}
        return TERMINAL_STATE, detail.reward, True, True, info

    def close(self) -> None:
        """Close the reward pool if this env created it (a shared pool stays open)."""
        if self._owns_pool:
            self.reward_pool.close()


def make_gem_env(
    problems: Sequence[Problem],
    *,
    verifier: str = "forgetjax",
    reward_pool: RewardPool | None = None,
    env_id: str | None = None,
    seed: int = 0,
    **gem_kwargs: Any,
) -> Any:
    """A GEM env serving ``problems`` (one domain), built with ``gem.make(env_id, dataset=...)``.

    ``env_id`` defaults to :func:`gem_env_id` of the problems' source and must name GEM's env class for the domain.
    ``verifier="forgetjax"`` wraps it in :class:`VerifiedRewardEnv` (rewards from ``reward_pool``, or a pool the env
    owns); ``verifier="gem"`` returns GEM's env with its own prompt handling and reward (see the module docstring).
    ``gem_kwargs`` go to ``gem.make`` (e.g. ``use_mp=False`` for GEM's math reward on the main thread).
    """
    domain = _check_problems(problems)
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    sources = {problem.metadata.get("source") for problem in problems}
    env_id = env_id or gem_env_id(domain, sources.pop() if len(sources) == 1 else None)
    spec = ENV_REGISTRY.get(env_id)
    if spec is None or spec.entry_point != _ENTRY_POINTS[domain]:
        raise ValueError(f"env_id {env_id!r} is not a GEM {_ENTRY_POINTS[domain]} env (needed for {domain} problems)")
    if verifier == "gem" and domain == "code" and any(p.reference["kind"] != "stdio" for p in problems):
        raise ValueError("GEM's CodeEnv scores only stdin/stdout tests; use verifier='forgetjax' for assert tests")

    dataset = Dataset.from_list(gem_records(problems))
    kwargs = {**_COLUMNS[domain], "seed": seed, **gem_kwargs}
    if verifier == "gem":
        return gem.make(env_id, dataset=dataset, **kwargs)
    if domain == "math":
        kwargs["use_mp"] = False  # GEM's grading pool is never used: the reward comes from the RewardPool
    env = gem.make(env_id, dataset=dataset, **kwargs)
    if domain == "qa":
        env.dataset = dataset.shuffle(seed=env.seed)  # undo QaEnv's <think>/<answer> prompt rewrite, same order
    problem_ids = {_reference_key(p.prompt, p.reference): p.id for p in problems}
    return VerifiedRewardEnv(env, domain, reward_pool, problem_ids)
