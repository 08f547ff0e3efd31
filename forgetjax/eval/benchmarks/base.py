"""Benchmark base classes, the registry, and the pure multiple-choice scoring math.

A `Benchmark` turns a data file into `Item`s with stable ids, builds prompts in two formats ("chat": messages for
the tokenizer's chat template; "fewshot": plain text for base models), carries default generation settings, and
scores one output per item. A study evaluates BASE starts in "fewshot" and SAFE (instruct) starts in "chat".

Few-shot exemplars are (question, answer) pairs in each item's `data["shots"]` pool, never evaluated items: each
benchmark's `shot_source` says where its pool comes from (a train/dev split, items held apart from the evaluated set
by a seeded split, or exemplars written for the module) and `default_shots` how many are used. A benchmark with an
empty `shot_source` is zero-shot in both formats by design (its `zero_shot_reason` says why); the "fewshot" format
is then the plain completion prompt a base model continues.

`Item.category` is the finer grouping inside a benchmark (MMLU macro-category, BBH task, MATH subject, XSTest
type, ...); `Benchmark.category` is the capability family (math, code, knowledge, ...).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from forgetjax.errors import UserError
from forgetjax.eval.engine import Generation, LoglikelihoodResult, Prompt

FORMATS = ("chat", "fewshot")
KINDS = ("generate", "multiple_choice", "safety")
FAMILIES = (
    "math",
    "multilingual",
    "code",
    "knowledge",
    "reasoning",
    "truthfulness",
    "commonsense",
    "instruction_following",
    "safety_refusal",
    "over_refusal",
    "ai_risk",
    "robustness",
    "default_behaviour",
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    """One benchmark example: a stable id, its category inside the benchmark, and the raw fields."""

    id: str
    category: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings for a generative benchmark (greedy by default)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()


@dataclass
class ScoringContext:
    """Shared scoring resources: a math grader (process pool), a safety judge, code-check parallelism."""

    math_grader: Any = None
    judge: Callable[[str, str], Any] | None = None
    code_workers: int = 2
    code_timeout_s: float = 10.0
    pass_k: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class MultipleChoiceOutput:
    """Engine results for the options of one item, aligned with the continuations that were scored."""

    results: list[LoglikelihoodResult]
    continuations: list[str] = field(default_factory=list)


def stable_hash(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts: identical across processes, machines and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def check_format(fmt: str) -> str:
    """Validate a prompt format name."""
    if fmt not in FORMATS:
        raise ValueError(f"prompt format (fmt) must be one of {FORMATS}, got {fmt!r}")
    return fmt


def output_texts(output: Generation | str | Sequence[str]) -> list[str]:
    """The sampled texts of a generative output (a Generation, a single text, or a list of texts)."""
    if isinstance(output, Generation):
        texts = list(output.texts)
    elif isinstance(output, str):
        texts = [output]
    elif isinstance(output, Sequence) and all(isinstance(t, str) for t in output):
        texts = list(output)
    else:
        raise TypeError(f"output must be a Generation, a str or a list of str, got {type(output)}")
    if not texts:
        raise ValueError("output has no texts")
    return texts


def log_softmax(logprobs: Sequence[float]) -> np.ndarray:
    """Option log-probabilities renormalised over the options (numerically stable)."""
    values = np.asarray(logprobs, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("option logprobs must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"option logprobs must be finite, got {values.tolist()}")
    shifted = values - values.max()
    return shifted - math.log(float(np.exp(shifted).sum()))


def score_options(
    option_logprobs: Sequence[float], correct_index: int, option_lengths: Sequence[int] | None = None
) -> dict[str, Any]:
    """Multiple-choice outcome from summed option log-probabilities.

    chosen = argmax of the summed log-probability (first index on ties); confidence = softmax probability of the
    chosen option over the options; the length-normalised variant (lm-eval's acc_norm: log-probability divided by
    the continuation's character length) goes to `extra`.
    """
    values = np.asarray(option_logprobs, dtype=np.float64)
    k = int(values.size)
    if not 0 <= correct_index < k:
        raise ValueError(f"correct_index {correct_index} out of range for {k} options")
    probs = np.exp(log_softmax(values))
    chosen = int(np.argmax(values))
    result: dict[str, Any] = {
        "option_logprobs": [float(v) for v in values],
        "chosen_option": chosen,
        "confidence": float(probs[chosen]),
        "k": k,
        "correct": int(chosen == correct_index),
        "score": float(probs[correct_index]),
        "extra": {"correct_option": int(correct_index)},
    }
    if option_lengths is not None:
        lengths = np.asarray(option_lengths, dtype=np.float64)
        if lengths.shape != values.shape or np.any(lengths <= 0):
            raise ValueError("option_lengths must be positive and match the options")
        chosen_norm = int(np.argmax(values / lengths))
        result["extra"]["chosen_option_norm"] = chosen_norm
        result["extra"]["correct_norm"] = int(chosen_norm == correct_index)
    return result


def true_mass(option_logprobs: Sequence[float], true_mask: Sequence[bool]) -> float:
    """TruthfulQA MC2: probability mass on the true answers after normalising over all answers."""
    mask = np.asarray(true_mask, dtype=bool)
    if mask.shape != (len(option_logprobs),):
        raise ValueError("true_mask must have one flag per option")
    if not mask.any() or mask.all():
        raise ValueError("true_mask needs at least one true and one false answer")
    probs = np.exp(log_softmax(option_logprobs))
    return float(probs[mask].sum())


class Benchmark:
    """Base class: subclasses set the class attributes and implement load / build_prompt / score."""

    name: str = ""
    category: str = ""
    kind: str = "generate"
    k: int | None = None
    default_shots: int = 0
    shot_source: str = ""
    zero_shot_reason: str = ""
    requires: tuple[str, ...] = ()
    description: str = ""
    subset_of: str | None = None  # a named subset of another benchmark's items (the `core` battery runs the whole)
    reads_data: bool = True  # False: the items are written in the module, no data-directory file is read

    def load(self, data_dir: str | Path) -> list[Item]:
        """Read the benchmark's items (stable ids) from the data directory."""
        raise NotImplementedError

    def build_prompt(self, item: Item, fmt: str, n_shots: int | None = None) -> Prompt:
        """Messages (fmt="chat") or plain few-shot text (fmt="fewshot") for the item."""
        raise NotImplementedError

    def generation_settings(self, fmt: str) -> GenerationSettings:
        """Default generation settings for the prompt format."""
        raise NotImplementedError(f"{self.name} is not a generative benchmark")

    def continuations(self, item: Item, fmt: str) -> list[str]:
        """The option continuations scored by log-likelihood (multiple choice only)."""
        raise NotImplementedError(f"{self.name} is not a multiple-choice benchmark")

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        """Score one output: keys are EvalRecord fields (extra as a dict)."""
        raise NotImplementedError

    def score_many(
        self, items: Sequence[Item], outputs: Sequence[Any], ctx: ScoringContext | None = None
    ) -> list[dict[str, Any]]:
        """Score a batch (subclasses override to grade in parallel)."""
        if len(items) != len(outputs):
            raise ValueError(f"{self.name}: {len(items)} items but {len(outputs)} outputs")
        return [self.score(item, output, ctx) for item, output in zip(items, outputs)]

    def group_id(self, item: Item) -> str:
        """The unit a battery `limit` counts and keeps whole: the item itself, or the base item of grouped variants."""
        return item.id

    def check_ready(self, items: Sequence[Item]) -> None:
        """Raise before any model time is spent if scoring these items cannot work (missing resources)."""

    def summary_metrics(self, extras: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Benchmark-specific aggregate metrics from the records' extra dicts (none by default)."""
        return {}

    def n_shots(self, requested: int | None) -> int:
        """The number of shots to use (the benchmark default when not requested); a zero-shot benchmark takes 0 only."""
        n = self.default_shots if requested is None else requested
        if n < 0:
            raise UserError(f"{self.name}: n_shots must be >= 0, got {n}")
        if n > 0 and not self.shot_source:
            raise UserError(f"{self.name}: n_shots must be 0, it is zero-shot by design ({self.zero_shot_reason})")
        return n

    def question(self, item: Item) -> str:
        """The item's question as an exemplar of the same benchmark would show it."""
        return item.data["question"]

    def exemplars(self, item: Item, n_shots: int | None = None) -> list[tuple[str, str]]:
        """The (question, answer) exemplars of the item's few-shot prompt: the first n_shots of its pool, skipping
        the item itself; more shots than the pool holds is an error naming the pool's source."""
        own = self.question(item).strip()
        pool = [shot for shot in item.data.get("shots", ()) if shot[0].strip() != own]
        n = self.n_shots(n_shots)
        if n > len(pool):
            source = self.shot_source or f"none: {self.zero_shot_reason}"
            raise UserError(f"{self.name}: n_shots={n} but its exemplar pool holds {len(pool)} (source: {source})")
        return pool[:n]


class MultipleChoiceBenchmark(Benchmark):
    """Options scored by log-likelihood; subclasses provide the context text and the options."""

    kind = "multiple_choice"
    letter_options: bool = False

    def options(self, item: Item) -> list[str]:
        """The answer options as shown to the model."""
        return list(item.data["options"])

    def correct_index(self, item: Item) -> int:
        """Index of the correct option."""
        return int(item.data["answer"])

    def option_requests(self, item: Item, fmt: str, n_shots: int | None = None) -> list[tuple[Prompt, str]]:
        """One (context, continuation) per option: the item's prompt with each continuation by default; partial
        scoring (WinoGrande) puts each option into its own context and scores the shared rest of the sentence."""
        prompt = self.build_prompt(item, fmt, n_shots)
        return [(prompt, continuation) for continuation in self.continuations(item, fmt)]

    def continuations(self, item: Item, fmt: str) -> list[str]:
        """Continuations " A", " B"... for lettered options, " <option text>" otherwise; no leading space in chat."""
        check_format(fmt)
        labels = [LETTERS[i] for i in range(len(self.options(item)))] if self.letter_options else self.options(item)
        prefix = " " if fmt == "fewshot" else ""
        return [prefix + label for label in labels]

    def score(self, item: Item, output: Any, ctx: ScoringContext | None = None) -> dict[str, Any]:
        logprobs, lengths = option_scores(output, self.continuations(item, "fewshot"))
        n_options = len(self.options(item))
        if len(logprobs) != n_options:
            raise ValueError(f"{self.name}/{item.id}: {len(logprobs)} option scores for {n_options} options")
        result = score_options(logprobs, self.correct_index(item), lengths)
        result["extracted_answer"] = option_label(result["chosen_option"], self.letter_options, self.options(item))
        return result

    def summary_metrics(self, extras: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        norm = [e["correct_norm"] for e in extras if "correct_norm" in e]
        return {"acc_norm": float(np.mean(norm))} if norm else {}


def option_label(index: int, letters: bool, options: Sequence[str]) -> str:
    """How a chosen option is written in `extracted_answer`: its letter or its text."""
    return LETTERS[index] if letters else options[index]


def continuation_lengths(continuations: Sequence[str]) -> list[int]:
    """Character lengths of the option texts (surrounding whitespace excluded), at least 1."""
    return [max(len(c.strip()), 1) for c in continuations]


def option_scores(output: Any, fallback_continuations: Sequence[str]) -> tuple[list[float], list[int]]:
    """Log-probabilities and character lengths from a MultipleChoiceOutput, results or plain floats."""
    if isinstance(output, MultipleChoiceOutput):
        continuations = output.continuations or list(fallback_continuations)
        return [float(r.logprob) for r in output.results], continuation_lengths(continuations)
    if isinstance(output, Sequence) and all(isinstance(r, LoglikelihoodResult) for r in output):
        return [float(r.logprob) for r in output], continuation_lengths(fallback_continuations)
    if isinstance(output, (Sequence, np.ndarray)) and all(isinstance(v, (int, float, np.floating)) for v in output):
        return [float(v) for v in output], continuation_lengths(fallback_continuations)
    raise TypeError(f"multiple-choice output must be MultipleChoiceOutput, LoglikelihoodResults or floats: {output!r}")


def stable_sample(rows: Sequence[Any], n: int, seed: object, key: Callable[[Any], str]) -> list[Any]:
    """The first n rows in sha256(seed, key(row)) order: a fixed, order-independent few-shot pool."""
    return sorted(rows, key=lambda row: stable_hash(seed, key(row)))[:n]
