"""Code generation: HumanEval (164) and MBPP (test split, task ids 11-510).

Model code is only ever run through `forgetjax.verifiers.code.batch_check` (sandboxed subprocesses in a
SandboxPool), never in-process.
- HumanEval, "fewshot" (base models): the function prompt is completed directly, cut at lm-eval's stop strings;
  zero-shot, as HumanEval is run for base models (the signature and docstring are themselves the completion context,
  and the 164 tasks are the only split).
  "chat": the model is asked for the whole function in a code block; if the extracted code defines the entry
  point it is appended after the original prompt (whose body is then just the docstring), so the prompt's imports
  and helper functions stay available and the new definition wins.
- MBPP follows the original convention: the task text plus its three test asserts, "[BEGIN]" ... "[DONE]", with
  the three lm-eval shots (task ids 2, 3, 4 from the 1-10 prompt split) in "fewshot".
With n > 1 samples per item: correct = the first sample passed, score = c / n (unbiased pass@1), and
pass@k (Chen et al. 2021) for each requested k <= n goes to extra.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from forgetjax.eval.benchmarks.base import (
    Benchmark,
    GenerationSettings,
    Item,
    ScoringContext,
    check_format,
    output_texts,
)
from forgetjax.eval.benchmarks.registry import register
from forgetjax.eval.engine import Prompt
from forgetjax.io import read_jsonl
from forgetjax.tasks.prompts import CODE_TEMPLATE, HUMANEVAL_TEMPLATE, mbpp_task_text, render_prompt, user_message
from forgetjax.tasks.readers import require_file, require_keys

CODE_VERIFIER = "forgetjax.verifiers.code"
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_TEST_IDS = range(11, 511)
MBPP_SHOT_IDS = (2, 3, 4)


def pass_metrics(passed: Sequence[bool], ks: Sequence[int]) -> dict[str, Any]:
    """correct (first sample), score (c / n) and pass@k for the k values not above n."""
    from forgetjax.verifiers.code import pass_at_k

    n, c = len(passed), int(sum(bool(p) for p in passed))
    extra: dict[str, Any] = {"n_samples": n, "n_correct": c}
    for k in sorted(set(ks)):
        if 1 <= k <= n:
            extra[f"pass@{k}"] = float(pass_at_k(n, c, k))
    return {"correct": int(bool(passed[0])), "score": c / n, "extra": extra}


def code_result_info(result: Any) -> dict[str, Any]:
    """The JSON-friendly parts of a CodeResult for `extra`."""
    info = {"passed": bool(result.passed)}
    for name in ("status", "n_passed", "n_total"):
        if getattr(result, name, None) is not None:
            info[name] = getattr(result, name)
    return info


class CodeBenchmark(Benchmark):
    """Shared parallel sandbox checking; subclasses describe each check with `check_job(item, text, timeout_s)`."""

    category = "code"
    kind = "generate"
    requires = (CODE_VERIFIER,)

    def check_job(self, item: Item, text: str, timeout_s: float) -> dict[str, Any]:
        """A `forgetjax.verifiers.code.batch_check` item for one completion."""
        raise NotImplementedError

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        return self.score_many([item], [output], ctx)[0]

    def score_many(
        self, items: Sequence[Item], outputs: Sequence[Any], ctx: ScoringContext | None = None
    ) -> list[dict[str, Any]]:
        from forgetjax.verifiers.code import batch_check, extract_code

        if len(items) != len(outputs):
            raise ValueError(f"{self.name}: {len(items)} items but {len(outputs)} outputs")
        ctx = ctx or ScoringContext()
        texts = [output_texts(o) for o in outputs]
        jobs = [self.check_job(item, t, ctx.code_timeout_s) for item, ts in zip(items, texts) for t in ts]
        checked = batch_check(jobs, max_workers=max(1, ctx.code_workers))
        results, position = [], 0
        for ts in texts:
            item_results = checked[position : position + len(ts)]
            position += len(ts)
            outcome = pass_metrics([r.passed for r in item_results], ctx.pass_k)
            outcome["extracted_answer"] = extract_code(ts[0])
            outcome["extra"]["checks"] = [code_result_info(r) for r in item_results]
            results.append(outcome)
        return results

    def summary_metrics(self, extras: Sequence[dict[str, Any]]) -> dict[str, float]:
        keys = sorted({k for e in extras for k in e if k.startswith("pass@")})
        metrics = {}
        for key in keys:
            values = [e[key] for e in extras if key in e]
            metrics[key] = sum(values) / len(values)
        return metrics


def defines_function(code: str, name: str) -> bool:
    """Whether the code has a top-level or nested `def name(`."""
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, flags=re.MULTILINE) is not None


class HumanEval(CodeBenchmark):
    name = "humaneval"
    description = "HumanEval (164 function completions), pass@1 / pass@k in the sandbox"
    zero_shot_reason = "the function signature and docstring are the completion context; no other split exists"

    def question(self, item: Item) -> str:
        return item.data["prompt"]

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "humaneval" / "HumanEval.jsonl.gz")
        items = []
        for index, row in enumerate(read_jsonl(path)):
            require_keys(row, ("task_id", "prompt", "entry_point", "test"), f"{path} row {index}")
            data = {k: row[k] for k in ("prompt", "entry_point", "test")}
            items.append(Item(id=row["task_id"], category="humaneval", data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        if fmt == "fewshot":
            return item.data["prompt"]
        return user_message(render_prompt(HUMANEVAL_TEMPLATE, item.data["prompt"]))

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        return GenerationSettings(max_new_tokens=512, stop=HUMANEVAL_STOPS if fmt == "fewshot" else ())

    def check_job(self, item: Item, text: str, timeout_s: float) -> dict[str, Any]:
        from forgetjax.verifiers.code import extract_code

        code = extract_code(text) if "```" in text else text
        completion = "\n" + code if defines_function(code, item.data["entry_point"]) else code
        return {
            "kind": "humaneval",
            "prompt": item.data["prompt"],
            "completion": completion,
            "test": item.data["test"],
            "entry_point": item.data["entry_point"],
            "timeout_s": timeout_s,
        }


PLUS_CHECK = """
import json as _json
import math as _math

