"""Code-execution verifiers (MBPP asserts, HumanEval, stdin/stdout problems) and the pass@k estimator.

Every check runs in `forgetjax.verifiers.sandbox`. Nothing here calls exec or eval in-process. For assert-style
checks, the sandbox runs a generated driver script. The driver executes the program in a fresh module named
"solution", so `if __name__ == "__main__"` blocks do not run, as in human-eval. It then runs the setup code
and then each test, all in that same namespace. After each test it writes a marker line to fd 1. The marker
carries a random per-run nonce. A test counts as passed only if its pass marker shows up and the whole run
exits cleanly. A program that calls sys.exit(0) or os._exit(0) early therefore passes nothing. This is a
guard, not a proof: code in the same interpreter could read its own driver. If any sandbox run reports
"unavailable", the check raises SandboxUnavailable instead of scoring the run as a failure. A broken
sandbox must not show up as zero reward.
"""

from __future__ import annotations

import dataclasses
import inspect
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from forgetjax.verifiers.sandbox import SandboxPool, SandboxResult, SandboxUnavailable, run_program

_PYTHON_FENCE_LANGS = frozenset({"python", "py", "python3", "py3"})
_ERROR_TAIL_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class CodeResult:
    """Verdict of one code check.

    status is "passed", "failed" (tests ran and some failed), "wrong_answer" (stdio output mismatch),
    "error" (the program or setup raised before the tests), or a sandbox status ("timeout", "memory",
    "output_limit", "killed").
    """

    passed: bool
    status: str
    n_passed: int | None
    n_total: int | None
    reasons: tuple[str, ...]
    error_tail: str = ""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Sandbox runs for one check, plus how to score their results (possibly a prefix of them)."""

    runs: list[dict[str, Any]]
    score: Callable[[list[SandboxResult]], CodeResult]


def extract_code(completion: str) -> str:
    """The last fenced ```python block (else the last bare ``` block), else the raw text.

    An unclosed fence at the end (a truncated generation) counts as a block that runs to the end of the text.
    Blocks tagged with another language are ignored.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    blocks: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    for line in completion.splitlines():
        stripped = line.strip()
        if current is None:
            if stripped.startswith("```"):
                current = (stripped[3:].strip().lower(), [])
        elif stripped.startswith("```"):
            blocks.append(current)
            current = None
        else:
            current[1].append(line)
    if current is not None:
        blocks.append(current)
    for wanted in (lambda lang: lang in _PYTHON_FENCE_LANGS, lambda lang: lang == ""):
        matching = [body for lang, body in blocks if wanted(lang)]
        if matching:
            return "\n".join(matching[-1]) + "\n"
    return completion


def _driver_source(program: str, setup_code: str, tests: Sequence[str], nonce: str) -> str:
    """Driver script: run program, setup, then each test in one "solution" module, marking each outcome."""
    return f"""\
import os as _fj_os, sys as _fj_sys, traceback as _fj_traceback, types as _fj_types
_fj_module = _fj_types.ModuleType("solution")
_fj_sys.modules["solution"] = _fj_module
def _fj_mark(tag):
    try:
        _fj_sys.stdout.flush()
    except Exception:
        pass
    _fj_os.write(1, ("\\n" + {nonce!r} + ":" + tag + "\\n").encode())
exec(compile({program!r}, "<program>", "exec"), _fj_module.__dict__)
exec(compile({setup_code!r}, "<setup>", "exec"), _fj_module.__dict__)
_fj_mark("loaded")
_fj_failures = 0
for _fj_index, _fj_test in enumerate({list(tests)!r}):
    try:
        exec(compile(_fj_test, "<test %d>" % _fj_index, "exec"), _fj_module.__dict__)
    except Exception:
        _fj_failures += 1
        _fj_traceback.print_exc()
        _fj_mark("fail:%d" % _fj_index)
    else:
        _fj_mark("pass:%d" % _fj_index)
_fj_sys.exit(1 if _fj_failures else 0)
"""


def _raise_if_unavailable(results: Sequence[SandboxResult]) -> None:
    for result in results:
        if result.status == "unavailable":
            raise SandboxUnavailable(result.reason)


def _tail(result: SandboxResult) -> str:
    return result.stderr[-_ERROR_TAIL_CHARS:]


def _assert_plan(program: str, tests: Sequence[str], setup_code: str, timeout_s: float) -> _Plan:
    nonce = secrets.token_hex(16)
    source = _driver_source(program, setup_code, tests, nonce)
    markers = {f"{nonce}:pass:{i}" for i in range(len(tests))}

    def score(results: list[SandboxResult]) -> CodeResult:
        _raise_if_unavailable(results)
        (result,) = results
        lines = set(result.stdout.splitlines())
        n_passed = len(markers & lines)
        loaded = f"{nonce}:loaded" in lines
        passed = result.status == "ok" and n_passed == len(tests)
        if passed:
            status = "passed"
        elif result.status not in ("ok", "error"):
            status = result.status
        else:
            status = "failed" if loaded else "error"
        return CodeResult(passed, status, n_passed, len(tests), (result.reason,), "" if passed else _tail(result))

    return _Plan([{"source": source, "timeout_s": timeout_s}], score)


def _as_test_list(tests: list[str] | str) -> list[str]:
    if isinstance(tests, str):
        return [tests]
    if not isinstance(tests, Sequence) or not all(isinstance(t, str) for t in tests):
        raise TypeError("tests must be a str or a list of str")
    if not tests:
        raise ValueError("tests must not be empty: a program with no tests cannot be verified")
    return list(tests)


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")


