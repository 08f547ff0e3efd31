"""Training and held-out problems for the three online-RL domains, read from the local data directory.

A :class:`Problem` is what an environment serves and a verifier checks: the user message (the raw question in the
domain's prompt template), the reference (math: final answer; code: tests; qa: list of acceptable answers, in the
forms of :func:`forgetjax.verifiers.rewards.normalize_reference`) and metadata (source, split, held_out, the raw
question, and a worked solution where the data has one, for SFT and privileged-information distillation).

Sources and splits (files under the data directory, see its README):

==========  =============  ==================================================  ========
domain      source         split: file / rows                                  held out
==========  =============  ==================================================  ========
math        gsm8k          train: gsm8k/train.jsonl (7,473)                    no
math        gsm8k          test: gsm8k/test.jsonl (1,319)                      yes
math        math500        test: math500/test.jsonl (500)                      yes
math        word_problems  train: generated, no file (2,000; see               no
                           forgetjax.tasks.word_problems)
math        word_problems  test: generated (500)                               yes
code        mbpp           train: task ids 601-974 of mbpp/mbpp.jsonl (374)    no
code        mbpp           validation: task ids 511-600 (90)                   no
code        mbpp           test: task ids 11-510 (500)                         yes
code        humaneval      test: humaneval/HumanEval.jsonl.gz (164)            yes
qa          efficientqa    train: nq_open/NQ-open.efficientqa.{dev,test}.1.1   no
                           .jsonl (1,800 + 1,769)
qa          nq_open        dev: nq_open/NQ-open.dev.jsonl (3,610)              yes
==========  =============  ==================================================  ========

Every safety domain of `forgetjax.tasks.safety_domains` (power_seeking, toxicity_refusal, ...) is a domain here too:
its source is the table's (ai_risk, sycophancy, truthfulqa, do_not_answer), its splits "train" and "heldout" (the
seeded hash split; held out), its prompt the item's own user message ("{question}"), its reference what the
safety-domain verifier checks and its metadata "solution" the GT-SFT target (the safe answer, or a refusal).

(MBPP's task ids 1-10 are the few-shot prompt split and belong to no split here.) ``source`` may also be the path of
a local JSON-lines file in GEM's record format (math: problem/question + answer; code: problem/question + tests as
``{"inputs", "outputs"}`` or a list of asserts, or MBPP rows; qa: question + answer list), e.g. a dump of a GEM hub
dataset such as Math12K or CodeContests; its problems are held out unless ``split == "train"``.

Problem ids are ``"<source>/<item id>"`` with the item id the evaluation registry uses for the same item where there
is one (``gsm8k/test-0000``, ``mbpp/601``, ``humaneval/HumanEval/0``, ``math500/test/precalculus/807.json``,
``nq_open/dev-0000``), so they do not depend on ``limit`` or ``seed`` and join with evaluation records.

The default prompts are the evaluation battery's chat prompts for the same data (`forgetjax.tasks.prompts`), so a
model trained on a domain is evaluated in the format it was trained in; pass ``template`` (with a ``{question}``
placeholder) to change them.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from forgetjax.io import read_jsonl
from forgetjax.paths import default_data_dir
from forgetjax.tasks.prompts import (
    HUMANEVAL_TEMPLATE,
    QUESTION,
    TEMPLATES,
    mbpp_task_text,
    question_mark,
    render_prompt,
    strip_calculator_annotations,
)
from forgetjax.tasks.readers import require_file, require_keys
from forgetjax.tasks.safety_domains import HELDOUT, SAFETY_DOMAINS, domain_items
from forgetjax.tasks.word_problems import word_problems
from forgetjax.verifiers.math import gsm8k_reference
from forgetjax.verifiers.rewards import DOMAINS, Reference, normalize_reference

__all__ = [
    "DOMAINS",
    "SOURCES",
    "TEMPLATES",
    "HUMANEVAL_TEMPLATE",
    "Problem",
    "default_data_dir",
    "default_template",
    "is_held_out",
    "load_problems",
    "require_training_pool",
]

MBPP_SPLITS = {"train": range(601, 975), "validation": range(511, 601), "test": range(11, 511)}
SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "math": {"gsm8k": ("train", "test"), "math500": ("test",), "word_problems": ("train", "test")},
    "code": {"mbpp": ("train", "validation", "test"), "humaneval": ("test",)},
    "qa": {"efficientqa": ("train",), "nq_open": ("dev",)},
}
HELD_OUT = frozenset({("gsm8k", "test"), ("math500", "test"), ("word_problems", "test"), ("mbpp", "test"),
                      ("humaneval", "test"), ("nq_open", "dev")}
                     | {(domain.source, HELDOUT) for domain in SAFETY_DOMAINS.values()})
GENERATED = frozenset({"word_problems"})
TRAIN_SPLIT = "train"
SOURCES.update({name: {domain.source: (TRAIN_SPLIT, HELDOUT)} for name, domain in SAFETY_DOMAINS.items()})


@dataclasses.dataclass(frozen=True)
class Problem:
    """One environment item: a stable id, its domain, the user message, the verifier's reference, metadata."""

    id: str
    domain: str
    prompt: str
    reference: Reference
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def held_out(self) -> bool:
        """Whether the problem belongs to an evaluation set that must never be trained on."""
        return bool(self.metadata.get("held_out", False))


