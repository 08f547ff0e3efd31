"""IFEval (541 prompts with verifiable instructions), scored with lm-eval's own checkers used as a library.

`lm_eval.tasks.ifeval.utils.test_instruction_following_strict` / `..._loose` are called unchanged. Per record:
correct = prompt-level strict (all instructions followed), score = share of instructions followed (strict), and
extra holds the per-instruction strict and loose verdicts, from which the summary computes prompt-level loose and
instruction-level strict/loose accuracy exactly as lm-eval aggregates them.
Some checkers need NLTK data (e.g. `length_constraints:number_sentences` needs the `punkt` sentence tokenizer);
`check_ready` probes every instruction used by the selected items and fails before generation if any is missing.
Zero-shot in both formats ("fewshot" is the bare prompt): exemplar responses would carry their own instructions'
constraints into the response, and the 541 prompts are the only split.
"""
from __future__ import annotations

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
from forgetjax.eval.nltk_data import try_ensure_punkt_tab
from forgetjax.io import read_jsonl
from forgetjax.tasks.prompts import user_message
from forgetjax.tasks.readers import require_file, require_keys

IFEVAL_LIBRARY = "lm_eval.tasks.ifeval.utils"
PROBE_RESPONSE = "This is a short probe response. It has two sentences."


def missing_resource_name(error: LookupError) -> str:
    """The NLTK resource named in a LookupError message (ANSI colour codes removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"Resource\s+(\S+)\s+not found", text)
    return found.group(1) if found else "NLTK data"


def _input_example(item: Item) -> Any:
    from lm_eval.tasks.ifeval.utils import InputExample

    return InputExample(
        key=int(item.data["key"]),
        instruction_id_list=list(item.data["instruction_id_list"]),
        prompt=item.data["prompt"],
        kwargs=[dict(k) for k in item.data["kwargs"]],
    )


def follow_instructions(item: Item, response: str) -> tuple[list[bool], list[bool]]:
    """Per-instruction (strict, loose) verdicts from lm-eval's IFEval checkers."""
    try_ensure_punkt_tab()  # before lm-eval's ifeval import, which would otherwise try to download it
    from lm_eval.tasks.ifeval.utils import test_instruction_following_loose, test_instruction_following_strict

    example = _input_example(item)
    strict = test_instruction_following_strict(example, response)
    loose = test_instruction_following_loose(example, response)
    return [bool(v) for v in strict.follow_instruction_list], [bool(v) for v in loose.follow_instruction_list]


class IFEval(Benchmark):
    name = "ifeval"
    category = "instruction_following"
    kind = "generate"
    requires = (IFEVAL_LIBRARY,)
    description = "IFEval (541 prompts), strict/loose accuracy per prompt and per instruction"
    zero_shot_reason = "exemplar responses would carry other instructions' constraints; the 541 prompts are one split"

    def question(self, item: Item) -> str:
        return item.data["prompt"]

    def load(self, data_dir: str | Path) -> list[Item]:
        path = require_file(Path(data_dir) / "ifeval" / "input_data.jsonl")
        items = []
        for index, row in enumerate(read_jsonl(path)):
            require_keys(row, ("key", "prompt", "instruction_id_list", "kwargs"), f"{path} row {index}")
            if len(row["kwargs"]) != len(row["instruction_id_list"]):
                raise ValueError(f"{path} row {index}: kwargs and instruction_id_list differ in length")
            data = {k: row[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")}
            items.append(Item(id=str(row["key"]), category="ifeval", data=data))
        return items

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        return user_message(item.data["prompt"]) if fmt == "chat" else item.data["prompt"]

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        return GenerationSettings(max_new_tokens=1280)

    def check_ready(self, items: Sequence[Item]) -> None:
        """Probe each distinct instruction once; raise naming those whose checker lacks NLTK data."""
        probes: dict[str, Item] = {}
        for item in items:
            for position, instruction_id in enumerate(item.data["instruction_id_list"]):
                if instruction_id not in probes:
                    data = {
                        "key": item.data["key"],
                        "prompt": item.data["prompt"],
                        "instruction_id_list": [instruction_id],
                        "kwargs": [item.data["kwargs"][position]],
                    }
                    probes[instruction_id] = Item(id=item.id, category=item.category, data=data)
        missing = []
        for instruction_id, probe in sorted(probes.items()):
            try:
                follow_instructions(probe, PROBE_RESPONSE)
            except LookupError as err:
                missing.append(f"{instruction_id} (needs {missing_resource_name(err)})")
        if missing:
            raise RuntimeError(
                "ifeval: these instruction checkers need NLTK data that is not installed: "
                + "; ".join(missing)
                + ". Install it (e.g. `python -m nltk.downloader punkt_tab`) or leave ifeval out of the battery."
            )

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        response = output_texts(output)[0]
        strict, loose = follow_instructions(item, response)
        return {
            "correct": int(all(strict)),
            "score": sum(strict) / len(strict),
            "extracted_answer": None,
            "extra": {
                "instruction_ids": list(item.data["instruction_id_list"]),
                "strict": [int(v) for v in strict],
                "loose": [int(v) for v in loose],
                "prompt_strict": int(all(strict)),
                "prompt_loose": int(all(loose)),
            },
        }

    def summary_metrics(self, extras: Sequence[dict[str, Any]]) -> dict[str, float]:
        scored = [e for e in extras if "strict" in e]
        if not scored:
            return {}
        strict = [v for e in scored for v in e["strict"]]
        loose = [v for e in scored for v in e["loose"]]
        return {
            "prompt_strict": sum(e["prompt_strict"] for e in scored) / len(scored),
            "prompt_loose": sum(e["prompt_loose"] for e in scored) / len(scored),
            "inst_strict": sum(strict) / len(strict),
            "inst_loose": sum(loose) / len(loose),
        }


register(IFEval())