def _assert_tests_plan(program: str, tests: list[str] | str, *, setup_code: str = "",
                       timeout_s: float = 10.0) -> _Plan:
    _check_str("program", program)
    _check_str("setup_code", setup_code)
    return _assert_plan(program, _as_test_list(tests), setup_code, timeout_s)


def _humaneval_plan(prompt: str, completion: str, test: str, entry_point: str, timeout_s: float = 10.0) -> _Plan:
    for name, value in (("prompt", prompt), ("completion", completion), ("test", test), ("entry_point", entry_point)):
        _check_str(name, value)
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
    return _assert_plan(prompt + completion, [f"{test}\ncheck({entry_point})\n"], "", timeout_s)


def normalize_output(text: str) -> list[str]:
    """Whitespace-normalised output: the sequence of whitespace-separated tokens (line breaks ignored)."""
    return text.split()


def _stdio_plan(program: str, cases: Sequence[tuple[str, str]], timeout_s: float = 10.0) -> _Plan:
    _check_str("program", program)
    if not cases:
        raise ValueError("cases must not be empty")
    for index, case in enumerate(cases):
        if len(case) != 2 or not all(isinstance(part, str) for part in case):
            raise TypeError(f"cases[{index}] must be a (stdin, expected_stdout) pair of str")
    runs = [{"source": program, "stdin": case_input, "timeout_s": timeout_s} for case_input, _ in cases]

    def score(results: list[SandboxResult]) -> CodeResult:
        _raise_if_unavailable(results)
        n_passed, status, tail = 0, "passed", ""
        for result, (_, expected) in zip(results, cases):
            if result.status == "ok" and normalize_output(result.stdout) == normalize_output(expected):
                n_passed += 1
            elif status == "passed":
                status = "wrong_answer" if result.status == "ok" else result.status
                tail = _tail(result) if result.status != "ok" else result.stdout[-_ERROR_TAIL_CHARS:]
        if status == "passed" and n_passed < len(cases):
            status = "failed"
        passed = n_passed == len(cases)
        return CodeResult(passed, status, n_passed, len(cases), tuple(r.reason for r in results), tail)

    return _Plan(runs, score)


def _run_sequential(plan: _Plan, stop: Callable[[SandboxResult, int], bool] | None = None) -> CodeResult:
    results: list[SandboxResult] = []
    for index, run in enumerate(plan.runs):
        results.append(run_program(**run))
        if stop is not None and stop(results[-1], index):
            break
    return plan.score(results)


def check_assert_tests(program: str, tests: list[str] | str, *, setup_code: str = "",
                       timeout_s: float = 10.0) -> CodeResult:
    """MBPP-style: run program, setup_code, then each assert. passed only if all pass and the run exits cleanly.

    A single str is one test block (n_total = 1).
    """
    return _run_sequential(_assert_tests_plan(program, tests, setup_code=setup_code, timeout_s=timeout_s))


def check_humaneval(prompt: str, completion: str, test: str, entry_point: str, timeout_s: float = 10.0) -> CodeResult:
    """HumanEval: prompt + completion, then the task's test code and `check(entry_point)` (one test)."""
    return _run_sequential(_humaneval_plan(prompt, completion, test, entry_point, timeout_s))


def check_stdio(program: str, cases: list[tuple[str, str]], timeout_s: float = 10.0, *,
                stop_on_failure: bool = True) -> CodeResult:
    """CodeContests/TACO-style: feed each case's stdin and compare stdout token-wise with the expected output.

    All cases must pass. With stop_on_failure (default), cases after the first failure are not run (and not
    counted as passed). Each case gets its own timeout_s.
    """
    plan = _stdio_plan(program, cases, timeout_s)
    if not stop_on_failure:
        return _run_sequential(plan)

    def failed(result: SandboxResult, index: int) -> bool:
        return not (result.status == "ok"
                    and normalize_output(result.stdout) == normalize_output(cases[index][1]))

    return _run_sequential(plan, failed)


_PLANNERS: dict[str, Callable[..., _Plan]] = {
    "assert": _assert_tests_plan,
    "humaneval": _humaneval_plan,
    "stdio": _stdio_plan,
}


def batch_check(items: Sequence[Mapping[str, Any]], *, pool: SandboxPool | None = None,
                max_workers: int = 2) -> list[CodeResult]:
    """Run many checks in parallel through a SandboxPool; results come back in item order.

    Each item is {"kind": "assert" | "humaneval" | "stdio", **arguments of the matching check_* function}.
    stdio items run all their cases (there is no early stop). A pool is created and closed here unless one is given.
    """
    plans = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping) or item.get("kind") not in _PLANNERS:
            raise ValueError(f"items[{index}] must be a mapping with kind in {sorted(_PLANNERS)}")
        planner = _PLANNERS[item["kind"]]
        arguments = {key: value for key, value in item.items() if key != "kind"}
        try:
            inspect.signature(planner).bind(**arguments)
        except TypeError as exc:
            raise ValueError(f"items[{index}] ({item['kind']}): {exc}") from None
        plans.append(planner(**arguments))
    runs = [run for plan in plans for run in plan.runs]
    own_pool = pool is None
    active_pool = SandboxPool(max_workers) if own_pool else pool
    try:
        results = active_pool.run_many(runs)
    finally:
        if own_pool:
            active_pool.close()
    verdicts, offset = [], 0
    for plan in plans:
        verdicts.append(plan.score(results[offset:offset + len(plan.runs)]))
        offset += len(plan.runs)
    return verdicts


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product.

    n samples, c of them correct. 1 - C(n-c,k)/C(n,k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge
    binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be int, got {type(value).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n={n}, got {k}")
    if n - c < k:
        return 1.0
    survival = 1.0
    for i in range(n - c + 1, n + 1):
        survival *= 1.0 - k / i
    return 1.0 - survival
