"""The method catalog: every post-training method's id, the module that registers it, its display label, its data
regime, its signal source and the teacher it needs. The registry imports a method's module from here, the study
matrix fills in teachers and the method's code version (`method_code_digest`) from here, and the analysis and report
label and group methods from here. Import-light (no JAX)."""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Literal

ON_POLICY = "on_policy"
OFF_POLICY_SFT = "off_policy_sft"
OTHER_POLICY = "other"
"""Data regimes: RQ5 compares ON_POLICY (the model's own samples) with OFF_POLICY_SFT (SFT on external data)."""

Teacher = Literal["same_family", "cross_family"]

SIGNAL_SOURCES: dict[str, str] = {
    "GT": "ground-truth solutions from the dataset",
    "SF": "a same-family teacher's generations",
    "CF": "a cross-family teacher's generations",
    "SELF": "the model's own generations (no reward, no teacher)",
    "RL": "a reward on sampled outputs (online GRPO variants or offline DPO preference pairs)",
    "PI": "the model itself as teacher with privileged information (the answer) in its prompt",
}
"""Where a method's training signal comes from, in report order. π-Distill is its own source PI: its teacher is
neither external (SF/CF) nor the plain model (SELF), and its reward-weighted loss is not only RL."""


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One runnable method. `teacher`: the study model entry's teacher (`<teacher>_teacher`) a cell passes as
    `method_args.teacher` unless the study sets one. `generates`: it samples completions (its arguments have
    `max_new_tokens`, which a study sets per domain)."""

    module: str
    label: str
    regime: str
    source: str
    teacher: Teacher | None = None
    generates: bool = True


METHODS: dict[str, MethodEntry] = {
    "gt_sft": MethodEntry("forgetjax.methods.sft", "GT-SFT", OFF_POLICY_SFT, "GT", generates=False),
    "sf_sft": MethodEntry("forgetjax.methods.distill", "SF-SFT", OFF_POLICY_SFT, "SF", teacher="same_family"),
    "cf_sft": MethodEntry("forgetjax.methods.distill", "CF-SFT", OFF_POLICY_SFT, "CF", teacher="cross_family"),
    "self_spin": MethodEntry("forgetjax.methods.spin", "SELF (SPIN)", ON_POLICY, "SELF"),
    "self_sdft": MethodEntry("forgetjax.methods.sdft", "SELF (SDFT)", ON_POLICY, "SELF"),
    "self_sdft_online": MethodEntry("forgetjax.methods.self_online", "SELF (online SDFT)", ON_POLICY, "SELF"),
    "off_rl_dpo": MethodEntry("forgetjax.methods.dpo", "OFF-RL (DPO)", OTHER_POLICY, "RL"),
    "on_rl_grpo": MethodEntry("forgetjax.methods.grpo", "ON-RL (GRPO)", ON_POLICY, "RL"),
    "on_rl_drgrpo": MethodEntry("forgetjax.methods.grpo", "ON-RL (Dr.GRPO)", ON_POLICY, "RL"),
    "on_rl_frpo": MethodEntry("forgetjax.methods.grpo", "ON-RL (FRPO)", ON_POLICY, "RL"),
    "pi_distill": MethodEntry("forgetjax.methods.pi_distill", "PI", ON_POLICY, "PI"),
}

SHORT_IDS: dict[str, tuple[str, str, str | None]] = {
    "on_rl": ("ON-RL", ON_POLICY, "RL"),
    "grpo": ("ON-RL", ON_POLICY, "RL"),
    "self": ("SELF", ON_POLICY, "SELF"),
    "sdft": ("SELF", ON_POLICY, "SELF"),
    "spin": ("SELF", ON_POLICY, "SELF"),
    "pi": ("PI", ON_POLICY, "PI"),
    "distill": ("KD", OTHER_POLICY, None),
    "kd": ("KD", OTHER_POLICY, None),
    "dpo": ("DPO", OTHER_POLICY, "RL"),
}
"""Short method ids results may use, with their (label, regime, signal source or None when the teacher is unknown);
they name no runnable method."""


def method_entry(name: str) -> MethodEntry:
    """The catalog entry of a runnable method; KeyError listing the known ids otherwise."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def unknown_methods(names) -> list[str]:
    """The names that are not runnable methods, sorted."""
    return sorted(set(names) - set(METHODS))


def method_label(method: str) -> str:
    """Display label of a method id (the id itself when unknown, e.g. "baseline")."""
    if method in METHODS:
        return METHODS[method].label
    return SHORT_IDS.get(method, (method, OTHER_POLICY, None))[0]


def method_regime(method: str) -> str:
    """ON_POLICY, OFF_POLICY_SFT or OTHER_POLICY (unknown ids)."""
    if method in METHODS:
        return METHODS[method].regime
    return SHORT_IDS.get(method, (method, OTHER_POLICY, None))[1]


def method_source(method: str) -> str | None:
    """The SIGNAL_SOURCES key of a method id; None for the baseline and ids whose source is unknown."""
    if method in METHODS:
        return METHODS[method].source
    return SHORT_IDS.get(method, (method, OTHER_POLICY, None))[2]


PACKAGE_DIR = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("forgetjax.methods", "forgetjax.losses")
"""A method's code is its module and the modules of these packages it imports, directly or through one another."""
BOOKKEEPING_MODULES = frozenset({"forgetjax.methods.registry", "forgetjax.methods.catalog", "forgetjax.methods.run"})
"""Modules of CODE_PACKAGES that name, register and drive methods without computing any."""


def _module_file(module: str) -> Path | None:
    """The source file of a `forgetjax` module (a package's __init__.py), None when there is none."""
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _code_imports(path: Path) -> frozenset[str]:
    """The modules of CODE_PACKAGES a source file imports (at any depth; `from pkg import module` counts)."""
    return _source_imports(path.read_text(encoding="utf-8"), str(path))


@functools.lru_cache(maxsize=512)
def _source_imports(source: str, filename: str) -> frozenset[str]:
    """`_code_imports` of one source text, kept by text (every study expansion walks the same method modules)."""
    found = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" if _module_file(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(tuple(p + "." for p in CODE_PACKAGES)) or n in CODE_PACKAGES)
    return frozenset(found - BOOKKEEPING_MODULES)


def method_modules(name: str) -> list[str]:
    """The modules whose source is `name`'s code: its module and the method and loss modules it reaches, sorted."""
    pending, seen = [method_entry(name).module], set()
    while pending:
        module = pending.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        pending.extend(_code_imports(path) - seen)
    return sorted(seen)


def method_code_digest(name: str) -> str:
    """sha256 over the sources of `method_modules(name)`: editing a method's module or a loss it uses changes it
    (and so the ids of the study cells that run the method)."""
    digest = hashlib.sha256()
    for module in method_modules(name):
        digest.update(f"{module}\0{_module_file(module).read_text(encoding='utf-8')}\0".encode())
    return digest.hexdigest()
