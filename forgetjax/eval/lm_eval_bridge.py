"""The lm-eval bridge: standard harness numbers for a forgetjax model, as forgetjax per-item records.

`run_lm_eval(model_source, tasks, out_dir)`:

1. exports the model to an HF directory (an HF directory source is used as is; anything else - forgetjax checkpoint,
   .gguf, hub id, embedded name - goes through `forgetjax.load` + `forgetjax.export_hf` in a child process pinned to
   the CPU, so this process never holds accelerator memory that lm-eval's torch model needs);
2. writes lm-eval task YAMLs for the LOCAL data files of the data directory (`write_task_configs`): every task reads
   its documents through `custom_dataset: !function forgetjax.eval.lm_eval_bridge.lm_eval_dataset`, so nothing is
   downloaded and no data is copied;
3. runs lm-eval 0.4 (`simple_evaluate`, HF backend, `log_samples=True`) in a child process with
   HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1 and HF_EVALUATE_OFFLINE=1 set, so nothing reaches
   the network;
4. converts lm-eval's per-sample logs into `EvalRecord`s, one Parquet file per (model, task), plus a summary.

Layout under `out_dir/<model slug>/lm_eval/`: `<benchmark>.parquet` (records), `<benchmark>.samples.jsonl.gz`
(lm-eval's logged samples), `<benchmark>.lm_eval.json` (lm-eval's aggregated results, configs, versions),
`summary.csv`, and `tasks/` (the generated YAMLs, usable with `lm_eval --include_path`). A records file whose
fingerprint matches is skipped (resume); one from another configuration is an error unless `overwrite=True`.

Tasks and their prompt formats (mirroring lm-eval's bundled YAMLs; tests compare them with the installed copies):
- `mmlu`: the 57 `mmlu_<subject>` tasks under one `mmlu` group (acc weighted by size = the micro average). Prompt,
  description and " A".." D" continuations as lm-eval's `mmlu/default`; shots are the subject's dev rows in file
  order (`first_n`). Deliberate difference: 5 shots by default (forgetjax's MMLU default and the usual published
  setting, i.e. `lm_eval --tasks mmlu --num_fewshot 5`); lm-eval's YAML itself defaults to 0 shots.
- `truthfulqa_mc1` / `truthfulqa_mc2`: lm-eval's six-question QA primer, the v1 (817) questions with choices in the
  data file's order. MC2's score is computed with forgetjax's numerically stable `true_mass` (lm-eval exponentiates
  raw log-likelihoods, which underflows only for log-likelihoods below about -745).
- `piqa`: "Question: <goal>\\nAnswer:" with both solutions as continuations (acc and acc_norm); zero-shot only,
  since the data pack has no PIQA train split.
- `gsm8k`: lm-eval's 5-shot "Question:/Answer:" prompt with shots drawn from the local train.jsonl by lm-eval's own
  seeded sampler, greedy generation until "Question:", and its "strict-match" (`#### <number>`) and
  "flexible-extract" (last number) filters; `correct` is strict-match, flexible-extract goes to `extra`.
No chat template is applied (lm-eval's default); `arc` is not available (no complete ARC copy in the data pack).

Records use forgetjax's item ids (`mmlu`: "<subject>/<row:04d>", `truthfulqa_*`: "<index:03d>", `piqa`: the row's
id, `gsm8k`: "test-<row:04d>") and its benchmark names, so pre/post joins work across the two backends. Option
log-probabilities are stored in the option order of forgetjax's own benchmark (TruthfulQA shuffles its options per
item; lm-eval's are mapped onto that order); `chosen_option` is lm-eval's argmax, `correct` is lm-eval's acc.
With `limit`, the items are forgetjax's `select_subset(items, limit, seed)` (the same items the battery picks), kept
in file order; `seed` selects the subset only, lm-eval keeps its default seeds (few-shot sampler 1234), so a run
without `limit` is exactly a standard lm-eval run on the local data.

Against forgetjax's own backend (same items, same ids): MMLU and PIQA prompts and continuations are identical to
forgetjax's "fewshot" format, so their option log-likelihoods, chosen options and accuracy agree (tests check this);
TruthfulQA differs by design (lm-eval's primer and option order vs forgetjax's own primer and shuffled options) and
GSM8K's shots differ (lm-eval samples annotated train solutions; forgetjax uses a fixed stripped pool). lm-eval does
not log generated token counts, so GSM8K records have `output_tokens=None`.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import yaml

from forgetjax.eval.battery import format_table, model_slug, select_subset, summarize, write_summary_csv
from forgetjax.eval.benchmarks import Item, get_benchmark
from forgetjax.eval.benchmarks.base import LETTERS, log_softmax, true_mass
from forgetjax.eval.benchmarks.multiple_choice import read_mmlu_rows
from forgetjax.eval.records import EvalRecord, prompt_hash, read_metadata, read_records, write_records
from forgetjax.io import atomic_open, read_jsonl, write_json_atomic, write_text_atomic
from forgetjax.paths import REPO_ROOT, default_data_dir
from forgetjax.tasks.readers import require_file

BACKEND = "lm-eval"
RECORDS_FORMAT_VERSION = "1"
DATASET_FUNCTION = "forgetjax.eval.lm_eval_bridge.lm_eval_dataset"
MC2_FUNCTION = "forgetjax.eval.lm_eval_bridge.process_results_mc2"
DTYPES = ("float32", "bfloat16", "float16")
OFFLINE_ENV = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
TARGET_DELIMITER = " "
MMLU_SHOTS_AVAILABLE = 5

MMLU_DOC_TO_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
)
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
GSM8K_METRIC = {
    "metric": "exact_match",
    "aggregation": "mean",
    "higher_is_better": True,
    "ignore_case": True,
    "ignore_punctuation": False,
    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}
GSM8K_FILTERS = [
    {
        "name": "strict-match",
        "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}],
    },
    {
        "name": "flexible-extract",
        "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
            {"function": "take_first"},
        ],
    },
]
GSM8K_GENERATION = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0}
GSM8K_STRICT, GSM8K_FLEXIBLE = "strict-match", "flexible-extract"
INVALID_ANSWER = "[invalid]"


@dataclass(frozen=True)
class TaskSpec:
    """One supported task: shot counts the local data allows and the version of the lm-eval YAML it mirrors."""

    name: str
    default_shots: int
    max_shots: int | None
    version: float
    why_no_shots: str = ""


NO_PRIMER_SHOTS = "its six-question QA primer is part of the prompt"
TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec("mmlu", 5, MMLU_SHOTS_AVAILABLE, 1.0),
    "truthfulqa_mc1": TaskSpec("truthfulqa_mc1", 0, 0, 2.0, NO_PRIMER_SHOTS),
    "truthfulqa_mc2": TaskSpec("truthfulqa_mc2", 0, 0, 3.0, NO_PRIMER_SHOTS),
    "piqa": TaskSpec("piqa", 0, 0, 1.0, "the data pack has no PIQA train split to draw shots from"),
    "gsm8k": TaskSpec("gsm8k", 5, None, 3.0),
}


class FunctionRef(str):
    """A YAML `!function module.attr` reference (lm-eval imports it when it loads the task)."""


class _TaskDumper(yaml.SafeDumper):
    """SafeDumper writing FunctionRef values with lm-eval's `!function` tag and multi-line strings as blocks."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_TaskDumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))
