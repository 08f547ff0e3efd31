"""What kind of model source a string names, and a check of it that reads headers but loads no weights.

Sources (see `forgetjax.load`): an embedded model name, a local HF directory (config.json + safetensors), a
forgetjax checkpoint directory (forgetjax.json + params/), a `.gguf` file, or a hub id `org/name`.
"""
from __future__ import annotations

import re
from pathlib import Path

from forgetjax import assets
from forgetjax.convert.safetensors_io import SafetensorsCheckpoint, WeightsError
from forgetjax.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_MARKER = "forgetjax.json"
GGUF_MAGIC = b"GGUF"


def classify_source(source: str | Path) -> tuple[str, Path | None]:
    """(kind, path): kind is "embedded" or "hub" (path None), or "forgetjax", "hf" or "gguf" for a local path.

    A local path that is none of these raises WeightsError saying what is missing."""
    text = str(source)
    if assets.embedded_name(text) is not None:
        return "embedded", None
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise WeightsError(f"{path}: a model file must be .gguf; for safetensors pass the model directory")
    if path.is_dir():
        if (path / CHECKPOINT_MARKER).is_file():
            return "forgetjax", path
        if (path / "config.json").is_file():
            return "hf", path
        if (path / "params").is_dir():
            raise WeightsError(f"{path}: incomplete forgetjax checkpoint (params/ present, {CHECKPOINT_MARKER} "
                               f"missing: the save was interrupted)")
        raise WeightsError(f"{path}: neither an HF model directory (no config.json) nor a forgetjax checkpoint "
                           f"(no {CHECKPOINT_MARKER})")
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return "hub", None
    raise WeightsError(f"model source {text!r} is not a file, a directory, an embedded model "
                       f"({', '.join([*assets.EMBEDDED_MODELS, *assets.RANDOM_MODELS])}) or a hub id (org/name)")


def check_source(source: str | Path, what: str | None = None) -> str:
    """Check a model source without loading weights and return its kind (see `classify_source`); errors are
    UserErrors whose message starts with `what` (the flag or field that named the source) when given.

    Local sources are read as far as their headers: an HF directory's config.json and every safetensors header,
    a checkpoint's forgetjax.json, a GGUF file's magic bytes. A relative `org/name` whose `org` is an existing
    local directory is taken as a mistyped local path rather than a hub id."""
    try:
        return _check_source(source)
    except UserError as err:
        if what is None:
            raise
        raise UserError(f"{what}: {err}") from None


def _check_source(source: str | Path) -> str:
    kind, path = classify_source(source)
    if kind == "hub":
        org = Path(str(source)).parts[0]
        if Path(org).is_dir():
            raise WeightsError(f"model source {str(source)!r} not found: {org}/ is a local directory without it "
                               f"(pass an existing model directory, or a hub id org/name)")
    elif kind == "gguf":
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise WeightsError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    elif kind == "forgetjax":
        from forgetjax.convert.checkpoint import read_meta

        read_meta(path)
        if not (path / "params").is_dir():
            raise WeightsError(f"{path}: forgetjax checkpoint without params/ (incomplete copy?)")
    elif kind == "hf":
        from forgetjax.models.config import load_config

        load_config(path)
        SafetensorsCheckpoint(path)
    return kind


__all__ = ["HUB_ID", "check_source", "classify_source"]
