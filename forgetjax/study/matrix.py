"""Expand a study into cells with stable ids; matched conditions are part of each cell's resolved config.

A cell id hashes everything that decides what the cell computes, fully resolved: the training run with every default
of RunConfig and of the method's argument dataclass filled in, the method's code version (a digest of its module and
the method and loss modules it uses: `forgetjax.methods.catalog.method_code_digest`), the matched conditions, the
evaluation battery's contents (not only its path), the evaluation limit and format, the representation settings and
the target benchmarks. Changing any of them gives new ids, and the analysis reads only the cells of the current config
(manifest.json). Expansion types every run through RunConfig and the method registry, so a study that does not
validate fails when it loads (`check_study`), naming the dotted field, instead of when its cell starts. The
evaluation's prompt format is resolved for the cell's start point (`eval_format: auto` gives a BASE start "fewshot"
and a SAFE start "chat", for its baseline and its post-trained cells alike)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from forgetjax.config import ConfigError, build_section, config_hash, deep_merge, to_dict
from forgetjax.methods.catalog import METHODS, method_code_digest, method_entry
from forgetjax.results import BASELINE_METHOD, stage_dir, stage_model_dir
from forgetjax.study.axes import (
    MERGE_AXIS,
    apply_setting,
    axes_record,
    merge_record,
    method_settings,
    parse_axes,
)
from forgetjax.study.pipelines import PipelinePath, pipeline_cells
from forgetjax.study.schema import StudyConfig, model_entry, study_domains
from forgetjax.tasks.domains import DomainSpec

CELL_TRAIN_KEYS = ("model", "seed", "budget", "out_dir")
"""Train fields every cell sets itself (from models, seeds, budget and the results directory), never the study."""
SAFETY_STAGE_METHOD = "gt_sft"


@dataclasses.dataclass
class StudyCell:
    cell_id: str
    start_point: str
    scale: str
    method: str
    domain: str | None
    seed: int
    start_model: str
    run: dict[str, Any] | None
    matched: dict[str, Any]
    target_benchmarks: tuple[str, ...] = ()
    resolved: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the id hashes
    eval_format: str = "chat"
    teacher_stage: str | None = None
    axes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # `axes.axes_record` (+ merge)
    merge_parent: str | None = None  # a derived merge cell: the trained cell it interpolates towards
    merge_alpha: float | None = None
    replay_stage: str | None = None  # the replay records' stage (`resolve_replay`)
    pipeline: PipelinePath | None = None  # the stages a pipeline cell trains (`forgetjax.study.pipelines`)

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE_METHOD

    @property
    def is_merge(self) -> bool:
        return self.merge_parent is not None


def safety_stage_optimizer(cfg: StudyConfig) -> dict[str, Any]:
    """The safety stage's optimizer settings: the study's (`train.optimizer`) at the stage's learning rate."""
    return {**cfg.train.get("optimizer", {}), "lr": cfg.safety_stage.lr}


def safety_stage_run(cfg: StudyConfig, scale: str, records: str, out_dir: str) -> dict[str, Any]:
    """The safety stage's training run at `scale`: GT-SFT on the `records` file with the study's train settings
    (the stage's batch size, length, steps and learning rate over them), written to `out_dir`."""
    stage = cfg.safety_stage
    entry = model_entry(cfg, scale)
    train = {**cfg.train, "model": getattr(entry, stage.from_start), "dtype": entry.dtype,
             "batch_size": stage.batch_size, "max_length": stage.max_length, "seed": 0,
             "budget": {"kind": "steps", "value": stage.steps}, "optimizer": safety_stage_optimizer(cfg),
             "out_dir": out_dir}
    return {"train": train, "method": SAFETY_STAGE_METHOD,
            "method_args": {"records": [records], "verify": False, "packing": True}, "domain": {"name": "qa"}}


def _safety_records_digest() -> str:
    """sha256 of the module that builds the safety stage's records (forgetjax/study/safety.py)."""
    return hashlib.sha256(Path(__file__).with_name("safety.py").read_bytes()).hexdigest()


