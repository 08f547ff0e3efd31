"""Open-domain QA and reasoning: NQ-open (dev, 3,610), TriviaQA (DPR's unfiltered-validation test, 11,313) and
BIG-Bench Hard (27 tasks, 6,511 examples).

Open QA (NQ-open, TriviaQA): the short answer (`extract_short_answer`) is correct when its SQuAD-normalised form equals
any reference answer; `score` is the best token F1. Few-shot prompts are "Q: <question>?\nA: <answer>" blocks, 5 by
default. NQ-open's shots come from the EfficientQA dev file, which is disjoint from NQ-open dev. TriviaQA's file is
its only split, so 8 questions are held apart by a seeded split (`stable_sample`) as its exemplar pool and never
evaluated (11,305 items in both formats). The QA domain trains on EfficientQA (NQ-style questions), so NQ-open is its
near target and TriviaQA (trivia-quiz questions) its far one.
BBH: exact match on the final answer (`bbh_match`), category per task. The chain-of-thought exemplar files are not in
the data pack and BBH has no train split, so 3 examples per task are held apart by a seeded split as that task's
answer-only exemplars ("Q: <input>\nA: <target>", the paper's answer-only prompting) and never evaluated (6,430
items in both formats).
"""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from typing import Any

from forgetjax.eval.benchmarks.base import (
    Benchmark,
    GenerationSettings,
    Item,
    ScoringContext,
    check_format,
    output_texts,
    stable_sample,
)
from forgetjax.eval.benchmarks.math import sample_outcome
from forgetjax.eval.benchmarks.registry import register
from forgetjax.errors import UserError
from forgetjax.eval.engine import Prompt
from forgetjax.io import read_jsonl
from forgetjax.tasks.prompts import QA_TEMPLATE, question_mark, render_prompt, user_message
from forgetjax.tasks.readers import require_file, require_keys

QA_VERIFIER = "forgetjax.verifiers.qa"
NQ_SHOT_POOL = 8
TRIVIAQA_SHOT_POOL = 8
BBH_SHOTS_PER_TASK = 3

BBH_TASKS = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)


class OpenQA(Benchmark):
    """Short-answer questions with answer lists; subclasses load items with data question/answers/shots."""

    category = "knowledge"
    kind = "generate"
    requires = (QA_VERIFIER,)
    default_shots = 5

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        question = question_mark(item.data["question"])
        if fmt == "chat":
            return user_message(render_prompt(QA_TEMPLATE, question))
        blocks = [f"Q: {question_mark(q)}\nA: {a}" for q, a in self.exemplars(item, n_shots)]
        blocks.append(f"Q: {question}\nA:")
        return "\n\n".join(blocks)

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        return GenerationSettings(max_new_tokens=32, stop=() if fmt == "chat" else ("\n",))

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        from forgetjax.verifiers.qa import exact_match, extract_short_answer, token_f1

        texts = output_texts(output)
        answers = item.data["answers"]
        predictions = [extract_short_answer(t) for t in texts]
        outcome = sample_outcome([bool(exact_match(p, answers)) for p in predictions])
        outcome["extracted_answer"] = predictions[0]
        outcome["extra"]["f1"] = float(token_f1(predictions[0], answers))
        return outcome

    def summary_metrics(self, extras: list[dict[str, Any]]) -> dict[str, float]:
        f1 = [e["f1"] for e in extras if "f1" in e]
        return {"f1": sum(f1) / len(f1)} if f1 else {}


class NQOpen(OpenQA):
    name = "nq_open"
    description = "Natural Questions-Open dev (3,610), normalised exact match against any answer"
    shot_source = "EfficientQA dev (NQ-style questions disjoint from NQ-open dev), fixed pool of 8"

    def load(self, data_dir: str | Path) -> list[Item]:
        data_dir = Path(data_dir)
        path = require_file(data_dir / "nq_open" / "NQ-open.dev.jsonl")
        shot_rows = read_jsonl(require_file(data_dir / "nq_open" / "NQ-open.efficientqa.dev.1.1.jsonl"))
        pool = stable_sample(shot_rows, NQ_SHOT_POOL, "nq-efficientqa-shots", key=lambda r: r["question"])
        shots = tuple((r["question"], r["answer"][0]) for r in pool)
        items = []
        for index, row in enumerate(read_jsonl(path)):
            require_keys(row, ("question", "answer"), f"{path} row {index}")
            if not isinstance(row["answer"], list) or not row["answer"]:
                raise ValueError(f"{path} row {index}: 'answer' must be a non-empty list")
            data = {"question": row["question"], "answers": list(row["answer"]), "shots": shots}
            items.append(Item(id=f"dev-{index:04d}", category="nq_open", data=data))
        return items