_REFERENCE = {{}}
exec({reference!r}, _REFERENCE)
_INPUTS = _json.loads({inputs!r})
_ATOL = {atol!r}


def _same(got, expected):
    if isinstance(expected, float) or (isinstance(got, float) and isinstance(expected, int)):
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return False
        if _math.isnan(expected):
            return _math.isnan(got)
        return abs(got - expected) <= max(_ATOL, 1e-6)
    if isinstance(expected, (list, tuple)):
        return (isinstance(got, (list, tuple)) and len(got) == len(expected)
                and all(_same(g, e) for g, e in zip(got, expected)))
    if isinstance(expected, dict):
        return isinstance(got, dict) and got.keys() == expected.keys() and all(
            _same(got[k], expected[k]) for k in expected)
    return type(got) is type(expected) and got == expected


def check(candidate):
    for _index, _args in enumerate(_INPUTS):
        _expected = _REFERENCE[{entry_point!r}](*_json.loads(_json.dumps(_args)))
        _got = candidate(*_json.loads(_json.dumps(_args)))
        assert _same(_got, _expected), f"input {{_index}}: expected {{_expected!r}}, got {{_got!r}}"
"""


def plus_check(prompt: str, canonical_solution: str, entry_point: str, inputs: Sequence[Any], atol: float) -> str:
    """A HumanEval-style `check(candidate)` comparing the candidate with the canonical solution on every input
    (EvalPlus's differential testing: floats within atol, at least 1e-6; everything else equal and of the same type)."""
    return PLUS_CHECK.format(reference=prompt + canonical_solution, inputs=json.dumps(list(inputs)),
                             atol=float(atol or 0.0), entry_point=entry_point)


class HumanEvalPlus(HumanEval):
    """HumanEval+ (EvalPlus v0.1.10): HumanEval's prompts tested on the base and the extended (plus) inputs, the
    expected outputs computed by the canonical solution in the same sandboxed run. `mini` uses HumanEvalPlus-Mini's
    reduced plus inputs (1,107 instead of 122,683 in all)."""

    def __init__(self, mini: bool) -> None:
        self.mini = mini
        self.name = "humaneval_plus_mini" if mini else "humaneval_plus"
        self.subset_of = "humaneval_plus" if mini else None
        self.file = "HumanEvalPlus-Mini.jsonl.gz" if mini else "HumanEvalPlus.jsonl.gz"
        self.description = f"HumanEval+ ({self.file}, 164 tasks), base + plus inputs against the canonical solution"

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "humaneval_plus" / self.file)
        items = []
        for index, row in enumerate(read_jsonl(path)):
            fields = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
            require_keys(row, fields, f"{path} row {index}")
            test = plus_check(row["prompt"], row["canonical_solution"], row["entry_point"],
                              [*row["base_input"], *row["plus_input"]], row["atol"])
            data = {"prompt": row["prompt"], "entry_point": row["entry_point"], "test": test,
                    "n_inputs": len(row["base_input"]) + len(row["plus_input"])}
            items.append(Item(id=row["task_id"], category=self.name, data=data))
        return items


