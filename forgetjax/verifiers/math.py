"""Math answer extraction, equivalence checking and a timeout-safe grading pool.

Used for GSM8K / MATH-500 / MGSM evaluation and as the GRPO reward for math problems.

Equivalence has two stages:

1. A fast, pure-Python path (no sympy) that decides plain numbers and textually identical answers.
2. A symbolic check with ``math_verify`` (``parse`` + ``verify``) for LaTeX, expressions, intervals,
   equations. This can hang on pathological input (e.g. ``9^{9^{9^{9}}}``). ``math_verify``'s own
   timeouts use ``SIGALRM``, which only works in the main thread, so :func:`is_equivalent` uses them
   only when called from the main thread. From worker threads use :class:`MathGrader`, which runs the
   symbolic check in spawned processes and kills any that exceed the time limit.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "gsm8k_reference",
    "extract_answer",
    "is_equivalent",
    "MathGrader",
    "math_reward",
]

# Size limits of the fast path (largest exponent expanded exactly, longest digit string, longest answer).
# Anything bigger goes to the symbolic check, whose cost MathGrader bounds, so input such as "1e999999999"
# cannot stall the calling thread.
_MAX_FAST_EXPONENT = 400
_MAX_FAST_DIGITS = 1000
_MAX_FAST_LENGTH = 2000

_UNIT_WORDS = frozenset(
    """
    dollar dollars usd cent cents euro euros pound pounds lb lbs ounce ounces oz gram grams g kg kilogram kilograms
    mg ton tons tonne tonnes
    cm mm m km meter meters metre metres centimeter centimeters kilometer kilometers inch inches in ft foot feet
    yard yards yd mile miles mph kmh kph km/h
    second seconds sec secs s minute minutes min mins hour hours hr hrs h day days week weeks month months
    year years yr yrs
    liter liters litre litres l ml gallon gallons gal cup cups
    degree degrees deg percent percentage point points unit units sq square cubic
    """.split()
)


def _check_str(value: object, name: str) -> str:
    """Return ``value`` if it is a str, else raise a TypeError naming the argument."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# References and answer extraction
# ----------------------------------------------------------------------------------------------------------------


def gsm8k_reference(answer_field: str) -> str:
    """The final answer of a GSM8K ``answer`` field: the text after the last ``####``, commas removed."""
    _check_str(answer_field, "answer_field")
    if "####" not in answer_field:
        raise ValueError("answer_field has no '####' final-answer marker")
    final = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError("answer_field has an empty answer after '####'")
    return final


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of every ``{`` that gets closed to the index of its matching ``}`` (one pass)."""
    open_indices: list[int] = []
    matches: dict[int, int] = {}
    for index, char in enumerate(text):
        if char == "{":
            open_indices.append(index)
        elif char == "}" and open_indices:
            matches[open_indices.pop()] = index
    return matches


_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``), else None."""
    boxes = list(_BOX_COMMAND.finditer(text))
    if not boxes:
        return None
    closing = _matching_braces(text)
    for match in reversed(boxes):
        rest = match.end()
        if rest < len(text) and text[rest] == "{":
            end = closing.get(rest)
            content = text[rest + 1 : end] if end is not None else None
        else:
            bare = re.match(r"[ \t]+([^\s$]+)", text[rest : rest + 200])
            content = bare.group(1) if bare else None
        if content is not None and content.strip():
            return content.strip()
    return None


_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("*", "*"), ("`", "`"))


def _strip_math_wrappers(text: str) -> str:
    """Remove enclosing ``$...$``, ``\\(...\\)``, ``\\[...\\]`` and markdown emphasis (up to 8 layers)."""
    for _ in range(8):
        changed = False
        text = text.strip()
        for left, right in _MATH_WRAPPERS:
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left) : len(text) - len(right)]
                changed = True
                break
        if not changed:
            break
    return text.strip()


_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def _clean_candidate(text: str) -> str:
    """Reduce the text after an answer marker to the answer: first line, first sentence, no wrappers."""
    line = text.strip().split("\n", 1)[0]
    line = _strip_math_wrappers(line)
    sentence_end = _SENTENCE_END.search(line)
    if sentence_end is not None:
        line = line[: sentence_end.start()]
    return _strip_math_wrappers(line.strip().rstrip(".,;:!").strip())