def safety_stage_id(cfg: StudyConfig, scale: str) -> str:
    """The stage's directory name: a hash of its fully resolved training run (source model, every train and GT-SFT
    default filled in), its record settings, the code of GT-SFT and of the record builder, and (when set) the
    data_dir its records come from; a change to any of them trains a new stage instead of reusing another one."""
    run = resolved_run(safety_stage_run(cfg, scale, records="<stage>/safety_records.jsonl", out_dir="<stage>"))
    key = {"run": run, "stage": to_dict(cfg.safety_stage), "code": method_code_digest(SAFETY_STAGE_METHOD),
           "records_code": _safety_records_digest()}
    if cfg.data_dir:
        key["data_dir"] = cfg.data_dir
    return f"safety-{scale}-{config_hash(key)[:10]}"


REPLAY_RECORDS = "replay_records.jsonl"


def replay_stage_id(cfg: StudyConfig, source: str) -> str:
    """The directory name of a named replay source's records: a hash of the source, its record limit (the safety
    stage's harmful_limit for "safety", helpful_limit for "general"), the record builder's code and the data_dir."""
    limit = cfg.safety_stage.harmful_limit if source == "safety" else cfg.safety_stage.helpful_limit
    key = {"source": source, "limit": limit, "records_code": _safety_records_digest(), "data_dir": cfg.data_dir}
    return f"replay-{source}-{config_hash(key)[:10]}"


def resolve_replay(cfg: StudyConfig, run: dict[str, Any]) -> str | None:
    """Point `run`'s `train.replay.source` "general" / "safety" at the replay records the study writes once
    (RESULTS_DIR/stages/<replay stage id>/replay_records.jsonl) and return that stage's id (None for a records file
    or no replay). ConfigError naming `train.replay` when the run's method cannot replay."""
    from forgetjax.training.replay import REPLAY_SOURCES

    replay = run["train"].get("replay")
    if not replay:
        return None
    from forgetjax.config import from_dict
    from forgetjax.methods.registry import build_method
    from forgetjax.methods.run import DomainConfig

    if not build_method(run["method"], run["method_args"], from_dict(DomainConfig, run["domain"])).replays:
        raise ConfigError(f"train.replay: method {run['method']} cannot replay (its batches are not SFT rows); "
                          "replay applies to the SFT-family methods")
    if replay.get("source") not in REPLAY_SOURCES:
        return None
    stage_id = replay_stage_id(cfg, replay["source"])
    run["train"]["replay"] = {**replay, "source": str(stage_dir(cfg.results_dir, stage_id) / REPLAY_RECORDS)}
    return stage_id


def start_model(cfg: StudyConfig, start_point: str, scale: str) -> str:
    """The model a cell starts from; a SAFE start produced by the safety stage points at that stage's output."""
    entry = model_entry(cfg, scale)
    if start_point == "safe" and cfg.safety_stage.enabled:
        return str(stage_model_dir(cfg.results_dir, safety_stage_id(cfg, scale)))
    return getattr(entry, start_point)


STUDY_KL_EVERY = 10
"""Study cells measure the KL to the start model after every 10th step unless the study's train.kl_to_start says
otherwise (`forgetjax.training.kl_monitor`), whatever the method: its two forward passes cost 2/3 of a step's FLOPs
per token, so every 10th step charges about 7% of the training FLOPs to the budget."""


def train_settings(cfg: StudyConfig, scale: str) -> dict[str, Any]:
    """The train section of the runs at `scale` before a cell's model, seed and budget: the study's train settings
    over the scale's dtype and the KL to the start model measured every STUDY_KL_EVERY steps."""
    return deep_merge({"dtype": model_entry(cfg, scale).dtype, "kl_to_start": {"every": STUDY_KL_EVERY}}, cfg.train)


