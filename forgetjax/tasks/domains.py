"""Training domains, one YAML file each in `configs/domains/`: where a domain's training problems come from (a
benchmark-data source or a records file, see `forgetjax.envs.load_problems`), which verifier scores them (the domain
name: `forgetjax.verifiers.rewards` grades math, code and qa), and the held-out benchmarks of the evaluation battery
that measure the target task (the x axis of the safety-capability Pareto front). A safety domain
(`forgetjax.tasks.safety_domains`) trains on its training half and targets its `<name>_heldout` benchmark. The study
checks those names against the benchmark registry (`forgetjax.study.schema.study_domains`). `max_new_tokens` is the
domain's generation length: every generating method of a study samples up to it
(`forgetjax.study.matrix.generation_args`).

In-domain benchmarks (`is_in_domain`, the one rule): a benchmark is in-domain for a cell trained in a domain when it
is one of the cell's target benchmarks, one of the domain config's `target_benchmarks`, matches one of its
`in_domain_benchmarks` (names or fnmatch patterns, e.g. "mgsm_*") or belongs to one of its `in_domain_families`
(benchmark families, `forgetjax.eval.benchmarks.FAMILIES`). Forgetting is measured off-target: the analysis leaves
in-domain items out of every pooled capability statistic and reports the target task separately.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
from pathlib import Path
from typing import Literal, Sequence

from forgetjax.paths import CONFIGS_DIR
from forgetjax.tasks.safety_domains import SAFETY_DOMAIN_NAMES

DOMAINS_DIR = CONFIGS_DIR / "domains"
DOMAIN_NAMES = ("math", "code", "qa", *SAFETY_DOMAIN_NAMES)
"""Every training domain: the three capability domains and the safety domains (`forgetjax.tasks.safety_domains`)."""
DomainName = Literal[DOMAIN_NAMES]
DEFAULT_MAX_NEW_TOKENS = 512
"""Generation length of a domain without one, and every generating method's default (room for chain of thought)."""


@dataclasses.dataclass
class DomainSpec:
    name: DomainName = "math"
    description: str = ""
    source: str = "gsm8k"
    split: str = "train"
    template: str | None = None
    target_benchmarks: list[str] = dataclasses.field(default_factory=list)
    in_domain_families: list[str] = dataclasses.field(default_factory=list)
    in_domain_benchmarks: list[str] = dataclasses.field(default_factory=list)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def validate(self):
        if not self.target_benchmarks:
            raise ValueError("target_benchmarks: name at least one held-out benchmark of the target task")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def problem_source(self) -> dict[str, str]:
        """The DomainConfig fields a training run reads (source, split and, when set, template)."""
        fields = {"source": self.source, "split": self.split}
        if self.template is not None:
            fields["template"] = self.template
        return fields


def load_domain(path: str | Path) -> DomainSpec:
    """A DomainSpec from a YAML file; its file name must match its `name`."""
    from forgetjax.config import load_config

    from forgetjax.config import ConfigError

    path = Path(path)
    spec = load_config(DomainSpec, path)
    if path.stem != spec.name:
        raise ConfigError(f"{path}: name {spec.name!r} does not match the file name {path.stem!r}")
    return spec


def domain_specs(directory: str | Path = DOMAINS_DIR) -> dict[str, DomainSpec]:
    """Every domain file in `directory`, by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"domain configs: directory {directory} not found")
    return {spec.name: spec for spec in map(load_domain, sorted(directory.glob("*.yaml")))}


@functools.lru_cache(maxsize=1)
def _shipped_domains() -> dict[str, DomainSpec]:
    """The shipped domain configs, read once on first use."""
    return domain_specs()


def target_benchmarks() -> dict[str, tuple[str, ...]]:
    """{domain: held-out target benchmarks} from the shipped domain configs (the x axis of the safety-capability
    Pareto front)."""
    return {name: tuple(spec.target_benchmarks) for name, spec in _shipped_domains().items()}


def is_in_domain(domain: str | None, targets: Sequence[str], benchmark: str, family: str) -> bool:
    """True when `benchmark` (of benchmark family `family`) measures what a cell trained in `domain` with target
    benchmarks `targets` was trained toward (the rule in the module docstring). The families and extra benchmarks
    come from the shipped domain config of that name; a cell without a domain has no in-domain benchmarks."""
    if domain is None:
        return False
    if benchmark in targets:
        return True
    spec = _shipped_domains().get(domain)
    if spec is None:
        return False
    return (benchmark in spec.target_benchmarks or family in spec.in_domain_families
            or any(fnmatch.fnmatchcase(benchmark, pattern) for pattern in spec.in_domain_benchmarks))
