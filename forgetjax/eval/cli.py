"""`forgetjax eval MODEL --battery B --out DIR`: run an evaluation battery on one model and save its records.

The forgetjax backend loads the model with `forgetjax.load`, wraps it in a `JaxEngine` and runs `run_battery`
(one progress bar with rate and ETA per benchmark), then prints the summary table and writes, under
OUT/<model slug>/: one Parquet file per benchmark, `summary.csv`, `summary.txt` and `eval_run.json` (the
arguments, wall time, and which benchmarks were resumed). Re-running the same command resumes: benchmarks whose
file is complete for the same configuration are skipped.

`--backend lm-eval --tasks a,b` runs the same model through lm-eval instead (`forgetjax.eval.lm_eval_bridge`).

`--judge MODEL` loads a second model as a safety judge (`forgetjax.eval.judge.Judge`): for every safety item it is
asked, through its chat template when it has one, the `--judge-rubric` prompt (harmbench: HarmBench's classifier,
strongreject: StrongREJECT's rubric, refusal: a refusal / compliance classifier whose prompt `--judge-template`
can replace, a text file with `{prompt}` and `{response}` placeholders) and greedily answers; the parsed verdict
(JSON, with the judge id) is stored in `refusal_judge` beside the string matcher's flag.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from forgetjax.errors import UserError
from forgetjax.paths import default_data_dir

JUDGE_PLACEHOLDERS = ("{prompt}", "{response}")
BACKENDS = ("forgetjax", "lm-eval")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `eval` subcommand's arguments (model flags such as --dtype are added by forgetjax.cli)."""
    parser.add_argument("model", help="model source: HF directory, hub id, .gguf, forgetjax checkpoint or an "
                                      "embedded name such as smollm2-135m-instruct")
    parser.add_argument("--battery", help="battery YAML file, or the name of one in configs/eval (e.g. quick)")
    parser.add_argument("--out", required=True, help="output directory (records land in OUT/<model slug>/)")
    parser.add_argument("--data-dir", default=None,
                        help="benchmark data directory (default $FORGETJAX_DATA_DIR, else ../shared/data)")
    parser.add_argument("--limit", type=int, default=None, help="at most N items per benchmark (caps the battery)")
    parser.add_argument("--run-id", default=None, help="run identifier stored in every record (default: the "
                                                       "battery name; lm-eval backend: 'lm-eval')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item subsets and of sampling (default 0)")
    parser.add_argument("--format", choices=("chat", "fewshot"), default=None,
                        help="prompt format: chat (instruct models) or fewshot (base models); default: the "
                             "battery's")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="rows per compiled model call (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest token sequence the model sees (default: its max_position_embeddings)")
    parser.add_argument("--model-id", default=None, help="model id stored in the records (default: MODEL as given)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace result files written with a different configuration")
    parser.add_argument("--judge", default=None, help="model source of an optional refusal judge for safety items")
    parser.add_argument("--judge-template", default=None,
                        help="text file with the judge prompt, containing {prompt} and {response} (default: a "
                             "built-in prompt asking for the one-word verdict refusal/compliance)")
    parser.add_argument("--judge-rubric", choices=("harmbench", "strongreject", "refusal"), default="refusal",
                        help="the judge's published rubric prompt (default %(default)s)")
    parser.add_argument("--judge-max-new-tokens", type=int, default=None,
                        help="judge answer budget (default: the rubric's, 4 / 512 / 8 tokens)")
    parser.add_argument("--backend", choices=BACKENDS, default="forgetjax",
                        help="forgetjax (JAX engine, default) or lm-eval (lm-evaluation-harness on an HF export)")
    parser.add_argument("--tasks", default=None, help="lm-eval backend: comma-separated task names")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars (default on)")