def read_triviaqa(path: Path) -> list[tuple[str, list[str]]]:
    """(question, aliases) rows of DPR's TriviaQA tsv: the question, then a Python-literal list of answer strings."""
    rows = []
    with open(require_file(path), encoding="utf-8", newline="") as handle:
        for index, row in enumerate(csv.reader(handle, delimiter="\t")):
            if len(row) != 2:
                raise UserError(f"{path} row {index}: expected 2 tab-separated columns, got {len(row)}")
            try:
                answers = ast.literal_eval(row[1])
            except (ValueError, SyntaxError) as err:
                raise UserError(f"{path} row {index}: the answer column is not a Python list literal ({err})") from err
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise UserError(f"{path} row {index}: answers must be a non-empty list of strings, got {row[1]!r}")
            rows.append((row[0], answers))
    return rows


class TriviaQA(OpenQA):
    name = "triviaqa"
    description = "TriviaQA unfiltered validation (DPR test, 11,313 less 8 held-apart shots), exact match on aliases"
    shot_source = "8 TriviaQA questions held apart by a seeded split (the pack has one split)"

    def load(self, data_dir: str | Path) -> list[Item]:
        rows = read_triviaqa(Path(data_dir) / "triviaqa" / "dpr_trivia_test.qa.tsv")
        held_apart = stable_sample(rows, TRIVIAQA_SHOT_POOL, "triviaqa-held-apart-shots", key=lambda r: r[0])
        shots = tuple((question, answers[0]) for question, answers in held_apart)
        held_questions = {question for question, _ in held_apart}
        return [Item(id=f"test-{index:05d}", category="triviaqa",
                     data={"question": question, "answers": answers, "shots": shots})
                for index, (question, answers) in enumerate(rows) if question not in held_questions]


class BBH(Benchmark):
    name = "bbh"
    category = "reasoning"
    kind = "generate"
    requires = (QA_VERIFIER,)
    default_shots = BBH_SHOTS_PER_TASK
    description = "BIG-Bench Hard, 27 tasks (6,511 less 3 held-apart shots per task), exact match on the final answer"
    shot_source = "3 examples per task held apart by a seeded split (no train split or CoT prompts in the pack)"

    def load(self, data_dir: str | Path) -> list[Item]:
        items = []
        for task in BBH_TASKS:
            path = require_file(Path(data_dir) / "bbh" / f"{task}.json")
            with open(path, encoding="utf-8") as handle:
                payload = json.load(handle)
            if "examples" not in payload:
                raise KeyError(f"{path}: missing field 'examples'")
            for index, example in enumerate(payload["examples"]):
                require_keys(example, ("input", "target"), f"{path} example {index}")
            held_apart = stable_sample(payload["examples"], BBH_SHOTS_PER_TASK, f"bbh-held-apart-shots/{task}",
                                       key=lambda e: e["input"])
            shots = tuple((e["input"], e["target"]) for e in held_apart)
            held_inputs = {e["input"] for e in held_apart}
            for index, example in enumerate(payload["examples"]):
                if example["input"] not in held_inputs:
                    data = {"input": example["input"], "target": example["target"], "shots": shots}
                    items.append(Item(id=f"{task}/{index:03d}", category=task, data=data))
        return items

    def question(self, item: Item) -> str:
        return item.data["input"]

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        question = item.data["input"]
        if fmt == "chat":
            return user_message(
                f"{question}\n\nThink step by step if needed, then finish with \"So the answer is <answer>.\""
            )
        blocks = [f"Q: {q}\nA: {a}" for q, a in self.exemplars(item, n_shots)]
        return "\n\n".join([*blocks, f"Q: {question}\nA:"])

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        stop = () if fmt == "chat" else ("\n\nQ:", "\nQ:")
        return GenerationSettings(max_new_tokens=512, stop=stop)

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        from forgetjax.verifiers.qa import bbh_extract, bbh_match

        texts = output_texts(output)
        target = item.data["target"]
        outcome = sample_outcome([bool(bbh_match(t, target)) for t in texts])
        outcome["extracted_answer"] = bbh_extract(texts[0], target)
        outcome["extra"]["target"] = target
        return outcome


register(NQOpen())
register(TriviaQA())
register(BBH())