@dataclasses.dataclass(frozen=True)
class _Record:
    """A problem before templating: item id, raw question, reference, extra metadata."""

    item_id: str
    question: str
    reference: Reference
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def default_template(domain: str, source: str) -> str:
    """The prompt template for a source: HumanEval gets the function-completion prompt, a safety domain's items their
    own user message, others their domain's."""
    if domain in SAFETY_DOMAINS:
        return QUESTION
    if domain not in TEMPLATES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return HUMANEVAL_TEMPLATE if source == "humaneval" else TEMPLATES[domain]


def is_held_out(source: str, split: str) -> bool:
    """Whether (source, split) is an evaluation set; for local files, every split except "train"."""
    known = any(source in sources for sources in SOURCES.values())
    return (source, split) in HELD_OUT if known else split != TRAIN_SPLIT


def require_training_pool(problems: Sequence[Problem]) -> None:
    """Raise ValueError if any problem is held out (guards a trainer against training on evaluation items)."""
    for problem in problems:
        if problem.held_out:
            raise ValueError(f"problem {problem.id!r} is held out ({problem.metadata.get('split')}) and must not "
                             "be used for training")


def load_training_problems(domain) -> list[Problem]:
    """The training problems a `DomainConfig` names (`load_problems` with its fields); held-out items are refused."""
    problems = load_problems(domain.name, domain.source, domain.data_dir, domain.split, domain.limit, domain.seed,
                             template=domain.template)
    require_training_pool(problems)
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Built-in sources
# ----------------------------------------------------------------------------------------------------------------


def _gsm8k(data_dir: Path, split: str) -> list[_Record]:
    path = require_file(data_dir / "gsm8k" / f"{split}.jsonl")
    records = []
    for index, row in enumerate(read_jsonl(path)):
        require_keys(row, ("question", "answer"), f"{path} row {index}")
        solution = strip_calculator_annotations(row["answer"])
        records.append(_Record(f"{split}-{index:04d}", row["question"], gsm8k_reference(row["answer"]),
                               {"solution": solution}))
    return records


def _word_problems(data_dir: Path, split: str) -> list[_Record]:
    return [_Record(f"{split}-{index:04d}", row["question"], gsm8k_reference(row["answer"]),
                    {"solution": row["answer"]}) for index, row in enumerate(word_problems(split))]


