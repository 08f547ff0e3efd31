"""Battery configs, deterministic item subsets, the battery runner and summaries.

A battery is a YAML file (see configs/eval/): top-level `name`, optional `description`, `format` ("chat" or
"fewshot"), `batch_size`, and `benchmarks`: a list of benchmark names or mappings with per-benchmark overrides
(limit, format, n_shots, max_new_tokens, temperature, top_p, n, pass_k, batch_size). A bare YAML list of entries
is accepted too. For code benchmarks pass@k is reported for `pass_k` (default: 1 and n).

`run_battery` evaluates one engine on every entry: load, subset (`select_subset`: sha256 order of (seed, item id),
so the same items are chosen before and after post-training whatever the order on disk), build prompts, call the
engine in batches, score (math through a `MathGrader` process pool, code through the sandboxed verifier), and write
one Parquet file per (model, benchmark) atomically, with a fingerprint of the configuration in its metadata.
Every entry is planned first (items loaded, resume decided, `check_ready` preflight such as IFEval's NLTK data),
so a missing scorer resource fails before any model time is spent.
A file whose fingerprint matches and that holds every selected item is skipped (resume); a file from a different
configuration is an error unless `overwrite=True`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml
from tqdm.auto import tqdm

from forgetjax.distributed import is_writer
from forgetjax.eval.benchmarks import FORMATS, Benchmark, GenerationSettings, Item, get_benchmark, list_benchmarks
from forgetjax.eval.benchmarks.base import MultipleChoiceOutput, ScoringContext, stable_hash
from forgetjax.eval.engine import Engine, Generation, GenerationRequest, LoglikelihoodResult
from forgetjax.errors import UserError
from forgetjax.eval.records import (
    EvalRecord,
    prompt_hash,
    read_metadata,
    read_records,
    records_from_table,
    records_to_table,
    write_records,
)
from forgetjax.io import write_text_atomic
from forgetjax.paths import CONFIGS_DIR

CONFIG_DIR = CONFIGS_DIR / "eval"
RECORDS_FORMAT_VERSION = "1"
SUMMARY_BASE_COLUMNS = ("benchmark", "family", "category", "n", "n_scored", "accuracy", "mean_score", "refusal_rate")


class BatteryConfigError(UserError):
    """A battery config that names an unknown key or benchmark, or holds a bad value."""


@dataclass(frozen=True)
class BenchmarkEntry:
    """One benchmark in a battery with its overrides (None = the benchmark's default)."""

    name: str
    limit: int | None = None
    format: str | None = None
    n_shots: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    pass_k: tuple[int, ...] | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class Battery:
    """A validated battery config."""

    name: str
    entries: tuple[BenchmarkEntry, ...]
    format: str = "chat"
    batch_size: int = 16
    description: str = ""
    source: str = "<memory>"


ENTRY_KEYS = tuple(f.name for f in fields(BenchmarkEntry))
TOP_LEVEL_KEYS = ("name", "description", "format", "batch_size", "benchmarks")


def _fail(source: str, where: str, message: str) -> BatteryConfigError:
    """A config error naming the file and the offending key."""
    return BatteryConfigError(f"{source}: {where}: {message}")


def _int_field(value: Any, source: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(source, where, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _float_field(value: Any, source: str, where: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, where, f"must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise _fail(source, where, f"must be in {bounds}, got {value!r}")
    return float(value)


def _format_field(value: Any, source: str, where: str) -> str:
    if value not in FORMATS:
        raise _fail(source, where, f"must be one of {FORMATS}, got {value!r}")
    return value


def parse_entry(raw: Any, source: str, index: int) -> BenchmarkEntry:
    """Validate one `benchmarks` entry (a name or a mapping)."""
    where = f"benchmarks[{index}]"
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise _fail(source, where, f"must be a benchmark name or a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        label = f"{where} ({raw.get('name', '?')})"
        raise _fail(source, label, f"unknown key(s) {unknown}; allowed: {list(ENTRY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(source, f"{where}.name", "a benchmark name is required")
    if name not in list_benchmarks():
        raise _fail(source, f"{where}.name", f"unknown benchmark {name!r}; known: {', '.join(list_benchmarks())}")
    values: dict[str, Any] = {"name": name}
    here = f"{where} ({name})"
    for key in ("limit", "max_new_tokens", "n", "batch_size"):
        if raw.get(key) is not None:
            values[key] = _int_field(raw[key], source, f"{here}.{key}", 1)
    if raw.get("n_shots") is not None:
        values["n_shots"] = _int_field(raw["n_shots"], source, f"{here}.n_shots", 0)
    if raw.get("format") is not None:
        values["format"] = _format_field(raw["format"], source, f"{here}.format")
    if raw.get("temperature") is not None:
        values["temperature"] = _float_field(raw["temperature"], source, f"{here}.temperature", 0.0, 100.0)
    if raw.get("top_p") is not None:
        values["top_p"] = _float_field(raw["top_p"], source, f"{here}.top_p", 0.0, 1.0, low_open=True)
    if raw.get("pass_k") is not None:
        ks = raw["pass_k"] if isinstance(raw["pass_k"], list) else [raw["pass_k"]]
        values["pass_k"] = tuple(_int_field(k, source, f"{here}.pass_k", 1) for k in ks)
    return BenchmarkEntry(**values)


def parse_battery(data: Any, source: str = "<memory>", default_name: str = "battery") -> Battery:
    """Validate a battery config already parsed from YAML."""
    if isinstance(data, list):
        data = {"benchmarks": data}
    if not isinstance(data, Mapping):
        raise BatteryConfigError(f"{source}: a battery must be a mapping with 'benchmarks' or a list of benchmarks")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise _fail(source, "top level", f"unknown key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)}")
    raw_entries = data.get("benchmarks")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise _fail(source, "benchmarks", "must be a non-empty list")
    entries = tuple(parse_entry(raw, source, i) for i, raw in enumerate(raw_entries))
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.name in seen:
            raise _fail(source, f"benchmarks[{index}].name", f"benchmark {entry.name!r} is listed twice")
        seen.add(entry.name)
    fmt = _format_field(data.get("format", "chat"), source, "format")
    batch_size = _int_field(data.get("batch_size", 16), source, "batch_size", 1)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise _fail(source, "name", f"must be a non-empty string, got {name!r}")
    description = data.get("description", "")
    return Battery(name, entries, fmt, batch_size, str(description or ""), source)


def load_battery(path: str | os.PathLike[str]) -> Battery:
    """Read and validate a battery YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"battery config not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise BatteryConfigError(f"{path}: invalid YAML: {err}") from err
    return parse_battery(data, source=str(path), default_name=path.stem)


def resolve_battery(battery: Battery | str | os.PathLike[str]) -> Battery:
    """A Battery, a path to a YAML file, or the name of a config in configs/eval (e.g. "quick")."""
    if isinstance(battery, Battery):
        return battery
    path = Path(battery)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_battery(path)
    return load_battery(CONFIG_DIR / f"{battery}.yaml")


def select_subset(
    items: Sequence[Item], limit: int | None, seed: int, group: Callable[[Item], str] | None = None
) -> list[Item]:
    """Up to `limit` items, chosen and ordered by sha256(seed, item id): independent of the input order.

    With `group` (a benchmark's `group_id`), groups are chosen and ordered by sha256(seed, group id) and `limit`
    counts groups; a group's items stay together in input order. Without it every item is its own group.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"select_subset: duplicate item ids {duplicates}")
    group = group or (lambda item: item.id)
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(group(item), []).append(item)
    ordered = sorted(groups, key=lambda key: (stable_hash("subset", seed, key), key))
    chosen = ordered if limit is None else ordered[:limit]
    return [item for key in chosen for item in groups[key]]


def item_seed(seed: int, benchmark: str, item_id: str) -> int:
    """The sampling seed of one item: fixed by (run seed, benchmark, item), independent of batching."""
    return stable_hash("generation", seed, benchmark, item_id) % (2**31)


def effective_limit(entry_limit: int | None, run_limit: int | None) -> int | None:
    """The smaller of the entry's and the run's limits (None = no limit)."""
    limits = [v for v in (entry_limit, run_limit) if v is not None]
    return min(limits) if limits else None


def generation_settings(benchmark: Benchmark, entry: BenchmarkEntry, fmt: str) -> GenerationSettings:
    """The benchmark's defaults with the entry's overrides applied."""
    base = benchmark.generation_settings(fmt)
    return GenerationSettings(
        max_new_tokens=entry.max_new_tokens or base.max_new_tokens,
        temperature=base.temperature if entry.temperature is None else entry.temperature,
        top_p=base.top_p if entry.top_p is None else entry.top_p,
        n=entry.n or base.n,
        stop=base.stop,
    )


def missing_requirements(benchmark: Benchmark) -> list[str]:
    """The modules a benchmark's scorer needs that cannot be imported here."""
    missing = []
    for module in benchmark.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def model_slug(model_id: str) -> str:
    """A file-system-safe directory name for a model id."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._")
    if not slug:
        raise ValueError(f"model_id {model_id!r} gives an empty directory name")
    return slug


def render_prompt(engine: Engine, prompt: str | list[dict[str, str]]) -> str:
    """The exact prompt text: plain text as is, chat messages through the engine's chat template."""
    return prompt if isinstance(prompt, str) else engine.apply_chat_template(prompt)


def batches(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of at most `size` values."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


@dataclass
class _Scored:
    """One item's prompt text, engine output and score dict, before it becomes an EvalRecord."""

    item: Item
    prompt_text: str
    score: dict[str, Any]
    output: str | None = None
    output_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _generate_and_score(
    engine: Engine,
    benchmark: Benchmark,
    items: Sequence[Item],
    entry: BenchmarkEntry,
    fmt: str,
    seed: int,
    batch_size: int,
    ctx: ScoringContext,
    bar: Any,
) -> list[_Scored]:
    """Generative and safety benchmarks: sample in batches (per-item seeds), then score each batch."""
    settings = generation_settings(benchmark, entry, fmt)
    scored: list[_Scored] = []
    for batch in batches(items, batch_size):
        prompts = [benchmark.build_prompt(item, fmt, entry.n_shots) for item in batch]
        requests = [
            GenerationRequest(
                prompt=prompt,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                n=settings.n,
                stop=settings.stop,
                seed=item_seed(seed, benchmark.name, item.id),
            )
            for item, prompt in zip(batch, prompts)
        ]
        generations = engine.generate(requests)
        if len(generations) != len(requests):
            raise RuntimeError(
                f"{benchmark.name}: engine returned {len(generations)} generations for {len(requests)} requests"
            )
        for generation in generations:
            if not isinstance(generation, Generation) or len(generation.texts) != settings.n:
                raise RuntimeError(f"{benchmark.name}: each generation must be a Generation with n={settings.n} texts")
        scores = benchmark.score_many(batch, generations, ctx)
        for item, prompt, generation, score in zip(batch, prompts, generations, scores):
            extra: dict[str, Any] = {}
            if settings.n > 1:
                extra["samples"] = list(generation.texts)
                extra["sample_tokens"] = list(generation.output_tokens)
            tokens = generation.output_tokens[0] if generation.output_tokens else None
            scored.append(_Scored(item, render_prompt(engine, prompt), score, generation.texts[0], tokens, extra))
        bar.update(len(batch))
    return scored


def _loglikelihood_and_score(
    engine: Engine,
    benchmark: Benchmark,
    items: Sequence[Item],
    entry: BenchmarkEntry,
    fmt: str,
    batch_size: int,
    ctx: ScoringContext,
    bar: Any,
) -> list[_Scored]:
    """Multiple choice: one (context, continuation) request per option, batched over items, then scored; an item
    whose options have their own contexts (partial scoring) records them joined by a record separator."""
    scored: list[_Scored] = []
    for batch in batches(items, batch_size):
        per_item = [[(render_prompt(engine, prompt), continuation)
                     for prompt, continuation in benchmark.option_requests(item, fmt, entry.n_shots)]
                    for item in batch]
        contexts = ["\n\x1e\n".join(dict.fromkeys(context for context, _ in pairs)) for pairs in per_item]
        continuations = [[c for _, c in pairs] for pairs in per_item]
        requests = [pair for pairs in per_item for pair in pairs]
        results = engine.loglikelihood(requests)
        if len(results) != len(requests):
            raise RuntimeError(
                f"{benchmark.name}: engine returned {len(results)} loglikelihoods for {len(requests)} requests"
            )
        if not all(isinstance(r, LoglikelihoodResult) for r in results):
            raise RuntimeError(f"{benchmark.name}: loglikelihood must return LoglikelihoodResult objects")
        outputs, position = [], 0
        for conts in continuations:
            outputs.append(MultipleChoiceOutput(list(results[position : position + len(conts)]), list(conts)))
            position += len(conts)
        scores = benchmark.score_many(batch, outputs, ctx)
        for item, context, output, score in zip(batch, contexts, outputs, scores):
            extra = {
                "option_tokens": [r.n_tokens for r in output.results],
                "option_greedy": [r.is_greedy for r in output.results],
            }
            scored.append(_Scored(item, context, score, None, None, extra))
        bar.update(len(batch))
    return scored


def _to_record(scored: _Scored, benchmark: Benchmark, run_id: str, model_id: str, seed: int, fmt: str) -> EvalRecord:
    """Merge the score dict into an EvalRecord (its extra dict JSON-encoded with the family and format)."""
    score = dict(scored.score)
    extra = {"family": benchmark.category, "format": fmt, **scored.extra, **score.pop("extra", {})}
    return EvalRecord(
        run_id=run_id,
        model_id=model_id,
        benchmark=benchmark.name,
        category=scored.item.category,
        item_id=scored.item.id,
        prompt_hash=prompt_hash(scored.prompt_text),
        output=scored.output,
        extracted_answer=score.get("extracted_answer"),
        correct=score.get("correct"),
        score=score.get("score"),
        option_logprobs=score.get("option_logprobs"),
        chosen_option=score.get("chosen_option"),
        confidence=score.get("confidence"),
        k=score.get("k", benchmark.k if benchmark.kind == "multiple_choice" else None),
        output_tokens=scored.output_tokens,
        refusal=score.get("refusal"),
        refusal_judge=score.get("refusal_judge"),
        seed=item_seed(seed, benchmark.name, scored.item.id) if benchmark.kind != "multiple_choice" else seed,
        extra=json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str),
    )


def evaluate_benchmark(
    engine: Engine,
    benchmark: Benchmark,
    items: Sequence[Item],
    entry: BenchmarkEntry,
    fmt: str,
    run_id: str,
    seed: int,
    batch_size: int,
    ctx: ScoringContext,
    progress: bool = True,
    desc: str | None = None,
) -> list[EvalRecord]:
    """Prompt, query the engine in batches, score, and return one record per item."""
    bar_options = {"desc": desc or benchmark.name, "unit": "item", "disable": not progress, "dynamic_ncols": True}
    with tqdm(total=len(items), **bar_options) as bar:
        if benchmark.kind == "multiple_choice":
            scored = _loglikelihood_and_score(engine, benchmark, items, entry, fmt, batch_size, ctx, bar)
        else:
            scored = _generate_and_score(engine, benchmark, items, entry, fmt, seed, batch_size, ctx, bar)
    return [_to_record(s, benchmark, run_id, engine.model_id, seed, fmt) for s in scored]


def fingerprint(
    run_id: str, model_id: str, benchmark: Benchmark, entry: BenchmarkEntry, fmt: str, seed: int, limit: int | None,
    items: Sequence[Item],
) -> dict[str, Any]:
    """What determines a benchmark file's content; resume only reuses a file with an identical fingerprint."""
    settings = asdict(generation_settings(benchmark, entry, fmt)) if benchmark.kind != "multiple_choice" else None
    fingerprint_fields = {
        "version": RECORDS_FORMAT_VERSION,
        "run_id": run_id,
        "model_id": model_id,
        "benchmark": benchmark.name,
        "format": fmt,
        "seed": seed,
        "limit": limit,
        "n_shots": benchmark.n_shots(entry.n_shots),
        "generation": settings,
        "pass_k": list(entry.pass_k or sorted({1, entry.n or 1})),
        "item_ids_sha256": prompt_hash("\n".join(item.id for item in items)),
    }
    return json.loads(json.dumps(fingerprint_fields, sort_keys=True))


def _is_complete(path: Path, expected: dict[str, Any], n_items: int) -> bool:
    """Whether the file holds this exact configuration's records for every item; raises on a foreign file."""
    metadata = read_metadata(path)
    stored = json.loads(metadata.get("fingerprint", "{}"))
    if stored != expected:
        differing = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise FileExistsError(
            f"{path} was written with a different configuration (differs in {differing}); "
            "use another out_dir or run_id, delete the file, or pass overwrite=True"
        )
    return int(metadata.get("n_items", -1)) == n_items and len(read_records(path)) == n_items


@dataclass
class _Plan:
    """One battery entry ready to run: its items, output path, fingerprint and whether it is already done."""

    entry: BenchmarkEntry
    benchmark: Benchmark
    fmt: str
    items: list[Item]
    path: Path
    expected: dict[str, Any]
    complete: bool


def _plan(
    entry: BenchmarkEntry, benchmark: Benchmark, battery: Battery, model_id: str, data_dir: str | os.PathLike[str],
    model_dir: Path, run_id: str, seed: int, limit: int | None, fmt: str | None, overwrite: bool,
) -> _Plan:
    """Load and subset one entry's items and decide whether its file is already complete."""
    entry_fmt = entry.format or fmt or battery.format
    entry_limit = effective_limit(entry.limit, limit)
    items = select_subset(benchmark.load(data_dir), entry_limit, seed, benchmark.group_id)
    path = model_dir / f"{benchmark.name}.parquet"
    expected = fingerprint(run_id, model_id, benchmark, entry, entry_fmt, seed, entry_limit, items)
    complete = path.exists() and not overwrite and _is_complete(path, expected, len(items))
    return _Plan(entry, benchmark, entry_fmt, items, path, expected, complete)


@dataclass
class BatteryResult:
    """Where a battery run wrote its files, which benchmarks were resumed, and the summary rows."""

    files: dict[str, Path]
    skipped: list[str]
    summary: list[dict[str, Any]]
    summary_path: Path


def run_battery(
    engine: Engine,
    battery: Battery | str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    run_id: str,
    seed: int,
    limit: int | None = None,
    progress: bool = True,
    *,
    judge: Callable[[str, str], Any] | None = None,
    math_grader: Any = None,
    code_workers: int = 2,
    code_timeout_s: float = 10.0,
    overwrite: bool = False,
    fmt: str | None = None,
) -> BatteryResult:
    """Evaluate `engine` on every benchmark of the battery; one Parquet file per (model, benchmark), resumable.

    `limit` caps every entry's own limit; `fmt` replaces the battery's default prompt format (entries that set
    their own format keep it); `judge(prompt, response)` adds a verdict to safety records.
    """
    battery = resolve_battery(battery)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(engine, Engine):
        raise TypeError(
            "engine must implement the Engine protocol (model_id, generate, loglikelihood, apply_chat_template)"
        )
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    benchmarks = [get_benchmark(entry.name) for entry in battery.entries]
    missing = {b.name: missing_requirements(b) for b in benchmarks if missing_requirements(b)}
    if missing:
        raise ModuleNotFoundError(f"{battery.source}: scorers unavailable for {missing}")
    model_dir = Path(out_dir) / model_slug(engine.model_id)
    plans = [
        _plan(entry, benchmark, battery, engine.model_id, data_dir, model_dir, run_id, seed, limit, fmt, overwrite)
        for entry, benchmark in zip(battery.entries, benchmarks)
    ]
    for plan in plans:
        if not plan.complete:
            plan.benchmark.check_ready(plan.items)
    owned_grader = None
    evaluated: dict[str, list[EvalRecord]] = {}
    try:
        for index, plan in enumerate(plans, start=1):
            label = f"[{index}/{len(plans)}] {plan.benchmark.name}"
            if plan.complete:
                if progress:
                    tqdm.write(f"{label}: complete, skipped ({plan.path})")
                continue
            needs_math = "forgetjax.verifiers.math" in plan.benchmark.requires
            if needs_math and math_grader is None and owned_grader is None:
                from forgetjax.verifiers.math import MathGrader

                owned_grader = MathGrader(max_workers=2)
            ctx = ScoringContext(
                math_grader=math_grader or owned_grader,
                judge=judge,
                code_workers=code_workers,
                code_timeout_s=code_timeout_s,
                pass_k=plan.entry.pass_k or tuple(sorted({1, plan.entry.n or 1})),
            )
            batch_size = plan.entry.batch_size or battery.batch_size
            records = evaluate_benchmark(
                engine, plan.benchmark, plan.items, plan.entry, plan.fmt, run_id, seed, batch_size, ctx, progress, label
            )
            metadata = {"fingerprint": json.dumps(plan.expected, sort_keys=True), "n_items": str(len(plan.items))}
            if is_writer():
                write_records(records, plan.path, metadata=metadata)
            evaluated[plan.benchmark.name] = records_from_table(records_to_table(records))
    finally:
        if owned_grader is not None:
            owned_grader.close()
    files = {plan.benchmark.name: plan.path for plan in plans}
    skipped = [plan.benchmark.name for plan in plans if plan.complete]
    all_records = [record for name, path in files.items()
                   for record in (evaluated[name] if name in evaluated else read_records(path))]
    rows = summarize(all_records)
    summary_path = model_dir / "summary.csv"
    if is_writer():
        write_summary_csv(rows, summary_path)
    if progress:
        print(format_table(rows))
    return BatteryResult(files, skipped, rows, summary_path)


def _mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values (never a mean over missing entries)."""
    return sum(values) / len(values) if values else None


def _summary_row(
    benchmark: str, family: str, category: str, records: Sequence[EvalRecord], metric_fn: Callable
) -> dict[str, Any]:
    """One summary row: masked means of correct, score and refusal over the records, plus extra metrics."""
    correct = [r.correct for r in records if r.correct is not None]
    scores = [r.score for r in records if r.score is not None and not math.isnan(r.score)]
    refusals = [int(r.refusal) for r in records if r.refusal is not None]
    row = {
        "benchmark": benchmark,
        "family": family,
        "category": category,
        "n": len(records),
        "n_scored": len(correct) if correct else len(scores),
        "accuracy": _mean(correct),
        "mean_score": _mean(scores),
        "refusal_rate": _mean(refusals),
    }
    row.update(metric_fn([r.extra_dict() for r in records]))
    return row


def summarize(records: Iterable[EvalRecord]) -> list[dict[str, Any]]:
    """Per benchmark (category "ALL") and per category: n, accuracy, mean score, refusal rate, extra metrics.

    Accuracy is the mean of `correct` over the records that have one; refusal_rate is set only where the matcher ran.
    """
    grouped: dict[str, list[EvalRecord]] = {}
    for record in records:
        grouped.setdefault(record.benchmark, []).append(record)
    rows = []
    for name in sorted(grouped):
        group = grouped[name]
        try:
            benchmark = get_benchmark(name)
            family, metric_fn = benchmark.category, benchmark.summary_metrics
        except KeyError:
            family, metric_fn = group[0].extra_dict().get("family", ""), (lambda extras: {})
        rows.append(_summary_row(name, family, "ALL", group, metric_fn))
        categories = sorted({r.category for r in group})
        if len(categories) > 1:
            for category in categories:
                members = [r for r in group if r.category == category]
                rows.append(_summary_row(name, family, category, members, metric_fn))
    return rows


def summary_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The base columns followed by every extra metric present, in first-seen order."""
    extra = []
    for row in rows:
        extra.extend(k for k in row if k not in SUMMARY_BASE_COLUMNS and k not in extra)
    return [*SUMMARY_BASE_COLUMNS, *extra]


def write_summary_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write summary rows as CSV atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=summary_columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_text_atomic(path, buffer.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Summary rows as a fixed-width text table."""
    if not rows:
        return "(no results)"
    columns = summary_columns(rows)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)
