"""Stage chains (`pipelines:` in a study): a cell whose post-training is a chain of methods, each stage starting from
the previous stage's final checkpoint, with "after stage k" evaluated for every stage `evaluate` names.

    pipelines:
      sft_then_dpo: [{method: gt_sft, budget: {kind: tokens, value: 5000}}, {method: off_rl_dpo}]
      frpo_then_sft:
        stages: [{name: frpo, method: on_rl_frpo, domain: qa}, {name: downstream, method: gt_sft, domain: math}]
        evaluate: [frpo, downstream]

A stage is a method with its own domain (default: the cell's), budget (default: the study's), train settings over
the study's (`train`, e.g. optimizer.lr or replay) and method arguments over the study's `method_args.<method>`. A
pipeline crosses with start points x scales x domains x seeds like a method: a stage without `domain` trains on the
cell's domain; a pipeline whose stages all name their domain does not cross with the study's domains (one chain
per start point, scale and seed). An evaluated stage is a cell: method `<pipeline>.<stage>`, domain (and target
benchmarks) of the evaluated stage, cell.json `pipeline` recording the stage path (each stage's id, method, domain
and budget used).

Stage id: `stage-<scale>-<method>-<domain>-<hash>`, the hash over the stage's fully resolved run (every RunConfig
and method-argument default filled in; its model is the parent stage's final checkpoint, or the start model for
the first stage), the parent stage's id and the method's code digest. Stages of different cells or pipelines with
the same prefix have the same ids, so they train once under RESULTS_DIR/stages/<id> (`distributed.run_once`: built
in `.<id>.partial`, renamed when complete; a killed build resumes from its checkpoints) and every cell reuses them.
An evaluated cell's id hashes the resolved runs and ids of its stage path, the evaluation, the representation
settings and the targets, so the chain is part of the cell id.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from forgetjax.config import ConfigError, build_section, config_hash, deep_merge, to_dict
from forgetjax.training.budget import BudgetConfig

NAME = re.compile(r"^[A-Za-z0-9_]+$")
STAGE_RUN_PLACEHOLDER = "<stage>"


@dataclasses.dataclass
class PipelineStage:
    """One stage of a chain. `train` overrides the study's train settings for this stage (not model, seed, budget or
    out_dir: the chain sets them); `method_args` override the study's `method_args.<method>`."""

    method: str
    name: str | None = None  # default: the method id (stages of one pipeline need distinct names)
    domain: str | None = None  # default: the cell's domain
    budget: BudgetConfig | None = None  # default: the study's budget
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    method_args: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.method


@dataclasses.dataclass
class Pipeline:
    """A chain of stages; `evaluate` names the stages whose final model is evaluated (default: the last one)."""

    stages: list[PipelineStage]
    evaluate: list[str] | None = None

    def validate(self):
        from forgetjax.methods.catalog import METHODS

        if not self.stages:
            raise ValueError("stages: at least one stage")
        seen = set()
        for i, stage in enumerate(self.stages):
            if stage.method not in METHODS:
                raise ValueError(f"stages[{i}].method: unknown method {stage.method!r}; known: "
                                 f"{', '.join(sorted(METHODS))}")
            if not NAME.match(stage.label):
                raise ValueError(f"stages[{i}].name: {stage.label!r} must be letters, digits and _")
            if stage.label in seen:
                raise ValueError(f"stages[{i}].name: two stages are named {stage.label!r}; give them distinct names")
            seen.add(stage.label)
        unknown = [name for name in self.evaluate or () if name not in seen]
        if unknown or self.evaluate == []:
            raise ValueError(f"evaluate: {unknown} must name stages of this pipeline "
                             f"({', '.join(s.label for s in self.stages)})")

    @property
    def evaluated(self) -> list[int]:
        """Indices of the evaluated stages, in chain order."""
        names = set(self.evaluate or [self.stages[-1].label])
        return [i for i, stage in enumerate(self.stages) if stage.label in names]


@dataclasses.dataclass
class StageRun:
    """A resolved stage: its id, parent, training run (model = parent's final checkpoint) and its shared stages."""

    stage_id: str
    name: str
    method: str
    domain: str
    parent: str | None
    run: dict[str, Any]
    resolved: dict[str, Any]
    teacher_stage: str | None = None
    replay_stage: str | None = None

    def path_entry(self) -> dict[str, Any]:
        return {"stage_id": self.stage_id, "name": self.name, "method": self.method, "domain": self.domain,
                "parent": self.parent}


@dataclasses.dataclass
class PipelinePath:
    """The stages an evaluated pipeline cell trains, first to the evaluated one."""

    name: str
    stages: list[StageRun]

    @property
    def evaluated(self) -> StageRun:
        return self.stages[-1]

    def describe(self) -> dict[str, Any]:
        """cell.json's `pipeline`: the pipeline, the evaluated stage and the stage path."""
        return {"name": self.name, "stage": self.evaluated.name, "stage_index": len(self.stages) - 1,
                "path": [stage.path_entry() for stage in self.stages]}


def normalise(value: Any) -> Any:
    """A pipeline given as a plain list of stages as the mapping {stages: [...]}."""
    return {"stages": value} if isinstance(value, list) else value


