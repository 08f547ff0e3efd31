"""Named conversions from a public source file's bytes to the bytes the loaders read (manifest field `transform`).

Each converter is deterministic, so the converted file is checked against the manifest's sha256 like a copied one.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from typing import Callable

from forgetjax.errors import UserError


def reserialize_jsonl(source: bytes) -> bytes:
    """One `json.dumps` (default separators, ASCII escapes) per non-blank line, LF-terminated, trailing newline.

    MBPP's copy has CRLF line ends and no final newline; this gives the layout of google-research's `mbpp.jsonl`.
    """
    lines = source.decode("utf-8").splitlines()
    return "".join(json.dumps(json.loads(line)) + "\n" for line in lines if line.strip()).encode("utf-8")


HELLASWAG_KEYS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings",
                  "source_id")


def hellaswag_arrow_to_jsonl_gz(source: bytes) -> bytes:
    """HellaSwag validation from a Hugging Face datasets arrow stream into rowanz's jsonl layout (the original key
    order, label as int, default `json.dumps`), compressed as `gzip -9n` does (GNU gzip is run: Python's zlib gives
    another, equally valid, deflate stream, so the pinned checksum needs the same compressor)."""
    import pyarrow as pa

    rows = pa.ipc.open_stream(source).read_all().to_pylist()
    text = "".join(json.dumps({key: int(row[key]) if key == "label" else row[key] for key in HELLASWAG_KEYS}) + "\n"
                   for row in rows)
    if shutil.which("gzip") is None:
        raise UserError("hellaswag_arrow_to_jsonl_gz needs the gzip program (GNU gzip) on PATH")
    return subprocess.run(["gzip", "-9n", "-c"], input=text.encode("utf-8"), capture_output=True, check=True).stdout


TRANSFORMS: dict[str, Callable[[bytes], bytes]] = {
    "reserialize_jsonl": reserialize_jsonl,
    "hellaswag_arrow_to_jsonl_gz": hellaswag_arrow_to_jsonl_gz,
}