_GSM8K_MARKER = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_PHRASE = re.compile(
    r"(?:\bfinal answer|\bthe answer)\s*(?:is\s*:?|:)[ \t]*|\banswer\s*:[ \t]*", flags=re.IGNORECASE
)
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![^\s(=$:\[{])-)?(?<![\d.,])(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:/\d+)?"
)


def extract_answer(text: str) -> str | None:
    """The model's final answer, or None if the text holds none.

    Tried in this order (the first strategy that yields a non-empty answer wins):

    1. the content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces);
    2. the text after the last ``#### `` marker (GSM8K style), to the end of its line;
    3. the text after the last "the answer is" / "final answer is" / "Answer:" phrase, cut at the end of
       its line and sentence, with ``$...$`` and markdown emphasis removed;
    4. the last number in the text (thousands commas, decimals, a leading minus and ``a/b`` allowed).
    """
    _check_str(text, "text")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    markers = list(_GSM8K_MARKER.finditer(text))
    if markers:
        candidate = _clean_candidate(markers[-1].group(1))
        if candidate:
            return candidate
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        candidate = _clean_candidate(text[phrases[-1].end() :])
        if candidate:
            return candidate
    numbers = _NUMBER_IN_TEXT.findall(text)
    return numbers[-1] if numbers else None


# ----------------------------------------------------------------------------------------------------------------
# Fast path: plain numbers and identical text
# ----------------------------------------------------------------------------------------------------------------

