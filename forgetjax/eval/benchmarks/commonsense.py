"""Cloze-style multiple choice: ARC-Challenge / ARC-Easy, HellaSwag, WinoGrande, XWinograd.

The option texts are the continuations (lm-eval's formulation, informative for small models where lettered choices
sit at chance); `acc_norm` (length-normalised) goes to extra as for the other multiple-choice benchmarks. Each item
keeps its own option count, so the records' k (chance = 1/k) is per item: ARC has 3-5 options, HellaSwag 4, the
Winograd sets 2.

- ARC (AI2 Reasoning Challenge, ARC-V1-Feb2018 release): "Question: <stem>\\nAnswer:" with " <option>" continuations;
  the gold option is found by matching `answerKey` against the option labels (22 Challenge-test items use 1-4).
  Few-shot exemplars come from outside the test split: ARC-Challenge's train split, ARC-Easy's dev split (the pack
  has no Easy train file), a fixed sha256-ordered pool of 5.
- HellaSwag (validation, 10,042): lm-eval's preprocessing ("<activity label>: <ctx_a> <Ctx_b>", bracketed tags
  removed, " [title]" -> ". ") and the four endings as continuations; zero-shot, as lm-eval runs it (the pack holds
  only the validation split).
- WinoGrande (v1.1 dev, 1,267) and XWinograd (Tikhonov & Ryabinin's multilingual Winograd collection, 3,961; family
  multilingual, category = language): partial scoring as in lm-eval and the GPT-3 paper. Each option replaces the
  blank (WinoGrande's "_") or the pronoun (XWinograd's marked span) in its own context, and the shared rest of the
  sentence is the scored continuation. Zero-shot (lm-eval's default; the pack has no train split for either). In
  "chat" the sentence is shown with both options and the option texts are the continuations.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from forgetjax.eval.benchmarks.base import Item, MultipleChoiceBenchmark, check_format, stable_sample
from forgetjax.eval.benchmarks.registry import register
from forgetjax.eval.engine import Prompt
from forgetjax.io import read_jsonl
from forgetjax.tasks.prompts import user_message
from forgetjax.tasks.readers import require_file, require_keys

ARC_SHOT_POOL = 5
WINOGRAD_REASON = "lm-eval scores it zero-shot (partial scoring) and the pack has no train split"


def arc_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Question, option texts and gold index of an ARC jsonl row (answerKey matched against the labels)."""
    require_keys(row, ("id", "question", "answerKey"), where)
    choices = row["question"]["choices"]
    labels = [str(choice["label"]) for choice in choices]
    if str(row["answerKey"]) not in labels:
        raise ValueError(f"{where}: answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return {
        "question": row["question"]["stem"].strip(),
        "options": [choice["text"].strip() for choice in choices],
        "answer": labels.index(str(row["answerKey"])),
    }


