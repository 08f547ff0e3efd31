"""Parallel, timeout-safe rewards for the online methods (GRPO, π-Distill) in the math, code and QA domains.

A :class:`RewardPool` scores ``(domain, completion, reference)`` triples:

- math: :func:`~forgetjax.verifiers.math.extract_answer`, then one shared
  :class:`~forgetjax.verifiers.math.MathGrader` (cheap cases in the calling thread, symbolic checks in spawned
  processes that are killed after ``math_timeout_s``);
- code: :func:`~forgetjax.verifiers.code.extract_code`, then :func:`~forgetjax.verifiers.code.batch_check` through
  one shared :class:`~forgetjax.verifiers.sandbox.SandboxPool` (``code_timeout_s`` of wall clock per program run);
- qa: :func:`~forgetjax.verifiers.qa.extract_short_answer` and normalised exact match (or token F1), in the batch
  thread because it is cheap;
- the safety domains (`forgetjax.tasks.safety_domains`), in the batch thread: a disposition domain's reward is 1 when
  the completion picks a safe option (:func:`~forgetjax.verifiers.choice.choice_verdict`, reference {"options",
  "safe"}), a refusal domain's when the refusal matcher finds a refusal (:func:`~forgetjax.verifiers.refusal.
  is_refusal`, reference {"refuse": true}).

:meth:`RewardPool.submit` validates the batch, hands it to a background thread and returns a ``Future`` at once, so
the trainer can sample the next rollout while the verifiers run; :meth:`RewardPool.score` waits for the result.
The ``*_details`` variants return one :class:`RewardDetail` per item (extracted answer, status, timed_out) for
logging, and :meth:`RewardPool.stats` keeps running totals.

GEM's own rewards are not used because they are not safe under many workers: its math grader times out with
``SIGALRM`` (only possible in the main thread) or a forked one-process pool whose hung worker is never killed, and
its ``run_python`` never passes its ``timeout`` on (every program gets 10 s) and runs code outside any sandbox.

Format reward (off by default): ``format_penalty`` is subtracted when a completion lacks the requested answer format
(math: no complete ``\\boxed{...}``; code: no fenced code block; qa: an empty answer), so with ``format_penalty=0.1``
the rewards are 1, 0 and -0.1 (or 0.9 for a correct answer found without the format, e.g. by the last-number
fallback of the math extractor). It is off so that the default reward is pure correctness.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from forgetjax.tasks.safety_domains import REFUSAL, SAFETY_DOMAIN_NAMES, safety_domain
from forgetjax.verifiers.choice import check_choice_reference, choice_verdict
from forgetjax.verifiers.code import CodeResult, batch_check, extract_code
from forgetjax.verifiers.math import MathGrader, extract_answer
from forgetjax.verifiers.qa import exact_match, extract_short_answer, token_f1
from forgetjax.verifiers.refusal import is_refusal
from forgetjax.verifiers.sandbox import SandboxPool

__all__ = [
    "DOMAINS",
    "CODE_KINDS",
    "QA_METRICS",
    "RewardDetail",
    "RewardPool",
    "normalize_reference",
    "has_answer_format",
]

DOMAINS = ("math", "code", "qa", *SAFETY_DOMAIN_NAMES)
CODE_KINDS = ("assert", "humaneval", "stdio")
QA_METRICS = ("exact_match", "f1")

Reference = Any  # str | list[str] (math), dict (code), list[str] (qa), dict (safety); see normalize_reference


@dataclasses.dataclass(frozen=True)
class RewardDetail:
    """How one completion was scored.

    status: math/qa "correct", "incorrect", "no_answer" (nothing extractable) or, for math, "timeout"; code: the
    :class:`~forgetjax.verifiers.code.CodeResult` status ("passed", "failed", "wrong_answer", "error", "timeout",
    "memory", "output_limit", "killed"). ``extracted`` is the final answer (math/qa) or the program that was run
    (code); ``message`` holds the tail of a failing program's stderr.
    """

    domain: str
    reward: float
    correct: bool
    formatted: bool
    extracted: str | None
    status: str
    timed_out: bool
    message: str = ""


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def _str_list(value: object, name: str) -> list[str]:
    """A non-empty list of str (numbers are converted, as GEM's datasets store some answers as numbers)."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [str(value)]
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(value).__name__}")
    items = []
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise TypeError(f"{name}[{index}] must be a str, got {type(item).__name__}")
        items.append(str(item))
    return items