def generation_args(cfg: StudyConfig, method: str, domain: DomainSpec) -> dict[str, Any]:
    """The one place a cell's generation length is set: every generating method of a domain (rollouts, teacher and
    self generations, DPO and SPIN samples) samples up to the same `max_new_tokens`, the study's when set (for all
    methods and domains), else the domain config's. {} for methods that do not generate."""
    if not method_entry(method).generates:
        return {}
    return {"max_new_tokens": cfg.max_new_tokens or domain.max_new_tokens}


def _method_args(cfg: StudyConfig, method: str, scale: str, domain: DomainSpec) -> dict[str, Any]:
    """The study's arguments of `method`, with the scale's teacher when the method needs one and none is set, and
    the domain's generation length."""
    args = copy.deepcopy(cfg.method_args.get(method, {}))
    teacher = method_entry(method).teacher
    teacher_model = getattr(model_entry(cfg, scale), f"{teacher}_teacher") if teacher else None
    if teacher_model and "teacher" not in args:
        args["teacher"] = teacher_model
    return {**args, **generation_args(cfg, method, domain)}


def resolved_method_args(method: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args` of `method` typed through the method registry's argument dataclass, every default filled in;
    ConfigError naming `method_args.<method>.<field>` when they do not validate."""
    from forgetjax.methods.registry import get_method_spec

    return to_dict(build_section(get_method_spec(method).args_class, args, f"method_args.{method}"))


def resolved_run(run: dict[str, Any]) -> dict[str, Any]:
    """`run` as training will see it: every default of RunConfig and of the method's arguments filled in.
    ConfigError naming the dotted field (`train.optimizer.lrr`, `method_args.off_rl_dpo.betta`) when it does not
    validate."""
    from forgetjax.methods.run import RunConfig

    resolved = to_dict(build_section(RunConfig, run, ""))
    resolved["method_args"] = resolved_method_args(run["method"], run["method_args"])
    return resolved


def domain_config(cfg: StudyConfig, domain: str, specs) -> dict[str, Any]:
    """The DomainConfig of `domain`'s runs: its domain file's problem source under `domain_sources.<domain>` (and the
    study's data_dir unless the source sets one)."""
    config = {"name": domain, **specs[domain].problem_source(), **cfg.domain_sources.get(domain, {})}
    if cfg.data_dir:
        config.setdefault("data_dir", cfg.data_dir)
    return config


def check_study(cfg: StudyConfig) -> None:
    """Type every section a cell reads, as the cells will read it (ConfigError naming the dotted field): train,
    method_args (also of methods the study does not run), domain_sources, the battery, the safety stage's run and
    every cell's run (through `expand`)."""
    from forgetjax.methods.run import DomainConfig

    set_by_cells = [key for key in CELL_TRAIN_KEYS if key in cfg.train]
    if set_by_cells:
        raise ConfigError(f"train.{set_by_cells[0]}: set per cell (from models, seeds, budget and results_dir); "
                          f"remove it from train")
    specs = study_domains(cfg)
    for method in cfg.method_args:
        if method not in METHODS:
            raise ConfigError(f"method_args.{method}: unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
        for scale in cfg.scales:
            for domain in cfg.domains:
                resolved_method_args(method, _method_args(cfg, method, scale, specs[domain]))
    study_axes(cfg)
    for domain in cfg.domain_sources:
        if domain not in specs:
            raise ConfigError(f"domain_sources.{domain}: unknown domain {domain!r}; known: {', '.join(sorted(specs))}")
        build_section(DomainConfig, domain_config(cfg, domain, specs), f"domain_sources.{domain}")
    expand(cfg)


def teacher_stage(run: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(stage id, key) of the teacher stage whose generations the run trains on; None when its method has no
    teacher or its teacher is the student itself ("self")."""
    from forgetjax.methods.distill import (
        SELF_TEACHER,
        TEACHER_STAGE_ARGS,
        resolved_teacher_dtype,
        teacher_stage_id,
        teacher_stage_key,
    )

    if method_entry(run["method"]).teacher is None:
        return None
    resolved = resolved_run(run)
    args = resolved["method_args"]
    if args.get("teacher") == SELF_TEACHER or not set(TEACHER_STAGE_ARGS) <= set(args):
        return None
    key = teacher_stage_key(args, resolved["domain"], resolved_teacher_dtype(args["teacher_dtype"],
                                                                             resolved["train"]["dtype"]))
    return teacher_stage_id(key), key


def teacher_stage_dir(cfg: StudyConfig, stage_id: str) -> Path:
    """Where a teacher stage is built: `teacher_stages_dir/<id>` when the study sets one (studies sharing it
    generate each stage once between them), else RESULTS_DIR/stages/<id>."""
    if cfg.teacher_stages_dir:
        return Path(cfg.teacher_stages_dir) / stage_id
    return stage_dir(cfg.results_dir, stage_id)


START_POINT_FORMATS = {"base": "fewshot", "safe": "chat"}


def resolve_eval_format(eval_format: str, start_point: str) -> str:
    """The prompt format a start point's cells are evaluated in: `auto` gives a base model few-shot prompts and a
    safe (instruct or safety-tuned) model chat prompts; "chat" or "fewshot" applies to every start point."""
    if eval_format != "auto":
        return eval_format
    if start_point not in START_POINT_FORMATS:
        raise ConfigError(f"start_points: {start_point!r} has no eval_format for 'auto' "
                          f"(known: {sorted(START_POINT_FORMATS)})")
    return START_POINT_FORMATS[start_point]


def evaluation_settings(cfg: StudyConfig, start_point: str) -> dict[str, Any]:
    """The resolved evaluation of a start point's cells: the battery's contents, the item limit and the prompt
    format resolved for the start point. ConfigError naming `battery` when the battery file is missing or does not
    validate."""
    from forgetjax.errors import UserError
    from forgetjax.eval.battery import resolve_battery

    try:
        battery = to_dict(resolve_battery(cfg.battery))
    except (UserError, FileNotFoundError) as err:
        raise ConfigError(f"battery: {err}") from None
    battery.pop("source", None)
    settings = {"battery": battery, "eval_limit": cfg.eval_limit,
                "eval_format": resolve_eval_format(cfg.eval_format, start_point)}
    if cfg.attacks.enabled:
        settings["attacks"] = to_dict(cfg.attacks)
    return settings


def study_axes(cfg: StudyConfig):
    """The study's (run-key axes, merge axis), typed (`forgetjax.study.axes.parse_axes`)."""
    return parse_axes(cfg.axes, cfg.budget)


def _merge_digest() -> str:
    """sha256 of the interpolation code (forgetjax/training/interpolate.py): part of every merge cell's id."""
    from forgetjax.training import interpolate

    return hashlib.sha256(Path(interpolate.__file__).read_bytes()).hexdigest()


def merge_cells(parent: StudyCell, alphas, evaluation: dict[str, Any], representation: dict[str, Any],
                digest: str) -> list[StudyCell]:
    """The derived cells of `parent`, one per alpha: (1 - alpha) x start + alpha x post-trained weights, evaluated like
    a cell, never trained. Each id hashes the parent's id (itself a hash of its resolved config) and alpha."""
    cells = []
    for alpha in alphas:
        resolved = {"parent": parent.cell_id, "merge": {"interpolate": alpha}, "code": digest,
                    "evaluation": evaluation, "representation": representation}
        cell_id = f"{parent.cell_id}-merge-{config_hash(resolved)[:10]}"
        cells.append(dataclasses.replace(
            parent, cell_id=cell_id, run=None, resolved=resolved, teacher_stage=None, replay_stage=None,
            axes={**parent.axes, MERGE_AXIS: merge_record(alpha)}, merge_parent=parent.cell_id, merge_alpha=alpha))
    return cells


def _trained_cells(cfg: StudyConfig, axes, point: str, scale: str, method: str, domain: str, seed: int,
                   domains: dict[str, DomainSpec], matched_base: dict[str, Any], evaluation: dict[str, Any],
                   representation: dict[str, Any], code: str) -> list[StudyCell]:
    """The trained cells of one (start, scale, method, domain, seed): one per combination of the axes that apply."""
    domain_cfg = domain_config(cfg, domain, domains)
    train = train_settings(cfg, scale)
    train.update({"model": matched_base["start_model"], "seed": seed, "budget": to_dict(cfg.budget)})
    base_run = {"train": train, "method": method, "method_args": _method_args(cfg, method, scale, domains[domain]),
                "domain": domain_cfg}
    cells = []
    for setting in method_settings(axes, method):
        run = apply_setting(base_run, axes, setting)
        stage = teacher_stage(run)
        if stage:
            run["method_args"]["teacher_data"] = str(teacher_stage_dir(cfg, stage[0]))
        matched = {**matched_base, "budget": run["train"]["budget"], "domain": domain_cfg}
        record = axes_record(setting)
        try:
            replay = resolve_replay(cfg, run)
            resolved_train = resolved_run(run)
        except ConfigError as err:
            if not setting:
                raise
            marks = {axis.name: axis.key.split(".")[-1] if axis.key.startswith("method_args.") else
                     ".".join(axis.key.split(".")[:2]) for axis in axes}  # how the error names the axis' key
            named = [name for name in setting if marks[name] in str(err)]
            raise ConfigError(f"axes ({', '.join(named or setting)}): {err}") from None
        resolved = {"run": resolved_train, "code": code, "matched": matched, "evaluation": evaluation,
                    "representation": representation, "targets": domains[domain].target_benchmarks}
        if record:
            resolved["axes"] = {name: entry["value"] for name, entry in record.items()}
        cell_id = f"{point}-{scale}-{method}-{domain}-s{seed}-{config_hash(resolved)[:10]}"
        cells.append(StudyCell(cell_id, point, scale, method, domain, seed, matched_base["start_model"], run,
                               matched, tuple(domains[domain].target_benchmarks), resolved,
                               eval_format=evaluation["eval_format"], teacher_stage=stage[0] if stage else None,
                               replay_stage=replay, axes=record))
    return cells


def expand(cfg: StudyConfig) -> list[StudyCell]:
    """All cells: one baseline per (start point, scale) plus start x scale x method x domain x seed x the values of
    the axes that apply to the method, each trained cell followed by its merge cells when the study has a merge
    axis, and the evaluated stages of every pipeline crossed with start x scale x domain x seed
    (`forgetjax.study.pipelines`)."""
    cells = []
    axes, merge = study_axes(cfg)
    digest = _merge_digest() if merge else ""
    domains = study_domains(cfg)
    representation = {"representation": cfg.representation, "representation_probe": cfg.representation_probe}
    code = {method: method_code_digest(method) for method in cfg.methods}
    for scale in cfg.scales:
        for point in cfg.start_points:
            start = start_model(cfg, point, scale)
            evaluation = evaluation_settings(cfg, point)
            fmt = evaluation["eval_format"]
            matched_base = {"start_model": start, "battery": cfg.battery, "eval_limit": cfg.eval_limit}
            resolved = {**matched_base, "seed": cfg.seeds[0], "evaluation": evaluation}
            baseline_id = f"{point}-{scale}-{BASELINE_METHOD}-" + config_hash(resolved)[:10]
            cells.append(StudyCell(baseline_id, point, scale, BASELINE_METHOD, None, cfg.seeds[0], start, None,
                                   matched_base, resolved=resolved, eval_format=fmt))
            for method in cfg.methods:
                for domain in cfg.domains:
                    for seed in cfg.seeds:
                        for cell in _trained_cells(cfg, axes, point, scale, method, domain, seed, domains,
                                                   matched_base, evaluation, representation, code[method]):
                            cells.append(cell)
                            if merge and (merge.methods is None or method in merge.methods):
                                cells.extend(merge_cells(cell, merge.interpolate, evaluation, representation,
                                                         digest))
            cells.extend(pipeline_cells(cfg, point, scale, start, evaluation, matched_base, representation, domains))
    return cells
