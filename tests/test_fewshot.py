"""Evaluation formats: BASE starts few-shot, SAFE starts chat, never paired across formats; every battery benchmark
has a few-shot prompt whose exemplars come from outside the evaluated items."""
from __future__ import annotations

import dataclasses
import json

import pytest


def _set_format(directory, benchmark: str, fmt: str) -> None:
    """Rewrite one cell's records of `benchmark` with extra.format = fmt."""
    from forgetjax.eval.records import read_records, write_records

    path = next(directory.glob(f"eval/*/{benchmark}.parquet"))
    records = [dataclasses.replace(r, extra=json.dumps({**r.extra_dict(), "format": fmt})) for r in read_records(path)]
    write_records(records, path)


def test_pairing_refuses_a_cell_and_baseline_in_different_formats(tmp_path):
    from forgetjax.analysis.loading import load_study
    from forgetjax.errors import UserError
    from test_analysis_queries import CellSpec, build_synthetic_study

    specs = (CellSpec("base-baseline", "base", "baseline", None, 0),
             CellSpec("base-gt_sft-math-s0", "base", "gt_sft", "math", 0, 0.5, 0.1, 0.3))
    build_synthetic_study(tmp_path, specs)
    for cell in ("base-baseline", "base-gt_sft-math-s0"):
        _set_format(tmp_path / "cells" / cell, "gsm8k", "fewshot")
    study = load_study(tmp_path)
    assert study.rows("SELECT DISTINCT format FROM paired WHERE benchmark = 'gsm8k'") == [{"format": "fewshot"}]
    study.connection.close()
    _set_format(tmp_path / "cells" / "base-gt_sft-math-s0", "gsm8k", "chat")
    with pytest.raises(UserError, match=r"gsm8k: cell 'base-gt_sft-math-s0' in 'chat' but its baseline "
                                        r"'base-baseline' in 'fewshot'"):
        load_study(tmp_path)
