"""Typed configs: dataclasses <-> YAML, `key=value` overrides, strict type checking and validation hooks.

A config is a (nested) dataclass. `load_config(cls, path, overrides)` reads a YAML mapping, applies dotted
overrides (`optimizer.lr=3e-5`, `data.paths=[a.jsonl,b.jsonl]`, `lora=null`; values are parsed with
`yaml.safe_load`), and builds the dataclass, checking every value against the field's type hint:
int (not bool), float (ints and YAML-1.2 number strings such as `3e-5` accepted), bool, str, Path,
Literal[...], Optional / unions, list[T], tuple[T, ...] / tuple[A, B], dict[K, V], nested dataclasses, Enum (by
value or name) and Any. Unknown keys, wrong types and missing required fields are errors that name the source, the
dotted key and what was expected, e.g. `configs/x.yaml: optimizer.lr: expected float, got 'abc'`.

A dataclass may define `validate(self)` raising ValueError; it runs after the instance is built (inner configs
first) and its message is prefixed with the source and key path. A validate hook types an untyped section (a
`dict[str, Any]` field whose schema is another dataclass) with `build_section(cls, value, "dotted.key")`; its errors
name the full dotted key below the enclosing config (`train.optimizer.lrr`), with the enclosing file as the source.

Includes: a top-level `base: other.yaml` (path relative to the including file; chains allowed, cycles rejected)
is loaded first and the file's own keys are merged over it (mappings merge recursively, other values replace).
`base` is only special when the dataclass has no field of that name.

`to_dict` / `dump_yaml` give the plain form that round-trips through `load_config`; `config_hash` is the sha256
of its canonical JSON (sorted keys, no whitespace), stable across runs and machines, used to identify study cells.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from forgetjax.errors import UserError
from forgetjax.io import write_text_atomic

T = TypeVar("T")
BASE_KEY = "base"
_FLOAT_STRING = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_SPECIAL_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
_MISSING = object()


class ConfigError(UserError):
    """A config file or override that does not match its dataclass (message names source and dotted key)."""


class _TypeMismatch(Exception):
    """Internal: a value does not match a type; `key` is the dotted path below the point of failure."""

    def __init__(self, key: str, message: str, shallow: bool = False):
        super().__init__(message)
        self.key = key
        self.message = message
        self.shallow = shallow  # the value's kind does not fit the type at `key` (vs. an error inside it)


def _join(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    """Readable name of a type hint for error messages."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, tp: Any, value: Any) -> _TypeMismatch:
    return _TypeMismatch(key, f"expected {_type_name(tp)}, got {value!r}", shallow=True)


def _as_float(value: Any) -> float | None:
    """A float from an int/float or a YAML-1.2 number string (PyYAML reads `3e-5` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[text.lower()]
        if _FLOAT_STRING.match(text):
            return float(text)
    return None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type hint `tp` and convert it (list->tuple, str->Path, mapping->dataclass...)."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _convert(value, args[0], key)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _mismatch(key, tp, value)
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(value, member, key)
            except _TypeMismatch as err:
                errors.append(err)
        specific = [e for e in errors if not (e.shallow and e.key == key)]
        if specific:
            raise specific[0]
        raise _mismatch(key, tp, value)
    if origin is typing.Literal:
        for allowed in args:
            if type(allowed) is type(value) and allowed == value:
                return allowed
        raise _mismatch(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        item_type = args[0] if args else Any
        return [_convert(v, item_type, _join(key, i)) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_type = args[0] if args else Any
            return tuple(_convert(v, item_type, _join(key, i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _TypeMismatch(key, f"expected {_type_name(tp)} with {len(args)} items, got {value!r}")
        return tuple(_convert(v, a, _join(key, i)) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        key_type, value_type = args if args else (Any, Any)
        return {_convert(k, key_type, key): _convert(v, value_type, _join(key, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        return _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if (type(member.value) is type(value) and member.value == value) or member.name == value:
                return member
        raise _mismatch(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is float:
        number = _as_float(value)
        if number is None:
            raise _mismatch(key, tp, value)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(key, tp, value)
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _mismatch(key, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(key, tp, value)
    raise TypeError(f"{key}: unsupported type hint {tp!r} in a config dataclass")


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a config class (resolving them dominated building a study's cells)."""
    return typing.get_type_hints(cls, include_extras=True)


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    """Build dataclass `cls` from a mapping: reject unknown keys, convert every value, then run validate()."""
    fields = _init_fields(cls)
    hints = _type_hints(cls)
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(fields)})"
            raise _TypeMismatch(_join(prefix, str(name)), f"unknown key {_join(prefix, str(name))}{hint}")
    kwargs = {}
    for name, spec in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(prefix, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise _TypeMismatch(_join(prefix, name), f"missing required key {_join(prefix, name)}")
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except _SectionError as err:
        raise err.mismatch from None
    except (ValueError, TypeError) as err:
        raise _TypeMismatch(prefix, str(err)) from err
    return obj


def _describe(err: _TypeMismatch) -> str:
    if err.message.startswith(("unknown key", "missing required key")) or not err.key:
        return err.message
    return f"{err.key}: {err.message}"


def _format(source: str, err: _TypeMismatch, note: str = "") -> str:
    return f"{source}: {_describe(err)}{note}"


class _SectionError(ConfigError):
    """A `build_section` failure: a ConfigError naming the dotted key; inside an enclosing build it is reported as
    the enclosing config's own mismatch (so the source and any override are named)."""

    def __init__(self, mismatch: _TypeMismatch):
        super().__init__(_describe(mismatch))
        self.mismatch = mismatch


def build_section(cls: type[T], data: Any, key: str) -> T:
    """Build dataclass `cls` from `data`, the value at dotted `key` of an enclosing config (for validate() hooks of
    configs that keep a section as a plain mapping). Errors are ConfigErrors naming `key.<field>`."""
    try:
        return _convert(data, cls, key)
    except _TypeMismatch as err:
        raise _SectionError(err) from None


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "<config>") -> T:
    """Build and validate dataclass `cls` from a plain mapping (as read from YAML); errors name `source`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return _build(cls, data, "")
    except _TypeMismatch as err:
        raise ConfigError(_format(source, err)) from None


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving a top-level `base:` include chain."""
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: base include cycle: {' -> '.join(str(p) for p in chain + (resolved,))}")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    try:
        data = copy.deepcopy(_parse_yaml(text))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=256)
