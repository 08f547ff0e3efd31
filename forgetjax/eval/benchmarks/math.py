"""Math word problems and competition math: GSM8K, MATH-500, MGSM (one benchmark per language).

Answers are extracted with `forgetjax.verifiers.math.extract_answer` and compared with the reference through the
battery's `MathGrader` (a process pool with real timeouts); without a grader, `is_equivalent` is called directly.
Few-shot shots ("Question: ...\nAnswer: <worked solution>"): GSM8K and MGSM use 5 worked solutions (lm-eval's GSM8K
default) from a fixed pool of 8 drawn from GSM8K *train* (MGSM is a translation of the first 250 GSM8K *test*
problems, so train shots never overlap it; the shots stay in English because MGSM's native exemplars are not in the
data pack). MATH-500 has no train split in the pack, so its 4 shots ("Problem:/Solution:") are short problems written
for this module (not MATH items). Word problems use 5 of the first 8 generated *train* problems.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from forgetjax.eval.benchmarks.base import (
    Benchmark,
    GenerationSettings,
    Item,
    ScoringContext,
    check_format,
    output_texts,
    stable_sample,
)
from forgetjax.eval.benchmarks.registry import register
from forgetjax.eval.engine import Prompt
from forgetjax.io import read_jsonl
from forgetjax.tasks.prompts import MATH_TEMPLATE, render_prompt, strip_calculator_annotations, user_message
from forgetjax.tasks.readers import require_file, require_keys

MATH_VERIFIER = "forgetjax.verifiers.math"
MAX_SHOT_POOL = 8
MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")

MATH_OWN_SHOTS = (
    ("What is the value of $3^2 + 4^2$?", "We have $3^2 + 4^2 = 9 + 16 = 25$. The final answer is $\\boxed{25}$."),
    (
        "Solve for $x$: $2x - 7 = 11$.",
        "Adding 7 to both sides gives $2x = 18$, so $x = 9$. The final answer is $\\boxed{9}$.",
    ),
    (
        "Simplify $\\frac{6}{8} + \\frac{1}{4}$.",
        "First $\\frac{6}{8} = \\frac{3}{4}$, and $\\frac{3}{4} + \\frac{1}{4} = 1$. The final answer is $\\boxed{1}$.",
    ),
    (
        "How many positive divisors does $12$ have?",
        "The divisors of 12 are 1, 2, 3, 4, 6 and 12, so there are 6. The final answer is $\\boxed{6}$.",
    ),
)

def grade_pairs(pairs: Sequence[tuple[str | None, str]], ctx: ScoringContext | None) -> list[bool]:
    """Equivalence of (prediction, reference) pairs; a missing prediction is wrong without grading."""
    from forgetjax.verifiers.math import is_equivalent

    to_grade = [(i, p, r) for i, (p, r) in enumerate(pairs) if p is not None and p.strip()]
    verdicts = [False] * len(pairs)
    if not to_grade:
        return verdicts
    if ctx is not None and ctx.math_grader is not None:
        graded = ctx.math_grader.grade_many([(p, r) for _, p, r in to_grade])
    else:
        graded = [is_equivalent(p, r) for _, p, r in to_grade]
    for (index, _, _), verdict in zip(to_grade, graded):
        verdicts[index] = bool(verdict)
    return verdicts


def sample_outcome(passed: Sequence[bool]) -> dict[str, Any]:
    """correct = the first sample's outcome; score = share of samples correct (pass@1 estimate)."""
    n_correct = int(sum(bool(p) for p in passed))
    extra: dict[str, Any] = {}
    if len(passed) > 1:
        extra = {"n_samples": len(passed), "n_correct": n_correct, "sample_correct": [int(p) for p in passed]}
    return {"correct": int(bool(passed[0])), "score": n_correct / len(passed), "extra": extra}


class MathBenchmark(Benchmark):
    """Shared prompt building and grading; subclasses load items with data question/reference/shots."""

    category = "math"
    kind = "generate"
    requires = (MATH_VERIFIER,)
    default_shots = 5
    max_new_tokens = 512
    shot_question_label = "Question"
    shot_answer_label = "Answer"

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        question = item.data["question"]
        if fmt == "chat":
            return user_message(render_prompt(MATH_TEMPLATE, question))
        q, a = self.shot_question_label, self.shot_answer_label
        blocks = [f"{q}: {sq}\n{a}: {sa}" for sq, sa in self.exemplars(item, n_shots)]
        blocks.append(f"{q}: {question}\n{a}:")
        return "\n\n".join(blocks)

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        stop = () if fmt == "chat" else (f"\n\n{self.shot_question_label}:", f"\n{self.shot_question_label}:")
        return GenerationSettings(max_new_tokens=self.max_new_tokens, stop=stop)

    def reference(self, item: Item) -> str:
        """The reference final answer."""
        return item.data["reference"]

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        return self.score_many([item], [output], ctx)[0]

    def score_many(
        self, items: Sequence[Item], outputs: Sequence[Any], ctx: ScoringContext | None = None
    ) -> list[dict[str, Any]]:
        from forgetjax.verifiers.math import extract_answer

        if len(items) != len(outputs):
            raise ValueError(f"{self.name}: {len(items)} items but {len(outputs)} outputs")
        texts = [output_texts(o) for o in outputs]
        flat = [(extract_answer(t), self.reference(item)) for item, ts in zip(items, texts) for t in ts]
        verdicts = iter(grade_pairs(flat, ctx))
        predictions = iter(p for p, _ in flat)
        results = []
        for item, ts in zip(items, texts):
            preds = [next(predictions) for _ in ts]
            outcome = sample_outcome([next(verdicts) for _ in ts])
            outcome["extracted_answer"] = preds[0]
            outcome["extra"]["reference"] = self.reference(item)
            results.append(outcome)
        return results