_TaskDumper.add_representer(str, _represent_text)


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Validated task names (a list or a comma-separated string), duplicates removed, order kept."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        arc = any("arc" in n for n in unknown)
        hint = " (arc is not available: the data pack has no complete ARC copy)" if arc else ""
        raise ValueError(f"tasks: unknown lm-eval task(s) {unknown}; supported: {sorted(TASKS)}{hint}")
    return list(dict.fromkeys(names))


def task_shots(task: str, num_fewshot: int | None) -> int:
    """The number of shots a task runs with: its default, or `num_fewshot` where the local data allows it."""
    spec = TASKS[task]
    if num_fewshot is None:
        return spec.default_shots
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot for {task} must be a non-negative integer or None, got {num_fewshot!r}")
    if spec.max_shots is not None and num_fewshot > spec.max_shots:
        reason = spec.why_no_shots or f"only {spec.max_shots} dev rows per subject"
        raise ValueError(f"num_fewshot={num_fewshot} is not supported for {task}: {reason} (max {spec.max_shots})")
    return num_fewshot


def resolve_shots(tasks: Sequence[str], num_fewshot: int | Mapping[str, int] | None) -> dict[str, int]:
    """Shots per task from one number for every task, a {task: shots} mapping (others default), or None."""
    if isinstance(num_fewshot, Mapping):
        unknown = sorted(set(num_fewshot) - set(tasks))
        if unknown:
            raise ValueError(f"num_fewshot names task(s) {unknown} that are not among the tasks {list(tasks)}")
        return {task: task_shots(task, num_fewshot.get(task)) for task in tasks}
    return {task: task_shots(task, num_fewshot) for task in tasks}


def check_max_gen_toks(max_gen_toks: int | None) -> int | None:
    """A positive generation budget or None (lm-eval's default, 256 tokens for the HF backend)."""
    if max_gen_toks is not None and (isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int)
                                     or max_gen_toks < 1):
        raise ValueError(f"max_gen_toks must be a positive integer or None, got {max_gen_toks!r}")
    return max_gen_toks


def check_limit(limit: int | None) -> int | None:
    """A positive integer limit or None."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return limit


# ----------------------------------------------------------------------------------------------------------------
# Documents for lm-eval, read from the local data directory


@functools.lru_cache(maxsize=8)
def _benchmark_items(benchmark: str, data_dir: str) -> tuple[Item, ...]:
    """forgetjax's items of a benchmark (cached: the 57 MMLU subject tasks share one load)."""
    return tuple(get_benchmark(benchmark).load(data_dir))


def selected_items(benchmark: str, data_dir: str | os.PathLike[str], limit: int | None, seed: int) -> list[Item]:
    """The items a run evaluates: forgetjax's `select_subset` (all items when limit is None), in file order."""
    items = _benchmark_items(benchmark, str(Path(data_dir).resolve()))
    chosen = {item.id for item in select_subset(items, check_limit(limit), seed, get_benchmark(benchmark).group_id)}
    return [item for item in items if item.id in chosen]


def _mmlu_doc(row: Mapping[str, Any], subject: str) -> dict[str, Any]:
    """An MMLU row in the field layout of lm-eval's `cais/mmlu` documents."""
    return {"question": row["question"], "subject": subject, "choices": list(row["options"]), "answer": row["answer"]}