_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_DECORATIONS = (
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("{,}", ","),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\$", ""),
    ("\\%", ""),
    ("%", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("°", ""),
    ("\u2212", "-"),
    ("\u00d7", "\\times"),
    ("\\cdot", "\\times"),
)
_TEXT_UNIT = re.compile(r"\\(?:text|mbox|mathrm|textrm)\{\s*([^{}]*?)\s*\}\s*$")
_VARIABLE_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*")


def _is_unit_phrase(phrase: str) -> bool:
    """True for unit phrases such as "cm", "dollars", "sq ft", "km/h", "cm^2"."""
    words = re.sub(r"\^\{?\d\}?$", "", phrase.strip().lower()).split()
    return bool(words) and all(word.strip(".") in _UNIT_WORDS for word in words)


def _strip_decorations(answer: str) -> str:
    """Remove formatting that never changes a final answer's value: math delimiters, ``\\$``, ``%``,
    degree signs, LaTeX spacing, ``\\left``/``\\right``, a trailing period and trailing unit text."""
    text = _strip_math_wrappers(answer.strip())
    boxed = _last_boxed(text) if text.startswith(("\\boxed", "\\fbox")) else None
    if boxed is not None:
        text = boxed
    text = _LEFT_RIGHT.sub("", text)
    for old, new in _DECORATIONS:
        text = text.replace(old, new)
    text = text.replace("$", "").strip()
    unit = _TEXT_UNIT.search(text)
    if unit is not None and unit.start() > 0 and _is_unit_phrase(unit.group(1)):
        text = text[: unit.start()]
    return text.strip().rstrip(".").strip()


_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?|\.\d+"
_EXPONENT = (
    r"(?:[eE](?P<exp_e>[+-]?\d+)"
    r"|\\times\s*10\s*\^\s*\{?\s*(?P<exp_t>[+-]?\d+)\s*\}?"
    r"|\*\s*10\s*(?:\^|\*\*)\s*\(?(?P<exp_s>[+-]?\d+)\)?)"
)
_UNIT_SUFFIX = r"(?:\s*(?P<unit>[A-Za-z][A-Za-z./ ]*(?:\^\{?\d\}?)?))?$"
_PLAIN_NUMBER = re.compile(rf"^(?P<sign>[+-]?)\s*(?P<mantissa>{_DECIMAL})(?:\s*{_EXPONENT})?{_UNIT_SUFFIX}")
_FRACTION = re.compile(
    r"^(?P<sign>[+-]?)\s*(?:"
    rf"\\frac\s*\{{\s*(?P<num_tex>[+-]?(?:{_DECIMAL}))\s*\}}\s*\{{\s*(?P<den_tex>[+-]?(?:{_DECIMAL}))\s*\}}"
    r"|\\frac(?P<num_short>\d)(?P<den_short>\d)"
    rf"|(?P<num_slash>{_DECIMAL})\s*/\s*(?P<den_slash>{_DECIMAL}))"
    + _UNIT_SUFFIX
)


def _decimal_fraction(literal: str) -> Fraction | None:
    """Exact value of a decimal literal with optional thousands commas; None if too long to be sane."""
    digits = literal.replace(",", "")
    if len(digits) > _MAX_FAST_DIGITS:
        return None
    if digits.endswith("."):
        digits = digits[:-1]
    return Fraction(digits)


def _unit_ok(unit: str | None) -> bool:
    return unit is None or _is_unit_phrase(unit)


def _plain_number(answer: str) -> tuple[Fraction, bool] | None:
    """Parse a plain numeric answer to ``(exact value, written_as_fraction)``; None if it is not one.

    Accepts signs, thousands commas, decimals, scientific notation (``1.5e3``, ``1.5\\times10^{3}``),
    ``a/b`` and ``\\frac{a}{b}``, a leading ``x =`` and trailing unit words, after
    :func:`_strip_decorations`.
    """
    text = _VARIABLE_ASSIGNMENT.sub("", _strip_decorations(answer), count=1)
    if len(text) > _MAX_FAST_LENGTH:
        return None
    number = _PLAIN_NUMBER.match(text)
    if number is not None and _unit_ok(number.group("unit")):
        value = _decimal_fraction(number.group("mantissa"))
        exponent_text = number.group("exp_e") or number.group("exp_t") or number.group("exp_s")
        exponent = int(exponent_text) if exponent_text else 0
        if value is None or abs(exponent) > _MAX_FAST_EXPONENT:
            return None
        value *= Fraction(10) ** exponent
        return (-value if number.group("sign") == "-" else value), False
    fraction = _FRACTION.match(text)
    if fraction is not None and _unit_ok(fraction.group("unit")):
        groups = fraction.groupdict()
        numerator_text = groups["num_tex"] or groups["num_short"] or groups["num_slash"]
        denominator_text = groups["den_tex"] or groups["den_short"] or groups["den_slash"]
        numerator = _signed_decimal(numerator_text)
        denominator = _signed_decimal(denominator_text)
        if numerator is None or denominator is None or denominator == 0:
            return None
        value = numerator / denominator
        return (-value if groups["sign"] == "-" else value), True
    return None


def _signed_decimal(literal: str) -> Fraction | None:
    negative = literal.startswith("-")
    value = _decimal_fraction(literal.lstrip("+-"))
    if value is None:
        return None
    return -value if negative else value


def _canonical_text(answer: str) -> str:
    """Whitespace-insensitive form of a decorated answer (keeps one space between digits: "7 1/2")."""
    text = _strip_decorations(answer)
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"(?<=\d)\s+(?=\d)", "\x00", text)
    text = re.sub(r"\s+", "", text).replace("\x00", " ")
    return text


def _fast_verdict(prediction: str, reference: str) -> bool | None:
    """Decide equivalence without sympy when that is safe; None means "ask the symbolic checker".

    Plain numbers are compared exactly as rationals. Unequal numbers are declared different only when
    neither side was written as a fraction; a fraction against a rounded decimal (1/3 vs 0.333333) is left
    to ``math_verify``, whose rounding rule then applies.
    """
    if not prediction.strip() or not reference.strip():
        return False
    if _canonical_text(prediction) == _canonical_text(reference) != "":
        return True
    predicted = _plain_number(prediction)
    expected = _plain_number(reference)
    if predicted is not None and expected is not None:
        if predicted[0] == expected[0]:
            return True
        if not predicted[1] and not expected[1]:
            return False
    return None


# ----------------------------------------------------------------------------------------------------------------
# Symbolic path (math_verify)
# ----------------------------------------------------------------------------------------------------------------


def _braces_balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += char == "{"
        depth -= char == "}"
        if depth < 0:
            return False
    return depth == 0