def load_gsm8k_shots(data_dir: Path) -> tuple[tuple[str, str], ...]:
    """A fixed pool of GSM8K train problems with their worked solutions (annotations stripped)."""
    rows = read_jsonl(require_file(data_dir / "gsm8k" / "train.jsonl"))
    chosen = stable_sample(rows, MAX_SHOT_POOL, "gsm8k-train-shots", key=lambda r: r["question"])
    return tuple((r["question"], strip_calculator_annotations(r["answer"])) for r in chosen)


class GSM8K(MathBenchmark):
    name = "gsm8k"
    description = "GSM8K test (1,319 grade-school word problems)"
    shot_source = "GSM8K train (fixed pool of 8 worked solutions)"

    def load(self, data_dir: str | Path) -> list[Item]:
        data_dir = Path(data_dir)
        path = require_file(data_dir / "gsm8k" / "test.jsonl")
        shots = load_gsm8k_shots(data_dir)
        items = []
        for index, row in enumerate(read_jsonl(path)):
            require_keys(row, ("question", "answer"), f"{path} row {index}")
            data = {"question": row["question"], "answer": row["answer"], "shots": shots}
            items.append(Item(id=f"test-{index:04d}", category="gsm8k", data=data))
        return items

    def reference(self, item: Item) -> str:
        """The number after '####' in the GSM8K solution (via the math verifier)."""
        from forgetjax.verifiers.math import gsm8k_reference

        return gsm8k_reference(item.data["answer"])


class MGSM(MathBenchmark):
    """One language of MGSM: tab-separated question and integer answer, read with quoting off. Family
    "multilingual", not "math": it measures the other languages, so a math-trained cell's forgetting of it is
    in-domain only because the math domain config lists it (`in_domain_benchmarks`)."""

    category = "multilingual"

    def __init__(self, language: str) -> None:
        self.language = language
        self.name = f"mgsm_{language}"
        self.description = f"MGSM ({language}), 250 translated GSM8K test problems"
        self.shot_source = "GSM8K train (English worked solutions; MGSM is translated GSM8K test)"

    def load(self, data_dir: str | Path) -> list[Item]:
        data_dir = Path(data_dir)
        path = require_file(data_dir / "mgsm" / f"mgsm_{self.language}.tsv")
        shots = load_gsm8k_shots(data_dir)
        items = []
        with open(path, encoding="utf-8", newline="") as handle:
            for index, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)):
                if len(row) != 2:
                    raise ValueError(f"{path} row {index}: expected 2 tab-separated columns, got {len(row)}")
                data = {"question": row[0], "reference": row[1].replace(",", "").strip(), "shots": shots}
                items.append(Item(id=f"{self.language}-{index:03d}", category=self.language, data=data))
        return items


class MATH500(MathBenchmark):
    name = "math500"
    description = "MATH-500 (PRM800K held-out subset), category per subject"
    default_shots = 4
    shot_source = "four problems written for this module (no MATH train split in the data pack)"
    max_new_tokens = 1024
    shot_question_label = "Problem"
    shot_answer_label = "Solution"

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "math500" / "test.jsonl")
        items = []
        for index, row in enumerate(read_jsonl(path)):
            require_keys(row, ("problem", "answer", "subject", "level", "unique_id"), f"{path} row {index}")
            data = {
                "question": row["problem"],
                "reference": row["answer"],
                "level": row["level"],
                "shots": MATH_OWN_SHOTS,
            }
            items.append(Item(id=row["unique_id"], category=row["subject"], data=data))
        return items


class WordProblems(MathBenchmark):
    """The held-out test split of forgetjax's generated word problems (the demo's training task); category one_step
    or two_step. Generated, so it needs no data files."""

    name = "word_problems"
    description = "Generated one- and two-step arithmetic word problems, test split (500)"
    shot_source = "generated train split (first 8 problems)"
    max_new_tokens = 256

    def load(self, data_dir: str | Path) -> list[Item]:
        from forgetjax.tasks.word_problems import word_problems
        from forgetjax.verifiers.math import gsm8k_reference

        shots = tuple((r["question"], r["answer"].replace("#### ", "The answer is ")) for r in
                      word_problems("train")[:MAX_SHOT_POOL])
        items = []
        for index, row in enumerate(word_problems("test")):
            steps = row["answer"].count("\n")
            data = {"question": row["question"], "reference": gsm8k_reference(row["answer"]), "shots": shots}
            items.append(Item(id=f"test-{index:04d}", category="one_step" if steps == 1 else "two_step", data=data))
        return items


register(GSM8K())
register(MATH500())
register(WordProblems())
for _language in MGSM_LANGUAGES:
    register(MGSM(_language))