def mmlu_docs(data_dir: str, subject: str, limit: int | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """test: the subject's selected rows; dev: its dev rows in file order (the few-shot pool)."""
    items = _benchmark_items("mmlu", str(Path(data_dir).resolve()))
    all_rows = [item for item in items if item.data["subject"] == subject]
    if not all_rows:
        raise ValueError(f"mmlu: no test rows for subject {subject!r} in {data_dir}")
    test = [
        {"item_id": item.id, **_mmlu_doc(item.data, subject)}
        for item in selected_items("mmlu", data_dir, limit, seed)
        if item.data["subject"] == subject
    ]
    dev = [_mmlu_doc(row, subject) for row in read_mmlu_rows(Path(data_dir) / "mmlu" / "dev" / f"{subject}_dev.csv")]
    return {"test": test, "dev": dev}


def truthfulqa_docs(benchmark: str, data_dir: str, limit: int | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """validation: the v1 questions with mc1/mc2 choices in the data file's order (as lm-eval's `truthful_qa`)."""
    path = require_file(Path(data_dir) / "truthfulqa" / "v1" / "mc_task.json")
    with open(path, encoding="utf-8") as handle:
        questions = json.load(handle)
    wanted = {item.id for item in selected_items(benchmark, data_dir, limit, seed)}
    docs = []
    for index, row in enumerate(questions):
        item_id = f"{index:03d}"
        if item_id not in wanted:
            continue
        targets = {
            key: {"choices": list(row[key].keys()), "labels": [int(v) for v in row[key].values()]}
            for key in ("mc1_targets", "mc2_targets")
        }
        docs.append({"item_id": item_id, "question": row["question"], **targets})
    if len(docs) != len(wanted):
        raise ValueError(f"{path}: {len(docs)} questions matched forgetjax's {len(wanted)} selected TruthfulQA ids")
    return {"validation": docs}


def piqa_docs(data_dir: str, limit: int | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """validation: goal, sol1, sol2 and the label from dev-labels.lst (as lm-eval's `piqa` documents)."""
    docs = [
        {"item_id": item.id, "goal": item.data["goal"], "sol1": item.data["options"][0],
         "sol2": item.data["options"][1], "label": item.data["answer"]}
        for item in selected_items("piqa", data_dir, limit, seed)
    ]
    return {"validation": docs}


def gsm8k_docs(data_dir: str, limit: int | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """test: the selected test problems; train: all of train.jsonl in file order (lm-eval's few-shot pool)."""
    test = [
        {"item_id": item.id, "question": item.data["question"], "answer": item.data["answer"]}
        for item in selected_items("gsm8k", data_dir, limit, seed)
    ]
    train = [
        {"question": row["question"], "answer": row["answer"]}
        for row in read_jsonl(require_file(Path(data_dir) / "gsm8k" / "train.jsonl"))
    ]
    return {"test": test, "train": train}


def task_docs(
    benchmark: str, data_dir: str, limit: int | None = None, seed: int = 0, subject: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The documents of one lm-eval task, split name -> rows."""
    data_dir = str(data_dir)
    if benchmark == "mmlu":
        if not subject:
            raise ValueError("mmlu documents need a subject")
        return mmlu_docs(data_dir, subject, limit, seed)
    if benchmark in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return truthfulqa_docs(benchmark, data_dir, limit, seed)
    if benchmark == "piqa":
        return piqa_docs(data_dir, limit, seed)
    if benchmark == "gsm8k":
        return gsm8k_docs(data_dir, limit, seed)
    raise ValueError(f"benchmark {benchmark!r} has no lm-eval documents; supported: {sorted(TASKS)}")


def lm_eval_dataset(
    *, benchmark: str, data_dir: str, limit: int | None = None, seed: int = 0, subject: str | None = None,
    **_task_metadata: Any,
):
    """lm-eval `custom_dataset` hook: a `datasets.DatasetDict` built in memory from the local files.

    lm-eval calls it with the task's `dataset_kwargs` and its `metadata` (version, config_source), hence the
    catch-all keyword arguments."""
    import datasets

    splits = task_docs(benchmark, data_dir, limit, seed, subject)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def process_results_mc2(doc: Mapping[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """TruthfulQA MC2 for lm-eval: normalised probability mass on the true answers (numerically stable)."""
    logprobs = [float(ll) for ll, _ in results]
    return {"acc": true_mass(logprobs, [bool(v) for v in doc["mc2_targets"]["labels"]])}


# ----------------------------------------------------------------------------------------------------------------
# Task YAMLs


def mmlu_subjects(data_dir: str | os.PathLike[str], limit: int | None, seed: int) -> list[str]:
    """The MMLU subjects with at least one selected item, sorted."""
    return sorted({item.data["subject"] for item in selected_items("mmlu", data_dir, limit, seed)})


def _metric(name: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def _dataset_fields(benchmark: str, data_dir: str, limit: int | None, seed: int, **extra: Any) -> dict[str, Any]:
    kwargs = {"benchmark": benchmark, "data_dir": data_dir, "limit": limit, "seed": seed, **extra}
    return {"custom_dataset": FunctionRef(DATASET_FUNCTION), "dataset_kwargs": kwargs}


def task_configs(
    task: str, data_dir: str | os.PathLike[str], limit: int | None = None, seed: int = 0,
    num_fewshot: int | None = None, max_gen_toks: int | None = None,
) -> dict[str, dict[str, Any]]:
    """lm-eval configs (file stem -> config) for one supported task, reading the local data directory.

    The first entry is what `simple_evaluate` is asked to run (the `mmlu` group, or the task itself).
    `max_gen_toks` caps GSM8K's generation (None keeps lm-eval's default)."""
    resolve_tasks([task])
    data_dir = str(Path(data_dir).resolve())
    shots = task_shots(task, num_fewshot)
    check_limit(limit)
    generation = dict(GSM8K_GENERATION)
    if check_max_gen_toks(max_gen_toks) is not None:
        generation["max_gen_toks"] = max_gen_toks
    meta = {"version": TASKS[task].version, "forgetjax_benchmark": task}
    if task == "mmlu":
        subjects = mmlu_subjects(data_dir, limit, seed)
        group = {
            "group": "mmlu",
            "task": [f"mmlu_{s}" for s in subjects],
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2, "forgetjax_benchmark": task},
        }
        configs = {"mmlu": group}
        for subject in subjects:
            configs[f"mmlu_{subject}"] = {
                "task": f"mmlu_{subject}",
                "task_alias": subject,
                **_dataset_fields(task, data_dir, limit, seed, subject=subject),
                "test_split": "test",
                "fewshot_split": "dev",
                "fewshot_config": {"sampler": "first_n"},
                "num_fewshot": shots,
                "output_type": "multiple_choice",
                "description": f"The following are multiple choice questions (with answers) about "
                f"{subject.replace('_', ' ')}.\n\n",
                "doc_to_text": MMLU_DOC_TO_TEXT,
                "doc_to_choice": list(LETTERS[:4]),
                "doc_to_target": "answer",
                "metric_list": [_metric("acc")],
                "metadata": meta,
            }
        return configs
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        targets = "mc1_targets" if task == "truthfulqa_mc1" else "mc2_targets"
        config = {
            "task": task,
            **_dataset_fields(task, data_dir, limit, seed),
            "output_type": "multiple_choice",
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            "num_fewshot": shots,
            "doc_to_text": TRUTHFULQA_PRIMER + "\n\nQ: {{question}}\nA:",
            "doc_to_target": 0,
            "doc_to_choice": "{{" + targets + ".choices}}",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "question",
            "metric_list": [_metric("acc")],
            "metadata": meta,
        }
        if task == "truthfulqa_mc2":
            config["process_results"] = FunctionRef(MC2_FUNCTION)
        return {task: config}
    if task == "piqa":
        return {
            "piqa": {
                "task": "piqa",
                **_dataset_fields(task, data_dir, limit, seed),
                "output_type": "multiple_choice",
                "training_split": None,
                "validation_split": "validation",
                "test_split": None,
                "num_fewshot": shots,
                "doc_to_text": "Question: {{goal}}\nAnswer:",
                "doc_to_target": "label",
                "doc_to_choice": "{{[sol1, sol2]}}",
                "should_decontaminate": True,
                "doc_to_decontamination_query": "goal",
                "metric_list": [_metric("acc"), _metric("acc_norm")],
                "metadata": meta,
            }
        }
    return {
        "gsm8k": {
            "task": "gsm8k",
            **_dataset_fields(task, data_dir, limit, seed),
            "output_type": "generate_until",
            "training_split": "train",
            "fewshot_split": "train",
            "test_split": "test",
            "num_fewshot": shots,
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{answer}}",
            "metric_list": [dict(GSM8K_METRIC)],
            "generation_kwargs": generation,
            "repeats": 1,
            "filter_list": GSM8K_FILTERS,
            "metadata": meta,
        }
    }


def dump_task_yaml(config: Mapping[str, Any]) -> str:
    """A task config as YAML text, function references tagged `!function`."""
    return yaml.dump(dict(config), Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=1000)


def write_task_configs(
    tasks: Sequence[str], data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
    limit: int | None = None, seed: int = 0, num_fewshot: int | Mapping[str, int] | None = None,
    max_gen_toks: int | None = None,
) -> dict[str, list[str]]:
    """Write the YAMLs of `tasks` into `out_dir` (replacing it); returns task -> [top-level name, leaf names...].

    The directory is built beside the target and swapped in, so lm-eval never indexes stale task files."""
    names = resolve_tasks(tasks)
    shots = resolve_shots(names, num_fewshot)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    layout: dict[str, list[str]] = {}
    try:
        for task in names:
            configs = task_configs(task, data_dir, limit, seed, shots[task], max_gen_toks)
            for stem, config in configs.items():
                write_text_atomic(staging / f"{stem}.yaml", dump_task_yaml(config))
            top = next(iter(configs))
            leaves = [stem for stem in configs if stem != top] or [top]
            layout[task] = [top, *leaves]
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return layout


# ----------------------------------------------------------------------------------------------------------------
# lm-eval samples -> EvalRecords


def option_permutation(reference: Sequence[str], shown: Sequence[str]) -> list[int]:
    """perm[j] = index in `shown` of `reference[j]` (equal texts paired in order); error if not a permutation."""
    positions: dict[str, list[int]] = {}
    for index, text in enumerate(shown):
        positions.setdefault(text, []).append(index)
    if len(reference) != len(shown) or sorted(reference) != sorted(shown):
        raise ValueError(f"lm-eval options {list(shown)!r} are not a permutation of forgetjax's {list(reference)!r}")
    return [positions[text].pop(0) for text in reference]


def choice_lengths(continuations: Sequence[str]) -> np.ndarray:
    """lm-eval's acc_norm denominators: character length of each choice (the continuation minus the delimiter)."""
    lengths = [len(c[len(TARGET_DELIMITER):]) if c.startswith(TARGET_DELIMITER) else len(c) for c in continuations]
    return np.maximum(np.asarray(lengths, dtype=np.float64), 1.0)


def _extra_json(extra: Mapping[str, Any]) -> str:
    return json.dumps(dict(extra), sort_keys=True, ensure_ascii=False, default=str)


def multiple_choice_record(
    benchmark: str, item: Item, sample: Mapping[str, Any], *, run_id: str, model_id: str, seed: int
) -> EvalRecord:
    """One multiple-choice record from lm-eval's logged sample, options in forgetjax's order."""
    bench = get_benchmark(benchmark)
    arguments = [tuple(a) for a in sample["arguments"]]
    responses = [(float(r[0]), bool(r[1])) for r in sample["filtered_resps"]]
    if not arguments or len(arguments) != len(responses):
        raise ValueError(f"{benchmark}/{item.id}: {len(arguments)} requests but {len(responses)} responses")
    shown = [continuation for _, continuation in arguments]
    perm = option_permutation(bench.continuations(item, "fewshot"), shown)
    lm_logprobs = np.asarray([ll for ll, _ in responses])
    pred_lm = int(np.argmax(lm_logprobs))  # lm-eval's acc rule: first index on ties
    norm_lm = int(np.argmax(lm_logprobs / choice_lengths(shown)))
    logprobs = [float(lm_logprobs[p]) for p in perm]
    chosen, chosen_norm = perm.index(pred_lm), perm.index(norm_lm)
    probs = np.exp(log_softmax(logprobs))
    extra: dict[str, Any] = {
        "family": bench.category,
        "format": "fewshot",
        "backend": BACKEND,
        "lm_eval_task": sample.get("task", benchmark),
        "lm_eval_doc_id": sample.get("doc_id"),
        "option_greedy": [responses[p][1] for p in perm],
        "chosen_option_norm": chosen_norm,
    }
    if benchmark == "truthfulqa_mc2":
        labels = [int(v) for v in item.data["labels"]]
        correct, score = None, float(sample["acc"])
        extra["chosen_is_true"] = labels[chosen]
    else:
        gold = bench.correct_index(item)
        if perm[gold] != int(sample["target"]):
            raise ValueError(
                f"{benchmark}/{item.id}: lm-eval's gold option {sample['target']} is not forgetjax's option {gold}"
            )
        correct, score = int(round(float(sample["acc"]))), float(probs[gold])
        extra["correct_option"] = gold
        norm_correct = float(sample["acc_norm"]) if "acc_norm" in sample else float(chosen_norm == gold)
        extra["correct_norm"] = int(round(norm_correct))
    if benchmark == "mmlu":
        extra["subject"] = item.data["subject"]
    labels_shown = list(LETTERS[: len(logprobs)]) if bench.letter_options else list(item.data["options"])
    return EvalRecord(
        run_id=run_id,
        model_id=model_id,
        benchmark=benchmark,
        category=item.category,
        item_id=item.id,
        prompt_hash=prompt_hash(arguments[0][0]),
        extracted_answer=labels_shown[chosen],
        correct=correct,
        score=score,
        option_logprobs=logprobs,
        chosen_option=chosen,
        confidence=float(probs[chosen]),
        k=len(logprobs),
        seed=seed,
        extra=_extra_json(extra),
    )


def _answer(filtered: Any) -> str | None:
    """A filter's extracted answer, None when lm-eval's regex found nothing."""
    value = filtered[0] if isinstance(filtered, (list, tuple)) else filtered
    return None if value is None or value == INVALID_ANSWER else str(value)


def generation_record(
    benchmark: str, item: Item, by_filter: Mapping[str, Mapping[str, Any]], *, run_id: str, model_id: str, seed: int
) -> EvalRecord:
    """One GSM8K record from lm-eval's strict-match and flexible-extract samples of the same document."""
    missing = [f for f in (GSM8K_STRICT, GSM8K_FLEXIBLE) if f not in by_filter]
    if missing:
        raise ValueError(f"{benchmark}/{item.id}: lm-eval logged no {missing} sample(s)")
    strict, flexible = by_filter[GSM8K_STRICT], by_filter[GSM8K_FLEXIBLE]
    output = strict["resps"][0][0]
    context = strict["arguments"][0][0]
    correct = int(round(float(strict["exact_match"])))
    extra = {
        "family": get_benchmark(benchmark).category,
        "format": "fewshot",
        "backend": BACKEND,
        "lm_eval_task": strict.get("task", benchmark),
        "lm_eval_doc_id": strict.get("doc_id"),
        "strict_match_raw": strict["filtered_resps"][0],
        "flexible_extract": _answer(flexible["filtered_resps"]),
        "correct_flexible": int(round(float(flexible["exact_match"]))),
        "reference": str(item.data["answer"]).split("####")[-1].strip(),
    }
    return EvalRecord(
        run_id=run_id,
        model_id=model_id,
        benchmark=benchmark,
        category=item.category,
        item_id=item.id,
        prompt_hash=prompt_hash(context),
        output=output,
        extracted_answer=_answer(strict["filtered_resps"]),
        correct=correct,
        score=float(correct),
        seed=seed,
        extra=_extra_json(extra),
    )


def samples_to_records(
    benchmark: str, samples: Iterable[Mapping[str, Any]], items: Sequence[Item], *, run_id: str, model_id: str,
    seed: int,
) -> list[EvalRecord]:
    """EvalRecords (in `items` order) from lm-eval's logged samples; every item needs its samples."""
    by_id = {item.id: item for item in items}
    grouped: dict[str, dict[str, Mapping[str, Any]]] = {}
    for sample in samples:
        item_id = sample["doc"].get("item_id")
        if item_id not in by_id:
            raise ValueError(f"{benchmark}: lm-eval sample for unexpected item {item_id!r}")
        filters = grouped.setdefault(item_id, {})
        if sample["filter"] in filters:
            raise ValueError(f"{benchmark}/{item_id}: two lm-eval samples for filter {sample['filter']!r}")
        filters[sample["filter"]] = sample
    missing = [item.id for item in items if item.id not in grouped]
    if missing:
        raise ValueError(f"{benchmark}: lm-eval returned no samples for {len(missing)} item(s), e.g. {missing[:3]}")
    records = []
    for item in items:
        by_filter = grouped[item.id]
        if benchmark == "gsm8k":
            records.append(generation_record(benchmark, item, by_filter, run_id=run_id, model_id=model_id, seed=seed))
        else:
            if list(by_filter) != ["none"]:
                raise ValueError(
                    f"{benchmark}/{item.id}: expected lm-eval's single 'none' filter, got {list(by_filter)}"
                )
            records.append(
                multiple_choice_record(benchmark, item, by_filter["none"], run_id=run_id, model_id=model_id, seed=seed)
            )
    return records


# ----------------------------------------------------------------------------------------------------------------
# Child processes: export (JAX on the CPU) and lm-eval (torch, offline)


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`, with forgetjax importable even from an uninstalled checkout."""
    env = dict(os.environ)
    env.update(extra)
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_child(command: str, spec: Mapping[str, Any], work_dir: Path, env: Mapping[str, str], timeout_s: float | None,
               progress: bool) -> None:
    """Run `python -m forgetjax.eval.lm_eval_bridge <command> spec.json`; its log is kept when not streamed."""
    spec_path = work_dir / f".{command.strip('_')}-spec.json"
    write_json_atomic(spec_path, dict(spec))
    log_path = work_dir / f"{command.strip('_')}.log"
    args = [sys.executable, "-m", "forgetjax.eval.lm_eval_bridge", command, str(spec_path)]
    try:
        if progress:
            result = subprocess.run(args, env=dict(env), cwd=work_dir, timeout=timeout_s)
        else:
            with open(log_path, "wb") as log:
                result = subprocess.run(args, env=dict(env), cwd=work_dir, timeout=timeout_s, stdout=log,
                                        stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired as err:
        raise TimeoutError(f"lm-eval bridge step {command.strip('_')!r} exceeded timeout_s={timeout_s}") from err
    finally:
        spec_path.unlink(missing_ok=True)
    if result.returncode != 0:
        where = "its output above" if progress else f"{log_path}:\n{log_path.read_text(errors='replace')[-3000:]}"
        raise RuntimeError(f"lm-eval bridge step {command.strip('_')!r} failed (exit {result.returncode}); see {where}")


def is_hf_directory(source: str | os.PathLike[str]) -> bool:
    """A local HF model directory (config.json) that is not a forgetjax checkpoint: lm-eval can load it as is."""
    path = Path(source).expanduser()
    return path.is_dir() and (path / "config.json").is_file() and not (path / "forgetjax.json").is_file()


def _export_worker(spec: Mapping[str, Any]) -> None:
    """Child: resolve the source; export it to HF format unless it already is an HF directory."""
    import forgetjax
    from forgetjax.api import resolve_source

    kind, path = resolve_source(spec["source"])
    if kind == "hf":
        write_json_atomic(spec["result"], {"hf_dir": str(path), "exported": False})
        return
    model, tokenizer = forgetjax.load(spec["source"], dtype=spec["dtype"])
    if tokenizer is None:
        raise ValueError(f"model source {spec['source']!r} has no tokenizer; lm-eval needs one")
    forgetjax.export_hf(model, tokenizer, spec["export_dir"], dtype=spec["dtype"])
    write_json_atomic(spec["result"], {"hf_dir": str(spec["export_dir"]), "exported": True})


def _write_jsonl_gz(path: Path, rows: Iterable[Any]) -> None:
    """gzip JSON lines, written atomically and byte-reproducibly (mtime 0)."""
    with atomic_open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        for row in rows:
            handle.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lm-eval samples a run logged for one benchmark (`<benchmark>.samples.jsonl.gz`)."""
    return read_jsonl(path)


def _evaluate_worker(spec: Mapping[str, Any]) -> None:
    """Child: run lm-eval offline on the generated tasks, write samples and results per benchmark."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=spec["tasks_dir"], include_defaults=False)
    layout: dict[str, list[str]] = spec["layout"]
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": spec["hf_dir"], "dtype": spec["dtype"]},
        tasks=[names[0] for names in layout.values()],
        batch_size=spec["batch_size"],
        device=spec["device"],
        task_manager=manager,
        log_samples=True,
    )
    work_dir = Path(spec["work_dir"])
    for benchmark, names in layout.items():
        leaves = names[1:]
        samples = [{**sample, "task": leaf} for leaf in leaves for sample in output["samples"].get(leaf, [])]
        _write_jsonl_gz(work_dir / f"{benchmark}.samples.jsonl.gz", samples)
        summary = {
            "results": {n: output["results"][n] for n in dict.fromkeys(names) if n in output["results"]},
            "n-shot": {n: output.get("n-shot", {}).get(n) for n in leaves},
            "versions": {n: output.get("versions", {}).get(n) for n in dict.fromkeys(names)},
            "n-samples": {n: output.get("n-samples", {}).get(n) for n in leaves},
            "configs": {n: output.get("configs", {}).get(n) for n in leaves},
            "lm_eval_version": output.get("lm_eval_version"),
            "transformers_version": output.get("transformers_version"),
            "max_length": output.get("max_length"),
            "model_args": {"pretrained": spec["hf_dir"], "dtype": spec["dtype"]},
            "date": output.get("date"),
        }
        write_text_atomic(work_dir / f"{benchmark}.lm_eval.json", json.dumps(summary, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The bridge


def fingerprint(benchmark: str, run_id: str, model_id: str, seed: int, limit: int | None, shots: int, dtype: str,
                items: Sequence[Item], max_gen_toks: int | None = None) -> dict[str, Any]:
    """What determines a benchmark's records; resume only reuses a file with an identical fingerprint."""
    return {
        "version": RECORDS_FORMAT_VERSION,
        "backend": BACKEND,
        "run_id": run_id,
        "model_id": model_id,
        "benchmark": benchmark,
        "seed": seed,
        "limit": limit,
        "num_fewshot": shots,
        "dtype": dtype,
        "max_gen_toks": max_gen_toks if benchmark == "gsm8k" else None,
        "item_ids_sha256": prompt_hash("\n".join(item.id for item in items)),
    }


def records_complete(path: Path, expected: Mapping[str, Any], n_items: int, overwrite: bool) -> bool:
    """Whether `path` already holds this configuration's records for every item; a foreign file is an error."""
    if overwrite or not path.exists():
        return False
    stored = json.loads(read_metadata(path).get("fingerprint", "{}"))
    if stored != dict(expected):
        differing = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise FileExistsError(
            f"{path} was written with a different configuration (differs in {differing}); "
            "use another out_dir or run_id, delete the file, or pass overwrite=True"
        )
    return len(read_records(path)) == n_items


def _lm_eval_headline(results_path: Path, top: str) -> dict[str, Any]:
    """lm-eval's own aggregate metrics for a benchmark's top-level task or group."""
    if not results_path.exists():
        return {}
    results = json.loads(results_path.read_text(encoding="utf-8")).get("results", {})
    return {k: v for k, v in results.get(top, {}).items() if "," in k}


def run_lm_eval(
    model_source: str,
    tasks: list[str],
    out_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int | str = 1,
    device: str = "cpu",
    dtype: str = "float32",
    run_id: str | None = None,
    seed: int = 0,
    num_fewshot: int | Mapping[str, int] | None = None,
    max_gen_toks: int | None = None,
    model_id: str | None = None,
    overwrite: bool = False,
    timeout_s: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model with lm-eval on local data; write forgetjax records and a summary.

    model_source: HF directory (used as is), forgetjax checkpoint, .gguf, hub id or embedded name (exported first).
    limit: forgetjax's seeded item subset per task (None = every item). num_fewshot: one number for every task or
    {task: shots} (None = the defaults: mmlu 5, gsm8k 5, others 0). max_gen_toks caps GSM8K's generation.
    model_id defaults to `model_source`, run_id to "lm-eval". timeout_s bounds each child process (None = none).
    Returns summary rows, lm-eval's headline metrics and the paths written (all JSON-serialisable)."""
    names = resolve_tasks(tasks)
    check_limit(limit)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    if not isinstance(model_source, (str, os.PathLike)) or not str(model_source):
        raise ValueError(f"model_source must be a non-empty string, got {model_source!r}")
    shots = resolve_shots(names, num_fewshot)
    check_max_gen_toks(max_gen_toks)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} does not exist (set FORGETJAX_DATA_DIR or pass data_dir)")
    model_id = model_id or str(model_source)
    run_id = run_id or "lm-eval"
    work_dir = Path(out_dir) / model_slug(model_id) / "lm_eval"
    work_dir.mkdir(parents=True, exist_ok=True)

    items = {task: selected_items(task, data_dir, limit, seed) for task in names}
    paths = {task: work_dir / f"{task}.parquet" for task in names}
    expected = {
        task: fingerprint(task, run_id, model_id, seed, limit, shots[task], dtype, items[task], max_gen_toks)
        for task in names
    }
    pending = [t for t in names if not records_complete(paths[t], expected[t], len(items[t]), overwrite)]
    hf_dir: str | None = None
    if pending:
        layout = write_task_configs(pending, data_dir, work_dir / "tasks", limit=limit, seed=seed,
                                    num_fewshot={task: shots[task] for task in pending}, max_gen_toks=max_gen_toks)
        export_root = None
        try:
            if is_hf_directory(model_source):
                hf_dir = str(Path(model_source).expanduser().resolve())
            else:
                export_root = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=work_dir))
                result_path = export_root / "result.json"
                spec = {"source": str(model_source), "dtype": dtype, "export_dir": str(export_root / "hf"),
                        "result": str(result_path)}
                _run_child("_export", spec, work_dir, _child_env({"JAX_PLATFORMS": "cpu"}), timeout_s, progress)
                hf_dir = json.loads(result_path.read_text(encoding="utf-8"))["hf_dir"]
            spec = {"hf_dir": hf_dir, "tasks_dir": str(work_dir / "tasks"), "layout": layout, "dtype": dtype,
                    "batch_size": batch_size, "device": device, "work_dir": str(work_dir)}
            _run_child("_evaluate", spec, work_dir, _child_env(OFFLINE_ENV), timeout_s, progress)
        finally:
            if export_root is not None:
                shutil.rmtree(export_root, ignore_errors=True)
        for task in pending:
            samples = read_samples(work_dir / f"{task}.samples.jsonl.gz")
            records = samples_to_records(task, samples, items[task], run_id=run_id, model_id=model_id, seed=seed)
            lm_eval_info = json.loads((work_dir / f"{task}.lm_eval.json").read_text(encoding="utf-8"))
            metadata = {"fingerprint": json.dumps(expected[task], sort_keys=True), "n_items": str(len(records)),
                        "backend": BACKEND, "lm_eval_version": str(lm_eval_info.get("lm_eval_version"))}
            write_records(records, paths[task], metadata=metadata)

    rows = summarize(record for task in names for record in read_records(paths[task]))
    summary_path = write_summary_csv(rows, work_dir / "summary.csv")
    if progress:
        print(format_table(rows))
    return {
        "model_id": model_id,
        "run_id": run_id,
        "out_dir": str(work_dir),
        "summary": rows,
        "summary_path": str(summary_path),
        "files": {task: str(paths[task]) for task in names},
        "skipped": [task for task in names if task not in pending],
        "lm_eval": {task: _lm_eval_headline(work_dir / f"{task}.lm_eval.json", task) for task in names},
        "results_files": {task: str(work_dir / f"{task}.lm_eval.json") for task in names},
        "samples_files": {task: str(work_dir / f"{task}.samples.jsonl.gz") for task in names},
        "tasks_dir": str(work_dir / "tasks"),
        "hf_dir": hf_dir,
        "num_fewshot": shots,
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m forgetjax.eval.lm_eval_bridge",
        description="Run lm-eval offline on the local benchmark data and write forgetjax per-item records.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="export the model, run lm-eval, write records and a summary")
    run.add_argument("model", help="HF directory, forgetjax checkpoint, .gguf, hub id or embedded model name")
    write = sub.add_parser("write-tasks", help="only write the task YAMLs (for `lm_eval --include_path DIR`)")
    for p in (run, write):
        p.add_argument("--tasks", nargs="+", required=True, help=f"any of {sorted(TASKS)}")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--data-dir", default=None, help="benchmark data directory (default: $FORGETJAX_DATA_DIR "
                       "or ../shared/data)")
        p.add_argument("--limit", type=int, default=None, help="seeded subset of at most this many items per task")
        p.add_argument("--seed", type=int, default=0, help="seed of the item subset (default %(default)s)")
        p.add_argument("--num-fewshot", type=int, default=None, help="shots (default: mmlu 5, gsm8k 5, others 0)")
    run.add_argument("--batch-size", default="1", help="lm-eval batch size, an integer or 'auto'")
    run.add_argument("--device", default="cpu", help="torch device for lm-eval, e.g. cpu or cuda:0")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="export and lm-eval dtype")
    run.add_argument("--run-id", default=None, help="run id stored in every record (default lm-eval)")
    run.add_argument("--model-id", default=None, help="model id stored in every record (default: MODEL)")
    run.add_argument("--max-gen-toks", type=int, default=None, help="GSM8K generation budget (default: lm-eval's)")
    run.add_argument("--overwrite", action="store_true", help="replace records written with another configuration")
    for hidden in ("_export", "_evaluate"):
        sub.add_parser(hidden).add_argument("spec")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("_export", "_evaluate"):
        spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        (_export_worker if args.command == "_export" else _evaluate_worker)(spec)
        return 0
    data_dir = args.data_dir or default_data_dir()
    if args.command == "write-tasks":
        layout = write_task_configs(args.tasks, data_dir, args.out, limit=args.limit, seed=args.seed,
                                    num_fewshot=args.num_fewshot)
        print(json.dumps({"tasks_dir": args.out, "run": [names[0] for names in layout.values()]}, indent=2))
        return 0
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    result = run_lm_eval(args.model, args.tasks, args.out, data_dir, limit=args.limit, batch_size=batch_size,
                         device=args.device, dtype=args.dtype, run_id=args.run_id, seed=args.seed,
                         num_fewshot=args.num_fewshot, max_gen_toks=args.max_gen_toks, model_id=args.model_id,
                         overwrite=args.overwrite)
    print(json.dumps({k: result[k] for k in ("files", "summary_path", "lm_eval")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
