"""Study configuration: start points x scales x methods x domains x seeds, with matched budgets, expanded into cells.

A cell's id is derived from its fully resolved configuration, so re-running a study finds finished cells, and any
change that alters what a cell computes gives it a new id instead of silently mixing results.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any, Literal

from forgetjax.config import ConfigError
from forgetjax.eval.attacks.autodan import AutoDANConfig
from forgetjax.eval.attacks.gcg import GCGConfig
from forgetjax.paths import REPO_ROOT
from forgetjax.tasks.domains import DOMAINS_DIR, DomainName, DomainSpec, domain_specs, load_domain
from forgetjax.training.budget import BudgetConfig


@dataclasses.dataclass
class ModelEntry:
    """One model scale: a BASE and a SAFE (instruct) source, and same/cross-family teachers for distillation."""

    scale: str
    base: str | None = None
    safe: str | None = None
    same_family_teacher: str | None = None
    cross_family_teacher: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TeacherEntry:
    """A teacher model a study's model entries name (`same_family_teacher` / `cross_family_teacher` equal to
    `source`) with `hf_config`, its architecture from the hub's config.json, so `forgetjax plan` sizes its teacher
    stages without downloading weights (the stage's dtype is the distillation method's `teacher_dtype`)."""

    source: str
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AttackSettings:
    """Attacks in every cell's evaluation (`forgetjax.eval.attacks`: GCG and/or AutoDAN), the same budget for every
    cell. A baseline attacks its start model and replays what it found on itself (`<attack>_transfer`); a
    post-trained cell attacks itself (`<attack>`) and replays its baseline's (do the start model's holes stay open?)."""

    enabled: bool = False
    methods: list[Literal["gcg", "autodan"]] = dataclasses.field(default_factory=lambda: ["gcg"])
    benchmark: Literal["harmbench_standard", "advbench"] = "harmbench_standard"
    limit: int = 8
    gcg: GCGConfig = dataclasses.field(default_factory=GCGConfig)
    autodan: AutoDANConfig = dataclasses.field(default_factory=AutoDANConfig)

    def validate(self):
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"limit must be a positive integer, got {self.limit!r}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: name gcg and/or autodan once each, got {self.methods}")
        self.gcg.validate()
        self.autodan.validate()


@dataclasses.dataclass
class SafetyStage:
    """Produces a SAFE start point from a model that does not refuse: GT-SFT on refusals of held-apart harmful
    prompts (Do-Not-Answer) mixed with helpful answers and answered borderline-safe requests
    (`forgetjax.study.borderline`), so safety results are read against this baseline. It trains with the study's
    train settings and optimizer (`train.optimizer`) at learning rate `lr`."""

    enabled: bool = False
    from_start: Literal["base", "safe"] = "safe"
    harmful_limit: int = 256
    helpful_limit: int = 256
    borderline_limit: int = 0
    steps: int = 40
    lr: float = 5e-5
    batch_size: int = 8
    max_length: int = 256


@dataclasses.dataclass
class StudyConfig:
    """A study. `train`, `method_args.<method>`, `domain_sources.<domain>` and `axes` stay plain mappings (cells merge
    them per scale, seed, domain and axis value) but are typed when the study loads, as every cell will read them:
    through TrainConfig, the method registry's argument dataclasses, DomainConfig and `forgetjax.study.axes`
    (`forgetjax.study.matrix.check_study`); model, domain and battery files are read then too. `pipelines.<name>`
    (stage chains, a list of stages or {stages, evaluate}) is typed through `forgetjax.study.pipelines.Pipeline`,
    every stage's run resolved. A typo fails at load naming the file and the dotted field."""

    name: str = "study"
    results_dir: str = "runs/study"
    data_dir: str | None = None
    models: list[ModelEntry] = dataclasses.field(default_factory=list)
    model_files: list[str] = dataclasses.field(default_factory=list)
    teacher_files: list[str] = dataclasses.field(default_factory=list)
    teacher_stages_dir: str | None = None  # where teacher stages live (default RESULTS_DIR/stages); may be shared
    scales: list[str] = dataclasses.field(default_factory=list)
    start_points: list[Literal["base", "safe"]] = dataclasses.field(default_factory=lambda: ["base", "safe"])
    methods: list[str] = dataclasses.field(default_factory=list)
    domains: list[DomainName] = dataclasses.field(default_factory=lambda: ["math"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    budget: BudgetConfig = dataclasses.field(default_factory=lambda: BudgetConfig("tokens", 200_000))
    max_new_tokens: int | None = None  # generation length of every method in every domain; None: each domain's
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    method_args: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    pipelines: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage chains (forgetjax/study/pipelines.py)
    domain_files: list[str] = dataclasses.field(default_factory=list)
    domain_sources: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    battery: str = "configs/eval/quick.yaml"
    eval_limit: int | None = None
    eval_format: Literal["chat", "fewshot", "auto"] = "auto"
    representation: bool = True
    representation_probe: int = 32
    safety_stage: SafetyStage = dataclasses.field(default_factory=SafetyStage)
    attacks: AttackSettings = dataclasses.field(default_factory=AttackSettings)
    axes: dict[str, Any] = dataclasses.field(default_factory=dict)  # forgetjax.study.axes: typed when the study loads
    executor: Literal["local", "slurm", "tpu_pod", "gpu"] = "local"

    def validate(self):
        from forgetjax.methods.catalog import METHODS, unknown_methods

        unknown = unknown_methods(self.methods)
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; known: {sorted(METHODS)}")
        known_scales = {m.scale for m in all_models(self)}
        missing = sorted(set(self.scales) - known_scales)
        if missing:
            raise ValueError(f"scales: {missing} have no entry in models (known: {sorted(known_scales)})")
        for m in all_models(self):
            for point in self.start_points:
                if m.scale in self.scales and getattr(m, point) is None and not (
                        point == "safe" and self.safety_stage.enabled):
                    raise ValueError(f"models[{m.scale}].{point} is required for start point {point!r}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        per_method = sorted(m for m, args in self.method_args.items() if "max_new_tokens" in args)
        if per_method:
            raise ValueError(f"method_args.{per_method[0]}.max_new_tokens: generation length is set per domain "
                             "(configs/domains) or for all methods by the study's max_new_tokens, not per method")
        missing = sorted(set(self.domains) - set(study_domains(self)))
        if missing:
            raise ValueError(f"domains: {missing} have no domain config (configs/domains/ or domain_files)")
        from forgetjax.study.matrix import check_study

        check_study(self)


def all_models(cfg: StudyConfig) -> list[ModelEntry]:
    """Inline `models` plus the ModelEntry YAML files listed in `model_files` (paths relative to the repo or cwd)."""
    from forgetjax.config import load_config

    entries = list(cfg.models)
    for name in cfg.model_files:
        entries.append(load_config(ModelEntry, _repo_path(name, "model_files")))
    return entries


def teacher_entries(cfg: StudyConfig) -> dict[str, TeacherEntry]:
    """{source: entry} of the TeacherEntry YAML files listed in `teacher_files`."""
    from forgetjax.config import load_config

    entries = [load_config(TeacherEntry, _repo_path(name, "teacher_files")) for name in cfg.teacher_files]
    return {entry.source: entry for entry in entries}


def study_domains(cfg: StudyConfig) -> dict[str, DomainSpec]:
    """The shipped domain configs (`configs/domains/`), replaced by name by the files listed in `domain_files`; their
    target benchmarks and in-domain benchmark patterns must name registered evaluation benchmarks, their in-domain
    families known benchmark families."""
    from forgetjax.eval.benchmarks.base import FAMILIES
    from forgetjax.eval.benchmarks.registry import list_benchmarks

    specs = domain_specs()
    sources = {name: str(DOMAINS_DIR / f"{name}.yaml") for name in specs}
    for name in cfg.domain_files:
        path = _repo_path(name, "domain_files")
        spec = load_domain(path)
        specs[spec.name], sources[spec.name] = spec, str(path)
    registered = set(list_benchmarks())
    for name, spec in specs.items():
        unknown = sorted(set(spec.target_benchmarks) - registered)
        if unknown:
            raise ValueError(f"{sources[name]}: target_benchmarks: unknown benchmarks {unknown}")
        unknown = sorted(set(spec.in_domain_families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"{sources[name]}: in_domain_families: unknown families {unknown}; known: {FAMILIES}")
        unmatched = [p for p in spec.in_domain_benchmarks if not fnmatch.filter(registered, p)]
        if unmatched:
            raise ValueError(f"{sources[name]}: in_domain_benchmarks: {unmatched} match no registered benchmark")
    return specs


def _repo_path(name: str, field: str) -> Path:
    """A config path as given (relative to the cwd) or relative to the repository root."""
    path = Path(name)
    if not path.is_file():
        path = REPO_ROOT / name
    if not path.is_file():
        raise ConfigError(f"{field}: {name} not found (as given or under {REPO_ROOT})")
    return path


def model_entry(cfg: StudyConfig, scale: str) -> ModelEntry:
    for entry in all_models(cfg):
        if entry.scale == scale:
            return entry
    raise KeyError(f"no model entry for scale {scale!r}")


def load_study_config(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    from forgetjax.config import load_config

    return load_config(StudyConfig, path, list(overrides))
