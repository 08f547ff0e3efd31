"""Memory-mapped safetensors reading (sliceable, bfloat16 included) and sharded writing.

The format is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}} and the
raw bytes. Reading through np.memmap means a device that loads one shard of a parameter touches only those bytes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from forgetjax.io import atomic_open, write_json_atomic

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightsError(ValueError):
    """Weights are missing, malformed or do not fit the config."""


class SafetensorsFile:
    """One .safetensors file, tensors exposed as lazily sliced memory maps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise WeightsError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise WeightsError(f"{self.path}: corrupt safetensors header ({err})") from err
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        size = self.path.stat().st_size
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise WeightsError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            if self._data_start + entry["data_offsets"][1] > size:
                raise WeightsError(f"{self.path}: tensor {name} extends past the end of the file (truncated?)")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def array(self, name: str) -> np.ndarray:
        """A read-only view of the whole tensor (no copy until sliced and materialised)."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        if end == begin:
            return np.zeros(entry["shape"], dtype)
        flat = self._mmap[self._data_start + begin:self._data_start + end].view(dtype)
        return flat.reshape(entry["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to one safetensors file atomically."""
    path = Path(path)
    header, offset = {}, 0
    arrays = {}
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        if value.dtype not in _NAMES:
            raise WeightsError(f"cannot store tensor {name} of dtype {value.dtype} in safetensors")
        header[name] = {"dtype": _NAMES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        arrays[name] = value
        offset += value.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for value in arrays.values():
            f.write(value.tobytes(order="C"))


def save_sharded(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path,
                 max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write tensors as `model.safetensors`, or as numbered shards plus an index when they exceed max_shard_bytes.

    Shards are flushed as they fill (host memory holds at most one shard) under provisional names and renamed once
    their count is known."""
    out_dir = Path(out_dir)
    metadata = {"format": "pt"}
    provisional: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        path = out_dir / f".shard-{len(provisional):05d}.partial"
        save_file(shard, path, metadata)
        provisional.append((path, list(shard)))

    for name, value in tensors:
        if shard and size + value.nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    if len(provisional) == 1:
        provisional[0][0].replace(out_dir / SINGLE_FILE)
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, (path, names) in enumerate(provisional, 1):
        fname = f"model-{i:05d}-of-{len(provisional):05d}.safetensors"
        path.replace(out_dir / fname)
        files.append(fname)
        weight_map.update({name: fname for name in names})
    write_json_atomic(out_dir / INDEX_FILE, {"metadata": {"total_size": int(total)}, "weight_map": weight_map})
    return files


class SafetensorsCheckpoint:
    """All tensors of an HF model directory (single file or sharded with an index), by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise WeightsError(f"{index_path}: not a valid safetensors index ({err})") from err
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                raise WeightsError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}")
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt"))
            hint = (f" (found {', '.join(others)}: only safetensors weights are supported; convert them with "
                    f"transformers' save_pretrained(safe_serialization=True))") if others else ""
            raise WeightsError(f"no weights in {self.directory}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._files = {f: SafetensorsFile(self.directory / f) for f in files}
        self._where = {name: f for f, sf in self._files.items() for name in sf.names()}

    def names(self) -> set[str]:
        return set(self._where)

    def where(self, name: str) -> str:
        return str(self.directory / self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        return np.asarray(self._files[self._where[name]].array(name)[index])


class ArrayCheckpoint:
    """In-memory tensors by HF name (GGUF-dequantised weights, tests) with the same interface."""

    def __init__(self, tensors: dict[str, np.ndarray], origin: str = "<memory>"):
        self._tensors = tensors
        self.origin = origin

    def names(self) -> set[str]:
        return set(self._tensors)

    def where(self, name: str) -> str:
        return self.origin

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        return np.asarray(self._tensors[name][index])