def _mv_parse(answer: str, timeout_s: int | None) -> list:
    """Parse a bare final answer with math_verify, wrapping it in ``\\boxed{}`` (or ``$...$``) so that
    its LaTeX extractor sees the whole answer rather than a fragment."""
    from math_verify import parse

    attempts = [f"\\boxed{{{answer}}}"] if _braces_balanced(answer) else []
    attempts += [f"${answer}$", answer]
    for attempt in attempts:
        parsed = parse(attempt, parsing_timeout=timeout_s)
        if parsed:
            return parsed
    return []


def _symbolic_equivalent(prediction: str, reference: str, timeout_s: int | None) -> bool:
    """math_verify equivalence (reference is the gold side; ``verify`` is not symmetric)."""
    from math_verify import verify

    gold = _mv_parse(_strip_decorations(reference), timeout_s)
    target = _mv_parse(_strip_decorations(prediction), timeout_s)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout_s))


def is_equivalent(prediction: str, reference: str, *, timeout_s: float | None = 5) -> bool:
    """Whether two final answers are mathematically equivalent (``reference`` is the gold answer).

    Fast path first (plain numbers with commas, ``$``, ``%``, units, decimals, fractions, scientific
    notation; identical text), then ``math_verify`` for LaTeX and symbolic answers (``\\frac``,
    ``\\sqrt{2}/2``, intervals, ``x=5`` vs ``5``). Conventions: a percent sign is dropped (50% == 50, not
    0.5), unreduced fractions count (2/6 == 1/3), decimals are exact (0.333 != 1/3; math_verify accepts
    6-decimal roundings of non-terminating fractions). ``timeout_s`` is handed to math_verify's SIGALRM
    timeout only on the main thread; elsewhere the symbolic check runs without a limit and can hang on
    pathological input, so threaded callers should use :class:`MathGrader`.
    """
    _check_str(prediction, "prediction")
    _check_str(reference, "reference")
    verdict = _fast_verdict(prediction, reference)
    if verdict is not None:
        return verdict
    on_main_thread = threading.current_thread() is threading.main_thread()
    signal_timeout = int(max(1, round(timeout_s))) if (timeout_s and on_main_thread) else None
    from math_verify.errors import TimeoutException

    try:
        return _symbolic_equivalent(prediction, reference, signal_timeout)
    except (Exception, TimeoutException):
        logger.debug("symbolic equivalence check failed", exc_info=True)
        return False


# ----------------------------------------------------------------------------------------------------------------
# Process pool with a real timeout
# ----------------------------------------------------------------------------------------------------------------


def _worker_main(connection: Connection, memory_limit_bytes: int | None) -> None:
    """Grading loop run in a spawned process: receive (prediction, reference), send back a bool.

    math_verify's signal timeouts are disabled here because the parent enforces the limit by killing
    this process.
    """
    if memory_limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _symbolic_equivalent("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}", None)  # warm up imports and sympy caches untimed
    connection.send("ready")
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        prediction, reference = task
        try:
            result = is_equivalent(prediction, reference, timeout_s=None)
        except BaseException:  # MemoryError, RecursionError, anything sympy raises: an ungradable answer
            result = False
        connection.send(result)


