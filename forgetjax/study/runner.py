"""Run a study: for every cell prepare data -> train -> evaluate -> analyse representations -> record.

Idempotent and resumable: a cell whose cell.json says "done" is skipped; an interrupted cell resumes (training from
its newest checkpoint, evaluation per finished benchmark file); a failing cell is recorded with its error and the
others go on. A manifest records the config hash, code version, package versions, seeds, budgets and wall time.
A merge cell (the study's `axes.merge`) trains nothing: it interpolates its start model and its trained parent's final
weights and is evaluated like a cell; it runs after its parent and fails, naming the parent, when that is not done.
Each cell.json keeps the resolved config its id hashes (`resolved`, and its `evaluation`); a cell directory holding
another resolved config stops the run before anything trains, so results of two configs are never mixed.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from forgetjax import results
from forgetjax.config import canonical_json, config_hash, differing_keys, dump_yaml, to_dict
from forgetjax.distributed import agree, barrier, is_writer, run_once
from forgetjax.errors import UserError
from forgetjax.io import write_json_atomic, write_jsonl_atomic
from forgetjax.paths import REPO_ROOT
from forgetjax.study.axes import axes_text
from forgetjax.study.matrix import (
    REPLAY_RECORDS,
    StudyCell,
    expand,
    replay_stage_id,
    safety_stage_id,
    safety_stage_run,
)
from forgetjax.study.pipelines import StageRun
from forgetjax.study.schema import StudyConfig, model_entry

EVAL_SEED = 0
"""The evaluation seed of every cell, baselines included: a limited battery's subsets (`select_subset`) and sampled
generations depend on it, so every seed's cell is evaluated on its baseline's items and pairs with all of them (the
attacked behaviours too)."""

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "grain", "numpy", "gem-llm",
            "lm-eval", "forgetjax")


def code_version() -> str:
    root = REPO_ROOT
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def data_dir_of(cfg: StudyConfig) -> Path:
    if cfg.data_dir:
        return Path(cfg.data_dir)
    from forgetjax.envs import default_data_dir

    return Path(default_data_dir())


def check_cell_index(index: int, n_cells: int) -> int:
    """`index` if it names one of `n_cells` cells (0-based, no negative indexing), else UserError."""
    if not 0 <= index < n_cells:
        raise UserError(f"--cell-index {index}: out of range; this study has {n_cells} cells, indices 0 to "
                        f"{n_cells - 1} (list them with --list)")
    return index


def budget_record(budget: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A trained cell's (or stage's) cell.json budget from its budget config and train result (`TrainResult` as a
    dict): kind, value, max_epochs, used, status, data, flags, and the replay data's use when it replayed."""
    record = {"kind": budget["kind"], "value": budget["value"], "max_epochs": budget.get("max_epochs"),
              "used": result["usage"], "status": result["status"], "data": result["data"], "flags": result["flags"]}
    if result.get("replay") is not None:
        record["replay"] = result["replay"]
    return record


def train_metrics(final_metrics: dict[str, Any]) -> dict[str, float]:
    """cell.json metrics of a training run: its numeric final metrics, prefixed train_."""
    return {f"train_{k}": v for k, v in final_metrics.items() if isinstance(v, (int, float))}


