"""Behavioural (policy-level) metrics of generated outputs: length, diversity, repetition, calibration, compliance.

Texts are either strings, split on whitespace (case kept, no other normalisation), or already-tokenised
sequences (e.g. token ids), used as given. Quantities with no n-grams to count are NaN rather than 0 so that
degenerate outputs are visible; use np.nanmean when averaging such values.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Literal, Sequence

import numpy as np
from numpy.typing import ArrayLike

Text = str | Sequence[Hashable]
BinStrategy = Literal["uniform", "quantile"]


@dataclass(frozen=True)
class LengthStats:
    """Summary of response lengths; std is the sample std (ddof=1), NaN for a single response."""

    mean: float
    median: float
    std: float
    min: float
    max: float
    n: int


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin mean confidence, accuracy and item count; empty bins have count 0 and NaN means."""

    bin_edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def tokens(text: Text) -> tuple[Hashable, ...]:
    """Whitespace tokens of a string, or the given token sequence as a tuple."""
    if isinstance(text, str):
        return tuple(text.split())
    if isinstance(text, (bytes, bytearray)):
        raise ValueError("texts must be str or token sequences, not bytes")
    return tuple(text.tolist() if isinstance(text, np.ndarray) else text)


def ngrams(token_seq: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """All contiguous n-grams of a token sequence (empty if it is shorter than n)."""
    _check_order("n", n)
    return [tuple(token_seq[start : start + n]) for start in range(len(token_seq) - n + 1)]


def _check_order(name: str, n: int) -> None:
    """Validate an n-gram order."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer n-gram order, got {n!r}")


def _check_texts(texts: Sequence[Text], minimum: int = 1) -> list[tuple[Hashable, ...]]:
    """Tokenise a collection of texts, requiring at least `minimum` of them."""
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of texts, not a single string")
    tokenised = [tokens(text) for text in texts]
    if len(tokenised) < minimum:
        raise ValueError(f"texts must contain at least {minimum} text(s), got {len(tokenised)}")
    return tokenised


def response_length_stats(lengths: ArrayLike) -> LengthStats:
    """Mean, median, sample std, min and max of per-response lengths (e.g. generated token counts)."""
    values = np.asarray(lengths, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("lengths must be finite and non-negative")
    return LengthStats(
        mean=float(values.mean()),
        median=float(np.median(values)),
        std=float(values.std(ddof=1)) if values.size > 1 else float("nan"),
        min=float(values.min()),
        max=float(values.max()),
        n=int(values.size),
    )


def distinct_n(texts: Sequence[Text], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over the whole set; NaN if none."""
    _check_order("n", n)
    pooled = [gram for token_seq in _check_texts(texts) for gram in ngrams(token_seq, n)]
    return len(set(pooled)) / len(pooled) if pooled else float("nan")


def repetition_rate(text: Text, n: int) -> float:
    """Share of n-gram occurrences in one output that repeat an earlier n-gram: 1 - unique/total; NaN if none."""
    grams = ngrams(tokens(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else float("nan")


def brevity_penalty(closest_reference_length: int, hypothesis_length: int) -> float:
    """BLEU brevity penalty exp(1 - r/c) for c <= r, 1 for c > r, and 0 for an empty hypothesis."""
    if hypothesis_length > closest_reference_length:
        return 1.0
    if hypothesis_length == 0:
        return 0.0
    return math.exp(1.0 - closest_reference_length / hypothesis_length)


def closest_reference_length(reference_lengths: Sequence[int], hypothesis_length: int) -> int:
    """Reference length closest to the hypothesis length; ties go to the shorter reference."""
    return min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))


def bleu_from_counts(
    matches: Sequence[int], totals: Sequence[int], brevity: float, epsilon: float = 0.1
) -> float:
    """Uniform-weight BLEU from per-order clipped matches and hypothesis n-gram totals.

    Smoothing: an order with zero matches gets precision epsilon / max(total, 1) (Chen & Cherry 2014,
    method 1, as in NLTK's SmoothingFunction().method1 and the Texygen self-BLEU). No unigram match gives 0.
    """
    if matches[0] == 0:
        return 0.0
    log_precisions = [
        math.log((match if match > 0 else epsilon) / max(total, 1)) for match, total in zip(matches, totals)
    ]
    return brevity * math.exp(math.fsum(log_precisions) / len(log_precisions))


def sentence_bleu(
    hypothesis: Text, references: Sequence[Text], n_max: int = 4, epsilon: float = 0.1
) -> float:
    """Smoothed sentence BLEU-n_max of one hypothesis against references (clipped counts, closest-length BP)."""
    _check_order("n_max", n_max)
    hypothesis_tokens = tokens(hypothesis)
    reference_tokens = _check_texts(references)
    matches, totals = [], []
    for order in range(1, n_max + 1):
        hypothesis_counts = Counter(ngrams(hypothesis_tokens, order))
        reference_max: Counter = Counter()
        for reference in reference_tokens:
            reference_max |= Counter(ngrams(reference, order))
        matches.append(sum(min(count, reference_max[gram]) for gram, count in hypothesis_counts.items()))
        totals.append(sum(hypothesis_counts.values()))
    closest = closest_reference_length([len(reference) for reference in reference_tokens], len(hypothesis_tokens))
    return bleu_from_counts(matches, totals, brevity_penalty(closest, len(hypothesis_tokens)), epsilon)


def _top_two_counts(per_text_counts: list[Counter]) -> dict[Hashable, tuple[int, int, int]]:
    """For each n-gram: (largest count, index of a text holding it, second-largest count over other texts)."""
    top: dict[Hashable, tuple[int, int, int]] = {}
    for index, counts in enumerate(per_text_counts):
        for gram, count in counts.items():
            best, best_index, second = top.get(gram, (0, -1, 0))
            if count > best:
                top[gram] = (count, index, best)
            else:
                top[gram] = (best, best_index, max(second, count))
    return top


def _closest_other_length(lengths: np.ndarray, index: int) -> int:
    """closest_reference_length of text `index` against all other texts, vectorised (ties -> shorter)."""
    others = np.delete(lengths, index)
    tie_broken = np.abs(others - lengths[index]) * (int(others.max()) + 1) + others
    return int(others[np.argmin(tie_broken)])


def self_bleu(texts: Sequence[Text], n_max: int = 4, epsilon: float = 0.1) -> float:
    """Self-BLEU (Zhu et al. 2018): mean smoothed sentence BLEU of each text against all the others as references.

    Higher means less diverse. Equals averaging `sentence_bleu(texts[i], texts[:i] + texts[i+1:])`, computed
    in O(total n-grams x texts) via per-n-gram top-two reference counts instead of re-counting references.
    """
    _check_order("n_max", n_max)
    tokenised = _check_texts(texts, minimum=2)
    lengths = np.array([len(token_seq) for token_seq in tokenised])
    per_order_counts = [
        [Counter(ngrams(token_seq, order)) for token_seq in tokenised] for order in range(1, n_max + 1)
    ]
    per_order_top = [_top_two_counts(counts) for counts in per_order_counts]
    scores = []
    for index, hypothesis_length in enumerate(lengths):
        matches, totals = [], []
        for counts, top in zip(per_order_counts, per_order_top):
            hypothesis_counts = counts[index]
            clipped = 0
            for gram, count in hypothesis_counts.items():
                best, best_index, second = top[gram]
                clipped += min(count, second if best_index == index else best)
            matches.append(clipped)
            totals.append(sum(hypothesis_counts.values()))
        closest = _closest_other_length(lengths, index)
        scores.append(bleu_from_counts(matches, totals, brevity_penalty(closest, int(hypothesis_length)), epsilon))
    return float(np.mean(scores))


def _calibration_inputs(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate paired confidences in [0, 1] and correctness values in [0, 1]."""
    conf = np.asarray(confidence, dtype=np.float64)
    outcome = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.size == 0:
        raise ValueError(f"confidence must be a non-empty 1-D array, got shape {conf.shape}")
    if outcome.shape != conf.shape:
        raise ValueError(f"correct has shape {outcome.shape} but confidence has shape {conf.shape}")
    if not np.all(np.isfinite(conf)) or np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidence must be finite probabilities within [0, 1]")
    if not np.all(np.isfinite(outcome)) or np.any((outcome < 0) | (outcome > 1)):
        raise ValueError("correct must be 0/1 (or a score within [0, 1])")
    return conf, outcome


def calibration_bin_edges(confidence: np.ndarray, n_bins: int, strategy: BinStrategy) -> np.ndarray:
    """n_bins + 1 edges: equal-width on [0, 1] ('uniform') or confidence quantiles ('quantile')."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        return np.quantile(confidence, np.linspace(0.0, 1.0, n_bins + 1))
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def reliability_diagram_data(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10, strategy: BinStrategy = "uniform"
) -> ReliabilityDiagram:
    """Bin items by confidence and report per-bin mean confidence, accuracy and count.

    Bins are right-closed, (e_{b-1}, e_b], with the first bin also containing its lower edge (the same
    assignment as sklearn.calibration.calibration_curve).
    """
    conf, outcome = _calibration_inputs(confidence, correct)
    edges = calibration_bin_edges(conf, n_bins, strategy)
    bin_index = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(bin_index, minlength=n_bins)
    confidence_sum = np.bincount(bin_index, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(bin_index, weights=outcome, minlength=n_bins)
    occupied = count > 0
    safe_count = np.where(occupied, count, 1)
    return ReliabilityDiagram(
        bin_edges=edges,
        confidence=np.where(occupied, confidence_sum / safe_count, np.nan),
        accuracy=np.where(occupied, correct_sum / safe_count, np.nan),
        count=count,
    )


def expected_calibration_error(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10, strategy: BinStrategy = "uniform"
) -> float:
    """ECE = sum over bins of (bin count / N) * |bin accuracy - bin mean confidence| (Guo et al. 2017)."""
    diagram = reliability_diagram_data(confidence, correct, n_bins, strategy)
    occupied = diagram.count > 0
    gaps = np.abs(diagram.accuracy[occupied] - diagram.confidence[occupied])
    return float(np.sum(diagram.count[occupied] * gaps) / diagram.count.sum())


def refusal_rate(flags: ArrayLike) -> float:
    """Share of outputs flagged as refusals (flags are bools or 0/1)."""
    values = np.asarray(flags)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"flags must be a non-empty 1-D array, got shape {values.shape}")
    if not (values.dtype == np.bool_ or np.issubdtype(values.dtype, np.number)):
        raise ValueError(f"flags must be bools or 0/1, got dtype {values.dtype}")
    numeric = values.astype(np.float64)
    if not np.all((numeric == 0) | (numeric == 1)):
        raise ValueError("flags must be bools or 0/1")
    return float(numeric.mean())


def _answer_extracted(answer: object) -> bool:
    """True for an extracted answer: not None, not a blank string; a bool is taken as the flag itself."""
    if answer is None:
        return False
    if isinstance(answer, (bool, np.bool_)):
        return bool(answer)
    if isinstance(answer, str):
        return bool(answer.strip())
    return True


def format_compliance(extracted: Sequence[object]) -> float:
    """Share of outputs from which an answer could be extracted (None or blank string = no answer)."""
    if isinstance(extracted, str):
        raise ValueError("extracted must be a sequence with one entry per output, not a single string")
    flags = [_answer_extracted(answer) for answer in extracted]
    if not flags:
        raise ValueError("extracted is empty; need at least one output")
    return sum(flags) / len(flags)


HEDGES = ("i think", "i believe", "it seems", "perhaps", "maybe", "might", "possibly", "probably", "it depends",
          "i'm not sure", "i am not sure", "generally", "typically", "in some cases", "it is possible")
APOLOGIES = ("sorry", "i apologize", "i apologise", "as an ai", "as a language model")
STYLE_FEATURES = ("words", "markdown", "list_lines", "hedges_per_100_words", "apology", "non_english")
MIN_LETTERS_FOR_LANGUAGE = 20
_LIST_LINE = r"^\s*(?:[-*\u2022+]|\d+[.)])\s+\S"
_MARKDOWN = r"(?m)^\s*#{1,6}\s+\S|\*\*[^*\n]+\*\*|__[^_\n]+__|```|^\s*\|.*\|\s*$"


def _phrase_count(text: str, phrases: Sequence[str]) -> int:
    lowered = text.lower()
    return sum(len(re.findall(rf"(?<![\w']){re.escape(p)}(?![\w'])", lowered)) for p in phrases)


def detected_language(text: str) -> str | None:
    """langdetect's language code for `text` (seeded, so deterministic), None for texts under
    MIN_LETTERS_FOR_LANGUAGE letters or when detection fails."""
    if sum(ch.isalpha() for ch in text) < MIN_LETTERS_FOR_LANGUAGE:
        return None
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


def style_features(text: str) -> dict[str, float]:
    """Default-behaviour features of one response (CapTrack's style dimension).

    words: whitespace tokens; markdown: 1 if it has a heading, bold, a code fence or a table row; list_lines: share
    of non-empty lines that are bullet or numbered items; hedges_per_100_words: HEDGES phrases per 100 words;
    apology: 1 if an APOLOGIES phrase occurs; non_english: 1 if langdetect finds a language other than English
    (0 for texts too short to tell).
    """
    if not isinstance(text, str):
        raise TypeError(f"style_features expects a string, got {type(text)}")
    words = len(text.split())
    lines = [line for line in text.splitlines() if line.strip()]
    list_lines = sum(bool(re.match(_LIST_LINE, line)) for line in lines)
    language = detected_language(text)
    return {
        "words": float(words),
        "markdown": float(bool(re.search(_MARKDOWN, text))),
        "list_lines": list_lines / len(lines) if lines else 0.0,
        "hedges_per_100_words": 100.0 * _phrase_count(text, HEDGES) / words if words else 0.0,
        "apology": float(_phrase_count(text, APOLOGIES) > 0),
        "non_english": float(language is not None and language != "en"),
    }