class ARC(MultipleChoiceBenchmark):
    """One ARC set: `subset` is "Challenge" or "Easy"; the test split is evaluated."""

    category = "reasoning"
    k = 4
    default_shots = ARC_SHOT_POOL

    def __init__(self, subset: str, shot_split: str) -> None:
        self.subset = subset
        self.shot_split = shot_split
        self.name = f"arc_{subset.lower()}"
        self.description = f"ARC-{subset} test, options scored as continuations, k = 3-5 per item"
        self.shot_source = f"ARC-{subset} {shot_split} split, a fixed sha256-ordered pool of {ARC_SHOT_POOL}"

    def load(self, data_dir: str | Path) -> list[Item]:
        root = Path(data_dir) / "arc"
        shot_path = require_file(root / f"ARC-{self.subset}-{self.shot_split}.jsonl")
        shot_rows = [arc_row(row, f"{shot_path} row {i}") for i, row in enumerate(read_jsonl(shot_path))]
        pool = stable_sample(shot_rows, ARC_SHOT_POOL, f"arc-{self.subset}-shots", key=lambda r: r["question"])
        shots = tuple((r["question"], r["options"][r["answer"]]) for r in pool)
        path = require_file(root / f"ARC-{self.subset}-Test.jsonl")
        items = []
        for index, row in enumerate(read_jsonl(path)):
            data = {**arc_row(row, f"{path} row {index}"), "shots": shots}
            items.append(Item(id=row["id"], category=f"{len(data['options'])}_options", data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        if fmt == "chat":
            return user_message(item.data["question"])
        blocks = [f"Question: {q}\nAnswer: {a}" for q, a in self.exemplars(item, n_shots)]
        return "\n\n".join([*blocks, f"Question: {item.data['question']}\nAnswer:"])


def hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, " [title]" -> ". ", bracketed tags removed, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoiceBenchmark):
    name = "hellaswag"
    category = "commonsense"
    k = 4
    description = "HellaSwag validation (10,042), four endings scored as continuations"
    zero_shot_reason = "lm-eval's HellaSwag is zero-shot and the pack holds only the validation split"

    def question(self, item: Item) -> str:
        return item.data["context"]

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "hellaswag" / "hellaswag_val.jsonl.gz")
        items = []
        for index, row in enumerate(read_jsonl(path)):
            require_keys(row, ("ind", "activity_label", "ctx_a", "ctx_b", "endings", "label"), f"{path} row {index}")
            if len(row["endings"]) != 4 or not 0 <= int(row["label"]) < 4:
                raise ValueError(f"{path} row {index}: expected 4 endings and a label in 0-3")
            context = hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
            data = {"context": context, "options": [hellaswag_text(e) for e in row["endings"]],
                    "answer": int(row["label"])}
            items.append(Item(id=f"{index:05d}", category=row["activity_label"], data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        if fmt == "chat":
            return user_message(f"Continue the description with the most likely next sentence.\n\n"
                                f"{item.data['context']}")
        return item.data["context"]


class WinogradBenchmark(MultipleChoiceBenchmark):
    """Two options that fill a gap in `sentence` at [start, end): partial scoring in "fewshot"."""

    k = 2
    zero_shot_reason = WINOGRAD_REASON

    def question(self, item: Item) -> str:
        """The sentence up to the gap: the text every option's partial context starts with."""
        return item.data["sentence"][: item.data["span"][0]]

    def gap_text(self, item: Item) -> str:
        """How the gap is shown in the chat prompt."""
        start, end = item.data["span"]
        return item.data["sentence"][start:end]

    def rest(self, item: Item) -> str:
        """The sentence after the gap: the continuation scored for every option (lm-eval: " " + stripped rest)."""
        rest = item.data["sentence"][item.data["span"][1]:]
        return " " + rest.strip() if rest[:1].isspace() else rest.strip()

    def continuations(self, item: Item, fmt: str) -> list[str]:
        return [continuation for _, continuation in self.option_requests(item, fmt)]

    def option_requests(self, item: Item, fmt: str, n_shots: int | None = None) -> list[tuple[Prompt, str]]:
        """Chat: the question with each option text. Fewshot: each option in the gap as its own context, the rest
        of the sentence scored; a gap that ends the sentence (10 XWinograd items) scores the options themselves
        after the shared prefix."""
        check_format(fmt)
        self.n_shots(n_shots)
        options = item.data["options"]
        if fmt == "chat":
            prompt = self.build_prompt(item, fmt, n_shots)
            return [(prompt, option) for option in options]
        prefix, rest = self.question(item), self.rest(item)
        if rest:
            return [(prefix + option, rest) for option in options]
        space = " " if prefix[-1:].isspace() else ""
        return [(prefix.rstrip(), space + option) for option in options]

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        """The chat question; in "fewshot" the first option's partial context (each option has its own)."""
        check_format(fmt)
        self.n_shots(n_shots)
        if fmt == "fewshot":
            return self.option_requests(item, fmt)[0][0]
        first, second = item.data["options"]
        return user_message(f"{item.data['sentence']}\n\nIn this sentence, who or what does \"{self.gap_text(item)}\" "
                            f"refer to: {first} or {second}? Answer with the option only.")


class WinoGrande(WinogradBenchmark):
    name = "winogrande"
    category = "commonsense"
    description = "WinoGrande v1.1 dev (1,267), partial scoring of the two blank fillers"

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "winogrande" / "dev.jsonl")
        items = []
        for index, row in enumerate(read_jsonl(path)):
            where = f"{path} row {index}"
            require_keys(row, ("qID", "sentence", "option1", "option2", "answer"), where)
            if row["answer"] not in ("1", "2") or row["sentence"].count("_") != 1:
                raise ValueError(f"{where}: answer must be '1' or '2' and the sentence must hold one '_'")
            blank = row["sentence"].index("_")
            data = {"sentence": row["sentence"], "span": (blank, blank + 1),
                    "options": [row["option1"], row["option2"]], "answer": int(row["answer"]) - 1}
            items.append(Item(id=row["qID"], category="winogrande", data=data))
        return items

    def gap_text(self, item: Item) -> str:
        return "_"


def token_offsets(sentence: str, tokens: list[str]) -> list[tuple[int, int] | None]:
    """Character [start, end) of each token, found left to right in the sentence; None for a token the sentence
    writes differently (the tokenizer's `` and '' quotes)."""
    offsets: list[tuple[int, int] | None] = []
    position = 0
    for token in tokens:
        start = sentence.find(token, position)
        if start < 0:
            offsets.append(None)
            continue
        offsets.append((start, start + len(token)))
        position = start + len(token)
    return offsets


class XWinograd(WinogradBenchmark):
    name = "xwinograd"
    category = "multilingual"
    description = "XWinograd source collection (3,961: en, fr, jp, pt, ru, zh), partial scoring, category = language"

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "xwinograd" / "dataset.tsv")
        items = []
        with open(path, encoding="utf-8", newline="") as handle:
            for index, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)):
                where = f"{path} line {index + 1}"
                if len(row) != 7:
                    raise ValueError(f"{where}: expected 7 tab-separated columns, got {len(row)}")
                language, _, _, sentence, tokens, pronoun, candidates = row
                offsets = token_offsets(sentence, json.loads(tokens))
                pronoun_text, (first, last), _ = json.loads(pronoun)
                if offsets[first] is None or offsets[last - 1] is None:
                    raise ValueError(f"{where}: pronoun {pronoun_text!r} not found in the sentence")
                span = (offsets[first][0], offsets[last - 1][1])
                options = [candidate[0] for candidate in json.loads(candidates)]
                gold = [bool(candidate[3]) for candidate in json.loads(candidates)]
                if len(options) != 2 or sum(gold) != 1:
                    raise ValueError(f"{where}: expected two candidates with one correct")
                data = {"sentence": sentence, "span": span,
                        "options": options, "answer": gold.index(True)}
                items.append(Item(id=f"{language}/{index:04d}", category=language, data=data))
        return items


register(ARC("Challenge", "Train"))
register(ARC("Easy", "Dev"))
register(HellaSwag())
register(WinoGrande())
register(XWinograd())
