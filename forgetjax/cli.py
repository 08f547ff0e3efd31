"""`forgetjax <command>`: convert, export, chat, generate and the quickstart main job.

Flags and input files are checked before any model is loaded. Bad input (a config field, a flag, a path, an
index) ends the command with one line, `forgetjax <command>: error: <message>`, and exit status 2; an unexpected
exception prints a one-line summary and exits 1, and `--debug` (or FORGETJAX_DEBUG=1) adds its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from forgetjax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
DEBUG_ENV = "FORGETJAX_DEBUG"
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _add_model_args(p: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                   help="compute dtype of the forward pass (default %(default)s)")
    p.add_argument("--param-dtype", choices=DTYPES, default=None,
                   help="dtype the parameters are stored in (default: same as --dtype)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per sample")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _check_at_least(flag: str, value: float | None, minimum: float) -> None:
    if value is not None and not value >= minimum:
        raise UserError(f"{flag} must be >= {minimum:g}, got {value}")


def _check_sampling(args) -> None:
    """The sampling flags, named as on the command line."""
    _check_at_least("--max-new-tokens", args.max_new_tokens, 1)
    _check_at_least("--n", args.n, 1)
    _check_at_least("--top-k", args.top_k, 0)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")


def _check_model(source: str, what: str = "MODEL") -> None:
    """A model source exists and its headers are sound (nothing is loaded); errors start with `what`."""
    from forgetjax.convert.source import check_source

    check_source(source, what)


def _check_input_file(flag: str, path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: file not found")
    if not path.is_file():
        raise UserError(f"{flag} {path}: not a file")
    return path


def _check_output_file(flag: str, path: str | Path) -> Path:
    """An output file whose directory exists (it is not created) and that is not itself a directory."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file path")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: directory {path.parent} does not exist (create it first)")
    return path


