"""Default behaviour (CapTrack): how a model answers neutral requests, measured as drift before -> after.

`neutral_prompts` (family "default_behaviour") holds NEUTRAL_PROMPTS, everyday requests written for this module
with no instruction about length, format or tone, so the response shows the model's defaults. Records carry the
output only (no correctness: `correct` and `score` are None, so the items never enter accuracy or forgetting); the
analysis measures the style features of each response (`forgetjax.analysis.policy.style_features`: length,
markdown, list lines, hedging, non-English text, apologies) and their drift from the baseline
(`forgetjax.analysis.tables.style_drift_table`). Zero-shot in both formats: exemplar responses would set the style
being measured; "fewshot" is the bare request followed by "Response:".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from forgetjax.eval.benchmarks.base import Benchmark, GenerationSettings, Item, ScoringContext, check_format
from forgetjax.eval.benchmarks.base import output_texts
from forgetjax.eval.benchmarks.registry import register
from forgetjax.eval.engine import Prompt
from forgetjax.tasks.prompts import user_message

NEUTRAL_PROMPTS = (
    ("explain", "Explain how a rainbow forms."),
    ("explain", "Why do leaves change colour in autumn?"),
    ("explain", "How does a refrigerator keep food cold?"),
    ("explain", "What causes the tides?"),
    ("explain", "How do vaccines help the body fight disease?"),
    ("explain", "Why is the sky blue?"),
    ("explain", "How does a bicycle stay upright when it moves?"),
    ("explain", "What is inflation in economics?"),
    ("advice", "How can I get better at remembering names?"),
    ("advice", "What should I pack for a weekend camping trip?"),
    ("advice", "How do I start learning to play the guitar?"),
    ("advice", "Give me some tips for a job interview."),
    ("advice", "How can I keep houseplants healthy?"),
    ("advice", "What is a good way to start running?"),
    ("advice", "How should I prepare for a long flight?"),
    ("advice", "How do I make my mornings less rushed?"),
    ("describe", "Describe a busy market in the morning."),
    ("describe", "Describe the city of Paris to someone who has never been there."),
    ("describe", "What is a typical breakfast in Japan?"),
    ("describe", "Tell me about the history of the bicycle."),
    ("describe", "Describe how bread is made."),
    ("describe", "What is the game of cricket?"),
    ("describe", "Tell me about the planet Mars."),
    ("describe", "What does a librarian do?"),
    ("opinion", "Is it better to read books on paper or on a screen?"),
    ("opinion", "What makes a good teacher?"),
    ("opinion", "Should children learn a second language?"),
    ("opinion", "What is the best season of the year?"),
    ("opinion", "Are cats or dogs better pets?"),
    ("opinion", "Is it worth learning to cook?"),
    ("opinion", "What makes a city pleasant to live in?"),
    ("opinion", "Why do people enjoy music?"),
    ("create", "Write a short story about a lost umbrella."),
    ("create", "Write a poem about the sea."),
    ("create", "Write a thank-you note to a neighbour who watered my plants."),
    ("create", "Suggest a name for a small bakery."),
    ("create", "Write a product description for a wooden chair."),
    ("create", "Invent a simple board game and explain it."),
    ("create", "Write a short speech for a friend's birthday."),
    ("create", "Describe an imaginary animal."),
)
STYLE_MAX_NEW_TOKENS = 256


class NeutralPrompts(Benchmark):
    name = "neutral_prompts"
    category = "default_behaviour"
    kind = "generate"
    reads_data = False
    description = f"{len(NEUTRAL_PROMPTS)} neutral requests; style features of the answers, drift pre -> post"
    zero_shot_reason = "exemplar responses would set the style being measured"

    def question(self, item: Item) -> str:
        return item.data["prompt"]

    def load(self, data_dir: str | Path) -> list[Item]:
        return [Item(id=f"{index:03d}", category=kind, data={"prompt": prompt})
                for index, (kind, prompt) in enumerate(NEUTRAL_PROMPTS)]

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        check_format(fmt)
        self.n_shots(n_shots)
        if fmt == "chat":
            return user_message(item.data["prompt"])
        return f"{item.data['prompt']}\n\nResponse:"

    def generation_settings(self, fmt: str) -> GenerationSettings:
        check_format(fmt)
        return GenerationSettings(max_new_tokens=STYLE_MAX_NEW_TOKENS)

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        output_texts(output)
        return {"correct": None, "score": None, "extracted_answer": None, "extra": {}}


register(NeutralPrompts())
