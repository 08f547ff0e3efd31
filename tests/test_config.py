"""Typed config loader: YAML + overrides -> dataclasses, type errors naming file/key, validate hooks, hashing,
dump/load round trips and `base:` includes. References are hand-written dicts/strings and hashlib on hand-written
JSON, never the loader's own output."""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from pathlib import Path
from typing import Literal

import pytest

from forgetjax.config import ConfigError, config_hash, dump_yaml, from_dict, load_config, to_dict


class Precision(enum.Enum):
    F32 = "float32"
    BF16 = "bfloat16"


@dataclasses.dataclass
class Optimizer:
    lr: float = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass
class Lora:
    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def validate(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@dataclasses.dataclass
class Data:
    paths: list[Path] = dataclasses.field(default_factory=list)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    packing: bool = False
    window: tuple[int, int] = (0, 0)


@dataclasses.dataclass
class Train:
    name: str
    seed: int = 0
    precision: Precision = Precision.F32
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)
    data: Data = dataclasses.field(default_factory=Data)
    lora: Lora | None = None

    def validate(self):
        if self.lora is not None and self.data.packing and self.lora.rank > 64:
            raise ValueError("packing with rank > 64 is not supported")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FULL_YAML = """\
name: gsm8k-sft
seed: 3
precision: bfloat16
optimizer:
  lr: 3e-5
  schedule: linear
  warmup_steps: 10
  max_grad_norm: null
data:
  paths: [a.jsonl, b.jsonl]
  fields: {question: prompt, answer: completion}
  packing: true
  window: [1, 2]
lora:
  rank: 8
"""


def test_all_supported_types_from_yaml(tmp_path):
    cfg = load_config(Train, write(tmp_path, "x.yaml", FULL_YAML))
    assert cfg == Train(
        name="gsm8k-sft", seed=3, precision=Precision.BF16,
        optimizer=Optimizer(lr=3e-5, schedule="linear", warmup_steps=10, max_grad_norm=None),
        data=Data(paths=[Path("a.jsonl"), Path("b.jsonl")], fields={"question": "prompt", "answer": "completion"},
                  packing=True, window=(1, 2)),
        lora=Lora(rank=8, targets=("q_proj", "v_proj")))
    assert isinstance(cfg.optimizer.lr, float) and isinstance(cfg.data.paths[0], Path)
    assert isinstance(cfg.lora.targets, tuple) and isinstance(cfg.data.window, tuple)


def test_float_fields_accept_ints_and_scientific_strings(tmp_path):
    cfg = load_config(Train, None, ["name=x", "optimizer.lr=2", "optimizer.max_grad_norm=1e-1"])
    assert cfg.optimizer.lr == 2.0 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.max_grad_norm == pytest.approx(0.1)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=abc", "optimizer.lr: expected float, got 'abc'"),
    ("seed=1.5", "seed: expected int, got 1.5"),
    ("seed=true", "seed: expected int, got True"),
    ("data.packing=maybe", "data.packing: expected bool, got 'maybe'"),
    ("name=12", "name: expected str, got 12"),
    ("optimizer.schedule=cosin", "optimizer.schedule: expected one of 'cosine', 'linear', 'constant', got 'cosin'"),
    ("precision=float16", "precision: expected one of 'float32', 'bfloat16', got 'float16'"),
    ("data.window=[1, 2, 3]", "data.window: expected tuple[int, int] with 2 items, got [1, 2, 3]"),
    ("lora.targets=[q_proj, 7]", "lora.targets[1]: expected str, got 7"),
    ("data.paths=a.jsonl", "data.paths: expected list[Path], got 'a.jsonl'"),
    ("optimizer=3", "optimizer: expected mapping (Optimizer), got 3"),
])
def test_wrong_types_name_file_key_and_expectation(tmp_path, override, message):
    path = write(tmp_path, "x.yaml", "name: run\n")
    with pytest.raises(ConfigError) as err:
        load_config(Train, path, [override])
    assert str(err.value).startswith(f"{path}: {message}")
    assert f"(from override {override})" in str(err.value)