def study_pipelines(cfg) -> dict[str, Pipeline]:
    """The study's `pipelines`, typed (ConfigError naming `pipelines.<name>.<field>`), with their stage domains and
    stage train sections checked."""
    from forgetjax.study.matrix import CELL_TRAIN_KEYS
    from forgetjax.study.schema import study_domains

    pipelines = {}
    domains = None
    for name, value in cfg.pipelines.items():
        where = f"pipelines.{name}"
        if not NAME.match(str(name)):
            raise ConfigError(f"{where}: a pipeline name must be letters, digits and _")
        if str(name) in cfg.methods:
            raise ConfigError(f"{where}: a pipeline may not be named like a method of the study")
        pipeline = build_section(Pipeline, normalise(value), where)
        for i, stage in enumerate(pipeline.stages):
            fixed = [key for key in CELL_TRAIN_KEYS if key in stage.train]
            if fixed:
                raise ConfigError(f"{where}.stages[{i}].train.{fixed[0]}: set by the chain (the budget with "
                                  f"{where}.stages[{i}].budget)")
            if stage.domain is not None:
                domains = domains if domains is not None else study_domains(cfg)
                if stage.domain not in domains:
                    raise ConfigError(f"{where}.stages[{i}].domain: unknown domain {stage.domain!r}; known: "
                                      f"{', '.join(sorted(domains))}")
        pipelines[str(name)] = pipeline
    return pipelines


def pipeline_domains(cfg, pipeline: Pipeline) -> list[str]:
    """The study domains a pipeline crosses with: all of them, or one entry (the first stage's domain) when every
    stage names its own domain."""
    if all(stage.domain is not None for stage in pipeline.stages):
        return [pipeline.stages[0].domain]
    return list(cfg.domains)


def stage_runs(cfg, name: str, pipeline: Pipeline, *, scale: str, start: str, domain: str, seed: int,
               specs: dict) -> list[StageRun]:
    """Every stage of `pipeline` resolved for one (start model, scale, cell domain, seed), parents first."""
    from forgetjax.methods.catalog import method_code_digest
    from forgetjax.results import stage_dir, stage_model_dir
    from forgetjax.study import matrix

    runs: list[StageRun] = []
    parent = None
    model = start
    for i, stage in enumerate(pipeline.stages):
        where = f"pipelines.{name}.stages[{i}]"
        stage_domain = stage.domain or domain
        train = deep_merge(matrix.train_settings(cfg, scale), stage.train)
        budget = to_dict(stage.budget) if stage.budget is not None else to_dict(cfg.budget)
        train.update({"model": model, "seed": seed, "budget": budget, "out_dir": STAGE_RUN_PLACEHOLDER})
        args = deep_merge(matrix._method_args(cfg, stage.method, scale, specs[stage_domain]), stage.method_args)
        run = {"train": train, "method": stage.method, "method_args": args,
               "domain": matrix.domain_config(cfg, stage_domain, specs)}
        try:
            teacher = matrix.teacher_stage(run)
            if teacher:
                run["method_args"]["teacher_data"] = str(matrix.teacher_stage_dir(cfg, teacher[0]))
            replay = matrix.resolve_replay(cfg, run)
            resolved_run = matrix.resolved_run(run)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        resolved = {"run": resolved_run, "parent": parent, "code": method_code_digest(stage.method)}
        stage_id = f"stage-{scale}-{stage.method}-{stage_domain}-{config_hash(resolved)[:10]}"
        stage_dir(cfg.results_dir, stage_id)  # checks the id is a directory name
        runs.append(StageRun(stage_id, stage.label, stage.method, stage_domain, parent, run, resolved,
                             teacher[0] if teacher else None, replay))
        parent, model = stage_id, str(stage_model_dir(cfg.results_dir, stage_id))
    return runs


def pipeline_cells(cfg, point: str, scale: str, start: str, evaluation: dict[str, Any], matched_base: dict[str, Any],
                   representation: dict[str, Any], specs: dict) -> list:
    """The evaluated stages of every pipeline of the study from one (start point, scale), as cells."""
    from forgetjax.study.matrix import StudyCell

    cells = []
    for name, pipeline in study_pipelines(cfg).items():
        for domain in pipeline_domains(cfg, pipeline):
            for seed in cfg.seeds:
                runs = stage_runs(cfg, name, pipeline, scale=scale, start=start, domain=domain, seed=seed, specs=specs)
                for index in pipeline.evaluated:
                    path = PipelinePath(name, runs[:index + 1])
                    stage = path.evaluated
                    targets = tuple(specs[stage.domain].target_benchmarks)
                    matched = {**matched_base, "budget": stage.run["train"]["budget"], "domain": stage.run["domain"]}
                    resolved = {"pipeline": {"name": name, "stage": stage.name,
                                             "stages": [{"id": s.stage_id, "name": s.name, **s.resolved}
                                                        for s in path.stages]},
                                "matched": matched, "evaluation": evaluation, "representation": representation,
                                "targets": list(targets)}
                    method = f"{name}.{stage.name}"
                    cell_id = f"{point}-{scale}-{method}-{stage.domain}-s{seed}-{config_hash(resolved)[:10]}"
                    cells.append(StudyCell(cell_id, point, scale, method, stage.domain, seed, start, stage.run,
                                           matched, targets, resolved, eval_format=evaluation["eval_format"],
                                           teacher_stage=stage.teacher_stage, replay_stage=stage.replay_stage,
                                           pipeline=path))
    return cells


def shared_stages(cells) -> dict[str, tuple[StageRun, int]]:
    """{stage id: (stage, number of evaluated cells whose path holds it)} over a study's pipeline cells."""
    stages: dict[str, tuple[StageRun, int]] = {}
    for cell in cells:
        for stage in cell.pipeline.stages if cell.pipeline else ():
            stages[stage.stage_id] = (stage, stages.get(stage.stage_id, (stage, 0))[1] + 1)
    return stages