def _check_output_dir(flag: str, path: str | Path) -> Path:
    """An output directory (created with its parents when missing) that is not an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    return path


def _check_not_source(flag: str, out: str | Path, source: str | Path) -> None:
    if Path(out).resolve() == Path(source).resolve():
        raise UserError(f"{flag} {out} is the model source itself; write to another directory")


def _sampling_params(args):
    from forgetjax.sampling.sampler import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, n=args.n, seed=args.seed, stop_strings=tuple(args.stop))


def _load(source: str, args, progress: bool = True):
    import forgetjax

    print(f"loading {source} ...", file=sys.stderr)
    start = time.time()
    model, tokenizer = forgetjax.load(source, dtype=args.dtype, param_dtype=args.param_dtype, progress=progress)
    print(f"loaded {model.config.model_type} model, {model.config.num_params() / 1e6:.1f}M parameters "
          f"in {time.time() - start:.1f}s", file=sys.stderr)
    return model, tokenizer


def cmd_convert(args) -> int:
    _check_model(args.src, "SRC")
    _check_output_dir("OUT", args.out)
    _check_not_source("OUT", args.out, args.src)
    from forgetjax.convert.checkpoint import save_model
    from forgetjax.convert.hf import export_hf

    model, tokenizer = _load(args.src, args)
    if args.format == "hf":
        out = export_hf(model, tokenizer, args.out)
    else:
        out = save_model(model, tokenizer, args.out, extra={"source": str(args.src)})
    print(f"wrote {args.format} checkpoint to {out}")
    return 0


def cmd_export(args) -> int:
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise UserError(f"--max-shard-gb must be a positive number, got {args.max_shard_gb}")
    _check_model(args.ckpt, "CKPT")
    _check_output_dir("OUT", args.out)
    _check_not_source("OUT", args.out, args.ckpt)
    from forgetjax.convert.hf import export_hf

    model, tokenizer = _load(args.ckpt, args)
    out = export_hf(model, tokenizer, args.out, dtype=args.export_dtype,
                    max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote HF model directory to {out}")
    return 0


def cmd_chat(args) -> int:
    _check_sampling(args)
    _check_model(args.model)
    from forgetjax.sampling.sampler import Sampler
    from forgetjax.tasks.prompts import user_message

    model, tokenizer = _load(args.model, args)
    sampler = Sampler(model, tokenizer)
    out = sampler.chat([user_message(args.prompt)], _sampling_params(args))
    for text in out.texts:
        print(text)
    return 0


def _read_prompts(path: Path) -> list[dict]:
    """The rows of a prompts JSONL file; a bad line raises UserError naming path:line."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not ({"prompt", "messages"} & set(row)):
            raise UserError(f"{path}:{line_no}: each line needs a 'prompt' (text) or 'messages' (chat) field")
        if "messages" in row and not (isinstance(row["messages"], list) and row["messages"] and all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in row["messages"])):
            raise UserError(f"{path}:{line_no}: 'messages' must be a non-empty list of {{role, content}} objects")
        if "messages" not in row and not isinstance(row["prompt"], str):
            raise UserError(f"{path}:{line_no}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return rows


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from forgetjax.io import write_jsonl_atomic
    from forgetjax.sampling.sampler import Sampler
    from forgetjax.tasks.prompts import user_message

    _check_at_least("--batch-size", args.batch_size, 1)
    _check_sampling(args)
    out_path = _check_output_file("--out", args.out)
    rows = _read_prompts(_check_input_file("--prompts", args.prompts))
    _check_model(args.model)
    model, tokenizer = _load(args.model, args)
    sampler = Sampler(model, tokenizer)
    params = _sampling_params(args)
    results = []
    for start in tqdm(range(0, len(rows), args.batch_size), desc="generating", unit="batch"):
        chunk = rows[start:start + args.batch_size]
        prompts = []
        for row in chunk:
            if "messages" in row:
                prompts.append(sampler.encode_chat(row["messages"]))
            elif args.chat:
                prompts.append(sampler.encode_chat(user_message(row["prompt"])))
            else:
                prompts.append(sampler.encode_text(row["prompt"]))
        out = sampler.generate_tokens(prompts, params)
        for i, row in enumerate(chunk):
            for j in range(params.n):
                r = i * params.n + j
                results.append({**row, "sample": j, "output": out.texts[r], "output_tokens": int(out.lengths[r]),
                                "finished": bool(out.finished[r]),
                                "logprob_sum": float(out.logprobs[r, :out.lengths[r]].sum())})
    write_jsonl_atomic(out_path, results)
    print(f"wrote {len(results)} generations to {out_path}")
    return 0


def cmd_quickstart(args) -> int:
    _check_output_dir("--out", args.out)
    from forgetjax.quickstart import run_quickstart

    return run_quickstart(model=args.model, out_dir=Path(args.out), prompt=args.prompt)


def cmd_eval(args) -> int:
    from forgetjax.eval.cli import run_eval

    return run_eval(args)


def cmd_attack(args) -> int:
    from collections import Counter

    from forgetjax.eval.attacks.autodan import AutoDANConfig
    from forgetjax.eval.attacks.gcg import GCGConfig
    from forgetjax.paths import default_data_dir

    if args.attack == "gcg":
        config = GCGConfig(steps=args.steps, suffix_length=args.suffix_length, top_k=args.top_k,
                           candidates=args.candidates, candidate_block=args.candidate_block, target=args.target,
                           mode=args.mode, seed=args.seed)
    else:
        config = AutoDANConfig(generations=args.generations, population=args.population, mutator=args.mutator,
                               target=args.target, seed=args.seed)
    config.validate()
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    transfer = Path(args.transfer_from) if args.transfer_from else None
    if transfer is not None and not transfer.is_file():
        raise UserError(f"--transfer-from: {transfer} is not a file (the records of an earlier attack)")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise UserError(f"--data-dir: {data_dir} is not a directory")
    _check_model(args.model)
    from forgetjax.eval.attacks.runner import run_attack, run_autodan_attack
    from forgetjax.eval.records import read_records

    judge = None
    if args.judge:
        _check_model(args.judge, "--judge")
        from forgetjax.eval.jax_engine import JaxEngine
        from forgetjax.eval.judge import Judge

        judge_model, judge_tokenizer = _load(args.judge, args)
        judge = Judge(JaxEngine(judge_model, judge_tokenizer, model_id=str(args.judge)), args.judge_rubric)
    model, tokenizer = _load(args.model, args)
    common = dict(data_dir=data_dir, out_dir=args.out, run_id=args.run_id, model_id=args.model, config=config,
                  benchmark=args.benchmark, limit=args.limit, seed=args.seed, transfer_from=transfer, judge=judge)
    if args.attack == "gcg":
        path = run_attack(model, tokenizer, fmt=args.format, **common)
    else:
        path = run_autodan_attack(model, tokenizer, **common)
    records = read_records(path)
    total, success = Counter(), Counter()
    for record in records:
        total[record.category] += 1
        success[record.category] += not record.refusal
    for category in sorted(total):
        print(f"{category:40s} ASR {success[category] / total[category]:.3f} (n={total[category]})")
    print(f"{'ALL':40s} ASR {sum(success.values()) / len(records):.3f} (n={len(records)}); records in {path}")
    return 0


def cmd_train(args) -> int:
    from forgetjax.methods.run import load_run_config, run_training

    _check_input_file("CONFIG", args.config)
    cfg = load_run_config(args.config, args.overrides)
    _check_model(cfg.train.model, "train.model")
    _check_output_dir("train.out_dir", cfg.train.out_dir)
    result = run_training(cfg, source=str(args.config))
    print(json.dumps({"status": result.status, "steps": result.steps, "usage": result.usage,
                      "out_dir": result.out_dir, "final_checkpoint": str(Path(result.out_dir) / "final")}, indent=2))
    return 0


def _check_results_dir(path: str | Path) -> Path:
    from forgetjax.results import CELLS_DIR

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"RESULTS_DIR {path}: not a directory")
    if not (path / CELLS_DIR).is_dir():
        raise UserError(f"RESULTS_DIR {path}: not a study results directory (no {CELLS_DIR}/ inside; give the "
                        f"results_dir a `forgetjax study` run wrote)")
    return path


