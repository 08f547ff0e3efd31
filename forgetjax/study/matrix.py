"""Expand a study into cells with stable ids; matched conditions are part of each cell's resolved config.

A cell id hashes everything that decides what the cell computes, fully resolved: the training run with every default
of RunConfig and of the method's argument dataclass filled in, the matched conditions, the evaluation battery's
contents (not only its path), the evaluation limit and format, the representation settings and the target benchmarks.
Changing any of them gives new ids, and the analysis reads only the cells of the current config (manifest.json)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from forgetjax.config import ConfigError, config_hash, deep_merge, from_dict, to_dict
from forgetjax.methods.catalog import method_entry
from forgetjax.results import BASELINE_METHOD, stage_model_dir
from forgetjax.study.schema import StudyConfig, model_entry, study_domains
from forgetjax.tasks.domains import DomainSpec


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

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE_METHOD


def safety_stage_optimizer(cfg: StudyConfig) -> dict[str, Any]:
    """The safety stage's optimizer settings: the study's (`train.optimizer`) at the stage's learning rate."""
    return {**cfg.train.get("optimizer", {}), "lr": cfg.safety_stage.lr}


def safety_stage_id(cfg: StudyConfig, scale: str) -> str:
    """The stage's directory name: a hash of its source model, settings, optimizer and (when set) the data_dir its
    records come from, so a changed data_dir or optimizer trains a new stage instead of reusing another one."""
    entry = model_entry(cfg, scale)
    key = {"source": getattr(entry, cfg.safety_stage.from_start), "stage": to_dict(cfg.safety_stage),
           "optimizer": safety_stage_optimizer(cfg)}
    if cfg.data_dir:
        key["data_dir"] = cfg.data_dir
    return f"safety-{scale}-{config_hash(key)[:10]}"


def start_model(cfg: StudyConfig, start_point: str, scale: str) -> str:
    """The model a cell starts from; a SAFE start produced by the safety stage points at that stage's output."""
    entry = model_entry(cfg, scale)
    if start_point == "safe" and cfg.safety_stage.enabled:
        return str(stage_model_dir(cfg.results_dir, safety_stage_id(cfg, scale)))
    return getattr(entry, start_point)


def train_settings(cfg: StudyConfig, scale: str) -> dict[str, Any]:
    """The train section of the runs at `scale` before a cell's model, seed and budget: the study's train settings
    over the scale's dtype."""
    return deep_merge({"dtype": model_entry(cfg, scale).dtype}, cfg.train)


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


def resolved_run(run: dict[str, Any]) -> dict[str, Any]:
    """`run` as training will see it: every default of RunConfig and of the method's arguments filled in. A run that
    does not validate is returned as given (its cell fails when run, with the error recorded)."""
    from forgetjax.methods.registry import get_method_spec
    from forgetjax.methods.run import RunConfig

    try:
        resolved = to_dict(from_dict(RunConfig, run, source="study cell"))
        args = from_dict(get_method_spec(run["method"]).args_class, run["method_args"], source="study cell")
    except (ConfigError, KeyError):
        return run
    resolved["method_args"] = to_dict(args)
    return resolved


def evaluation_settings(cfg: StudyConfig) -> dict[str, Any]:
    """The resolved evaluation of every cell: the battery's contents, the item limit and the prompt format."""
    from forgetjax.eval.battery import resolve_battery

    battery = to_dict(resolve_battery(cfg.battery))
    battery.pop("source", None)
    return {"battery": battery, "eval_limit": cfg.eval_limit, "eval_format": cfg.eval_format}


def expand(cfg: StudyConfig) -> list[StudyCell]:
    """All cells: one baseline per (start point, scale) plus start x scale x method x domain x seed."""
    cells = []
    domains = study_domains(cfg)
    evaluation = evaluation_settings(cfg)
    representation = {"representation": cfg.representation, "representation_probe": cfg.representation_probe}
    for scale in cfg.scales:
        for point in cfg.start_points:
            start = start_model(cfg, point, scale)
            matched_base = {"start_model": start, "battery": cfg.battery, "eval_limit": cfg.eval_limit}
            baseline_id = f"{point}-{scale}-{BASELINE_METHOD}-" + config_hash(
                {**matched_base, "seed": cfg.seeds[0], "evaluation": evaluation})[:10]
            cells.append(StudyCell(baseline_id, point, scale, BASELINE_METHOD, None, cfg.seeds[0], start, None,
                                   matched_base))
            for method in cfg.methods:
                for domain in cfg.domains:
                    domain_cfg = {"name": domain, **domains[domain].problem_source(),
                                  **cfg.domain_sources.get(domain, {})}
                    if cfg.data_dir:
                        domain_cfg.setdefault("data_dir", cfg.data_dir)
                    for seed in cfg.seeds:
                        train = train_settings(cfg, scale)
                        train.update({"model": start, "seed": seed, "budget": to_dict(cfg.budget)})
                        run = {"train": train, "method": method,
                               "method_args": _method_args(cfg, method, scale, domains[domain]),
                               "domain": domain_cfg}
                        matched = {**matched_base, "budget": to_dict(cfg.budget), "domain": domain_cfg}
                        digest = config_hash({"run": resolved_run(run), "matched": matched, "evaluation": evaluation,
                                              "representation": representation,
                                              "targets": domains[domain].target_benchmarks})[:10]
                        cell_id = f"{point}-{scale}-{method}-{domain}-s{seed}-{digest}"
                        cells.append(StudyCell(cell_id, point, scale, method, domain, seed, start, run, matched,
                                               tuple(domains[domain].target_benchmarks)))
    return cells