def _math500(data_dir: Path, split: str) -> list[_Record]:
    path = require_file(data_dir / "math500" / "test.jsonl")
    records = []
    for index, row in enumerate(read_jsonl(path)):
        require_keys(row, ("problem", "answer", "solution", "subject", "level", "unique_id"), f"{path} row {index}")
        extra = {"solution": row["solution"], "subject": row["subject"], "level": row["level"]}
        records.append(_Record(row["unique_id"], row["problem"], row["answer"], extra))
    return records


def _mbpp(data_dir: Path, split: str) -> list[_Record]:
    path = require_file(data_dir / "mbpp" / "mbpp.jsonl")
    wanted = MBPP_SPLITS[split]
    records = []
    for index, row in enumerate(read_jsonl(path)):
        require_keys(row, ("task_id", "text", "code", "test_list", "test_setup_code"), f"{path} row {index}")
        if int(row["task_id"]) in wanted:
            reference = {"kind": "assert", "tests": list(row["test_list"]), "setup_code": row["test_setup_code"]}
            extra = {"solution": row["code"].replace("\r\n", "\n"), "task_id": int(row["task_id"])}
            records.append(_Record(str(row["task_id"]), mbpp_task_text(row), reference, extra))
    missing = len(wanted) - len(records)
    if missing:
        raise ValueError(f"{path}: {missing} task ids of the MBPP {split} split ({wanted.start}-{wanted.stop - 1}) "
                         "are missing")
    return records


def _humaneval(data_dir: Path, split: str) -> list[_Record]:
    path = require_file(data_dir / "humaneval" / "HumanEval.jsonl.gz")
    records = []
    for index, row in enumerate(read_jsonl(path)):
        require_keys(row, ("task_id", "prompt", "entry_point", "test", "canonical_solution"), f"{path} row {index}")
        reference = {"kind": "humaneval", "prompt": row["prompt"], "test": row["test"],
                     "entry_point": row["entry_point"]}
        extra = {"solution": row["prompt"] + row["canonical_solution"]}
        records.append(_Record(row["task_id"], row["prompt"], reference, extra))
    return records


def _qa_rows(path: Path, item_prefix: str) -> list[_Record]:
    records = []
    for index, row in enumerate(read_jsonl(require_file(path))):
        require_keys(row, ("question", "answer"), f"{path} row {index}")
        records.append(_Record(f"{item_prefix}-{index:04d}", question_mark(row["question"]), row["answer"]))
    return records


def _efficientqa(data_dir: Path, split: str) -> list[_Record]:
    folder = data_dir / "nq_open"
    return [record for part in ("dev", "test")
            for record in _qa_rows(folder / f"NQ-open.efficientqa.{part}.1.1.jsonl", part)]


def _nq_open(data_dir: Path, split: str) -> list[_Record]:
    return _qa_rows(data_dir / "nq_open" / "NQ-open.dev.jsonl", "dev")


def _safety_domain(domain: str, data_dir: Path, split: str) -> list[_Record]:
    return [_Record(item.item_id, item.prompt, item.reference, {"solution": item.target, "category": item.category})
            for item in domain_items(domain, data_dir, split)]


_LOADERS: dict[str, Callable[[Path, str], list[_Record]]] = {
    "gsm8k": _gsm8k,
    "math500": _math500,
    "word_problems": _word_problems,
    "mbpp": _mbpp,
    "humaneval": _humaneval,
    "efficientqa": _efficientqa,
    "nq_open": _nq_open,
}


# ----------------------------------------------------------------------------------------------------------------
# Local files in GEM's record format
# ----------------------------------------------------------------------------------------------------------------


