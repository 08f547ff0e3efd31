"""The method catalog: every post-training method's id, the module that registers it, its display label, its data
regime and the teacher it needs. The registry imports a method's module from here, the study matrix fills in
teachers from here, and the analysis and report label and group methods from here. Import-light (no JAX)."""
from __future__ import annotations

import dataclasses
from typing import Literal

ON_POLICY = "on_policy"
OFF_POLICY_SFT = "off_policy_sft"
OTHER_POLICY = "other"
"""Data regimes: RQ5 compares ON_POLICY (the model's own samples) with OFF_POLICY_SFT (SFT on external data)."""

Teacher = Literal["same_family", "cross_family"]


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One runnable method. `teacher`: the study model entry's teacher (`<teacher>_teacher`) a cell passes as
    `method_args.teacher` unless the study sets one."""

    module: str
    label: str
    regime: str
    teacher: Teacher | None = None


METHODS: dict[str, MethodEntry] = {
    "gt_sft": MethodEntry("forgetjax.methods.sft", "GT-SFT", OFF_POLICY_SFT),
    "sf_sft": MethodEntry("forgetjax.methods.distill", "SF-SFT", OFF_POLICY_SFT, teacher="same_family"),
    "cf_sft": MethodEntry("forgetjax.methods.distill", "CF-SFT", OFF_POLICY_SFT, teacher="cross_family"),
    "self_spin": MethodEntry("forgetjax.methods.spin", "SELF (SPIN)", ON_POLICY),
    "self_sdft": MethodEntry("forgetjax.methods.sdft", "SELF (SDFT)", ON_POLICY),
    "self_sdft_online": MethodEntry("forgetjax.methods.self_online", "SELF (online SDFT)", ON_POLICY),
    "off_rl_dpo": MethodEntry("forgetjax.methods.dpo", "OFF-RL (DPO)", OTHER_POLICY),
    "on_rl_grpo": MethodEntry("forgetjax.methods.grpo", "ON-RL (GRPO)", ON_POLICY),
    "on_rl_drgrpo": MethodEntry("forgetjax.methods.grpo", "ON-RL (Dr.GRPO)", ON_POLICY),
    "on_rl_frpo": MethodEntry("forgetjax.methods.grpo", "ON-RL (FRPO)", ON_POLICY),
    "pi_distill": MethodEntry("forgetjax.methods.pi_distill", "PI", ON_POLICY),
}

SHORT_IDS: dict[str, tuple[str, str]] = {
    "on_rl": ("ON-RL", ON_POLICY),
    "grpo": ("ON-RL", ON_POLICY),
    "self": ("SELF", ON_POLICY),
    "sdft": ("SELF", ON_POLICY),
    "spin": ("SELF", ON_POLICY),
    "pi": ("PI", ON_POLICY),
    "distill": ("KD", OTHER_POLICY),
    "kd": ("KD", OTHER_POLICY),
    "dpo": ("DPO", OTHER_POLICY),
}
"""Short method ids results may use, with their (label, regime); they name no runnable method."""


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
    return SHORT_IDS.get(method, (method, OTHER_POLICY))[0]


def method_regime(method: str) -> str:
    """ON_POLICY, OFF_POLICY_SFT or OTHER_POLICY (unknown ids)."""
    if method in METHODS:
        return METHODS[method].regime
    return SHORT_IDS.get(method, (method, OTHER_POLICY))[1]