class _Worker:
    """One spawned grading process and the parent's end of its pipe."""

    def __init__(self, context: BaseContext, memory_limit_bytes: int | None) -> None:
        self.connection, child_connection = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main, args=(child_connection, memory_limit_bytes), daemon=True, name="MathGraderWorker"
        )
        self.process.start()
        child_connection.close()
        self.ready = False
        self._kill_lock = threading.Lock()
        self._killed = False

    def wait_ready(self, startup_timeout_s: float) -> bool:
        if self.ready:
            return True
        try:
            if self.connection.poll(startup_timeout_s) and self.connection.recv() == "ready":
                self.ready = True
        except (EOFError, OSError):
            return False
        return self.ready

    def kill(self) -> None:
        """Kill the process and close the pipe, once (close() and a timing-out thread may race here)."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=5)
            self.connection.close()


def _kill_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()
    workers.clear()


class MathGrader:
    """Thread-safe math grading with a real per-answer timeout.

    Cheap cases are decided in the calling thread (:func:`_fast_verdict`); the rest go to a pool of
    ``max_workers`` spawned processes. A grading that takes longer than ``timeout_s`` returns False, is
    counted in ``timed_out``, and its worker process is killed and replaced. Waiting for a free worker
    does not count towards the timeout, and neither does worker start-up. Each worker's address space is
    capped at ``memory_limit_mb`` (None: no cap) so a runaway expression cannot exhaust the machine.

    Spawned workers re-import the caller's ``__main__``; scripts must guard their entry point with
    ``if __name__ == "__main__":``.
    """

    def __init__(
        self,
        max_workers: int = 2,
        timeout_s: float = 5.0,
        *,
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if memory_limit_mb is not None and memory_limit_mb <= 0:
            raise ValueError(f"memory_limit_mb must be positive or None, got {memory_limit_mb!r}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s!r}")
        self.max_workers = max_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._memory_limit_bytes = memory_limit_mb * 2**20 if memory_limit_mb else None
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: set[_Worker] = set()
        self.timed_out = 0
        self.crashed = 0
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        for _ in range(max_workers):
            self._idle.put(self._start_worker())  # type: ignore[arg-type]  (never None before close)

    def _start_worker(self) -> _Worker | None:
        """Start and register a worker (under the lock, so none appears after close); None once closed."""
        with self._lock:
            if self._closed:
                return None
            worker = _Worker(self._context, self._memory_limit_bytes)
            self._workers.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker and, unless the grader is closed, put a fresh one in the idle queue."""
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
        replacement = self._start_worker()
        if replacement is not None:
            self._idle.put(replacement)

    def _acquire(self) -> _Worker:
        """Take a live, ready worker from the idle queue (blocking while all are busy)."""
        while True:
            if self._closed:
                raise RuntimeError("MathGrader is closed")
            try:
                worker = self._idle.get(timeout=0.2)
            except queue.Empty:
                continue
            if not worker.process.is_alive():
                self._discard(worker)
                continue
            if worker.wait_ready(self.startup_timeout_s):
                return worker
            self._discard(worker)
            raise RuntimeError(f"MathGrader worker did not start within {self.startup_timeout_s} s (workers are spawned "
                               "and re-import __main__: a script that does its work at import time needs an "
                               "`if __name__ == '__main__':` guard)")

    def _grade_in_worker(self, prediction: str, reference: str) -> bool | None:
        """One attempt in a worker: the verdict, False on timeout, or None if the worker died."""
        worker = self._acquire()
        try:
            worker.connection.send((prediction, reference))
            if worker.connection.poll(self.timeout_s):
                result = bool(worker.connection.recv())
                self._idle.put(worker)
                return result
        except (EOFError, OSError):
            with self._lock:
                self.crashed += 1
            self._discard(worker)
            return None
        with self._lock:
            self.timed_out += 1
        self._discard(worker)
        return False

    def grade(self, prediction: str, reference: str) -> bool:
        """Whether ``prediction`` is equivalent to ``reference``; False on timeout.

        If the worker process dies mid-grading (counted in ``crashed``), the grading is retried once on
        a fresh worker; a second death also returns False.
        """
        _check_str(prediction, "prediction")
        _check_str(reference, "reference")
        verdict = _fast_verdict(prediction, reference)
        if verdict is not None:
            return verdict
        for _ in range(2):
            result = self._grade_in_worker(prediction, reference)
            if result is not None:
                return result
        return False

    def grade_many(self, pairs: Iterable[Sequence[str]]) -> list[bool]:
        """Grade ``(prediction, reference)`` pairs in parallel; results are in input order."""
        pairs = [tuple(pair) for pair in pairs]
        for index, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ValueError(f"pairs[{index}] must be a (prediction, reference) pair, got {len(pair)} items")
        if not pairs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(pairs))) as executor:
            return list(executor.map(lambda pair: self.grade(*pair), pairs))

    def close(self) -> None:
        """Stop all worker processes; further grading raises RuntimeError."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def math_reward(response: str, reference: str, grader: MathGrader | None = None) -> float:
    """1.0 if the final answer extracted from ``response`` is equivalent to the final answer
    ``reference`` (e.g. :func:`gsm8k_reference` output or a MATH ``answer``), else 0.0.

    Without a ``grader`` the check runs in-process (see :func:`is_equivalent` about threads).
    """
    _check_str(response, "response")
    _check_str(reference, "reference")
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    correct = grader.grade(answer, reference) if grader is not None else is_equivalent(answer, reference)
    return 1.0 if correct else 0.0
