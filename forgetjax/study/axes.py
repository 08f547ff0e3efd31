"""Study axes: named lists of settings that cross with start points x scales x methods x domains x seeds.

An axis sets one key of a cell's run (`train.lora`, `method_args.frpo_lambda`, `train.replay.fraction`, ...) to each
of its values; the value enters the resolved run, so it changes the cell id, and cell.json records it (`axes`). The
first value of every axis is its reference: cells at the reference of every axis are the ones the method comparisons
(RQ1-RQ9) read; the others are read by the axis report. Forms (`axes:` in a study):

    adapter: [full, {lora: {rank: 8, alpha: 16}}]        train.lora: full fine-tuning or a LoRA adapter
    frpo_lambda: [0.2, 0.5, 2.0]                         FRPO's lambda (on_rl_frpo only)
    frpo_jackknife: [false, true]                        FRPO's jackknife correction (on_rl_frpo only)
    budget: [2000, {kind: flops, value: 1.0e15}]         the cell budget (a number keeps the study budget's kind)
    NAME: {key: dotted.run.key, values: [...], methods: [...]}   any resolved run key (methods: optional filter)
    merge: {interpolate: [0.0, 0.5, 1.0]}                 WiSE-FT: derived cells (1 - a) start + a post, no training

A `method_args.<field>` key applies only to the methods whose argument dataclass has that field; `methods:` narrows
any axis to the methods listed. An axis that does not apply to a method leaves its cells alone (not multiplied).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Mapping, Sequence

from forgetjax.config import ConfigError, build_section, to_dict
from forgetjax.training.budget import BudgetConfig
from forgetjax.training.lora import LoraConfig

MERGE_AXIS = "merge"
BUDGET_AXIS = "budget"
RUN_SECTIONS = ("train", "method_args", "domain")
FORBIDDEN_TRAIN_KEYS = ("model", "seed", "out_dir", "budget")
BUILTIN_KEYS = {"adapter": "train.lora", "frpo_lambda": "method_args.frpo_lambda",
                "frpo_jackknife": "method_args.frpo_jackknife", BUDGET_AXIS: BUDGET_AXIS}
BUILTIN_METHODS = {"frpo_lambda": ("on_rl_frpo",), "frpo_jackknife": ("on_rl_frpo",)}


@dataclasses.dataclass(frozen=True)
class AxisValue:
    """One setting of an axis: its label (tables, figures), the JSON value cell.json records and what it sets."""

    label: str
    value: Any
    setting: Any


@dataclasses.dataclass(frozen=True)
class Axis:
    """A named axis: the run key it sets (BUDGET_AXIS for the cell budget), its values (the first is the reference)
    and the methods it applies to (None: every method it can apply to)."""

    name: str
    key: str
    values: tuple[AxisValue, ...]
    methods: tuple[str, ...] | None = None

    def applies_to(self, method: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.key.startswith("method_args."):
            from forgetjax.methods.registry import get_method_spec

            field = self.key.split(".")[1]
            return field in {f.name for f in dataclasses.fields(get_method_spec(method).args_class)}
        return True


@dataclasses.dataclass(frozen=True)
class MergeAxis:
    """Weight-space interpolation between the start and each trained cell: derived cells, one per alpha."""

    interpolate: tuple[float, ...]
    methods: tuple[str, ...] | None = None


def value_label(value: Any) -> str:
    """A short stable label of a JSON value: numbers and strings as written, mappings as k=v lists."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={value_label(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_label(v) for v in value) + "]"
    return str(value)


def _adapter_value(raw: Any, where: str) -> AxisValue:
    if raw == "full":
        return AxisValue("full", "full", None)
    if isinstance(raw, Mapping) and set(raw) == {"lora"}:
        lora = to_dict(build_section(LoraConfig, raw["lora"] or {}, f"{where}.lora"))
        return AxisValue(f"lora(r={lora['rank']},alpha={value_label(float(lora['alpha']))})", {"lora": lora}, lora)
    raise ConfigError(f"{where}: an adapter is 'full' or {{lora: {{rank: R, alpha: A}}}}, got {raw!r}")