def cmd_report(args) -> int:
    _check_at_least("--resamples", args.resamples, 1)
    for results_dir in args.results_dirs:
        _check_results_dir(results_dir)
    _check_output_dir("--out", args.out)
    from forgetjax.report import build_report

    index = build_report(args.results_dirs, args.out, n_resamples=args.resamples, seed=args.seed)
    print(f"wrote report to {index}")
    return 0


def _check_study_inputs(cfg, source: str) -> None:
    """What a local study run reads first beyond its config (whose files loading checked): the data directory and
    the start models."""
    from forgetjax.study.runner import data_dir_of
    from forgetjax.study.schema import all_models

    data_dir = data_dir_of(cfg)
    if not data_dir.is_dir():
        raise UserError(f"{source}: data_dir {data_dir} is not a directory (set data_dir or $FORGETJAX_DATA_DIR)")
    for entry in all_models(cfg):
        if entry.scale not in cfg.scales:
            continue
        points = set(cfg.start_points)
        if cfg.safety_stage.enabled and "safe" in points:
            points = (points - {"safe"}) | {cfg.safety_stage.from_start}
        for point in sorted(points):
            if getattr(entry, point) is not None:
                _check_model(getattr(entry, point), f"{source}: models[{entry.scale}].{point}")


def cmd_study(args) -> int:
    from forgetjax.study.matrix import expand
    from forgetjax.study.runner import check_cell_index
    from forgetjax.study.schema import load_study_config

    _check_input_file("CONFIG", args.config)
    cfg = load_study_config(args.config, args.overrides)
    executor = args.executor or cfg.executor
    results = Path(cfg.results_dir)
    cells = expand(cfg)
    indices = range(len(cells))
    if args.cell_index is not None:
        if executor in ("slurm", "tpu_pod"):
            raise UserError(f"--cell-index runs one cell here; with --executor {executor} the launch script passes "
                            f"it to each task (use --executor local)")
        indices = [check_cell_index(args.cell_index, len(cells))]
    if args.list:
        from forgetjax.study.axes import axes_text, describe_axes
        from forgetjax.study.matrix import study_axes

        for line in describe_axes(*study_axes(cfg)):
            print(line)
        for i in indices:
            print(f"{i:4d}  {cells[i].cell_id}" + (f"  {axes_text(cells[i].axes)}" if cells[i].axes else ""))
            if cells[i].pipeline is not None:
                print("        chain: " + " -> ".join(f"{s.name} [{s.stage_id}]" for s in cells[i].pipeline.stages))
        _print_pipeline_stages([cells[i] for i in indices])
        return 0
    if executor in ("slurm", "tpu_pod"):
        return _launch_study(args, executor, len(cells), results)
    _check_study_inputs(cfg, str(args.config))
    _check_output_dir("results_dir", results)
    if args.dry_run:
        for i in indices:
            print(f"{i:4d}  {cells[i].cell_id}")
        print(f"dry run: {len(indices)} of {len(cells)} cells would run into {results}; nothing was written",
              file=sys.stderr)
        return 0
    if args.distributed:
        import jax

        jax.distributed.initialize()
    from forgetjax.study.runner import StudyRunner

    summary = StudyRunner(cfg, source=str(args.config)).run(only_index=args.cell_index)
    print(json.dumps(summary, indent=2))
    if args.report and args.cell_index is None:
        from forgetjax.report import build_report

        print(f"report: {build_report(results, results / 'report')}")
    return 0 if summary["failed"] == 0 else 1