def test_wrong_type_in_file_names_file_and_dotted_key(tmp_path):
    path = write(tmp_path, "bad.yaml", "name: run\noptimizer:\n  lr: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(Train, path)
    assert str(err.value) == f"{path}: optimizer.lr: expected float, got 'abc'"


def test_unknown_key_suggests_the_closest_field(tmp_path):
    path = write(tmp_path, "x.yaml", "name: run\noptimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Train, path)
    assert str(err.value) == f"{path}: unknown key optimizer.lrr (did you mean lr?)"
    with pytest.raises(ConfigError, match=r"unknown key zzz \(known keys: name, seed"):
        load_config(Train, None, ["name=x", "zzz=1"])


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "x.yaml", "seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Train, path)
    assert str(err.value) == f"{path}: missing required key name"


def test_overrides_set_nested_values_lists_and_null(tmp_path):
    path = write(tmp_path, "x.yaml", FULL_YAML)
    cfg = load_config(Train, path, ["optimizer.lr=3e-4", "data.paths=[c.jsonl]", "lora=null", "seed=7"])
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.data.paths == [Path("c.jsonl")]
    assert cfg.lora is None and cfg.seed == 7
    assert cfg.data.fields == {"question": "prompt", "answer": "completion"}
    created = load_config(Train, None, ["name=x", "lora.rank=4"])
    assert created.lora == Lora(rank=4)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Train, None, ["name"])
    with pytest.raises(ConfigError, match="optimizer.lr is 0.001, not a mapping"):
        load_config(Train, None, ["name=x", "optimizer.lr=0.001", "optimizer.lr.x=1"])


def test_validate_hooks_are_prefixed_with_the_key_path(tmp_path):
    path = write(tmp_path, "x.yaml", "name: run\noptimizer:\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Train, path)
    assert str(err.value) == f"{path}: optimizer: lr must be > 0, got -1.0"
    with pytest.raises(ConfigError) as err:
        load_config(Train, path, ["optimizer.lr=0.1", "lora.rank=0"])
    assert str(err.value) == f"{path}: lora: rank must be >= 1, got 0 (from override lora.rank=0)"
    with pytest.raises(ConfigError) as err:
        load_config(Train, path, ["optimizer.lr=0.1", "data.packing=true", "lora.rank=128"])
    assert str(err.value).startswith(f"{path}: packing with rank > 64 is not supported")


def test_config_hash_is_sha256_of_canonical_json(tmp_path):
    cfg = load_config(Train, write(tmp_path, "x.yaml", FULL_YAML))
    expected = {
        "name": "gsm8k-sft", "seed": 3, "precision": "bfloat16",
        "optimizer": {"lr": 3e-5, "schedule": "linear", "warmup_steps": 10, "max_grad_norm": None},
        "data": {"paths": ["a.jsonl", "b.jsonl"], "fields": {"question": "prompt", "answer": "completion"},
                 "packing": True, "window": [1, 2]},
        "lora": {"rank": 8, "targets": ["q_proj", "v_proj"]},
    }
    canonical = json.dumps(expected, sort_keys=True, separators=(",", ":"))
    assert config_hash(cfg) == hashlib.sha256(canonical.encode()).hexdigest()
    reordered = write(tmp_path, "y.yaml", (
        "lora: {rank: 8}\ndata: {window: [1, 2], packing: true, fields: {answer: completion, question: prompt}, "
        "paths: [a.jsonl, b.jsonl]}\noptimizer: {max_grad_norm: null, warmup_steps: 10, schedule: linear, "
        "lr: 0.00003}\nprecision: bfloat16\nseed: 3\nname: gsm8k-sft\n"))
    assert config_hash(load_config(Train, reordered)) == config_hash(cfg)
    assert config_hash(load_config(Train, None, ["name=gsm8k-sft"])) != config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, seed=4)) != config_hash(cfg)


