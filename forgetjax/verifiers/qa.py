"""Short-answer QA scoring (NQ-open exact match / token F1) and BIG-Bench Hard answer matching."""

from __future__ import annotations

import re
import string
from collections import Counter
from fractions import Fraction

__all__ = [
    "normalize_answer",
    "exact_match",
    "token_f1",
    "extract_short_answer",
    "bbh_extract",
    "bbh_match",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _check_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_answers(answers: object) -> list[str]:
    """Validate the list of gold answers (a bare str is rejected: iterating it would yield characters)."""
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)):
        raise TypeError(f"answers must be a list of str, got {type(answers).__name__}")
    if not answers:
        raise ValueError("answers must contain at least one gold answer")
    for index, answer in enumerate(answers):
        _check_str(answer, f"answers[{index}]")
    return list(answers)


def normalize_answer(s: str) -> str:
    """SQuAD / NQ-open normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the,
    collapse whitespace (the same steps, in the same order, as the official SQuAD v1.1 script)."""
    _check_str(s, "s")
    text = "".join(char for char in s.lower() if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Whether the normalised prediction equals any normalised gold answer."""
    _check_str(prediction, "prediction")
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(answer) for answer in _check_answers(answers))


def _f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    """Bag-of-tokens F1; two empty token lists agree (1.0), one empty list scores 0.0."""
    if not prediction_tokens or not answer_tokens:
        return float(prediction_tokens == answer_tokens)
    overlap = sum((Counter(prediction_tokens) & Counter(answer_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 of the normalised prediction, maximised over the gold answers."""
    _check_str(prediction, "prediction")
    prediction_tokens = normalize_answer(prediction).split()
    return max(_f1(prediction_tokens, normalize_answer(answer).split()) for answer in _check_answers(answers))


_ANSWER_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+|short\s+)?answer\s*(?:is\s*)?[:：]?|a\s*[:：])\s*", flags=re.IGNORECASE
)
_EMPHASIS = re.compile(r"^[*_`\"']+|[*_`\"']+$")


def extract_short_answer(text: str) -> str:
    """The short answer in a free-form QA generation.

    Takes the first non-empty line (few-shot continuations put the answer before the first newline),
    removes leading "Answer:", "A:", "Final answer:", "The answer is" prefixes (case-insensitive, repeated),
    markdown emphasis / quotes around the answer, and a trailing period. Returns "" for blank text.
    """
    _check_str(text, "text")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    answer = lines[0]
    previous = None
    while answer != previous:
        previous = answer
        answer = _ANSWER_PREFIX.sub("", answer, count=1).strip().rstrip(".").strip()
        answer = _EMPHASIS.sub("", answer).strip()
    return answer


# ----------------------------------------------------------------------------------------------------------------
# BIG-Bench Hard
# ----------------------------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"answer\s+is\s*:?[ \t]*([^\n]*)", flags=re.IGNORECASE)
_CHOICE_TARGET = re.compile(r"^\([A-Z]\)$")
_CHOICE_IN_TEXT = re.compile(r"\(([A-Z])\)")
_BARE_CHOICE = re.compile(r"^([A-Z])(?:[).:,\s]|$)")
_INTEGER_TARGET = re.compile(r"^-?\d+$")
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_DYCK_TARGET = re.compile(r"^[)\]}>]+(?: [)\]}>]+)*$")
_BRACKETS = re.compile(r"[()\[\]{}<>]")
_WORD_CHOICES = (("true", "false"), ("yes", "no"), ("valid", "invalid"))


_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def _answer_span(text: str) -> tuple[str, bool]:
    """The text after the last "answer is" (and True), or the whole stripped text (and False)."""
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        return matches[-1].group(1).strip(), True
    return text.strip(), False


def _first_sentence(span: str) -> str:
    return _SENTENCE_END.split(span, maxsplit=1)[0]


def _pick(found: list[str], from_answer_phrase: bool) -> str | None:
    """First hit right after "the answer is", else the last hit in the whole text."""
    if not found:
        return None
    return found[0] if from_answer_phrase else found[-1]


def _with_case_of(word: str, target: str) -> str:
    """``word`` written in the casing style of ``target`` ("yes" / "Yes" / "YES")."""
    if target.isupper() and len(target) > 1:
        return word.upper()
    if target[:1].isupper():
        return word.capitalize()
    return word.lower()


def _clean_free_text(span: str) -> str:
    span = re.sub(r"^[*_`\"']+|[*_`\"']+$", "", span.strip())
    return " ".join(span.rstrip(".").split())


def _choice_letter(span: str, from_answer_phrase: bool) -> str | None:
    """The chosen option letter: after "the answer is", the first "(X)" or else a leading bare letter
    ("B because ..."); without an answer phrase, the last "(X)" or a reply that is a lone letter."""
    cleaned = _clean_free_text(span)
    letters = [match.group(1) for match in _CHOICE_IN_TEXT.finditer(span)]
    if from_answer_phrase:
        if letters:
            return letters[0]
        leading = _BARE_CHOICE.match(cleaned)
        return leading.group(1) if leading else None
    if letters:
        return letters[-1]
    lone = re.fullmatch(r"\(?([A-Z])\)?", cleaned)
    return lone.group(1) if lone else None


def bbh_extract(text: str, target: str) -> str:
    """The final answer in a BBH generation, in the format of ``target``.

    The answer span is the text after the last "the answer is" on its line, else the whole text;
    choices, words and numbers are looked for in the first sentence of that span. The target decides the
    format: a choice "(A)" → the first "(X)" or a leading bare letter after the answer phrase (the last
    "(X)" when there is no answer phrase); True/False, Yes/No, valid/invalid → that word (cased like the
    target; first hit after the answer phrase, else last); an integer → the number (commas removed,
    12.0 → 12); a Dyck closing sequence → the bracket characters of the span joined by single spaces;
    anything else (word sorting, free-text titles) → the span with whitespace collapsed and a trailing
    period removed. When nothing of the expected kind is found, the cleaned span is returned.
    """
    _check_str(text, "text")
    _check_str(target, "target")
    target = target.strip()
    if not target:
        raise ValueError("target must be a non-empty string")
    span, from_answer_phrase = _answer_span(text)
    head = _first_sentence(span) if from_answer_phrase else span
    if _CHOICE_TARGET.match(target):
        letter = _choice_letter(head, from_answer_phrase)
        return f"({letter})" if letter else _clean_free_text(span)
    for choices in _WORD_CHOICES:
        if target.lower() in choices:
            pattern = r"\b(" + "|".join(choices) + r")\b"
            words = [match.group(1).lower() for match in re.finditer(pattern, head, flags=re.IGNORECASE)]
            word = _pick(words, from_answer_phrase)
            return _with_case_of(word, target) if word else _clean_free_text(span)
    if _INTEGER_TARGET.match(target):
        number = _pick(_NUMBER_IN_TEXT.findall(head), from_answer_phrase)
        if number is None:
            return _clean_free_text(span)
        value = Fraction(number.replace(",", ""))
        return str(value.numerator) if value.denominator == 1 else str(float(value))
    if _DYCK_TARGET.match(target):
        return " ".join(_BRACKETS.findall(span))
    return _clean_free_text(span)


def _canonical(answer: str) -> str:
    return " ".join(answer.strip().rstrip(".").split()).casefold()


def bbh_match(text: str, target: str) -> bool:
    """Exact match of :func:`bbh_extract` against the target (case- and whitespace-insensitive)."""
    return _canonical(bbh_extract(text, target)) == _canonical(target)
