"""The results directory of a study: its layout, the cell.json and representation.json schemas, and validated
writers. The study runner writes through this module and the analysis reads through it.

    RESULTS_DIR/study.yaml, manifest.json             the resolved study config; config hash, versions, cell states
    RESULTS_DIR/stages/<stage_id>/train/final          a stage's model: the safety stage's (a SAFE start point), a
                                                       pipeline stage's (`forgetjax.study.pipelines`); replay records
    RESULTS_DIR/cells/<cell_id>/cell.json             one JSON object describing the cell (`parse_cell`)
    RESULTS_DIR/cells/<cell_id>/run.yaml, train/       the cell's run config; checkpoints, metrics.jsonl, final/
    RESULTS_DIR/cells/<cell_id>/eval/**/*.parquet      EvalRecord files (`forgetjax.eval.records`):
                                                       run_battery(out_dir=cell_eval_dir(...))
    RESULTS_DIR/cells/<cell_id>/representation.json    optional representation results (`REPRESENTATION_SCHEMA`)

cell.json: {"cell_id": str (= the directory name), "start_point": "base"|"safe", "model": str, "scale": str,
"method": str ("baseline" for the cell without post-training, one per (start_point, scale)), "domain": "math"|
"code"|"qa"|other str|null, "seed": int, "status": "pending"|"running"|"done"|"failed", "budget": {...},
"metrics": {...}, "target_benchmarks": [str, ...], "evaluation": {...} (optional: the resolved battery, limit and
format it was evaluated with), "axes": {name: {"value", "label", "reference": bool}} (optional: the study axes'
values, `forgetjax.study.axes`; a merge cell's "merge" axis among them), "axis_reference": bool (optional, default
true: every axis at its reference value and no merge), "merge": {"parent", "interpolate"} (merge cells), "kl_to_start":
{"last", "mean", "max", "measured_steps"} (trained cells: KL(policy || start) per completion token), "pipeline":
{...} (optional: a pipeline cell's stage path, `parse_pipeline`)}; the runner adds what it ran (start_model, matched,
run, the resolved config its id
hashes, times, error). JSON is written standard (NaN as null), keys sorted, atomically. The cells read together
must share one evaluation (`discover_cells`).

A trained cell's budget: {"kind", "value", "max_epochs": number|null, "status": "budget_reached"|"data_exhausted",
"used": {"steps", "tokens", "examples", "flops", "flops_by_component": {"train", "rollout", "teacher",
"reference"}}, "data": {"unique", "size", "epochs"}|null (null: the method's data source does not report it),
"flags": ["exceeded_max_epochs"|"data_exhausted", ...], "replay": {"unique", "size", "epochs"} (only runs that
replayed: the replay records' use; `used.replay_tokens` / `used.replay_examples` are the replay rows' share of
`used.tokens` / `used.examples`)} (`forgetjax.training.budget`, `forgetjax.training.replay`).

A pipeline cell's "pipeline": {"name": str, "stage": str (the evaluated stage), "stage_index": int, "path": [{"stage_id",
"name", "method", "domain", "parent": str|null, "budget": {...} (once trained)}, ...]} from the first stage to the
evaluated one; its "method" is "<pipeline>.<stage>".
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from forgetjax.config import differing_keys
from forgetjax.errors import UserError
from forgetjax.io import write_text_atomic
from forgetjax.tasks.domains import target_benchmarks

CELLS_DIR = "cells"
CELL_FILE = "cell.json"
EVAL_DIR = "eval"
REPRESENTATION_FILE = "representation.json"
STUDY_FILE = "study.yaml"
MANIFEST_FILE = "manifest.json"
STAGES_DIR = "stages"
TRAIN_DIR = "train"
FINAL_MODEL_DIR = "final"
RUN_FILE = "run.yaml"
PENDING_STATUS = "pending"

START_POINTS = ("base", "safe")
BASELINE_METHOD = "baseline"
DONE_STATUS = "done"
CELL_REQUIRED_FIELDS = ("cell_id", "start_point", "model", "scale", "method", "seed", "status")
CELL_OPTIONAL_FIELDS = ("domain", "budget", "metrics")

REPRESENTATION_VERSION = 1
REFUSAL_KEYS = ("cosine", "norm_ratio", "projection_gap_ratio")
REPRESENTATION_SCHEMA = """representation.json (version 1); every list is aligned with "layers":
{
  "version": 1,
  "layers": [0, 1, ...],                        # layer indices
  "cka": [float, ...],                          # linear CKA(start, post activations) per layer; 1 = unchanged
  "refusal_direction": {                        # difference-of-means refusal direction, start vs post, per layer
      "cosine": [...], "norm_ratio": [...], "projection_gap_ratio": [...]   # DirectionAttenuation fields
  },
  "weight_delta": {                             # spectrum of W_post - W_start, per module name, per layer
      "<module>": {"frobenius_norm": [...], "spectral_norm": [...], "effective_rank": [...], "stable_rank": [...]}
  },
  "knowledge_probe": {                          # linear probes of true vs false statements, fit on the start model
      "start": [...], "post": [...],            # held-out accuracy with the start / the post-trained activations
      "post_refit": [...],                      # optional: probes refit on the post-trained model's activations
      "n_train": int, "n_test": int             # statements in the probes' training and held-out splits
  }
}
Only "version" and "layers" are required; values are numbers or null (undefined, e.g. a zero direction)."""


def _check_cell_id(cell_id: str, what: str = "cell_id") -> str:
    """A cell (or stage) id usable as a single directory name."""
    if not isinstance(cell_id, str) or not cell_id or cell_id in (".", "..") or "/" in cell_id or "\\" in cell_id:
        raise ValueError(f"{what} must be a non-empty directory name without path separators, got {cell_id!r}")
    return cell_id


def cells_root(results_dir: str | os.PathLike[str]) -> Path:
    """RESULTS_DIR/cells."""
    return Path(results_dir) / CELLS_DIR


def cell_dir(results_dir: str | os.PathLike[str], cell_id: str) -> Path:
    """RESULTS_DIR/cells/<cell_id>."""
    return cells_root(results_dir) / _check_cell_id(cell_id)


def cell_file(results_dir: str | os.PathLike[str], cell_id: str) -> Path:
    """RESULTS_DIR/cells/<cell_id>/cell.json."""
    return cell_dir(results_dir, cell_id) / CELL_FILE


def cell_eval_dir(results_dir: str | os.PathLike[str], cell_id: str) -> Path:
    """RESULTS_DIR/cells/<cell_id>/eval: pass as run_battery's out_dir (records land in <model_slug>/ below)."""
    return cell_dir(results_dir, cell_id) / EVAL_DIR


