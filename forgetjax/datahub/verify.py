"""Checksums and row counts of data files, and the state of a data directory against the manifest."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from forgetjax.datahub.manifest import DataError, Entry

PRESENT, MISSING, ALTERED = "present", "missing", "altered"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def git_blob_id(path: Path) -> str:
    """The git blob id of a file: sha1 of "blob <size>\\0" followed by its bytes."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pin_mismatch(entry: Entry, path: Path) -> str | None:
    """How the file differs from the entry's pin (its sha256, or a hub entry's git blob id), or None."""
    if entry.hub_only:
        blob = git_blob_id(path)
        return None if blob == entry.source.git_blob else f"git blob {blob} (expected {entry.source.git_blob})"
    sha256 = file_sha256(path)
    return None if sha256 == entry.sha256 else f"sha256 {sha256} (expected {entry.sha256})"


LISTED_FORMATS = {"json_examples": "examples", "json_jailbreaks": "jailbreaks"}


def count_rows(path: Path, row_format: str) -> int:
    """Rows as the data pack counts them: records of a jsonl/json/csv file (no CSV header), non-blank lines of a
    headerless TSV or label list, the `examples` of a BIG-Bench-Hard task file and the `jailbreaks` of a
    JailbreakBench artifact."""
    if row_format == "lines":
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    if row_format in LISTED_FORMATS:
        key = LISTED_FORMATS[row_format]
        with open(path, encoding="utf-8") as handle:
            try:
                return len(json.load(handle)[key])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}: not a JSON object with a {key!r} list ({err})") from None
    from forgetjax.data.records import RecordError, iter_raw  # the package imports grain and JAX: import on use

    rows = 0
    try:
        for _, record in iter_raw(path):
            if isinstance(record, RecordError):
                raise record
            rows += 1
    except RecordError as err:
        raise DataError(str(err)) from None
    return rows


def mismatch(entry: Entry, path: Path) -> str | None:
    """What differs between the file at `path` and the manifest entry (rows, sha256 or a hub entry's git blob), or
    None if it matches; a hub entry's rows are only checked to be readable."""
    try:
        rows = count_rows(path, entry.format)
    except DataError as err:
        return f"rows unreadable ({err})"
    problems = []
    if entry.rows is not None and rows != entry.rows:
        problems.append(f"{rows} rows (expected {entry.rows})")
    pin = _pin_mismatch(entry, path)
    if pin is not None:
        problems.append(pin)
    return ", ".join(problems) or None


@dataclass(frozen=True)
class FileState:
    entry: Entry
    state: str
    detail: str = ""


def file_state(entry: Entry, data_dir: Path) -> FileState:
    """present (sha256, or a hub entry's git blob, as in the manifest), missing, or altered (it differs)."""
    path = data_dir / entry.path
    if not path.is_file():
        return FileState(entry, MISSING)
    pin = _pin_mismatch(entry, path)
    if pin is not None:
        return FileState(entry, ALTERED, pin)
    return FileState(entry, PRESENT)


def check(entries: list[Entry], data_dir: str | Path) -> list[FileState]:
    data_dir = Path(data_dir)
    return [file_state(entry, data_dir) for entry in entries]
