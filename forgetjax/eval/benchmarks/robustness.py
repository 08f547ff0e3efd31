"""Robustness (CapTrack): the same multiple-choice item under deterministic surface perturbations.

`Perturbed(base, perturbations)` registers `<base>_robust` (family "robustness"): every item of the base benchmark
appears once per perturbation, with id "<item id>::<perturbation>" and `group_id` = the base item id, so a battery
`limit` counts base items and keeps all of an item's variants together. Perturbations (all fixed by the item id):

- "original": the item as the base benchmark shows it.
- "shuffled": the options rotated by a seeded offset in 1..k-1, so every option changes position (lettered
  benchmarks only: cloze benchmarks score the option texts, whose order the prompt does not show).
- "distractor": an irrelevant true sentence (DISTRACTORS) put before the question (a context perturbation).
- "reworded": the question preceded by one of REWORDINGS, a different wording of the request.

Each record's extra holds the base item (`source_item`), the perturbation and `semantic_choice`, the base-order index
of the option the model chose; an item is consistent when every variant has the same semantic choice
(`forgetjax.analysis.tables.robustness_table`). The prompts otherwise are the base benchmark's, in both formats.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from forgetjax.eval.benchmarks.base import Item, MultipleChoiceBenchmark, ScoringContext, stable_hash
from forgetjax.eval.benchmarks.registry import get_benchmark, register
from forgetjax.eval.engine import Prompt

PERTURBATIONS = ("original", "shuffled", "distractor", "reworded")
DISTRACTORS = (
    "The Pacific is the largest of Earth's oceans.",
    "A week has seven days.",
    "Honey is made by bees from flower nectar.",
    "The violin is a string instrument.",
    "Chess is played on a board of sixty-four squares.",
    "Mount Everest lies in the Himalayas.",
    "Penguins live mostly in the Southern Hemisphere.",
    "Paper is usually made from wood pulp.",
    "The Moon orbits the Earth roughly once a month.",
    "A triangle has three sides.",
    "Copper conducts electricity well.",
    "Tea is brewed from the leaves of a plant.",
)
REWORDINGS = (
    "Please answer the following question.",
    "Here is a question for you.",
    "Consider this question carefully.",
    "Pick the best answer to the question below.",
)
SEPARATOR = "::"


def rotation(n_options: int, item_id: str) -> list[int]:
    """Shown position i holds base option order[i]: a rotation by an offset in 1..n-1 fixed by the item id."""
    if n_options < 2:
        raise ValueError(f"an item needs at least 2 options to shuffle, got {n_options}")
    offset = 1 + stable_hash("robust-shuffle", item_id) % (n_options - 1)
    return [(i + offset) % n_options for i in range(n_options)]


def perturb(data: dict[str, Any], item_id: str, perturbation: str) -> dict[str, Any]:
    """The item data shown under one perturbation, with `option_order` (shown index -> base index)."""
    n_options = len(data["options"])
    out = {**data, "option_order": list(range(n_options))}
    if perturbation == "original":
        return out
    if perturbation == "shuffled":
        order = rotation(n_options, item_id)
        out["options"] = [data["options"][j] for j in order]
        out["answer"] = order.index(int(data["answer"]))
        out["option_order"] = order
        return out
    if perturbation == "distractor":
        sentence = DISTRACTORS[stable_hash("robust-distractor", item_id) % len(DISTRACTORS)]
        out["question"] = f"{sentence} {data['question']}"
        return out
    if perturbation == "reworded":
        prefix = REWORDINGS[stable_hash("robust-reworded", item_id) % len(REWORDINGS)]
        out["question"] = f"{prefix} {data['question']}"
        return out
    raise ValueError(f"unknown perturbation {perturbation!r}; known: {PERTURBATIONS}")


class Perturbed(MultipleChoiceBenchmark):
    """A multiple-choice benchmark's items under PERTURBATIONS; prompts, options and scoring are the base's."""

    category = "robustness"

    def __init__(self, base_name: str, perturbations: Sequence[str]) -> None:
        base = get_benchmark(base_name)
        if not isinstance(base, MultipleChoiceBenchmark):
            raise TypeError(f"{base_name} is not a multiple-choice benchmark")
        unknown = sorted(set(perturbations) - set(PERTURBATIONS))
        if unknown or "original" not in perturbations:
            raise ValueError(f"perturbations must include 'original' and come from {PERTURBATIONS}: {unknown}")
        if "shuffled" in perturbations and not base.letter_options:
            raise ValueError(f"{base_name} scores option texts: shuffling its options changes nothing it shows")
        self.base = base
        self.perturbations = tuple(perturbations)
        self.name = f"{base.name}_robust"
        self.k = base.k
        self.letter_options = base.letter_options
        self.default_shots = base.default_shots
        self.shot_source = base.shot_source
        self.zero_shot_reason = base.zero_shot_reason
        self.requires = base.requires
        self.description = (f"{base.name} items under {', '.join(self.perturbations)} (CapTrack robustness); limit "
                            f"counts base items")

    def load(self, data_dir: str | Path) -> list[Item]:
        items = []
        for item in self.base.load(data_dir):
            for perturbation in self.perturbations:
                data = {**perturb(dict(item.data), item.id, perturbation), "source_item": item.id,
                        "perturbation": perturbation}
                items.append(Item(id=f"{item.id}{SEPARATOR}{perturbation}", category=item.category, data=data))
        return items

    def group_id(self, item: Item) -> str:
        return item.data["source_item"]

    def question(self, item: Item) -> str:
        return self.base.question(item)

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        return self.base.build_prompt(item, fmt, n_shots)

    def option_requests(self, item: Item, fmt: str, n_shots: int | None = None) -> list[tuple[Prompt, str]]:
        return self.base.option_requests(item, fmt, n_shots)

    def continuations(self, item: Item, fmt: str) -> list[str]:
        return self.base.continuations(item, fmt)

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        result = self.base.score(item, output, ctx)
        result["extra"].update(source_item=item.data["source_item"], perturbation=item.data["perturbation"],
                               semantic_choice=int(item.data["option_order"][result["chosen_option"]]))
        return result


register(Perturbed("mmlu", PERTURBATIONS))
register(Perturbed("arc_challenge", ("original", "distractor", "reworded")))