def _budget_value(raw: Any, where: str, study_budget: BudgetConfig) -> AxisValue:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = {**to_dict(study_budget), "value": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a budget is a number (the study budget's kind) or {{kind, value}}, got {raw!r}")
    budget = to_dict(build_section(BudgetConfig, dict(raw), where))
    return AxisValue(f"{budget['kind']}={value_label(float(budget['value']))}", budget, budget)


def _check_key(key: Any, where: str) -> str:
    parts = key.split(".") if isinstance(key, str) else []
    if len(parts) < 2 or parts[0] not in RUN_SECTIONS or not all(parts):
        raise ConfigError(f"{where}: key must be a dotted run key under {', '.join(RUN_SECTIONS)} "
                          f"(e.g. train.replay.fraction), got {key!r}")
    if parts[0] == "train" and parts[1] in FORBIDDEN_TRAIN_KEYS:
        hint = "use the budget axis" if parts[1] == "budget" else "cells set it themselves"
        raise ConfigError(f"{where}: train.{parts[1]} cannot be an axis key ({hint})")
    return key


def _methods(raw: Any, where: str) -> tuple[str, ...] | None:
    from forgetjax.methods.catalog import unknown_methods

    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise ConfigError(f"{where}: a list of method names, got {raw!r}")
    unknown = unknown_methods(raw)
    if unknown:
        raise ConfigError(f"{where}: unknown methods {unknown}")
    return tuple(raw)


def _values_list(raw: Any, where: str) -> list:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: a non-empty list of values, got {raw!r}")
    return raw


def parse_axes(raw: Mapping[str, Any], study_budget: BudgetConfig) -> tuple[list[Axis], MergeAxis | None]:
    """The study's axes (run-key axes in the order written) and its merge axis; ConfigError naming `axes.<name>`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"axes: a mapping of axis name to values, got {type(raw).__name__}")
    axes, merge = [], None
    for name, spec in raw.items():
        where = f"axes.{name}"
        if name == MERGE_AXIS:
            merge = _parse_merge(spec, where)
            continue
        methods = BUILTIN_METHODS.get(name)
        if isinstance(spec, Mapping) and "key" in spec:
            unknown = sorted(set(spec) - {"key", "values", "methods"})
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; known: key, values, methods")
            key = _check_key(spec["key"], f"{where}.key")
            raw_values = _values_list(spec.get("values"), f"{where}.values")
            methods = _methods(spec.get("methods"), f"{where}.methods")
            values = [AxisValue(value_label(v), v, v) for v in raw_values]
            values_where = f"{where}.values"
        elif name in BUILTIN_KEYS:
            key = BUILTIN_KEYS[name]
            raw_values = _values_list(spec, where)
            values_where = where
            if name == "adapter":
                values = [_adapter_value(v, f"{where}[{i}]") for i, v in enumerate(raw_values)]
            elif name == BUDGET_AXIS:
                values = [_budget_value(v, f"{where}[{i}]", study_budget) for i, v in enumerate(raw_values)]
            else:
                values = [AxisValue(value_label(v), v, v) for v in raw_values]
        else:
            raise ConfigError(f"{where}: unknown axis; built-in axes are {', '.join([*BUILTIN_KEYS, MERGE_AXIS])}, "
                              "any other is {key: dotted.run.key, values: [...]}")
        labels = [v.label for v in values]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"{values_where}: repeated value(s) {repeated}")
        axes.append(Axis(str(name), key, tuple(values), methods))
    keys = [axis.key for axis in axes]
    for axis in axes:
        if keys.count(axis.key) > 1:
            raise ConfigError(f"axes.{axis.name}: key {axis.key} is set by another axis too")
    return axes, merge


def _parse_merge(spec: Any, where: str) -> MergeAxis:
    if not isinstance(spec, Mapping) or "interpolate" not in spec or set(spec) - {"interpolate", "methods"}:
        raise ConfigError(f"{where}: expected {{interpolate: [alpha, ...]}} (optional methods: [...]), got {spec!r}")
    alphas = _values_list(spec["interpolate"], f"{where}.interpolate")
    for i, alpha in enumerate(alphas):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"{where}.interpolate[{i}]: an alpha in [0, 1], got {alpha!r}")
    if len(set(map(float, alphas))) != len(alphas):
        raise ConfigError(f"{where}.interpolate: repeated alphas {alphas}")
    return MergeAxis(tuple(float(a) for a in alphas), _methods(spec.get("methods"), f"{where}.methods"))


def method_settings(axes: Sequence[Axis], method: str) -> list[dict[str, tuple[int, AxisValue]]]:
    """Every combination of the values of the axes that apply to `method`: [{axis name: (index, value)}]; one empty
    combination when none applies."""
    applying = [axis for axis in axes if axis.applies_to(method)]
    return [{axis.name: (i, axis.values[i]) for axis, i in zip(applying, choice)}
            for choice in itertools.product(*(range(len(axis.values)) for axis in applying))]


def apply_setting(run: dict[str, Any], axes: Sequence[Axis], setting: Mapping[str, tuple[int, AxisValue]]) -> dict:
    """A copy of `run` with every axis of `setting` applied at its key (the budget axis sets train.budget)."""
    run = copy.deepcopy(run)
    by_name = {axis.name: axis for axis in axes}
    for name, (_, value) in setting.items():
        key = by_name[name].key
        if key == BUDGET_AXIS:
            run["train"]["budget"] = copy.deepcopy(value.setting)
            continue
        node = run
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"axes.{name}: {key} goes below {part}, which is not a mapping")
            node = child
        node[last] = copy.deepcopy(value.setting)
    return run


def axes_record(setting: Mapping[str, tuple[int, AxisValue]]) -> dict[str, dict[str, Any]]:
    """What cell.json records of a cell's axes: {name: {value, label, reference (the axis's first value)}}."""
    return {name: {"value": value.value, "label": value.label, "reference": index == 0}
            for name, (index, value) in setting.items()}


def merge_record(alpha: float) -> dict[str, Any]:
    return {"value": alpha, "label": f"interpolate={alpha:g}", "reference": False}


def axes_text(axes: Mapping[str, Mapping[str, Any]]) -> str:
    """"adapter=full frpo_lambda=0.2" of a cell's recorded axes ("" without any)."""
    return " ".join(f"{name}={entry['label']}" for name, entry in axes.items())


def describe_axes(axes: Sequence[Axis], merge: MergeAxis | None) -> list[str]:
    """One line per axis for `forgetjax study --list` and `forgetjax plan`."""
    lines = []
    for axis in axes:
        only = f" (methods: {', '.join(axis.methods)})" if axis.methods else ""
        lines.append(f"axis {axis.name} [{axis.key}]{only}: " + ", ".join(
            f"{v.label}{' (reference)' if i == 0 else ''}" for i, v in enumerate(axis.values)))
    if merge is not None:
        only = f" (methods: {', '.join(merge.methods)})" if merge.methods else ""
        lines.append(f"axis merge [derived cells, no training]{only}: interpolate "
                     + ", ".join(f"{a:g}" for a in merge.interpolate))
    return lines