class StudyRunner:
    def __init__(self, cfg: StudyConfig, source: str = "<config>", log=print):
        self.cfg = cfg
        self.source = source
        self.results = Path(cfg.results_dir)
        self.log = log
        self._models: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ bookkeeping

    def write_manifest(self, cells: list[StudyCell], started: float, finished: float | None = None) -> None:
        if not is_writer():
            return
        manifest = {
            "study": self.cfg.name, "config_source": self.source, "config_hash": config_hash(self.cfg),
            "code_version": code_version(), "packages": package_versions(), "python": sys.version.split()[0],
            "seeds": self.cfg.seeds, "budget": to_dict(self.cfg.budget), "started": started, "finished": finished,
            "wall_seconds": (finished or time.time()) - started,
            "cells": [{"cell_id": c.cell_id, "method": c.method, "domain": c.domain, "seed": c.seed,
                       "start_point": c.start_point, "scale": c.scale, "status": self.status(c.cell_id),
                       **({"axes": axes_text(c.axes)} if c.axes else {})}
                      for c in cells],
        }
        write_json_atomic(results.manifest_file(self.results), manifest)

    def status(self, cell_id: str) -> str:
        return results.cell_status(self.results, cell_id)

    def check_stored_config(self, cell: StudyCell) -> None:
        """UserError when `cell`'s directory holds a cell.json written for another resolved config (a hand-edited or
        copied directory, a hash collision): its results are never mixed with this config's."""
        stored = results.read_cell_data(self.results, cell.cell_id).get("resolved")
        if stored is None or canonical_json(stored) == canonical_json(cell.resolved):
            return
        keys = differing_keys(stored, to_dict(cell.resolved))
        raise UserError(f"cell {cell.cell_id}: {results.cell_file(self.results, cell.cell_id)} was written for "
                        f"another resolved config (differs at {', '.join(keys[:8])}"
                        f"{', ...' if len(keys) > 8 else ''}); move that directory away or use another results_dir")

    def _write_cell(self, cell: StudyCell, status: str, **extra) -> None:
        if not is_writer():
            return
        previous = results.read_cell_data(self.results, cell.cell_id)
        model = model_entry(self.cfg, cell.scale)
        data = {**previous, "cell_id": cell.cell_id, "start_point": cell.start_point,
                "model": getattr(model, cell.start_point) or cell.start_model, "scale": cell.scale,
                "method": cell.method, "domain": cell.domain, "seed": cell.seed, "status": status,
                "start_model": cell.start_model, "matched": cell.matched, "run": cell.run,
                "target_benchmarks": list(cell.target_benchmarks), "evaluation": cell.resolved.get("evaluation"),
                "eval_format": cell.eval_format, "resolved": cell.resolved, **extra}
        if cell.axes:
            data["axes"] = cell.axes
            data["axis_reference"] = all(entry["reference"] for entry in cell.axes.values())
        if cell.is_merge:
            data["merge"] = {"parent": cell.merge_parent, "interpolate": cell.merge_alpha}
        if cell.pipeline is not None:
            data["pipeline"] = {**cell.pipeline.describe(), **data.get("pipeline", {}), **extra.get("pipeline", {})}
        data.setdefault("budget", {})
        data.setdefault("metrics", {})
        results.write_cell_data(self.results, data)

    # ------------------------------------------------------------------------------------------------ stages

    def run_safety_stage(self, scale: str) -> Path:
        """GT-SFT on refusal + helpful records, producing the SAFE start point of `scale`: once, however many jobs
        (SLURM array tasks) of the study need it at the same time (`forgetjax.distributed.run_once`)."""
        stage_id = safety_stage_id(self.cfg, scale)
        run_once(results.stage_dir(self.results, stage_id), lambda work: self._train_safety_stage(scale, work),
                 log=self.log)
        return results.stage_model_dir(self.results, stage_id)

    def _train_safety_stage(self, scale: str, stage_dir: Path) -> None:
        """Train the safety stage in `stage_dir` (resuming from its checkpoints when a killed job left some)."""
        from forgetjax.methods.run import RunConfig, run_training
        from forgetjax.study.safety import safety_records

        stage = self.cfg.safety_stage
        records = stage_dir / "safety_records.jsonl"
        rows = safety_records(data_dir_of(self.cfg), stage.harmful_limit, stage.helpful_limit, stage.borderline_limit)
        if is_writer():
            write_jsonl_atomic(records, rows)
        self.log(f"[study] safety stage for {scale}: {len(rows)} records -> {stage_dir}")
        run = safety_stage_run(self.cfg, scale, str(records), str(stage_dir / results.TRAIN_DIR))
        from forgetjax.config import from_dict

        run_training(from_dict(RunConfig, run, source=f"{self.source}: safety_stage"),
                     source=f"{self.source}: safety_stage")

    def run_teacher_stage(self, cell: StudyCell) -> Path:
        """The teacher's verified samples a distillation cell trains on: generated once per teacher stage id,
        however many cells (seeds, start points, scales) and jobs share it, and resumed chunk by chunk when a
        killed job left a partial stage."""
        return self._teacher_stage(cell.run, f"cell {cell.cell_id}")

    def _teacher_stage(self, run: dict[str, Any], what: str) -> Path:
        """The teacher stage `run` (a cell's or a pipeline stage's) trains on, built once."""
        from forgetjax.config import from_dict
        from forgetjax.methods.distill import DistillArgs, build_teacher_stage, resolved_teacher_dtype
        from forgetjax.methods.run import DomainConfig

        where = f"{self.source}: {what}"
        args = from_dict(DistillArgs, run["method_args"], source=f"{where} method_args")
        domain = from_dict(DomainConfig, run["domain"], source=f"{where} domain")
        dtype = resolved_teacher_dtype(args.teacher_dtype, run["train"].get("dtype", "float32"))
        return run_once(Path(args.teacher_data), lambda work: build_teacher_stage(work, args, domain, dtype),
                        log=self.log)

    def run_replay_stage(self, stage_id: str) -> Path:
        """The records of a named replay source (`train.replay.source` general / safety), written once."""
        from forgetjax.study.safety import replay_records
        from forgetjax.training.replay import REPLAY_SOURCES

        source = next(s for s in REPLAY_SOURCES if replay_stage_id(self.cfg, s) == stage_id)
        limit = self.cfg.safety_stage.harmful_limit if source == "safety" else self.cfg.safety_stage.helpful_limit

        def build(work: Path) -> None:
            rows = replay_records(data_dir_of(self.cfg), source, limit)
            if is_writer():
                write_jsonl_atomic(work / REPLAY_RECORDS, rows)
            self.log(f"[study] replay records {source}: {len(rows)} -> {work}")

        return run_once(results.stage_dir(self.results, stage_id), build, log=self.log)

    def run_stage(self, stage: StageRun) -> dict[str, Any]:
        """Train one pipeline stage once, however many cells and jobs share it (`run_once`: a killed build resumes
        from its checkpoints), and return its train_result.json. Its parent must be built already."""
        final = results.stage_dir(self.results, stage.stage_id)
        if agree(final.is_dir()):
            self.log(f"[study] stage {stage.stage_id} ({stage.name}): done already, reused")
        else:
            run_once(final, lambda work: self._train_stage(stage, work), log=self.log)
        return json.loads((final / results.TRAIN_DIR / "train_result.json").read_text(encoding="utf-8"))

    def _train_stage(self, stage: StageRun, work: Path) -> None:
        from forgetjax.config import from_dict
        from forgetjax.methods.run import RunConfig, run_training

        self.log(f"[study] stage {stage.stage_id}: {stage.method} on {stage.domain} from "
                 f"{stage.parent or stage.run['train']['model']}")
        if stage.teacher_stage:
            self._teacher_stage(stage.run, stage.stage_id)
        if stage.replay_stage:
            self.run_replay_stage(stage.replay_stage)
        run = dict(stage.run)
        run["train"] = {**run["train"], "out_dir": str(work / results.TRAIN_DIR)}
        config = from_dict(RunConfig, run, source=f"{self.source}: stage {stage.stage_id}")
        if is_writer():
            dump_yaml(config, work / results.RUN_FILE)
            write_json_atomic(work / "stage.json", {**stage.path_entry(), "resolved": stage.resolved})
        run_training(config, source=f"{self.source}: stage {stage.stage_id}")

    def run_pipeline(self, cell: StudyCell) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Train (or reuse) every stage of a pipeline cell's path; (the path with each stage's budget used, the
        evaluated stage's train_result.json)."""
        path = []
        for stage in cell.pipeline.stages:
            result = self.run_stage(stage)
            path.append({**stage.path_entry(), "budget": budget_record(stage.run["train"]["budget"], result)})
        return path, result

    # ------------------------------------------------------------------------------------------------ cells

    def _load(self, source: str):
        import forgetjax

        if source not in self._models:
            self._models.clear()
            self._models[source] = forgetjax.load(source)
        return self._models[source]

    def run_cell(self, cell: StudyCell) -> None:
        import forgetjax
        from forgetjax.config import from_dict
        from forgetjax.eval.battery import run_battery
        from forgetjax.eval.jax_engine import JaxEngine
        from forgetjax.host_memory import release_host_memory
        from forgetjax.study.representation import analyse
        from forgetjax.methods.run import RunConfig, run_training

        started = time.time()
        self._write_cell(cell, "running", started=started)
        budget, metrics, extra = {}, {}, {}
        model_source = cell.start_model
        if not cell.is_baseline:
            self._models.clear()  # the last evaluated model is not needed while this cell trains
        if cell.is_merge:
            model, tokenizer = self._merged_model(cell)
        elif cell.pipeline is not None:
            path, result = self.run_pipeline(cell)
            budget, metrics = path[-1]["budget"], train_metrics(result["final_metrics"])
            if result.get("kl_to_start") is not None:
                extra["kl_to_start"] = result["kl_to_start"]
            self._write_cell(cell, "running", started=started, pipeline={"path": path})
            model_source = str(results.stage_model_dir(self.results, cell.pipeline.evaluated.stage_id))
        elif not cell.is_baseline:
            if cell.teacher_stage:
                self.run_teacher_stage(cell)
                release_host_memory()
            if cell.replay_stage:
                self.run_replay_stage(cell.replay_stage)
            run = dict(cell.run)
            run["train"] = {**run["train"], "out_dir": str(results.cell_train_dir(self.results, cell.cell_id))}
            if is_writer():
                dump_yaml(from_dict(RunConfig, run, source=cell.cell_id),
                          results.cell_run_file(self.results, cell.cell_id))
            result = run_training(from_dict(RunConfig, run, source=f"{self.source}: cell {cell.cell_id}"),
                                  source=cell.cell_id)
            budget = budget_record(to_dict(self.cfg.budget), dataclasses.asdict(result))
            metrics = train_metrics(result.final_metrics)
            if result.kl_to_start is not None:
                extra["kl_to_start"] = result.kl_to_start
            model_source = str(results.cell_model_dir(self.results, cell.cell_id))
        if not cell.is_merge:
            model, tokenizer = self._load(model_source)
        engine = JaxEngine(model, tokenizer, model_id=cell.cell_id, batch_size=16, max_length=2048)
        result = run_battery(engine, self.cfg.battery, data_dir_of(self.cfg),
                             results.cell_eval_dir(self.results, cell.cell_id),
                             run_id=cell.cell_id, seed=EVAL_SEED, limit=self.cfg.eval_limit, fmt=cell.eval_format,
                             progress=True)
        eval_summary = {f"eval_{row['benchmark']}": row.get("accuracy") for row in result.summary
                        if row.get("category") == "ALL" and row.get("accuracy") is not None}
        if self.cfg.attacks.enabled:
            eval_summary.update(self.run_attacks(cell, model, tokenizer))
        del engine
        release_host_memory()
        if self.cfg.representation and not cell.is_baseline:
            start_model, _ = forgetjax.load(cell.start_model)
            data = analyse(start_model, model, tokenizer, data_dir_of(self.cfg), self.cfg.representation_probe)
            if is_writer():
                results.write_representation(results.representation_file(self.results, cell.cell_id), data)
            del start_model, data
        self._write_cell(cell, "done", budget=budget, metrics={**metrics, **eval_summary},
                         wall_seconds=time.time() - started, finished=time.time(), **extra)
        release_host_memory()

    def _merged_model(self, cell: StudyCell):
        """(model, tokenizer) of a merge cell: its start model and its parent's final model interpolated at alpha
        (`forgetjax.training.interpolate`); UserError when the parent has not finished."""
        import forgetjax
        from forgetjax.training.interpolate import interpolate_models

        if self.status(cell.merge_parent) != results.DONE_STATUS:
            raise UserError(f"merge cell {cell.cell_id}: its trained cell {cell.merge_parent} is not done "
                            f"(status {self.status(cell.merge_parent)!r}); run it first, then rerun the study")
        self._models.clear()
        start, tokenizer = forgetjax.load(cell.start_model)
        post, _ = forgetjax.load(str(results.cell_model_dir(self.results, cell.merge_parent)))
        return interpolate_models(start, post, cell.merge_alpha), tokenizer

    def run_attacks(self, cell: StudyCell, model, tokenizer) -> dict[str, float]:
        """Each configured attack against the cell's model and the replay of the start model's findings on it; records
        beside the battery's, each kept once written (a rerun resumes). The start model's findings are an attack
        stage built once (`attack_stage`), so a post-trained cell never waits for its baseline cell; the baseline's
        own records are that stage's. Returns the ASR of every attack and replay."""
        import shutil

        from forgetjax.eval.battery import model_slug
        from forgetjax.eval.records import read_records

        eval_dir = results.cell_eval_dir(self.results, cell.cell_id)
        baseline = cell if cell.is_baseline else next(
            c for c in expand(self.cfg) if c.is_baseline and (c.start_point, c.scale) == (cell.start_point, cell.scale))
        asr = {}
        for attack in self.cfg.attacks.methods:
            run = self._attack(attack, cell, model, tokenizer, eval_dir, cell.cell_id)
            source = self.attack_stage(baseline, attack, (model, tokenizer) if cell.is_baseline else None)
            own = eval_dir / model_slug(cell.cell_id) / f"{attack}.parquet"
            if not own.is_file():
                if cell.is_baseline:
                    if is_writer():
                        own.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(source, own)
                    barrier(f"attack-copy:{own}")
                else:
                    run()
            replay = eval_dir / model_slug(cell.cell_id) / f"{attack}_transfer.parquet"
            if not replay.is_file():
                run(transfer_from=source)
            for path in (own, replay):
                records = read_records(path)
                asr[f"asr_{path.stem}"] = sum(not r.refusal for r in records) / len(records)
        return asr

    def _attack(self, attack: str, cell: StudyCell, model, tokenizer, out_dir: Path, run_id: str):
        """The configured `attack` (gcg or autodan) on `model`, records under `out_dir` as `run_id`."""
        from forgetjax.eval.attacks.runner import run_attack, run_autodan_attack

        settings = self.cfg.attacks
        common = dict(data_dir=data_dir_of(self.cfg), out_dir=out_dir, run_id=run_id, model_id=run_id,
                      benchmark=settings.benchmark, limit=settings.limit, seed=EVAL_SEED)
        if attack == "gcg":
            return functools.partial(run_attack, model, tokenizer, config=settings.gcg, fmt=cell.eval_format, **common)
        return functools.partial(run_autodan_attack, model, tokenizer, config=settings.autodan, **common)

    def attack_stage(self, baseline: StudyCell, attack: str, loaded=None) -> Path:
        """The start model's findings of `attack` (GCG suffixes, AutoDAN templates) that every cell of the baseline's
        (start point, scale) replays: the records of the attack on the start model, written once as the stage
        `attack-<attack>-<baseline cell id>` (the baseline's id hashes the start model and the evaluation with its
        attack settings) by whichever job needs them first (`run_once`); `loaded`: the start (model, tokenizer) when
        the caller holds it already. Returns the records' Parquet file."""
        import forgetjax
        from forgetjax.eval.battery import model_slug

        stage_id = f"attack-{attack}-{baseline.cell_id}"

        def build(work: Path) -> None:
            start, tokenizer = loaded or forgetjax.load(baseline.start_model)
            self._attack(attack, baseline, start, tokenizer, work, baseline.cell_id)()
            self.log(f"[study] {attack} on the start model of {baseline.cell_id} -> {work}")

        final = run_once(results.stage_dir(self.results, stage_id), build, log=self.log)
        return final / model_slug(baseline.cell_id) / f"{attack}.parquet"

    def run(self, only_index: int | None = None) -> dict[str, Any]:
        """Run every cell, or only cell `only_index` (checked before anything is written or trained); the
        safety stage runs only for the scales of selected cells that start from it."""
        cells = expand(self.cfg)
        selected = cells if only_index is None else [cells[check_cell_index(only_index, len(cells))]]
        for cell in selected:
            self.check_stored_config(cell)
        if is_writer():
            self.results.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.cfg, results.study_file(self.results))
        started = time.time()
        self.write_manifest(cells, started)
        if self.cfg.safety_stage.enabled:
            for scale in self.cfg.scales:
                if any(c.scale == scale and c.start_point == "safe" for c in selected):
                    self.run_safety_stage(scale)
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for i, cell in enumerate(selected, 1):
            if agree(self.status(cell.cell_id) == "done"):
                counts["skipped"] += 1
                self.log(f"[study] {i}/{len(selected)} {cell.cell_id}: done already, skipped")
                continue
            self.log(f"[study] {i}/{len(selected)} {cell.cell_id}: {cell.method} on {cell.domain or '-'} "
                     f"from {cell.start_point}")
            try:
                self.run_cell(cell)
                counts["done"] += 1
            except KeyboardInterrupt:
                raise
            except Exception as err:  # a failing cell is recorded and the study goes on
                counts["failed"] += 1
                self._write_cell(cell, "failed", error=f"{type(err).__name__}: {err}",
                                 traceback=traceback.format_exc(limit=20))
                self.log(f"[study] {cell.cell_id} FAILED: {type(err).__name__}: {err}")
            self.write_manifest(cells, started)
        self.write_manifest(cells, started, finished=time.time())
        return {"cells": len(cells), **counts, "results_dir": str(self.results)}
