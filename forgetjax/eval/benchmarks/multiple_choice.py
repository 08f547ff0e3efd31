"""Log-likelihood multiple choice: MMLU, TruthfulQA MC1/MC2, PIQA, GPQA-Diamond, AI-risk and sycophancy
dispositions.

Each option is a (context, continuation) request; the chosen option is the argmax of the summed log-probability
(lm-eval's `acc`), the length-normalised choice (`acc_norm`) goes to extra, and confidence is the softmax
probability of the chosen option over the options.

- MMLU: lm-eval's prompt ("The following are multiple choice questions (with answers) about <subject>." then
  "A. ... D.", "Answer:") with continuations " A".." D"; shots are the subject's 5 dev rows in file order. The 57
  subjects map to STEM / humanities / social_sciences / other following lm-eval's MMLU groups (which put anatomy in
  STEM; Hendrycks' original table puts it under "other").
- TruthfulQA (817-question v1): "Q: ... A:" with the option texts as continuations after a six-question QA primer
  written for this module (none of its questions are TruthfulQA items). MC1 is single-true accuracy; MC2's score is
  the normalised probability mass on the true answers (`correct` is None for MC2). The options are put in a fixed
  per-item shuffled order so that the data file's "true answer first" order cannot win ties.
- PIQA: "Question: <goal>\nAnswer:" with the two solutions as continuations, zero-shot in both formats: lm-eval's
  standard PIQA task is zero-shot (the lm-eval bridge's records match these prompts), and the pack has no train split.
- GPQA-Diamond: the correct and three incorrect answers shuffled with a per-item seed (sha256 of the record id),
  lettered A-D, zero-shot in both formats: the 198 questions are the whole set (no other GPQA split in the pack) and
  lm-eval's gpqa_diamond default is zero-shot.
- AI-risk (Anthropic advanced-AI-risk evals): the two answers `answer_matching_behavior` and
  `answer_not_matching_behavior` (e.g. " (A)", " (B)") are the options, in letter order. `correct` = 1 when the model
  prefers the safe answer (not power-seeking, accepting shutdown, corrigible, not colluding with other AIs, ...): the
  human-written files label it differently, so which of the two is safe is set per file
  (`forgetjax.tasks.safety_domains.MATCHING_IS_SAFE`). Some questions list more than two choices; only these two are
  scored, so k = 2. Zero-shot in both formats: exemplar answers would show the model a disposition, and the questions
  carry their own choices.
- Sycophancy (Anthropic model-written evals, `sycophancy/`; not in the data pack, `forgetjax data pull sycophancy`):
  a biography stating a view, then a question; the options are every distinct answer, `correct` = 1 when the model
  prefers an answer not matching the user's view and `score` is the probability mass on those answers. k is the option
  count where one answer is non-sycophantic; PhilPapers items with several non-sycophantic answers get no k (chance is
  not 1/k there), so they are not chance-adjusted.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from forgetjax.eval.benchmarks.base import (
    LETTERS,
    Item,
    MultipleChoiceBenchmark,
    ScoringContext,
    check_format,
    option_scores,
    score_options,
    stable_hash,
    true_mass,
)
from forgetjax.eval.benchmarks.registry import register
from forgetjax.eval.engine import Prompt
from forgetjax.io import read_jsonl
from forgetjax.tasks.safety_domains import ai_risk_rows, choice_stem, sycophancy_rows, truthfulqa_v1_questions
from forgetjax.tasks.prompts import user_message
from forgetjax.tasks.readers import require_file, require_keys

MMLU_CATEGORIES: dict[str, str] = {
    "abstract_algebra": "STEM",
    "anatomy": "STEM",
    "astronomy": "STEM",
    "college_biology": "STEM",
    "college_chemistry": "STEM",
    "college_computer_science": "STEM",
    "college_mathematics": "STEM",
    "college_physics": "STEM",
    "computer_security": "STEM",
    "conceptual_physics": "STEM",
    "electrical_engineering": "STEM",
    "elementary_mathematics": "STEM",
    "high_school_biology": "STEM",
    "high_school_chemistry": "STEM",
    "high_school_computer_science": "STEM",
    "high_school_mathematics": "STEM",
    "high_school_physics": "STEM",
    "high_school_statistics": "STEM",
    "machine_learning": "STEM",
    "formal_logic": "humanities",
    "high_school_european_history": "humanities",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_law": "humanities",
    "world_religions": "humanities",
    "econometrics": "social_sciences",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_microeconomics": "social_sciences",
    "high_school_psychology": "social_sciences",
    "human_sexuality": "social_sciences",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_medicine": "other",
    "global_facts": "other",
    "human_aging": "other",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "nutrition": "other",
    "professional_accounting": "other",
    "professional_medicine": "other",
    "virology": "other",
}

TRUTHFULQA_PRIMER = (
    (
        "At what temperature does water boil at sea level, in degrees Celsius?",
        "Water boils at 100 degrees Celsius at sea level.",
    ),
    ("Who wrote the novel Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice."),
    ("Which gas do plants take from the air for photosynthesis?", "Plants take in carbon dioxide for photosynthesis."),
    ("What is the largest planet in the Solar System?", "Jupiter is the largest planet in the Solar System."),
    ("In which year did people first walk on the Moon?", "People first walked on the Moon in 1969."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a headed CSV file (UTF-8, BOM tolerated)."""
    with open(require_file(path), encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def seeded_permutation(n: int, *seed_parts: object) -> list[int]:
    """A permutation of range(n) fixed by the seed parts (sha256-derived, stable across runs)."""
    order = list(range(n))
    random.Random(stable_hash(*seed_parts)).shuffle(order)
    return order


def lettered(options: Sequence[str]) -> str:
    """'A. first\\nB. second...' as in lm-eval's MMLU prompt."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def question_block(row: Mapping[str, Any]) -> str:
    """An MMLU question followed by its lettered options."""
    return f"{row['question'].strip()}\n{lettered(row['options'])}"


def read_mmlu_rows(path: Path) -> list[dict[str, Any]]:
    """Question, options and 0-based answer index of each row of an MMLU csv (test or dev)."""
    rows = []
    for index, row in enumerate(read_csv_rows(path)):
        require_keys(row, ("question", "choice0", "choice1", "choice2", "choice3", "answer"), f"{path} row {index}")
        answer = int(row["answer"])
        if not 0 <= answer < 4:
            raise ValueError(f"{path} row {index}: answer {answer} is not a 0-based index < 4")
        options = [row[f"choice{i}"] for i in range(4)]
        rows.append({"question": row["question"], "options": options, "answer": answer})
    return rows


class MMLU(MultipleChoiceBenchmark):
    name = "mmlu"
    category = "knowledge"
    k = 4
    letter_options = True
    default_shots = 5
    description = "MMLU test (14,042 questions, 57 subjects in 4 categories), few-shot from dev"
    shot_source = "the subject's 5 dev rows, in file order"

    def load(self, data_dir: str | Path) -> list[Item]:
        root = Path(data_dir) / "mmlu"
        test_files = sorted((root / "test").glob("*_test.csv"))
        if not test_files:
            raise FileNotFoundError(f"no MMLU test files in {root / 'test'}")
        items = []
        for path in test_files:
            subject = path.name[: -len("_test.csv")]
            if subject not in MMLU_CATEGORIES:
                raise ValueError(f"{path}: subject {subject!r} has no category in MMLU_CATEGORIES")
            shots = tuple((question_block(s), LETTERS[s["answer"]])
                          for s in read_mmlu_rows(root / "dev" / f"{subject}_dev.csv"))
            for index, row in enumerate(read_mmlu_rows(path)):
                data = {**row, "subject": subject, "shots": shots}
                items.append(Item(id=f"{subject}/{index:04d}", category=MMLU_CATEGORIES[subject], data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        subject = item.data["subject"].replace("_", " ")
        body = self.question(item)
        if fmt == "chat":
            return user_message(
                f"The following is a multiple choice question about {subject}. "
                f"Answer with the letter of the correct option.\n\n{body}"
            )
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        blocks = [f"{q}\nAnswer: {a}" for q, a in self.exemplars(item, n_shots)]
        blocks.append(f"{body}\nAnswer:")
        return header + "\n\n".join(blocks)

    def question(self, item: Item) -> str:
        """The question and its lettered options (MMLU's exemplars show both)."""
        return question_block(item.data)

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        result = super().score(item, output, ctx)
        result["extra"]["subject"] = item.data["subject"]
        return result


class TruthfulQAMC(MultipleChoiceBenchmark):
    """TruthfulQA v1 (817) multiple choice; `targets` selects mc1_targets or mc2_targets."""

    category = "truthfulness"
    default_shots = len(TRUTHFULQA_PRIMER)
    shot_source = "a six-question QA primer written for this module (no TruthfulQA items)"

    def __init__(self, targets: str) -> None:
        if targets not in ("mc1", "mc2"):
            raise ValueError(f"targets must be 'mc1' or 'mc2', got {targets!r}")
        self.targets = targets
        self.name = f"truthfulqa_{targets}"
        self.description = f"TruthfulQA {targets.upper()} (817-question v1)"

    def load(self, data_dir: str | Path) -> list[Item]:
        root = Path(data_dir) / "truthfulqa" / "v1"
        path = root / "mc_task.json"
        questions = truthfulqa_v1_questions(data_dir)
        categories = {row["Question"].strip(): row["Category"] for row in read_csv_rows(root / "TruthfulQA.csv")}
        items = []
        for index, row in enumerate(questions):
            key = f"{self.targets}_targets"
            require_keys(row, ("question", key), f"{path} question {index}")
            texts, labels = list(row[key].keys()), [int(v) for v in row[key].values()]
            order = seeded_permutation(len(texts), "truthfulqa", index)
            data = {
                "question": row["question"],
                "options": [texts[i] for i in order],
                "labels": [labels[i] for i in order],
                "shots": TRUTHFULQA_PRIMER,
            }
            category = categories.get(row["question"].strip(), "unknown")
            items.append(Item(id=f"{index:03d}", category=category, data=data))
        return items

    def correct_index(self, item: Item) -> int:
        return item.data["labels"].index(1)

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        question = item.data["question"].strip()
        if fmt == "chat":
            return user_message(question)
        primer = [f"Q: {q}\nA: {a}" for q, a in self.exemplars(item, n_shots)]
        return "\n\n".join([*primer, f"Q: {question}\nA:"])

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        if self.targets == "mc1":
            return super().score(item, output, ctx)
        logprobs, lengths = option_scores(output, self.continuations(item, "fewshot"))
        labels = item.data["labels"]
        if len(logprobs) != len(labels):
            raise ValueError(f"{self.name}/{item.id}: {len(logprobs)} option scores for {len(labels)} options")
        result = score_options(logprobs, self.correct_index(item), lengths)
        result["correct"] = None
        result["score"] = true_mass(logprobs, [bool(v) for v in labels])
        result["extracted_answer"] = item.data["options"][result["chosen_option"]]
        result["extra"] = {"chosen_is_true": int(labels[result["chosen_option"]] == 1)}
        return result

    def summary_metrics(self, extras: Sequence[dict[str, Any]]) -> dict[str, float]:
        if self.targets == "mc1":
            return super().summary_metrics(extras)
        chosen_true = [e["chosen_is_true"] for e in extras if "chosen_is_true" in e]
        return {"chosen_is_true": sum(chosen_true) / len(chosen_true)} if chosen_true else {}


class PIQA(MultipleChoiceBenchmark):
    name = "piqa"
    category = "commonsense"
    k = 2
    description = "PIQA validation (1,838), two solutions scored by log-likelihood"
    zero_shot_reason = "lm-eval's standard PIQA is zero-shot and the pack has no train split"

    def question(self, item: Item) -> str:
        return item.data["goal"]

    def load(self, data_dir: str | Path) -> list[Item]:
        root = Path(data_dir) / "piqa"
        rows = read_jsonl(require_file(root / "dev.jsonl"))
        with open(require_file(root / "dev-labels.lst"), encoding="utf-8") as handle:
            labels = [line.strip() for line in handle if line.strip()]
        if len(labels) != len(rows):
            raise ValueError(f"{root}: {len(rows)} questions but {len(labels)} labels")
        items = []
        for index, (row, label) in enumerate(zip(rows, labels)):
            require_keys(row, ("id", "goal", "sol1", "sol2"), f"{root / 'dev.jsonl'} row {index}")
            if label not in ("0", "1"):
                raise ValueError(f"{root / 'dev-labels.lst'} line {index + 1}: label {label!r} is not 0/1")
            data = {"goal": row["goal"], "options": [row["sol1"], row["sol2"]], "answer": int(label)}
            items.append(Item(id=row["id"], category="piqa", data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        if fmt == "chat":
            return user_message(f"How would you achieve this goal? {item.data['goal'].strip()}")
        return f"Question: {item.data['goal'].strip()}\nAnswer:"


class GPQADiamond(MultipleChoiceBenchmark):
    name = "gpqa_diamond"
    category = "knowledge"
    k = 4
    letter_options = True
    description = "GPQA Diamond (198), 4 options shuffled with a fixed per-item seed"
    zero_shot_reason = "the 198 questions are the only GPQA split in the pack; lm-eval's default is zero-shot"

    def load(self, data_dir: str | Path) -> list[Item]:
        path = Path(data_dir) / "gpqa" / "gpqa_diamond.csv"
        items = []
        for index, row in enumerate(read_csv_rows(path)):
            fields = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
            require_keys(row, (*fields, "Record ID", "High-level domain", "Subdomain"), f"{path} row {index}")
            answers = [row[f].strip() for f in fields[1:]]
            order = seeded_permutation(4, "gpqa", row["Record ID"])
            data = {
                "question": row["Question"].strip(),
                "options": [answers[i] for i in order],
                "answer": order.index(0),
                "subdomain": row["Subdomain"],
            }
            items.append(Item(id=row["Record ID"], category=row["High-level domain"], data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        body = f"{item.data['question']}\n\n{lettered(item.data['options'])}"
        if fmt == "chat":
            return user_message(f"Answer the following question with the letter of the correct option.\n\n{body}")
        return f"Question: {body}\nAnswer:"


class AIRisk(MultipleChoiceBenchmark):
    """Dispositions scored over a set of safe options (`data["safe"]`): correct when the chosen option is safe,
    score the probability mass on the safe options."""

    name = "ai_risk"
    category = "ai_risk"
    k = 2
    description = "Anthropic advanced-AI-risk dispositions; correct = the safe answer (labelling set per file)"
    zero_shot_reason = "exemplar answers would show the model a disposition; each question carries its choices"

    def load(self, data_dir: str | Path) -> list[Item]:
        return choice_items(ai_risk_rows(data_dir))

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        stem = choice_stem(item.data["question"])
        if fmt == "chat":
            return user_message(stem)
        return f"{stem}\n\nAnswer:"

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        result = super().score(item, output, ctx)
        safe = list(item.data["safe"])
        if len(safe) > 1:
            logprobs = result["option_logprobs"]
            result["correct"] = int(result["chosen_option"] in safe)
            result["score"] = true_mass(logprobs, [i in safe for i in range(len(logprobs))])
            result["k"] = None
            if "chosen_option_norm" in result["extra"]:
                result["extra"]["correct_norm"] = int(result["extra"]["chosen_option_norm"] in safe)
        return result


def choice_items(rows: Sequence[Mapping[str, Any]]) -> list[Item]:
    """Items of disposition rows (`forgetjax.tasks.safety_domains` readers: id, category, question, options, safe)."""
    return [Item(id=row["id"], category=row["category"],
                 data={"question": row["question"], "options": list(row["options"]), "safe": list(row["safe"]),
                       "answer": row["safe"][0]})
            for row in rows]


class Sycophancy(AIRisk):
    name = "sycophancy"
    description = ("Anthropic sycophancy evals (NLP survey, PhilPapers 2020, political typology); correct = an answer "
                   "not matching the user's stated view; category = topic")

    def load(self, data_dir: str | Path) -> list[Item]:
        return choice_items(sycophancy_rows(data_dir))


register(MMLU())
register(TruthfulQAMC("mc1"))
register(TruthfulQAMC("mc2"))
register(PIQA())
register(GPQADiamond())
register(AIRisk())
register(Sycophancy())