def _print_pipeline_stages(cells) -> None:
    """One line per pipeline stage of `cells` (trained once, shared by every cell whose chain holds it)."""
    from forgetjax.study.pipelines import shared_stages

    stages = shared_stages(cells)
    if not stages:
        return
    shared = sum(count > 1 for _, count in stages.values())
    print(f"pipeline stages: {len(stages)} (each trained once; {shared} shared by several evaluated cells)")
    for stage_id, (stage, count) in stages.items():
        budget = stage.run["train"]["budget"]
        print(f"  {stage_id}  {stage.method} on {stage.domain}, {budget['kind']} {budget['value']:g}, "
              f"from {stage.parent or stage.run['train']['model']}; in {count} cell(s)")


def _launch_study(args, executor: str, n_cells: int, results: Path) -> int:
    """Write (and with SLURM submit) the launch script; with --dry-run print it and write nothing."""
    from forgetjax.study import executors

    overrides = tuple(args.overrides)
    if executor == "slurm":
        text = executors.slurm_array_text(str(args.config), n_cells, results, overrides=overrides)
    else:
        text = executors.tpu_pod_text(str(args.config), results, overrides=overrides)
    path = executors.launch_script_path(results, executor)
    if args.dry_run:
        print(text, end="")
        print(f"dry run: nothing was written; without --dry-run this script is written to {path}"
              + (" and submitted with sbatch" if executor == "slurm" else ""), file=sys.stderr)
        return 0
    _check_output_dir("results_dir", results)
    if executor == "slurm":
        script = executors.slurm_array_script(str(args.config), n_cells, results, overrides=overrides)
        submitted = executors.submit_slurm(script)
        print(f"wrote {script} ({n_cells} array tasks); "
              + (f"submitted: {submitted}" if submitted else "no sbatch here: submit it with sbatch"))
    else:
        script = executors.tpu_pod_script(str(args.config), results, overrides=overrides)
        print(f"wrote {script}: run it with TPU_NAME=... ZONE=... bash {script}")
    return 0