def _first_field(row: Mapping[str, Any], keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if key in row:
            return row[key]
    raise KeyError(f"{where}: none of the fields {list(keys)} is present")


def _local_record(domain: str, row: Mapping[str, Any], index: int, split: str, where: str) -> _Record:
    """A problem from one row of a user-provided file (GEM field names, MBPP rows, GSM8K '####' answers)."""
    id_keys = [key for key in ("id", "task_id", "unique_id") if key in row]
    item_id = str(row[id_keys[0]]) if id_keys else f"{split}-{index:04d}"
    if domain == "code" and "test_list" in row:
        reference = {"kind": "assert", "tests": row["test_list"], "setup_code": row.get("test_setup_code", "")}
        question = mbpp_task_text(row) if "text" in row else _first_field(row, ("problem", "question", "prompt"), where)
        return _Record(item_id, question, reference)
    question = _first_field(row, ("problem", "question", "prompt", "text"), where)
    if domain == "code":
        return _Record(item_id, question, _first_field(row, ("tests",), where))
    answer = _first_field(row, ("answer", "answers"), where)
    if domain == "math" and isinstance(answer, str) and "####" in answer:
        answer = gsm8k_reference(answer)
    if domain == "qa":
        question = question_mark(question)
    return _Record(item_id, question, answer)


def _local_file(domain: str, path: Path, split: str) -> list[_Record]:
    return [_local_record(domain, row, index, split, f"{path} row {index}")
            for index, row in enumerate(read_jsonl(require_file(path)))]


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def _check_choice(value: object, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def _local_path(source: str, data_dir: Path) -> Path | None:
    """The file a source names, if it names one (an existing path, or a .jsonl path relative to data_dir)."""
    candidate = Path(source).expanduser()
    if candidate.is_file():
        return candidate
    if source.endswith(".jsonl"):
        return candidate if candidate.is_absolute() else data_dir / candidate
    return None


def _subset(records: list[_Record], limit: int | None, seed: int) -> list[_Record]:
    """``limit`` records drawn at random with ``seed`` (kept in file order), or all of them."""
    if limit is None or limit >= len(records):
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[index] for index in chosen]


def load_problems(
    domain: str,
    source: str,
    data_dir: str | Path | None = None,
    split: str = TRAIN_SPLIT,
    limit: int | None = None,
    seed: int = 0,
    *,
    template: str | None = None,
) -> list[Problem]:
    """Problems of one source and split (table in the module docstring), in file order.

    ``data_dir`` defaults to :func:`default_data_dir`. ``limit`` keeps that many problems drawn at random with
    ``seed`` (ids do not change). ``template`` replaces the default prompt; it must contain ``{question}``.
    """
    _check_choice(domain, DOMAINS, "domain")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty str, got {source!r}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty str, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    template = default_template(domain, source) if template is None else template
    if not isinstance(template, str) or QUESTION not in template:
        raise ValueError(f"template must be a str containing the placeholder {QUESTION}")

    local = None if source in _LOADERS else _local_path(source, data_dir)
    if local is not None:
        source_name = local.name.removesuffix(".jsonl")
        records = _local_file(domain, local, split)
    else:
        _check_choice(source, tuple(SOURCES[domain]), f"source (domain {domain!r})")
        _check_choice(split, SOURCES[domain][source], f"split (source {source!r})")
        if source not in GENERATED and not data_dir.is_dir():
            raise FileNotFoundError(f"data_dir {data_dir} is not a directory (set FORGETJAX_DATA_DIR)")
        source_name = source
        records = (_safety_domain(domain, data_dir, split) if domain in SAFETY_DOMAINS
                   else _LOADERS[source](data_dir, split))

    held_out = split != TRAIN_SPLIT if local is not None else is_held_out(source, split)
    duplicates = [item_id for item_id, n in Counter(r.item_id for r in records).items() if n > 1]
    if duplicates:
        raise ValueError(f"{source}: duplicate item ids {duplicates[:5]}")
    problems = []
    for record in _subset(records, limit, seed):
        problem_id = f"{source_name}/{record.item_id}"
        try:
            reference = normalize_reference(domain, record.reference)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{source} item {record.item_id}: {error}") from None
        metadata = {"source": source_name, "split": split, "held_out": held_out, "item_id": record.item_id,
                    "question": record.question, **record.extra}
        problems.append(Problem(problem_id, domain, render_prompt(template, record.question), reference, metadata))
    return problems
