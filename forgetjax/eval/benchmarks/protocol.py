"""Protocol compliance (CapTrack): structured output that must follow a given JSON Schema.

`json_schema` (family "instruction_following", beside IFEval) asks for a JSON object under one of three schemas
(a profile of a subject, an answer with a confidence, a step plan; SCHEMAS), each over the subjects written for this
module (SUBJECTS): 36 items. The schema is shown in the prompt; zero-shot in both formats (an exemplar would show
the answer's shape). Scoring uses the `jsonschema` library (Draft 2020-12):

- the object: a fenced ```json block if the response has one, else the first `{` from which a JSON object decodes
  (`extract_json`);
- correct = that object validates against the item's schema (loose adherence); extra.strict = the whole response,
  stripped (and without one surrounding code fence), is exactly that object (strict adherence); extra.parsed = an
  object was found; extra.errors = the first validation messages.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from forgetjax.eval.benchmarks.base import Benchmark, GenerationSettings, Item, ScoringContext, check_format
from forgetjax.eval.benchmarks.base import output_texts
from forgetjax.eval.benchmarks.registry import register
from forgetjax.eval.engine import Prompt
from forgetjax.tasks.prompts import user_message

SCHEMAS: dict[str, dict[str, Any]] = {
    "profile": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "kind": {"type": "string", "enum": ["animal", "place", "object", "food"]},
            "facts": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
        },
        "required": ["name", "kind", "facts"],
        "additionalProperties": False,
    },
    "answer": {
        "type": "object",
        "properties": {
            "answer": {"type": "string"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    },
    "plan": {
        "type": "object",
        "properties": {
            "goal": {"type": "string"},
            "steps": {
                "type": "array",
                "minItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"n": {"type": "integer", "minimum": 1}, "action": {"type": "string"}},
                    "required": ["n", "action"],
                    "additionalProperties": False,
                },
            },
            "difficulty": {"type": "string", "enum": ["easy", "medium", "hard"]},
        },
        "required": ["goal", "steps", "difficulty"],
        "additionalProperties": False,
    },
}
SUBJECTS: dict[str, tuple[str, ...]] = {
    "profile": ("the elephant", "the city of Rome", "a teapot", "sourdough bread", "the penguin", "the Sahara",
                "a compass", "sushi", "the honeybee", "Mount Fuji", "a violin", "the mango"),
    "answer": ("What is the capital of Canada?", "How many legs does a spider have?", "Who wrote Hamlet?",
               "What gas do plants absorb from the air?", "What is the largest planet in the solar system?",
               "In which year did the first person walk on the Moon?", "What is the boiling point of water in "
               "Celsius at sea level?", "Which ocean lies between Africa and Australia?", "What is the chemical "
               "symbol for gold?", "How many continents are there?", "What language is spoken in Brazil?",
               "What is the square root of 81?"),
    "plan": ("bake a loaf of bread", "paint a bedroom", "learn to juggle", "plant a vegetable garden",
             "organise a birthday party", "repair a flat bicycle tyre", "write a short story", "train for a 5 km run",
             "move to a new flat", "set up a home aquarium", "learn basic chess openings", "clean out a garage"),
}
REQUESTS = {
    "profile": "Give a short profile of {subject}.",
    "answer": "Answer the question: {subject}",
    "plan": "Make a plan to {subject}.",
}
PROTOCOL_MAX_NEW_TOKENS = 256
_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)


def first_object(text: str) -> dict[str, Any] | None:
    """The first JSON object that decodes from a `{` of `text`, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def extract_json(text: str) -> tuple[dict[str, Any] | None, bool]:
    """(object, strict): the response's JSON object (from a fenced block first, else the first `{` from which one
    decodes) and whether the whole response, stripped and without one surrounding fence, is a JSON object."""
    stripped = text.strip()
    fenced = _FENCE.search(stripped)
    value = first_object(fenced.group(1)) if fenced else None
    if value is None:
        value = first_object(stripped)
    if value is None:
        return None, False
    whole = fenced.group(1).strip() if fenced and fenced.group(0) == stripped else stripped
    try:
        strict = isinstance(json.loads(whole), dict)
    except json.JSONDecodeError:
        strict = False
    return value, strict


def schema_errors(value: Any, schema: Mapping[str, Any], limit: int = 3) -> list[str]:
    """The first `limit` validation messages of `value` against `schema` (Draft 2020-12), empty when valid."""
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:limit]]


class JSONSchemaAdherence(Benchmark):
    name = "json_schema"
    category = "instruction_following"
    kind = "generate"
    reads_data = False
    requires = ("jsonschema",)
    description = f"{sum(map(len, SUBJECTS.values()))} requests for JSON under a given schema (3 schemas); loose/strict"
    zero_shot_reason = "an exemplar would show the answer's shape; the schema in the prompt is the instruction"

    def question(self, item: Item) -> str:
        return item.data["request"]

    def load(self, data_dir: str | Path) -> list[Item]:
        items = []
        for schema_name, subjects in SUBJECTS.items():
            for index, subject in enumerate(subjects):
                request = REQUESTS[schema_name].format(subject=subject)
                items.append(Item(id=f"{schema_name}/{index:02d}", category=schema_name,
                                  data={"request": request, "schema": schema_name}))
        return items

    def instruction(self, item: Item) -> str:
        schema = json.dumps(SCHEMAS[item.data["schema"]], separators=(", ", ": "))
        return f"{item.data['request']}\n\nReply with only a JSON object that follows this JSON Schema:\n{schema}"

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        self.n_shots(n_shots)
        if fmt == "chat":
            return user_message(self.instruction(item))
        return f"{self.instruction(item)}\n\nJSON:"

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        return GenerationSettings(max_new_tokens=PROTOCOL_MAX_NEW_TOKENS)

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        text = output_texts(output)[0]
        value, strict = extract_json(text)
        errors = schema_errors(value, SCHEMAS[item.data["schema"]]) if value is not None else ["no JSON object"]
        valid = value is not None and not errors
        return {"correct": int(valid), "score": float(valid), "extracted_answer": json.dumps(value) if value is not None else None,
                "extra": {"parsed": value is not None, "strict": bool(valid and strict), "errors": errors}}

    def summary_metrics(self, extras: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if not extras:
            return {}
        return {"parsed": sum(bool(e.get("parsed")) for e in extras) / len(extras),
                "strict": sum(bool(e.get("strict")) for e in extras) / len(extras)}


register(JSONSchemaAdherence())