def cmd_plan(args) -> int:
    from forgetjax.config import from_dict
    from forgetjax.models.config import config_from_hf, load_config
    from forgetjax.study.matrix import train_settings
    from forgetjax.study.matrix import expand
    from forgetjax.study.plan import (Rollouts, choose_mesh, format_bytes, parse_topology, study_references,
                                      study_rollouts)
    from forgetjax.study.schema import all_models, load_study_config
    from forgetjax.training.memory import MEMORY_FRACTION, fitted_estimate, train_memory_settings
    from forgetjax.training.trainer import TrainConfig

    topology = parse_topology(args.topology)
    if args.rollout_batch is not None:
        _check_at_least("--rollout-batch", args.rollout_batch, 0)
    if args.rollout_len is not None:
        _check_at_least("--rollout-len", args.rollout_len, 1)
    _check_at_least("--teacher-prompt-len", args.teacher_prompt_len, 1)
    _check_input_file("CONFIG", args.config)
    cfg = load_study_config(args.config, args.overrides)
    train_configs = {scale: from_dict(TrainConfig, train_settings(cfg, scale), source=f"{args.config}: train")
                     for scale in cfg.scales}
    settings = {scale: train_memory_settings(train) for scale, train in train_configs.items()}
    first = settings[cfg.scales[0]] if cfg.scales else train_memory_settings(TrainConfig())
    print(f"topology {topology.name}: {topology.devices} devices x {topology.hbm_bytes / 2**30:.0f} GiB; "
          f"micro-batch {first['global_batch']} x {first['seq_len']} tokens (all devices), remat {first['remat']}")
    from forgetjax.study.axes import describe_axes
    from forgetjax.study.matrix import study_axes

    axes, merge = study_axes(cfg)
    for line in describe_axes(axes, merge):
        print(line)
    cells = expand(cfg)
    rollouts = study_rollouts(cells)
    for scale in cfg.scales:
        found = rollouts.get(scale, Rollouts())
        rows = found.rows if args.rollout_batch is None else args.rollout_batch
        length = found.length if args.rollout_len is None else args.rollout_len
        origin = (f"largest sampler call: {found.method}" if found.method else "no method samples the trained model")
        if args.rollout_batch is not None or args.rollout_len is not None:
            origin = "--rollout-batch / --rollout-len"
        rollouts[scale] = Rollouts(rows, length, found.method)
        print(f"{scale}: rollout KV cache {rows} rows x {length} tokens ({origin})")
    adapters = [(value.label, value.setting) for axis in axes if axis.key == "train.lora"
                for value in axis.values] or [(None, None)]
    references = study_references(cells)
    budget = MEMORY_FRACTION * topology.hbm_bytes
    header = (f"{'scale':>8} {'params':>8} {'mesh (data,fsdp,tensor)':>24} {'from':>12} {'remat':>5} {'params':>12} "
              f"{'grads':>12} {'optimizer':>12} {'activations':>12} {'logits':>12} {'reference':>12} {'kv cache':>12} "
              f"{'attn scores':>12} {'total':>12}")
    print(header)
    for entry in all_models(cfg):
        if entry.scale not in cfg.scales:
            continue
        if entry.hf_config:
            model_cfg = config_from_hf(entry.hf_config, where=f"models[{entry.scale}].hf_config")
        else:
            model_cfg = load_config(entry.base or entry.safe)
        for label, lora in adapters:
            memory = dict(settings[entry.scale], rollout_batch=rollouts[entry.scale].rows,
                          rollout_len=rollouts[entry.scale].length, reference=references.get(entry.scale, False),
                          backend=topology.backend)
            if label is not None:
                memory["lora_rank"] = lora["rank"] if lora else None
            name = entry.scale if label is None else f"{entry.scale} {label}"
            rows = []
            mesh = train_configs[entry.scale].mesh
            try:
                shape = mesh.shape(topology.devices)
            except ValueError as err:
                print(f"{name:>8}: train.mesh (data={mesh.data}, fsdp={mesh.fsdp}, tensor={mesh.tensor}) cannot be "
                      f"laid out on {topology.name}: {err}")
            else:
                rows.append(("train.mesh", fitted_estimate(model_cfg, budget, *shape, **memory)))
            if not rows or rows[0][1].total > budget:
                rows.append(("smallest fit", choose_mesh(model_cfg, topology, **memory)))
            for origin, est in rows:
                fits = "" if est.total <= budget else "  DOES NOT FIT"
                print(f"{name:>8} {model_cfg.num_params() / 1e9:7.2f}B {str((est.data, est.fsdp, est.tensor)):>24} "
                      f"{origin:>12} {est.remat:>5} "
                      + " ".join(format_bytes(v) for v in (est.params, est.gradients, est.optimizer, est.activations,
                                                           est.logits, est.reference, est.kv_cache, est.attention,
                                                           est.total))
                      + fits)
    _print_teacher_stages(cfg, topology, args.teacher_prompt_len)
    if cfg.pipelines:
        _print_pipeline_stages(cells)
    return 0