def representation_file(results_dir: str | os.PathLike[str], cell_id: str) -> Path:
    """RESULTS_DIR/cells/<cell_id>/representation.json."""
    return cell_dir(results_dir, cell_id) / REPRESENTATION_FILE


def study_file(results_dir: str | os.PathLike[str]) -> Path:
    """RESULTS_DIR/study.yaml: the resolved study config."""
    return Path(results_dir) / STUDY_FILE


def manifest_file(results_dir: str | os.PathLike[str]) -> Path:
    """RESULTS_DIR/manifest.json."""
    return Path(results_dir) / MANIFEST_FILE


def stage_dir(results_dir: str | os.PathLike[str], stage_id: str) -> Path:
    """RESULTS_DIR/stages/<stage_id>."""
    return Path(results_dir) / STAGES_DIR / _check_cell_id(stage_id, "stage_id")


def stage_model_dir(results_dir: str | os.PathLike[str], stage_id: str) -> Path:
    """RESULTS_DIR/stages/<stage_id>/train/final: the model a stage produces."""
    return stage_dir(results_dir, stage_id) / TRAIN_DIR / FINAL_MODEL_DIR


def cell_train_dir(results_dir: str | os.PathLike[str], cell_id: str) -> Path:
    """RESULTS_DIR/cells/<cell_id>/train: the cell's training out_dir."""
    return cell_dir(results_dir, cell_id) / TRAIN_DIR