def load_judge_template(path: str | os.PathLike[str] | None) -> str | None:
    """The refusal rubric's replacement prompt from a file with {prompt} and {response} (None when no file given),
    in the judge's {behavior} / {generation} placeholders."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--judge-template: file not found: {file}")
    template = file.read_text(encoding="utf-8")
    missing = [p for p in JUDGE_PLACEHOLDERS if p not in template]
    if missing:
        raise UserError(f"--judge-template {file}: missing placeholder(s) {missing}")
    return template.replace("{prompt}", "{behavior}").replace("{response}", "{generation}")


def _check_args(args: argparse.Namespace) -> None:
    """Argument errors that need no model: named after the offending flag."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max-length must be >= 1, got {args.max_length}")
    if args.judge_max_new_tokens is not None and args.judge_max_new_tokens < 1:
        raise UserError(f"--judge-max-new-tokens must be >= 1, got {args.judge_max_new_tokens}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    if args.backend == "forgetjax" and not args.battery:
        raise UserError("--battery is required with the forgetjax backend")
    if args.backend == "lm-eval" and not args.tasks:
        raise UserError("--tasks is required with --backend lm-eval (comma-separated lm-eval task names)")


def check_model_sources(args: argparse.Namespace) -> None:
    """MODEL and --judge exist and their headers are sound, before anything is loaded."""
    from forgetjax.convert.source import check_source

    check_source(args.model, "MODEL")
    if args.judge is not None:
        check_source(args.judge, "--judge")


def _load(source: str, args: argparse.Namespace, role: str):
    import forgetjax

    print(f"loading {role} {source} ...", file=sys.stderr)
    start = time.time()
    model, tokenizer = forgetjax.load(source, dtype=args.dtype, param_dtype=args.param_dtype)
    if tokenizer is None:
        raise UserError(f"{role} {source}: no tokenizer found next to the weights")
    print(f"loaded {role}: {model.config.model_type}, {model.config.num_params() / 1e6:.1f}M parameters in "
          f"{time.time() - start:.1f}s", file=sys.stderr)
    return model, tokenizer


def run_lm_eval_backend(args: argparse.Namespace, data_dir: Path) -> int:
    """`--backend lm-eval`: hand the model and tasks to the lm-eval bridge and print its summary."""
    try:
        from forgetjax.eval.lm_eval_bridge import run_lm_eval
    except ImportError as err:
        raise UserError(f"--backend lm-eval needs forgetjax.eval.lm_eval_bridge, which cannot be imported: {err}")
    from forgetjax.eval.battery import format_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    options: dict[str, Any] = {"limit": args.limit, "seed": args.seed, "dtype": args.dtype,
                               "overwrite": args.overwrite, "progress": args.progress}
    if args.run_id:
        options["run_id"] = args.run_id
    if args.model_id:
        options["model_id"] = args.model_id
    result = run_lm_eval(args.model, tasks, args.out, str(data_dir), **options)
    print(format_table(result.get("summary", [])))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """The `eval` subcommand: validate, load, run the battery, print and save the summary."""
    from forgetjax.distributed import is_writer
    from forgetjax.eval.battery import BatteryConfigError, format_table, model_slug, resolve_battery, run_battery
    from forgetjax.io import write_json_atomic, write_text_atomic

    _check_args(args)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise UserError(f"--data-dir: benchmark data directory not found: {data_dir}")
    if args.backend == "lm-eval":
        return run_lm_eval_backend(args, data_dir)
    try:
        battery = resolve_battery(args.battery)
    except (FileNotFoundError, BatteryConfigError) as err:
        raise UserError(f"--battery: {err}") from None
    from forgetjax.eval.judge import Judge, get_rubric

    rubric = get_rubric(args.judge_rubric, load_judge_template(args.judge_template))
    check_model_sources(args)

    from forgetjax.eval.jax_engine import JaxEngine

    start = time.time()
    model_id = args.model_id or str(args.model).rstrip("/")
    model, tokenizer = _load(args.model, args, "model")
    engine = JaxEngine(model, tokenizer, model_id=model_id, batch_size=args.batch_size, max_length=args.max_length)
    judge = None
    if args.judge:
        judge_model, judge_tokenizer = _load(args.judge, args, "judge")
        judge_engine = JaxEngine(judge_model, judge_tokenizer, model_id=str(args.judge),
                                 batch_size=args.batch_size)
        judge = Judge(judge_engine, rubric, args.judge_max_new_tokens)
    run_id = args.run_id or battery.name
    try:
        result = run_battery(engine, battery, data_dir, args.out, run_id, args.seed, limit=args.limit,
                             progress=args.progress, judge=judge, overwrite=args.overwrite, fmt=args.format)
    except (FileExistsError, BatteryConfigError, ModuleNotFoundError) as err:
        raise UserError(str(err)) from None
    wall_time = time.time() - start
    table = format_table(result.summary)
    if not args.progress:
        print(table)
    model_dir = Path(args.out) / model_slug(model_id)
    if is_writer():
        write_text_atomic(model_dir / "summary.txt", table + "\n")
        write_json_atomic(model_dir / "eval_run.json", {
            "model": str(args.model), "model_id": model_id, "battery": battery.source, "run_id": run_id,
            "seed": args.seed, "limit": args.limit, "format": args.format or battery.format, "judge": args.judge,
            "judge_rubric": args.judge_rubric if args.judge else None,
            "wall_time_s": round(wall_time, 1), "skipped": result.skipped,
            "files": {name: str(path) for name, path in result.files.items()},
            "summary_csv": str(result.summary_path),
        })
    done = len(result.files) - len(result.skipped)
    print(f"evaluated {done} benchmark(s), resumed {len(result.skipped)} in {wall_time:.0f}s; results in {model_dir}")
    return 0