def test_dump_yaml_round_trips_and_leaves_no_temp_files(tmp_path):
    cfg = load_config(Train, write(tmp_path, "x.yaml", FULL_YAML), ["optimizer.lr=1e-7", "name='yes'"])
    assert cfg.name == "yes"
    out = dump_yaml(cfg, tmp_path / "out" / "resolved.yaml")
    assert load_config(Train, out) == cfg
    assert config_hash(load_config(Train, out)) == config_hash(cfg)
    assert sorted(p.name for p in out.parent.iterdir()) == ["resolved.yaml"]
    assert to_dict(cfg)["precision"] == "bfloat16" and to_dict(cfg)["data"]["window"] == [1, 2]


def test_base_include_is_merged_under_the_files_own_keys(tmp_path):
    write(tmp_path, "base.yaml", "name: base\nseed: 1\noptimizer:\n  lr: 0.5\n  warmup_steps: 3\n")
    (tmp_path / "exp").mkdir()
    child = write(tmp_path / "exp", "child.yaml", "base: ../base.yaml\nseed: 2\noptimizer:\n  lr: 0.25\n")
    cfg = load_config(Train, child)
    assert (cfg.name, cfg.seed, cfg.optimizer.lr, cfg.optimizer.warmup_steps) == ("base", 2, 0.25, 3)
    write(tmp_path, "a.yaml", "base: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="base include cycle"):
        load_config(Train, tmp_path / "a.yaml")


def test_from_dict_and_top_level_errors(tmp_path):
    assert from_dict(Optimizer, {"lr": 1}) == Optimizer(lr=1.0)
    with pytest.raises(ConfigError, match=r"^cli: expected a mapping at the top level"):
        from_dict(Optimizer, [1, 2], source="cli")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Train, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Train, write(tmp_path, "broken.yaml", "name: [unclosed\n"))


@dataclasses.dataclass
class Sweep:
    """A config keeping a section as a plain mapping (as a study keeps `train`), typed by its validate hook."""

    train: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        from forgetjax.config import build_section

        build_section(Train, {"name": "x", **self.train}, "train")


def test_a_section_typed_in_a_validate_hook_names_the_file_and_the_full_dotted_key(tmp_path):
    from forgetjax.config import build_section

    path = write(tmp_path, "sweep.yaml", "train:\n  optimizer: {lrr: 1}\n")
    with pytest.raises(ConfigError) as unknown:
        load_config(Sweep, path)
    assert str(unknown.value) == f"{path}: unknown key train.optimizer.lrr (did you mean lr?)"
    ok = write(tmp_path, "ok.yaml", "train: {seed: 1}\n")
    with pytest.raises(ConfigError) as typed:
        load_config(Sweep, ok, ["train.optimizer.lr=abc"])
    assert str(typed.value) == (f"{ok}: train.optimizer.lr: expected float, got 'abc' "
                                "(from override train.optimizer.lr=abc)")
    with pytest.raises(ConfigError) as invalid:
        load_config(Sweep, ok, ["train.optimizer.lr=-1"])
    assert str(invalid.value) == f"{ok}: train.optimizer: lr must be > 0, got -1.0 (from override train.optimizer.lr=-1)"
    with pytest.raises(ConfigError, match=r"^train.seed: expected int, got 'one'$"):
        build_section(Train, {"name": "x", "seed": "one"}, "train")
    assert build_section(Optimizer, {"lr": "3e-5"}, "train.optimizer") == Optimizer(lr=3e-5)


def test_differing_keys_lists_the_dotted_paths_that_differ():
    from forgetjax.config import differing_keys

    first = {"run": {"lr": 1e-5, "args": {"beta": 0.1}, "paths": ["a", "b"]}, "limit": None}
    assert differing_keys(first, json.loads(json.dumps(first))) == []
    second = {"run": {"lr": 2e-5, "args": {"beta": 0.1, "seed": 0}, "paths": ["a", "c"]}, "limit": None, "new": 1}
    assert differing_keys(first, second) == ["new", "run.args.seed", "run.lr", "run.paths"]
    assert differing_keys(1, 2) == ["<root>"]