def cell_model_dir(results_dir: str | os.PathLike[str], cell_id: str) -> Path:
    """RESULTS_DIR/cells/<cell_id>/train/final: the post-trained model."""
    return cell_train_dir(results_dir, cell_id) / FINAL_MODEL_DIR


def cell_run_file(results_dir: str | os.PathLike[str], cell_id: str) -> Path:
    """RESULTS_DIR/cells/<cell_id>/run.yaml."""
    return cell_dir(results_dir, cell_id) / RUN_FILE


def _json_text(data: Any) -> str:
    """Deterministic JSON text with NaN written as null."""
    return json.dumps(_nan_to_none(data), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _nan_to_none(value: Any) -> Any:
    """Replace float NaN/inf (recursively) by None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Cell:
    """One study cell as described by its cell.json."""

    cell_id: str
    start_point: str
    model: str
    scale: str
    method: str
    domain: str | None
    seed: int
    status: str
    budget: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    target_benchmarks: tuple[str, ...] = ()
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    axes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    axis_reference: bool = True
    kl_to_start: Mapping[str, Any] = field(default_factory=dict)
    pipeline: Mapping[str, Any] = field(default_factory=dict)  # a pipeline cell's stage path ({} otherwise)

    @property
    def axes_label(self) -> str:
        """"adapter=full merge=interpolate=0.5" ("" for a cell of a study without axes)."""
        return " ".join(f"{name}={entry['label']}" for name, entry in sorted(self.axes.items()))

    @property
    def targets(self) -> tuple[str, ...]:
        """The held-out benchmarks of this cell's target task: as its study's domain config named them, else the
        shipped domain config's."""
        return self.target_benchmarks or target_benchmarks().get(self.domain or "", ())

    @property
    def budget_flags(self) -> tuple[str, ...]:
        """Why this cell's data use needs a look (`budget.flags`): e.g. repeated beyond max_epochs, data exhausted."""
        return tuple(self.budget.get("flags") or ())

    @property
    def is_baseline(self) -> bool:
        """True for the no-post-training reference cell of its (start_point, scale)."""
        return self.method == BASELINE_METHOD

    @property
    def baseline_key(self) -> tuple[str, str]:
        """(start_point, scale): cells sharing it are compared against the same baseline."""
        return (self.start_point, self.scale)

    def meta(self) -> dict[str, Any]:
        """The identifying columns every table row carries."""
        return {
            "cell_id": self.cell_id,
            "start_point": self.start_point,
            "scale": self.scale,
            "model": self.model,
            "method": self.method,
            "domain": self.domain,
            "seed": self.seed,
            "axes": self.axes_label,
        }


def _check_axes(axes: Any, source: str) -> dict[str, dict[str, Any]]:
    """A cell's recorded axes: {name: {"value": JSON, "label": str, "reference": bool}}."""
    if not isinstance(axes, Mapping) or not all(
            isinstance(entry, Mapping) and {"value", "label", "reference"} <= set(entry)
            and isinstance(entry["label"], str) and isinstance(entry["reference"], bool) for entry in axes.values()):
        raise ValueError(f"{source}: field 'axes' must map axis names to {{value, label, reference}}, got {axes!r}")
    return {str(name): dict(entry) for name, entry in axes.items()}


def _string_field(data: Mapping[str, Any], name: str, source: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _check_budget(budget: Mapping[str, Any], source: str) -> None:
    """The typed parts of a cell's budget: flags a list of strings, data an object of numbers, usage numbers."""
    flags = budget.get("flags") or []
    if not isinstance(flags, list) or not all(isinstance(f, str) and f for f in flags):
        raise ValueError(f"{source}: field 'budget.flags' must be a list of strings, got {flags!r}")
    data = budget.get("data")
    if data is not None and (not isinstance(data, Mapping) or set(data) != {"unique", "size", "epochs"} or not all(
            _is_number(v) and v >= 0 for v in data.values())):
        raise ValueError(f"{source}: field 'budget.data' must be null or an object of numbers >= 0 with keys "
                         f"unique, size, epochs, got {data!r}")
    used = budget.get("used") or {}
    if not isinstance(used, Mapping):
        raise ValueError(f"{source}: field 'budget.used' must be a JSON object, got {type(used).__name__}")
    components = used.get("flops_by_component") or {}
    values = [v for k, v in used.items() if k != "flops_by_component"] + list(
        components.values() if isinstance(components, Mapping) else [None])
    if not all(_is_number(v) for v in values):
        raise ValueError(f"{source}: field 'budget.used' must hold numbers (flops_by_component an object of "
                         f"numbers), got {dict(used)!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_cell(data: Any, source: str = "<cell.json>") -> Cell:
    """Validate a decoded cell.json object; errors name the file and the field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a cell description must be a JSON object, got {type(data).__name__}")
    missing = [name for name in CELL_REQUIRED_FIELDS if name not in data]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}; required: {list(CELL_REQUIRED_FIELDS)}")
    strings = {name: _string_field(data, name, source) for name in ("cell_id", "model", "scale", "method", "status")}
    _check_cell_id(strings["cell_id"])
    start_point = data["start_point"]
    if start_point not in START_POINTS:
        raise ValueError(f"{source}: field 'start_point' must be one of {START_POINTS}, got {start_point!r}")
    domain = data.get("domain")
    if domain is not None and (not isinstance(domain, str) or not domain):
        raise ValueError(f"{source}: field 'domain' must be a non-empty string or null, got {domain!r}")
    seed = data["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{source}: field 'seed' must be an integer, got {seed!r}")
    extras = {}
    for name in ("budget", "metrics", "evaluation", "kl_to_start"):
        value = data.get(name) or {}
        if not isinstance(value, Mapping):
            raise ValueError(f"{source}: field {name!r} must be a JSON object, got {type(value).__name__}")
        extras[name] = dict(value)
    _check_budget(extras["budget"], source)
    extras["pipeline"] = parse_pipeline(data.get("pipeline"), source)
    targets = data.get("target_benchmarks") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{source}: field 'target_benchmarks' must be a list of benchmark names, got {targets!r}")
    axes = _check_axes(data.get("axes") or {}, source)
    reference = data.get("axis_reference", True)
    if not isinstance(reference, bool):
        raise ValueError(f"{source}: field 'axis_reference' must be true or false, got {reference!r}")
    return Cell(start_point=start_point, domain=domain, seed=seed, target_benchmarks=tuple(targets), **strings,
                **extras, axes=axes, axis_reference=reference)


def parse_pipeline(value: Any, source: str) -> dict[str, Any]:
    """A cell.json `pipeline` (null or absent: {}): name and evaluated stage strings, the stage path a non-empty list
    of objects with string stage_id, name, method and domain, ending at the evaluated stage."""
    if value is None:
        return {}
    path = value.get("path") if isinstance(value, Mapping) else None
    entries_ok = isinstance(path, list) and path and all(
        isinstance(e, Mapping) and all(isinstance(e.get(k), str) and e.get(k) for k in ("stage_id", "name", "method",
                                                                                       "domain")) for e in path)
    if not (entries_ok and all(isinstance(value.get(k), str) and value.get(k) for k in ("name", "stage"))
            and path[-1]["name"] == value["stage"]):
        raise ValueError(f"{source}: field 'pipeline' must be an object with name, stage and a path of stages "
                         f"(stage_id, name, method, domain) ending at the evaluated stage, got {value!r}")
    return dict(value)


def read_cell(path: str | os.PathLike[str]) -> Cell:
    """Read and validate one cell.json; the cell_id must equal its directory's name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    cell = parse_cell(data, str(path))
    if cell.cell_id != path.parent.name:
        raise ValueError(f"{path}: field 'cell_id' is {cell.cell_id!r} but the directory is {path.parent.name!r}")
    return cell


def cell_json(cell: Cell) -> dict[str, Any]:
    """The cell.json object of a Cell."""
    return {
        "cell_id": cell.cell_id,
        "start_point": cell.start_point,
        "model": cell.model,
        "scale": cell.scale,
        "method": cell.method,
        "domain": cell.domain,
        "seed": cell.seed,
        "status": cell.status,
        "budget": dict(cell.budget),
        "metrics": dict(cell.metrics),
        "target_benchmarks": list(cell.target_benchmarks),
        "evaluation": dict(cell.evaluation),
        **({"axes": {k: dict(v) for k, v in cell.axes.items()}, "axis_reference": cell.axis_reference}
           if cell.axes else {}),
        **({"kl_to_start": dict(cell.kl_to_start)} if cell.kl_to_start else {}),
        **({"pipeline": dict(cell.pipeline)} if cell.pipeline else {}),
    }


def write_cell(results_dir: str | os.PathLike[str], cell: Cell) -> Path:
    """Write RESULTS_DIR/cells/<cell_id>/cell.json atomically."""
    parse_cell(cell_json(cell), f"cell {cell.cell_id!r}")
    return write_text_atomic(cell_file(results_dir, cell.cell_id), _json_text(cell_json(cell)))


def read_cell_data(results_dir: str | os.PathLike[str], cell_id: str) -> dict[str, Any]:
    """The cell.json object of a cell as written (with the runner's extra keys); {} when there is none yet."""
    path = cell_file(results_dir, cell_id)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def cell_status(results_dir: str | os.PathLike[str], cell_id: str) -> str:
    """The status in a cell's cell.json; "pending" when there is none yet."""
    return read_cell_data(results_dir, cell_id).get("status", PENDING_STATUS)


def write_cell_data(results_dir: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Validate a cell.json object (`parse_cell`; extra keys are kept) and write it atomically to its cell."""
    cell = parse_cell(_nan_to_none(dict(data)), f"cell {data.get('cell_id')!r}")
    return write_text_atomic(cell_file(results_dir, cell.cell_id), _json_text(dict(data)))


def current_cell_ids(results_dir: str | os.PathLike[str]) -> set[str] | None:
    """The cell ids of the current study config from RESULTS_DIR/manifest.json; None without a manifest."""
    path = manifest_file(results_dir)
    if not path.is_file():
        return None
    try:
        return {entry["cell_id"] for entry in json.loads(path.read_text(encoding="utf-8"))["cells"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable study manifest ({err})") from err


def discover_cells(results_dir: str | os.PathLike[str]) -> tuple[list[Cell], list[str]]:
    """The cells under RESULTS_DIR/cells (sorted by id) that belong to the current study config (all of them without
    a manifest: RESULTS_DIR/manifest.json, written by the study runner), and notes on directories left out. Cells
    left over from an earlier config (other ids) are never pooled with the current ones."""
    root = cells_root(results_dir)
    if not root.is_dir():
        return [], [f"no cells directory at {root}"]
    current = current_cell_ids(results_dir)
    cells, issues = [], []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if current is not None and directory.name not in current:
            issues.append(f"cell directory {directory.name!r} is not in {MANIFEST_FILE} (left over from an earlier "
                          "study config); skipped")
            continue
        path = directory / CELL_FILE
        if not path.is_file():
            issues.append(f"cell directory {directory.name!r} has no {CELL_FILE}; skipped")
            continue
        cells.append(read_cell(path))
    check_one_evaluation(cells)
    return cells, issues


def check_one_evaluation(cells: Sequence[Cell]) -> None:
    """UserError naming two cells and the keys at which they differ when the cells that record their evaluation
    (battery contents, limit) were not all evaluated the same way: their scores do not compare. The prompt format may
    differ between start points (`eval_format: auto`); the analysis checks it per pre/post pair instead."""
    recorded = [cell for cell in cells if cell.evaluation]
    for cell in recorded[1:]:
        keys = [key for key in differing_keys(recorded[0].evaluation, cell.evaluation) if key != "eval_format"]
        if keys:
            raise UserError(f"cells {recorded[0].cell_id!r} and {cell.cell_id!r} were evaluated differently "
                            f"(evaluation differs at {', '.join(keys[:8])}); analyse one study config's results "
                            "at a time")


def record_files(results_dir: str | os.PathLike[str], cell_id: str) -> list[Path]:
    """The Parquet record files of a cell (any depth below eval/, temporary files excluded), sorted."""
    root = cell_eval_dir(results_dir, cell_id)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


# ------------------------------------------------------------------------------------------- representation


@dataclass(frozen=True)
class Representation:
    """A validated representation.json: per-layer lists (NaN where a value is undefined)."""

    layers: tuple[int, ...]
    cka: tuple[float, ...] | None
    refusal_direction: dict[str, tuple[float, ...]] | None
    weight_delta: dict[str, dict[str, tuple[float, ...]]] | None
    knowledge_probe: dict[str, Any] | None = None

    def cka_drift(self) -> float | None:
        """1 - mean CKA over layers (0 = unchanged representations); None without CKA values."""
        values = _finite(self.cka)
        return None if values is None else 1.0 - float(np.mean(values))

    def refusal_attenuation(self) -> float | None:
        """1 - mean projection-gap ratio over layers (0 = refusal separation intact, 1 = erased)."""
        ratios = _finite((self.refusal_direction or {}).get("projection_gap_ratio"))
        return None if ratios is None else 1.0 - float(np.mean(ratios))

    def weight_delta_norm(self) -> float | None:
        """Mean Frobenius norm of the weight deltas over modules and layers."""
        norms = [v for module in (self.weight_delta or {}).values() for v in module.get("frobenius_norm", ())]
        values = _finite(norms)
        return None if values is None else float(np.mean(values))


def _finite(values: Iterable[float] | None) -> np.ndarray | None:
    """The finite entries of a list as an array, or None when there are none."""
    if values is None:
        return None
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return array if array.size else None


def _number_list(value: Any, n_layers: int, where: str) -> tuple[float, ...]:
    """Validate a per-layer list of numbers or nulls (null -> NaN)."""
    if not isinstance(value, list) or len(value) != n_layers:
        length = len(value) if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{where} must be a list with one value per layer ({n_layers}), got {length}")
    numbers = []
    for index, entry in enumerate(value):
        if entry is None:
            numbers.append(float("nan"))
        elif isinstance(entry, bool) or not isinstance(entry, (int, float)):
            raise ValueError(f"{where}[{index}] must be a number or null, got {entry!r}")
        else:
            numbers.append(float(entry))
    return tuple(numbers)


def _number_lists(value: Any, n_layers: int, where: str, allowed: Sequence[str] | None) -> dict[str, tuple]:
    """Validate an object of per-layer number lists (keys restricted to `allowed` when given)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object of per-layer lists, got {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    return {key: _number_list(entry, n_layers, f"{where}.{key}") for key, entry in value.items()}


def parse_representation(data: Any, source: str = "<representation.json>") -> Representation:
    """Validate a decoded representation.json (see REPRESENTATION_SCHEMA); errors name the field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: must be a JSON object")
    unknown = sorted(set(data) - {"version", "layers", "cka", "refusal_direction", "weight_delta", "knowledge_probe"})
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}")
    if data.get("version") != REPRESENTATION_VERSION:
        raise ValueError(f"{source}: field 'version' must be {REPRESENTATION_VERSION}, got {data.get('version')!r}")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in layers
    ):
        raise ValueError(f"{source}: field 'layers' must be a non-empty list of integers, got {layers!r}")
    n = len(layers)
    cka = _number_list(data["cka"], n, f"{source}: cka") if data.get("cka") is not None else None
    refusal = None
    if data.get("refusal_direction") is not None:
        refusal = _number_lists(data["refusal_direction"], n, f"{source}: refusal_direction", REFUSAL_KEYS)
    weight_delta = None
    if data.get("weight_delta") is not None:
        raw = data["weight_delta"]
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: weight_delta must be an object keyed by module name")
        weight_delta = {
            str(module): _number_lists(entry, n, f"{source}: weight_delta.{module}", None)
            for module, entry in raw.items()
        }
    probe = None
    if data.get("knowledge_probe") is not None:
        raw = data["knowledge_probe"]
        where = f"{source}: knowledge_probe"
        if not isinstance(raw, Mapping) or not {"start", "post", "n_train", "n_test"} <= set(raw) <= {
                "start", "post", "post_refit", "n_train", "n_test"}:
            raise ValueError(f"{where} must be an object with start, post, n_train and n_test (and optionally "
                             f"post_refit)")
        for key in ("n_train", "n_test"):
            if isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 1:
                raise ValueError(f"{where}.{key} must be a positive integer, got {raw[key]!r}")
        curves = tuple(k for k in ("start", "post", "post_refit") if k in raw)
        probe = {**_number_lists({k: raw[k] for k in curves}, n, where, curves),
                 "n_train": raw["n_train"], "n_test": raw["n_test"]}
    return Representation(tuple(layers), cka, refusal, weight_delta, probe)


def read_representation(path: str | os.PathLike[str]) -> Representation:
    """Read and validate a representation.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    return parse_representation(data, str(path))


def representation_json(
    layers: Sequence[int],
    cka: Sequence[float] | None = None,
    refusal_direction: Sequence[Any] | None = None,
    weight_delta: Mapping[str, Sequence[Any]] | None = None,
    knowledge_probe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a representation.json object from per-layer analysis results.

    refusal_direction: one `DirectionAttenuation` (or mapping with its fields) per layer; weight_delta: module ->
    one `SpectrumSummary` (or mapping) per layer.
    """
    def field_value(entry: Any, name: str) -> Any:
        return entry[name] if isinstance(entry, Mapping) else getattr(entry, name)

    data: dict[str, Any] = {"version": REPRESENTATION_VERSION, "layers": [int(v) for v in layers]}
    if cka is not None:
        data["cka"] = [float(v) for v in cka]
    if refusal_direction is not None:
        data["refusal_direction"] = {
            key: [float(field_value(entry, key)) for entry in refusal_direction] for key in REFUSAL_KEYS
        }
    if weight_delta is not None:
        keys = ("frobenius_norm", "spectral_norm", "effective_rank", "stable_rank")
        data["weight_delta"] = {
            module: {key: [float(field_value(entry, key)) for entry in entries] for key in keys}
            for module, entries in weight_delta.items()
        }
    if knowledge_probe is not None:
        data["knowledge_probe"] = {**{key: [float(v) for v in knowledge_probe[key]]
                                      for key in ("start", "post", "post_refit") if key in knowledge_probe},
                                   "n_train": int(knowledge_probe["n_train"]), "n_test": int(knowledge_probe["n_test"])}
    return _nan_to_none(data)


def write_representation(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Validate and write a representation.json atomically."""
    parse_representation(_nan_to_none(dict(data)), str(path))
    return write_text_atomic(path, _json_text(dict(data)))