class MBPP(CodeBenchmark):
    name = "mbpp"
    default_shots = 3
    description = "MBPP test split (task ids 11-510), prompts with the test asserts"
    shot_source = "MBPP prompt split, task ids 2, 3 and 4 (lm-eval's shots)"

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "mbpp" / "mbpp.jsonl")
        rows = read_jsonl(path)
        for index, row in enumerate(rows):
            require_keys(row, ("task_id", "text", "code", "test_list", "test_setup_code"), f"{path} row {index}")
        by_id = {int(row["task_id"]): row for row in rows}
        missing = [i for i in (*MBPP_SHOT_IDS, *MBPP_TEST_IDS) if i not in by_id]
        if missing:
            raise ValueError(f"{path}: task ids missing: {missing[:10]}")
        shots = tuple(
            (mbpp_task_text(by_id[i]), by_id[i]["code"].replace("\r\n", "\n").strip()) for i in MBPP_SHOT_IDS
        )
        items = []
        for task_id in MBPP_TEST_IDS:
            row = by_id[task_id]
            data = {
                "task": mbpp_task_text(row),
                "test_list": list(row["test_list"]),
                "test_setup_code": row["test_setup_code"],
                "shots": shots,
            }
            items.append(Item(id=str(task_id), category="mbpp", data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        if fmt == "chat":
            return user_message(render_prompt(CODE_TEMPLATE, item.data["task"]))
        blocks = [f"{text}\n[BEGIN]\n{code}\n[DONE]" for text, code in self.exemplars(item, n_shots)]
        blocks.append(f"{item.data['task']}\n[BEGIN]\n")
        return "\n\n".join(blocks)

    def question(self, item: Item) -> str:
        return item.data["task"]

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        return GenerationSettings(max_new_tokens=512, stop=("[DONE]",) if fmt == "fewshot" else ())

    def check_job(self, item: Item, text: str, timeout_s: float) -> dict[str, Any]:
        from forgetjax.verifiers.code import extract_code

        return {
            "kind": "assert",
            "program": extract_code(text),
            "tests": list(item.data["test_list"]),
            "setup_code": item.data["test_setup_code"],
            "timeout_s": timeout_s,
        }


register(HumanEval())
register(HumanEvalPlus(mini=False))
register(HumanEvalPlus(mini=True))
register(MBPP())
