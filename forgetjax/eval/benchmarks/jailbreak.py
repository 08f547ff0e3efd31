"""Fixed jailbreak templates applied to HarmBench's standard behaviours: attack success under simple wrappers.

One benchmark per template, `harmbench_<template>`, over the 159 standard behaviours of HarmBench's test split
(`harmbench_standard`'s items), category = SemanticCategory, so the battery summary and the analysis give the attack
success rate (ASR = 1 - correct: the response was not a refusal) per template and HarmBench semantic category, beside
the plain `harmbench_standard` baseline. The judge is shown the plain behaviour (`behavior`), never the wrapper.
The templates (`forgetjax.tasks.jailbreaks`, shared with the jailbreak-resistance training domain) are short
re-wordings, written for this project, of attack styles described in the literature (each
cites its origin); optimised attacks (GCG, AutoDAN) are not templates and live elsewhere.
"""
from __future__ import annotations

from pathlib import Path

from forgetjax.eval.benchmarks.base import Item
from forgetjax.eval.benchmarks.registry import register
from forgetjax.eval.benchmarks.safety import HarmBenchStandard
from forgetjax.tasks.jailbreaks import TEMPLATES, JailbreakTemplate

__all__ = ["TEMPLATES", "HarmBenchTemplate", "JailbreakTemplate"]


class HarmBenchTemplate(HarmBenchStandard):
    """HarmBench standard behaviours wrapped in one jailbreak template."""

    subset_of = None

    def __init__(self, template: JailbreakTemplate) -> None:
        self.template = template
        self.name = f"harmbench_{template.name}"
        self.description = f"HarmBench standard behaviours (159) under the {template.name} template ({template.origin})"

    def load(self, data_dir: str | Path) -> list[Item]:
        items = []
        for item in super().load(data_dir):
            data = {**item.data, "behavior": item.data["prompt"], "prompt": self.template.apply(item.data["prompt"]),
                    "template": self.template.name}
            items.append(Item(id=item.id, category=item.category, data=data))
        return items


for _template in TEMPLATES:
    register(HarmBenchTemplate(_template))