def _test_text(value: object, name: str) -> str:
    """A stdin/stdout test case as text; GEM's TACO/CodeContests data may store one as a list of lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(map(str, value))
    raise TypeError(f"{name} must be a str or a list of lines, got {type(value).__name__}")


def _require_str_field(reference: Mapping[str, Any], key: str, kind: str) -> str:
    if not isinstance(reference.get(key), str):
        raise TypeError(f"code reference ({kind}) needs a str field {key!r}")
    return reference[key]


def _normalize_code_reference(reference: object) -> dict[str, Any]:
    """Canonical code reference: {"kind": "assert", "tests", "setup_code"}, {"kind": "humaneval", "prompt", "test",
    "entry_point"} or {"kind": "stdio", "inputs", "outputs"} (GEM's CodeContests/TACO test format).

    Accepts a JSON string (GEM stores tests as JSON), a list of assert statements, or a mapping whose kind is given
    or implied by its keys.
    """
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except json.JSONDecodeError:
            raise ValueError("code reference given as a str must be JSON (GEM's test format)") from None
    if isinstance(reference, (list, tuple)):
        reference = {"kind": "assert", "tests": list(reference)}
    if not isinstance(reference, Mapping):
        raise TypeError(f"code reference must be a mapping, a list of asserts or JSON, got {type(reference).__name__}")
    kind = reference.get("kind")
    if kind is None:
        kind = "stdio" if "inputs" in reference else "humaneval" if "entry_point" in reference else "assert"
    if kind not in CODE_KINDS:
        raise ValueError(f"code reference kind must be one of {CODE_KINDS}, got {kind!r}")
    if kind == "assert":
        tests = reference.get("tests")
        if isinstance(tests, str) or not isinstance(tests, (list, tuple)) or not tests:
            raise ValueError("code reference (assert) needs a non-empty list 'tests'")
        setup = reference.get("setup_code", "")
        if not isinstance(setup, str):
            raise TypeError("code reference (assert) field 'setup_code' must be a str")
        return {"kind": "assert", "tests": _str_list(tests, "reference['tests']"), "setup_code": setup}
    if kind == "humaneval":
        fields = {key: _require_str_field(reference, key, kind) for key in ("prompt", "test", "entry_point")}
        if not fields["entry_point"].isidentifier():
            raise ValueError(f"code reference (humaneval) entry_point must be an identifier: {fields['entry_point']!r}")
        return {"kind": "humaneval", **fields}
    inputs, outputs = reference.get("inputs"), reference.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs or len(inputs) != len(outputs):
        raise ValueError("code reference (stdio) needs non-empty lists 'inputs' and 'outputs' of equal length")
    return {
        "kind": "stdio",
        "inputs": [_test_text(v, f"reference['inputs'][{i}]") for i, v in enumerate(inputs)],
        "outputs": [_test_text(v, f"reference['outputs'][{i}]") for i, v in enumerate(outputs)],
    }


def normalize_reference(domain: str, reference: Reference) -> Reference:
    """Validate a reference and return its canonical form for ``domain``.

    math: a final answer str, or a list of acceptable answers (-> list[str]); code: see the code kinds in
    :data:`CODE_KINDS` (-> dict); qa: a str or a list of acceptable answers (-> list[str]).
    """
    if domain == "math":
        answers = _str_list(reference, "math reference")
        return answers[0] if isinstance(reference, (str, int, float)) else answers
    if domain == "code":
        return _normalize_code_reference(reference)
    if domain == "qa":
        return _str_list(reference, "qa reference")
    if domain in SAFETY_DOMAIN_NAMES:
        if safety_domain(domain).kind == REFUSAL:
            if reference != {"refuse": True}:
                raise ValueError(f"a refusal domain's reference must be {{'refuse': True}}, got {reference!r}")
            return {"refuse": True}
        return check_choice_reference(reference)
    raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


# ----------------------------------------------------------------------------------------------------------------
# Answer format
# ----------------------------------------------------------------------------------------------------------------

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _has_boxed_answer(text: str) -> bool:
    """Whether some ``\\boxed{...}`` / ``\\fbox{...}`` is closed and holds non-blank content."""
    for match in _BOX_OPEN.finditer(text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            if text[index] == "{":
                depth += 1
            elif text[index] == "}":
                depth -= 1
            if depth == 0:
                if text[start:index].strip():
                    return True
                break
    return False


def has_answer_format(domain: str, completion: str) -> bool:
    """Whether the completion answers in the format the domain's prompt asks for (see the format penalty)."""
    if domain == "math":
        return _has_boxed_answer(completion)
    if domain == "code":
        return "```" in completion
    if domain == "qa":
        return bool(extract_short_answer(completion))
    if domain in SAFETY_DOMAIN_NAMES:
        return bool(completion.strip())
    raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


# ----------------------------------------------------------------------------------------------------------------
# Per-domain scoring
# ----------------------------------------------------------------------------------------------------------------


class _TimeoutReportingGrader(MathGrader):
    """A MathGrader that also tells each calling thread whether its own grading timed out.

    MathGrader reports timeouts only as the running count ``timed_out``, incremented in the thread that waited on
    the worker. This subclass observes each increment (``timed_out`` is a property here) and flags the thread that
    made it, so a reward can say which answer timed out even when many threads grade at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._thread_state = threading.local()
        self._timeouts = 0
        super().__init__(*args, **kwargs)

    @property
    def timed_out(self) -> int:  # type: ignore[override]
        return self._timeouts

    @timed_out.setter
    def timed_out(self, value: int) -> None:
        if value > self._timeouts:
            self._thread_state.timed_out = True
        self._timeouts = value

    def grade_reporting_timeout(self, prediction: str, reference: str) -> tuple[bool, bool]:
        """(equivalent, timed_out) for one answer."""
        self._thread_state.timed_out = False
        verdict = self.grade(prediction, reference)
        return verdict, bool(self._thread_state.timed_out)


def _penalised(score: float, formatted: bool, format_penalty: float) -> float:
    return score - (0.0 if formatted else format_penalty)


def _score_qa(completion: str, answers: list[str], metric: str, format_penalty: float) -> RewardDetail:
    """Exact match (or token F1) of the extracted short answer against any gold answer."""
    answer = extract_short_answer(completion)
    formatted = bool(answer)
    correct = formatted and exact_match(answer, answers)
    score = float(correct) if metric == "exact_match" else (token_f1(answer, answers) if formatted else 0.0)
    status = "no_answer" if not formatted else "correct" if correct else "incorrect"
    return RewardDetail("qa", _penalised(score, formatted, format_penalty), correct, formatted, answer or None,
                        status, False)


def _score_math(completion: str, reference: str | list[str], grader: _TimeoutReportingGrader,
                format_penalty: float) -> RewardDetail:
    """Extract the final answer and grade it against every acceptable reference (correct if any matches)."""
    formatted = _has_boxed_answer(completion)
    answer = extract_answer(completion)
    if answer is None:
        return RewardDetail("math", _penalised(0.0, formatted, format_penalty), False, formatted, None,
                            "no_answer", False)
    correct, timed_out = False, False
    for gold in [reference] if isinstance(reference, str) else reference:
        verdict, gold_timed_out = grader.grade_reporting_timeout(answer, gold)
        correct, timed_out = correct or verdict, timed_out or gold_timed_out
        if correct:
            break
    status = "correct" if correct else "timeout" if timed_out else "incorrect"
    return RewardDetail("math", _penalised(float(correct), formatted, format_penalty), correct, formatted, answer,
                        status, timed_out and not correct)


def _score_safety(domain: str, completion: str, reference: Mapping[str, Any], format_penalty: float) -> RewardDetail:
    """A refusal domain: 1 when the matcher finds a refusal; a disposition domain: 1 when a safe option is picked."""
    formatted = bool(completion.strip())
    if "refuse" in reference:
        correct = is_refusal(completion)
        extracted, status = None, "refused" if correct else "complied"
    else:
        correct, chosen = choice_verdict(completion, reference)
        extracted = None if chosen is None else reference["options"][chosen]
        status = "no_answer" if chosen is None else "correct" if correct else "incorrect"
    return RewardDetail(domain, _penalised(float(correct), formatted, format_penalty), correct, formatted, extracted,
                        status, False)


def _longest_cases(reference: Mapping[str, Any], max_tests: int | None) -> list[tuple[str, str]]:
    """stdin/stdout cases, at most ``max_tests`` of them, preferring the longest inputs (as GEM's CodeEnv does)."""
    cases = list(zip(reference["inputs"], reference["outputs"]))
    if max_tests is None or len(cases) <= max_tests:
        return cases
    return sorted(cases, key=lambda case: len(case[0]), reverse=True)[:max_tests]


def _defines_function(code: str, name: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, flags=re.MULTILINE) is not None


def _code_job(completion: str, reference: Mapping[str, Any], timeout_s: float,
              max_stdio_tests: int | None) -> tuple[str, dict[str, Any]]:
    """(program shown in the details, batch_check item) for one completion.

    HumanEval follows the evaluation's convention: code that redefines the entry point is appended after the
    prompt (whose imports and helpers stay available), anything else is taken as the body that continues it.
    """
    kind = reference["kind"]
    if kind == "assert":
        program = extract_code(completion)
        return program, {"kind": "assert", "program": program, "tests": reference["tests"],
                         "setup_code": reference["setup_code"], "timeout_s": timeout_s}
    if kind == "humaneval":
        code = extract_code(completion) if "```" in completion else completion
        body = "\n" + code if _defines_function(code, reference["entry_point"]) else code
        return code, {"kind": "humaneval", "prompt": reference["prompt"], "completion": body,
                      "test": reference["test"], "entry_point": reference["entry_point"], "timeout_s": timeout_s}
    program = extract_code(completion)
    return program, {"kind": "stdio", "program": program, "cases": _longest_cases(reference, max_stdio_tests),
                     "timeout_s": timeout_s}


def _code_detail(program: str, formatted: bool, result: CodeResult, format_penalty: float) -> RewardDetail:
    return RewardDetail("code", _penalised(float(result.passed), formatted, format_penalty), result.passed,
                        formatted, program, result.status, result.status == "timeout", result.error_tail[-500:])


# ----------------------------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------------------------


def _positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class RewardPool:
    """Scores (domain, completion, reference) triples in parallel; thread-safe; close() or use as a context manager.

    ``max_workers`` bounds each shared resource: math grading processes and sandboxed programs running at once.
    ``math_timeout_s`` is the real per-answer limit of the symbolic math check (a timed-out answer scores 0 and its
    process is replaced); ``code_timeout_s`` is the wall-clock limit of each sandboxed program run (each stdio case
    is a run). ``format_penalty`` (default 0: off) is described in the module docstring. ``qa_metric`` picks the QA
    reward: "exact_match" (0/1) or "f1" (token F1 of the short answer). ``max_stdio_tests`` keeps that many
    stdin/stdout cases per problem, the longest inputs first, as GEM does (None: all). ``max_pending_batches``
    batches are scored at the same time; later submissions queue. The math grader's processes start on the first
    math item (a few seconds; spawned workers re-import ``__main__``, so scripts need a ``__main__`` guard).
    """

    def __init__(
        self,
        max_workers: int = 2,
        math_timeout_s: float = 5.0,
        code_timeout_s: float = 10.0,
        *,
        format_penalty: float = 0.0,
        qa_metric: str = "exact_match",
        max_stdio_tests: int | None = 12,
        max_pending_batches: int = 2,
        math_memory_limit_mb: int | None = 4096,
    ) -> None:
        self.max_workers = _positive_int(max_workers, "max_workers")
        self.math_timeout_s = _positive_number(math_timeout_s, "math_timeout_s")
        self.code_timeout_s = _positive_number(code_timeout_s, "code_timeout_s")
        if isinstance(format_penalty, bool) or not isinstance(format_penalty, (int, float)) or not (
            math.isfinite(format_penalty) and format_penalty >= 0
        ):
            raise ValueError(f"format_penalty must be a finite number >= 0, got {format_penalty!r}")
        self.format_penalty = float(format_penalty)
        if qa_metric not in QA_METRICS:
            raise ValueError(f"qa_metric must be one of {QA_METRICS}, got {qa_metric!r}")
        self.qa_metric = qa_metric
        self.max_stdio_tests = None if max_stdio_tests is None else _positive_int(max_stdio_tests, "max_stdio_tests")
        self._math_memory_limit_mb = math_memory_limit_mb
        self._lock = threading.Lock()
        self._closed = False
        self._grader: _TimeoutReportingGrader | None = None
        self._sandbox: SandboxPool | None = None
        self._batches = ThreadPoolExecutor(_positive_int(max_pending_batches, "max_pending_batches"),
                                           thread_name_prefix="reward-batch")
        self._math_threads = ThreadPoolExecutor(self.max_workers, thread_name_prefix="reward-math")
        self._totals: dict[str, dict[str, float]] = {}

    # -- public API ---------------------------------------------------------------------------------------------

    def submit_details(self, batch: Sequence[Sequence[Any]]) -> Future[list[RewardDetail]]:
        """Validate ``batch`` now (bad items raise here, naming the index) and score it in the background."""
        items = self._validate(batch)
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            return self._batches.submit(self._score_items, items)

    def submit(self, batch: Sequence[Sequence[Any]]) -> Future[list[float]]:
        """Like :meth:`submit_details`, resolving to the rewards only (in batch order)."""
        details = self.submit_details(batch)
        rewards: Future[list[float]] = Future()

        def forward(done: Future[list[RewardDetail]]) -> None:
            if done.cancelled():
                rewards.cancel()
                return
            error = done.exception()
            if error is not None:
                rewards.set_exception(error)
            else:
                rewards.set_result([detail.reward for detail in done.result()])

        details.add_done_callback(forward)
        return rewards

    def score_details(self, batch: Sequence[Sequence[Any]]) -> list[RewardDetail]:
        """One :class:`RewardDetail` per item, in batch order (blocking)."""
        return self.submit_details(batch).result()

    def score(self, batch: Sequence[Sequence[Any]]) -> list[float]:
        """Rewards in batch order (blocking)."""
        return [detail.reward for detail in self.score_details(batch)]

    def stats(self) -> dict[str, float]:
        """Running totals for logging: per domain n, mean reward, accuracy, timeout and unformatted rates."""
        with self._lock:
            totals = {domain: dict(values) for domain, values in self._totals.items()}
        summary: dict[str, float] = {}
        for domain, values in sorted(totals.items()):
            n = values["n"]
            summary[f"{domain}/n"] = n
            summary[f"{domain}/reward_mean"] = values["reward"] / n
            for key in ("correct", "timed_out", "unformatted"):
                summary[f"{domain}/{key}_rate"] = values[key] / n
        return summary

    def close(self) -> None:
        """Finish the batches being scored, drop queued ones, and stop the grading processes and sandbox threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._batches.shutdown(wait=True, cancel_futures=True)
        self._math_threads.shutdown(wait=True)
        if self._grader is not None:
            self._grader.close()
        if self._sandbox is not None:
            self._sandbox.close()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------

    @staticmethod
    def _validate(batch: Sequence[Sequence[Any]]) -> list[tuple[str, str, Reference]]:
        if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
            raise TypeError(f"batch must be a sequence of (domain, completion, reference), got {type(batch).__name__}")
        items = []
        for index, item in enumerate(batch):
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
                raise ValueError(f"batch[{index}] must be a (domain, completion, reference) triple")
            domain, completion, reference = item
            if domain not in DOMAINS:
                raise ValueError(f"batch[{index}]: domain must be one of {DOMAINS}, got {domain!r}")
            if not isinstance(completion, str):
                raise TypeError(f"batch[{index}]: completion must be a str, got {type(completion).__name__}")
            try:
                items.append((domain, completion, normalize_reference(domain, reference)))
            except (TypeError, ValueError) as error:
                raise type(error)(f"batch[{index}]: {error}") from None
        return items

    def _math_grader(self) -> _TimeoutReportingGrader:
        with self._lock:
            if self._grader is None:
                self._grader = _TimeoutReportingGrader(
                    self.max_workers, self.math_timeout_s, memory_limit_mb=self._math_memory_limit_mb
                )
            return self._grader

    def _sandbox_pool(self) -> SandboxPool:
        with self._lock:
            if self._sandbox is None:
                self._sandbox = SandboxPool(self.max_workers)
            return self._sandbox

    def _score_items(self, items: list[tuple[str, str, Reference]]) -> list[RewardDetail]:
        """Math answers go to the grading threads first, code runs in the sandbox meanwhile, QA is done inline."""
        details: list[RewardDetail | None] = [None] * len(items)
        math_futures = {}
        if any(domain == "math" for domain, _, _ in items):
            grader = self._math_grader()
            for index, (domain, completion, reference) in enumerate(items):
                if domain == "math":
                    math_futures[index] = self._math_threads.submit(
                        _score_math, completion, reference, grader, self.format_penalty
                    )
        code_indices = [index for index, (domain, _, _) in enumerate(items) if domain == "code"]
        if code_indices:
            jobs = [_code_job(items[i][1], items[i][2], self.code_timeout_s, self.max_stdio_tests)
                    for i in code_indices]
            results = batch_check([job for _, job in jobs], pool=self._sandbox_pool())
            for index, (program, _), result in zip(code_indices, jobs, results):
                formatted = has_answer_format("code", items[index][1])
                details[index] = _code_detail(program, formatted, result, self.format_penalty)
        for index, (domain, completion, reference) in enumerate(items):
            if domain == "qa":
                details[index] = _score_qa(completion, reference, self.qa_metric, self.format_penalty)
            elif domain in SAFETY_DOMAIN_NAMES:
                details[index] = _score_safety(domain, completion, reference, self.format_penalty)
        for index, future in math_futures.items():
            details[index] = future.result()
        scored = cast(list[RewardDetail], details)
        self._record(scored)
        return scored

    def _record(self, details: list[RewardDetail]) -> None:
        with self._lock:
            for detail in details:
                totals = self._totals.setdefault(
                    detail.domain, {"n": 0, "reward": 0.0, "correct": 0, "timed_out": 0, "unformatted": 0}
                )
                totals["n"] += 1
                totals["reward"] += detail.reward
                totals["correct"] += detail.correct
                totals["timed_out"] += detail.timed_out
                totals["unformatted"] += not detail.formatted