def _parse_yaml(text: str) -> Any:
    """The parsed YAML of a file's text, kept by text: a study reads its model, domain and method files once per
    cell, and parsing dominated its expansion. Callers get a deep copy."""
    return yaml.safe_load(text)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict of `override` merged into `base`: mappings merge recursively, any other value in `override`
    replaces the base value; nothing is shared with the inputs."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_with_bases(path: Path, cls: type, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    data = _read_yaml(path, chain)
    if BASE_KEY in data and BASE_KEY not in _init_fields(cls):
        base_name = data.pop(BASE_KEY)
        if not isinstance(base_name, str):
            raise ConfigError(f"{path}: {BASE_KEY}: expected a relative YAML path, got {base_name!r}")
        base = _load_with_bases(path.parent / base_name, cls, chain + (path.resolve(),))
        data = deep_merge(base, data)
    return data


def parse_override(override: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], yaml.safe_load(value)); an empty value means an empty string."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: cannot parse value: {err}") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with every `key=value` override set at its dotted path (creating mappings)."""
    result = deep_merge({}, data)
    for override in overrides:
        parts, value = parse_override(override)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, Mapping):
                child = node[part] = dict(child)
            else:
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {override!r}: {where} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return result


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read YAML `path` (None: start empty), apply `key=value` overrides, build and validate `cls`."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, got the string {overrides!r}")
    data = _load_with_bases(Path(path), cls) if path is not None else {}
    data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "<overrides>"
    override_keys = [".".join(parse_override(o)[0]) for o in overrides]
    try:
        return _build(cls, data, "")
    except _TypeMismatch as err:
        touched = [o for o, k in zip(overrides, override_keys)
                   if err.key == k or err.key.startswith((k + ".", k + "["))
                   or (err.key and k.startswith(err.key + "."))]
        note = f" (from override {touched[-1]})" if touched else ""
        raise ConfigError(_format(source, err, note)) from None


_PLAIN_TYPES = frozenset({bool, int, float, str, type(None)})


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON form of a config: dataclasses -> dicts (init fields), tuples -> lists, Path -> str,
    Enum -> value."""
    if type(obj) in _PLAIN_TYPES:  # exact types first: a study hashes every cell's resolved config through here
        return obj
    if isinstance(obj, Mapping):
        return {str(k) if isinstance(k, Path) else to_dict(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return to_dict(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialise {type(obj).__name__} value {obj!r} in a config")


def dump_yaml(obj: Any, path: str | Path) -> Path:
    """Write `to_dict(obj)` as YAML atomically; `load_config(type(obj), path)` gives back an equal object."""
    return write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True))


def differing_keys(first: Any, second: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two plain configs (`to_dict` forms) differ: a key present in one only, or a different
    value; lists compare whole. Sorted; [] when they are equal."""
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        keys = sorted(set(first) | set(second), key=str)
        return [k for key in keys
                for k in (differing_keys(first[key], second[key], _join(prefix, str(key)))
                          if key in first and key in second else [_join(prefix, str(key))])]
    return [] if canonical_json(first) == canonical_json(second) else [prefix or "<root>"]


def canonical_json(obj: Any) -> str:
    """Canonical JSON of a config: sorted keys, no whitespace, UTF-8 text (inf/NaN written as Infinity/NaN)."""
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of a config (equal configs hash equal on any machine)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