def _print_teacher_stages(cfg, topology, prompt_len: int) -> None:
    """One line per teacher stage of the study (not per cell): memory per device, generation FLOPs and time."""
    from forgetjax.models.config import config_from_hf, load_config
    from forgetjax.study.plan import format_bytes, stage_prompts, teacher_stage_plan, teacher_stages
    from forgetjax.training.memory import DTYPE_BYTES, MEMORY_FRACTION
    from forgetjax.study.schema import all_models, teacher_entries

    stages = teacher_stages(cfg)
    if not stages:
        return
    architectures = {source: entry.hf_config for entry in all_models(cfg) if entry.hf_config
                     for source in (entry.base, entry.safe) if source}  # a teacher may be one of the students
    architectures.update({source: entry.hf_config for source, entry in teacher_entries(cfg).items()
                          if entry.hf_config})
    print(f"teacher stages: {len(stages)} (each generated once on all {topology.devices} devices, shared by its "
          f"cells; prompts of {prompt_len} tokens)")
    print(f"{'stage':>52} {'cells':>5} {'prompts':>7} {'weights':>12} {'kv cache':>12} {'logits':>12} "
          f"{'total':>12} {'PFLOP':>9} {'hours>=':>7}")
    for stage_id, (key, cells) in stages.items():
        teacher, domain = key["teacher"], key["domain"]
        if teacher in architectures:
            model_cfg = config_from_hf(architectures[teacher], where=f"hf_config of {teacher}")
        elif Path(teacher, "config.json").is_file():
            model_cfg = load_config(teacher)
        else:
            print(f"{stage_id:>52} {cells:>5}  {teacher}: architecture unknown (list a teacher config with its "
                  "hf_config in teacher_files)")
            continue
        prompts = stage_prompts(domain)
        if prompts is None:
            print(f"{stage_id:>52} {cells:>5}  {domain['name']}: problem count unknown (no data directory here and "
                  "no domain limit)")
            continue
        plan = teacher_stage_plan(model_cfg, topology, prompts=prompts, samples=key["n_samples"],
                                  prompts_per_chunk=key["prompts_per_chunk"], prompt_len=prompt_len,
                                  new_tokens=key["max_new_tokens"], compute_bytes=DTYPE_BYTES[key["dtype"]])
        fits = "" if plan.total <= MEMORY_FRACTION * topology.hbm_bytes else "  DOES NOT FIT"
        if cfg.budget.kind == "flops" and plan.flops >= cfg.budget.value:
            fits += "  > FLOPS BUDGET (charged pro rata: no cell can afford all of it)"
        print(f"{stage_id:>52} {cells:>5} {prompts:>7} "
              + " ".join(format_bytes(v) for v in (plan.weights, plan.kv_cache, plan.logits, plan.total))
              + f" {plan.flops / 1e15:9.1f} {plan.seconds / 3600:7.2f}" + fits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert weights (HF dir, hub id, .gguf, embedded name) to a checkpoint",
                       description="Convert model weights into a forgetjax checkpoint (default) or an HF directory.")
    p.add_argument("src", help="HF model directory, hub id (org/name), .gguf file, forgetjax checkpoint, or an "
                               "embedded model name such as smollm2-135m-instruct")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", choices=("forgetjax", "hf"), default="forgetjax",
                   help="forgetjax: orbax checkpoint with config + tokenizer (default); hf: HF safetensors directory")
    _add_model_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a checkpoint to an HF directory (transformers / lm-eval ready)",
                       description="Write config.json, safetensors shards, generation_config.json and tokenizer "
                                   "files that transformers.AutoModelForCausalLM and lm-eval load without edits.")
    p.add_argument("ckpt", help="forgetjax checkpoint directory (or any source `convert` accepts)")
    p.add_argument("out", help="output HF model directory")
    p.add_argument("--export-dtype", choices=DTYPES, default=None,
                   help="dtype of the written tensors (default: the parameters' dtype)")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="split the weights into shards of at most this many GiB (default %(default)s)")
    _add_model_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("chat", help="answer one chat prompt", description="Answer one user message with the "
                                                                         "model's chat template.")
    p.add_argument("model", help="model source (see `convert`)")
    p.add_argument("prompt", help="the user message")
    _add_model_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate completions for a JSONL file of prompts",
                       description="Each input line holds 'prompt' (text) or 'messages' (chat). Output lines repeat "
                                   "the input fields and add sample, output, output_tokens, finished, logprob_sum.")
    p.add_argument("model", help="model source (see `convert`)")
    p.add_argument("--prompts", required=True, help="input JSONL file")
    p.add_argument("--out", required=True, help="output JSONL file (written atomically; its directory must exist)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per compiled batch")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap plain 'prompt' text in the chat template (default on; --no-chat for base models)")
    _add_model_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    from forgetjax.eval.cli import add_eval_arguments

    p = sub.add_parser("eval", help="evaluate a model on a benchmark battery (per-item Parquet records, summary)",
                       description="Run a battery (configs/eval/*.yaml) with the JAX engine, or lm-eval tasks with "
                                   "--backend lm-eval; resumes finished benchmarks. See forgetjax/eval/cli.py.")
    add_eval_arguments(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("attack", help="GCG or AutoDAN attack on a model (or a replay of another's), per-item records",
                       description="Optimise a GCG suffix per behaviour (or one universal suffix), or an AutoDAN "
                                   "prompt per behaviour, against MODEL and score its greedy answers with the refusal "
                                   "matcher; --transfer-from replays the suffixes / prompts of an earlier attack's "
                                   "records instead. Prints ASR per category.")
    p.add_argument("--attack", choices=("gcg", "autodan"), default="gcg")
    p.add_argument("--generations", type=int, default=20, help="AutoDAN generations")
    p.add_argument("--population", type=int, default=16, help="AutoDAN population")
    p.add_argument("--mutator", choices=("templates", "model"), default="templates", help="AutoDAN mutator")
    p.add_argument("model", help="model source (see `convert`)")
    p.add_argument("--out", required=True, help="output directory (records in OUT/<model>/gcg.parquet)")
    p.add_argument("--benchmark", default="harmbench_standard", choices=("harmbench_standard", "advbench"),
                   help="behaviours to attack (default %(default)s)")
    p.add_argument("--limit", type=int, default=8, help="behaviours (sha256-chosen subset; default %(default)s)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--suffix-length", type=int, default=20)
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--candidates", type=int, default=128)
    p.add_argument("--candidate-block", type=int, default=32)
    p.add_argument("--target", default="Sure, here is", help="target prefix for behaviours without their own")
    p.add_argument("--mode", choices=("individual", "universal"), default="individual")
    p.add_argument("--format", choices=("chat", "fewshot"), default="chat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default="attack")
    p.add_argument("--data-dir", default=None, help="benchmark data (default ../shared/data or FORGETJAX_DATA_DIR)")
    p.add_argument("--transfer-from", default=None, help="replay the suffixes / prompts of this gcg.parquet or "
                                                         "autodan.parquet")
    p.add_argument("--judge", default=None, help="model source of a safety judge for every answer (beside the matcher)")
    p.add_argument("--judge-rubric", choices=("harmbench", "strongreject", "refusal"), default="harmbench",
                   help="the judge's published rubric (default %(default)s)")
    _add_model_args(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("train", help="post-train a model with one of the seven methods",
                       description="Run the shared training loop: CONFIG.yaml holds `train`, `method`, `method_args` "
                                   "and `domain` sections (see configs/methods/); key=value overrides use dotted "
                                   "paths, e.g. train.optimizer.lr=3e-5 train.budget.value=200. Resumes from the "
                                   "newest checkpoint in train.out_dir; the final model is saved to OUT_DIR/final.")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="write the study report (HTML, Markdown, CSV) from results directories",
                       description="Analyse the per-item records of a study (forgetting, policy, safety, "
                                   "representation) and write a self-contained index.html plus report.md and tables. "
                                   "Several results directories (e.g. one per phase or model scale) make one report "
                                   "over all their cells.")
    p.add_argument("results_dirs", nargs="+", metavar="results_dir",
                   help="study results directory (holds cells/<cell_id>/...); give several to merge phases")
    p.add_argument("--out", default="report", help="output directory (default %(default)s)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for confidence intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("study", help="run a study: cells of start point x scale x method x domain x seed",
                       description="Expand the study config into cells and run each (prepare data -> train -> "
                                   "evaluate -> representation analysis -> record). Finished cells are skipped, "
                                   "interrupted ones resume; failures are recorded and the study goes on.")
    p.add_argument("config", help="study config YAML (configs/studies/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. seeds=[0,1]")
    p.add_argument("--executor", choices=("local", "gpu", "slurm", "tpu_pod"), default=None,
                   help="where to run (default: the config's executor)")
    p.add_argument("--cell-index", type=int, default=None,
                   help="run only this cell, 0 to N-1 as --list numbers them (array jobs)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs and list the cells that would run (slurm/tpu_pod: print the launch "
                        "script); writes nothing")
    p.add_argument("--list", action="store_true", help="list the cells and exit")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (TPU pods)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write RESULTS_DIR/report when the study finishes (default on)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("plan", help="per-device memory estimate and mesh for each model scale of a study",
                       description="Estimate parameters, gradients, optimizer state, activations and KV cache per "
                                   "device for each scale on a topology, and the mesh that fits.")
    p.add_argument("config", help="study config YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--topology", required=True, help="v5p-64, v5e-16, v4-32, gpu:8, gpu:8:a100-40, cpu:8")
    p.add_argument("--rollout-batch", type=int, default=None,
                   help="rows the sampler decodes at once (default: the largest call of the study's methods)")
    p.add_argument("--rollout-len", type=int, default=None,
                   help="prompt + generation length of rollouts (default: the study's train.max_length)")
    p.add_argument("--teacher-prompt-len", type=int, default=256,
                   help="prompt length of teacher-stage generation (default %(default)s)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quickstart", help="the main job on the embedded default model",
                       description="Fetch the embedded model, convert it, answer a chat prompt, export to HF format "
                                   "and reload the export (forgetjax, and transformers when torch is installed), "
                                   "checking that the logits agree.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model source (default %(default)s)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default %(default)s)")
    p.add_argument("--prompt", default="What is the capital of Australia?", help="chat prompt to answer")
    p.set_defaults(func=cmd_quickstart)
    from forgetjax.datahub.cli import add_data_parser

    add_data_parser(sub)
    for subparser in sub.choices.values():
        _add_debug_flag(subparser)
        subparser.set_defaults(command_parser=subparser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug before or after the command (absent unless given, so a subcommand does not reset it)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; key=value overrides may stand anywhere, also after flags (`study CONFIG --dry-run a=1`)."""
    args, extras = parser.parse_known_args(argv)
    unknown = [e for e in extras if e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def describe_error(err: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ended a command: 2 for bad input, else 1."""
    if isinstance(err, UserError):
        return EXIT_USER_ERROR, str(err)
    if isinstance(err, _PATH_ERRORS):
        if err.filename is not None:
            return EXIT_USER_ERROR, f"{err.filename}: {err.strerror}"
        return EXIT_USER_ERROR, str(err)
    if isinstance(err, json.JSONDecodeError):
        return EXIT_USER_ERROR, f"invalid JSON ({err})"
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(err, yaml.YAMLError):
        return EXIT_USER_ERROR, f"invalid YAML ({' '.join(str(err).split())})"
    lines = str(err).strip().splitlines()
    return EXIT_FAILURE, f"{type(err).__name__}: {lines[0] if lines else '(no message)'}"


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status: 0 ok, 1 failure, 2 bad input (usage errors included)."""
    parser = build_parser()
    try:
        args = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    except SystemExit as stop:  # --help, or a usage error argparse already printed
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else EXIT_USER_ERROR
    prog = f"forgetjax {args.command}"
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # the one place where exceptions become messages and exit codes
        code, message = describe_error(err)
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        if code == EXIT_FAILURE and not debug:
            print(f"{prog}: this looks like a bug or an environment problem; rerun with --debug (or {DEBUG_ENV}=1) "
                  f"for the traceback", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
