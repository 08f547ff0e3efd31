"""A study's results loaded into DuckDB: the analysable cells, every record joined with its benchmark's family and
kind, and every post-trained cell's items paired with its baseline's.

Several results directories (the phases of one study, e.g. one per model scale) load as one study: their cells are
merged by id. Cell ids embed a hash of the resolved config, so the same id in two directories must be the same cell:
identical content (cell.json, records, representation.json) is loaded once, different content is a UserError.

Only cells with status "done" that hold records are analysed; every skipped cell is listed in `Study.issues`.
Pairing: every post-trained cell's items are inner-joined with its baseline's items on (benchmark, item_id); items
present on one side only are counted in the pairing table, never imputed. Per paired item the compared value is
`correct` when both sides have one (binary: forgetting / backward transfer / McNemar apply), else `score` when
both sides have a finite one (continuous: delta only); unscored items are dropped.
Each paired row says whether its benchmark is in-domain for the cell (`forgetjax.tasks.domains.is_in_domain`) and
whether it is one of the cell's target benchmarks; capability forgetting is measured on the off-target capability
items (OFF_TARGET_SQL).
A cell and its baseline must have
evaluated each benchmark in the same prompt format (the records' `extra.format`, "chat" or "fewshot"): a pair of
different formats measures the prompt, not the training, so loading refuses it naming the benchmark and both cells.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from forgetjax.errors import UserError
from forgetjax.results import (
    DONE_STATUS,
    Cell,
    Representation,
    cell_eval_dir,
    cell_file,
    discover_cells,
    read_representation,
    record_files,
    representation_file,
)
from forgetjax.tasks.domains import is_in_domain

SAFETY_FAMILIES = ("safety_refusal", "over_refusal")
NON_CAPABILITY_FAMILIES = (*SAFETY_FAMILIES, "ai_risk", "robustness", "default_behaviour")
"""Families outside pooled capability forgetting: safety and dispositions, the robustness variants (their base
benchmark already counts each item once) and the unscored default-behaviour prompts (`analysis.captrack`)."""
OFF_TARGET_SQL = "is_capability AND NOT in_domain"
"""The paired-table condition of the items capability forgetting is measured on: capability, not in-domain."""


@dataclass
class Study:
    """The analysed cells of one or several results directories with their records loaded into DuckDB.

    `cells`: the baselines and the post-trained cells at the reference of every study axis (all of them in a study
    without axes), the cells every method comparison reads; `axis_cells`: the other post-trained cells (other axis
    values, merge cells), read by the axis report (`forgetjax.analysis.axes`). DuckDB tables hold both.
    DuckDB tables: `cells` (Cell columns + baseline_id), `records` (every record + cell_id, family, kind,
    harmful) and `paired` (one row per post-trained cell x item present in the cell and its baseline, with
    `in_domain` and `is_target` from `benchmark_scope`: one row per post-trained cell x benchmark of its baseline).
    """

    results_dirs: tuple[Path, ...]
    connection: duckdb.DuckDBPyConnection
    cells: list[Cell]
    baselines: dict[tuple[str, str], Cell]
    representations: dict[str, Representation]
    issues: list[str]
    axis_cells: list[Cell] = dataclasses.field(default_factory=list)

    @property
    def post_cells(self) -> list[Cell]:
        """The analysed post-trained cells at every axis' reference (each has a baseline)."""
        return [c for c in self.cells if not c.is_baseline]

    @property
    def all_post_cells(self) -> list[Cell]:
        """Every analysed post-trained cell: the reference ones and the axis cells."""
        return [*self.post_cells, *self.axis_cells]

    def cell(self, cell_id: str) -> Cell:
        """The analysed cell with this id."""
        for cell in [*self.cells, *self.axis_cells]:
            if cell.cell_id == cell_id:
                return cell
        raise KeyError(f"no analysed cell {cell_id!r}")

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run a query and return its rows as dicts."""
        cursor = self.connection.execute(sql, params or [])
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]

    def arrays(self, sql: str, params: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
        """Run a query and return its columns as numpy arrays (write NULLs away in SQL first)."""
        result = self.connection.execute(sql, params or []).fetchnumpy()
        return {name: np.asarray(values) for name, values in result.items()}


def _benchmark_info() -> pa.Table:
    """(benchmark, family, kind) of every registered benchmark."""
    from forgetjax.eval.benchmarks import get_benchmark, list_benchmarks

    names = list_benchmarks()
    return pa.table(
        {
            "benchmark": names,
            "family": [get_benchmark(n).category for n in names],
            "kind": [get_benchmark(n).kind for n in names],
        }
    )


def _cells_table(cells: Sequence[Cell], baselines: Mapping[tuple[str, str], Cell]) -> pa.Table:
    """The analysed cells as an Arrow table with each post-trained cell's baseline id."""
    rows = []
    for cell in cells:
        baseline = None if cell.is_baseline else baselines[cell.baseline_key].cell_id
        rows.append({**cell.meta(), "status": cell.status, "baseline_id": baseline})
    schema = pa.schema(
        [
            ("cell_id", pa.string()), ("start_point", pa.string()), ("scale", pa.string()), ("model", pa.string()),
            ("method", pa.string()), ("domain", pa.string()), ("seed", pa.int64()), ("axes", pa.string()),
            ("status", pa.string()), ("baseline_id", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


_EMPTY_RAW = """CREATE TABLE raw AS SELECT * FROM (VALUES (
    NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR,
    NULL::TINYINT, NULL::DOUBLE, NULL::DOUBLE[], NULL::INTEGER, NULL::DOUBLE, NULL::INTEGER, NULL::BIGINT,
    NULL::BOOLEAN, NULL::VARCHAR, NULL::VARCHAR)) AS t(filename, benchmark, category, item_id, prompt_hash, output,
    extracted_answer, correct, score, option_logprobs, chosen_option, confidence, k, output_tokens, refusal,
    refusal_judge, extra) WHERE false"""

_RECORDS_SQL = f"""
CREATE TABLE records AS
WITH typed AS (
    SELECT f.cell_id, r.benchmark, coalesce(r.category, '') AS category, r.item_id, r.prompt_hash, r.output,
           r.extracted_answer, r.correct, r.score, r.confidence, r.k, r.output_tokens, r.refusal, r.refusal_judge, r.extra,
           coalesce(b.family, json_extract_string(r.extra, '$.family'), 'unknown') AS family,
           coalesce(b.kind, CASE WHEN r.option_logprobs IS NOT NULL OR r.chosen_option IS NOT NULL
                                 THEN 'multiple_choice' WHEN r.refusal IS NOT NULL THEN 'safety'
                                 ELSE 'generate' END) AS kind,
           json_extract_string(r.extra, '$.format') AS format,
           TRY_CAST(json_extract_string(r.extra, '$.harmful') AS BOOLEAN) AS harmful_flag
    FROM raw r JOIN files f ON r.filename = f.path LEFT JOIN benchmark_info b ON b.benchmark = r.benchmark
)
SELECT * EXCLUDE (harmful_flag),
       CASE WHEN refusal IS NOT NULL THEN coalesce(harmful_flag, family <> 'over_refusal') END AS harmful,
       family NOT IN ({", ".join(repr(f) for f in NON_CAPABILITY_FAMILIES)}) AS is_capability,
       json_extract_string(extra, '$.attack') IS NOT NULL AS is_attack
FROM typed
"""

_PAIRED_SQL = """
CREATE TABLE paired AS
SELECT c.cell_id, c.start_point, c.scale, c.method, c.domain, c.seed,
       post.benchmark, pre.family, pre.kind, pre.category, post.item_id, pre.is_capability, pre.is_attack,
       coalesce(post.k, pre.k)::DOUBLE AS k,
       (pre.correct IS NOT NULL AND post.correct IS NOT NULL) AS is_binary,
       CASE WHEN pre.correct IS NOT NULL AND post.correct IS NOT NULL THEN pre.correct::DOUBLE
            WHEN isfinite(pre.score) AND isfinite(post.score) THEN pre.score END AS pre_value,
       CASE WHEN pre.correct IS NOT NULL AND post.correct IS NOT NULL THEN post.correct::DOUBLE
            WHEN isfinite(pre.score) AND isfinite(post.score) THEN post.score END AS post_value,
       pre.refusal AS pre_refusal, post.refusal AS post_refusal, pre.harmful,
       pre.prompt_hash <> post.prompt_hash AS prompt_changed, pre.format,
       s.in_domain, s.is_target
FROM cells c
JOIN records pre ON pre.cell_id = c.baseline_id
JOIN records post ON post.cell_id = c.cell_id AND post.benchmark = pre.benchmark AND post.item_id = pre.item_id
JOIN benchmark_scope s ON s.cell_id = c.cell_id AND s.benchmark = pre.benchmark
"""

_MIXED_FORMATS_SQL = """
SELECT DISTINCT post.benchmark, c.cell_id, c.baseline_id, pre.format, post.format
FROM cells c
JOIN records pre ON pre.cell_id = c.baseline_id
JOIN records post ON post.cell_id = c.cell_id AND post.benchmark = pre.benchmark AND post.item_id = pre.item_id
WHERE pre.format IS DISTINCT FROM post.format
ORDER BY ALL LIMIT 5
"""


def check_pair_formats(con: duckdb.DuckDBPyConnection) -> None:
    """Raise naming benchmark and cells where a cell's records and its baseline's were prompted differently."""
    mixed = con.execute(_MIXED_FORMATS_SQL).fetchall()
    if mixed:
        listed = "; ".join(f"{bench}: cell {cell!r} in {post!r} but its baseline {base!r} in {pre!r}"
                           for bench, cell, base, pre, post in mixed)
        raise UserError(f"pre/post records in different prompt formats (chat vs fewshot) cannot be paired: {listed}; "
                        "evaluate the cell and its baseline in one format (study eval_format)")


def results_dir_list(results_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """One results directory or several as a tuple of paths (each must exist; a directory named twice is an error)."""
    if isinstance(results_dirs, (str, os.PathLike)):
        results_dirs = [results_dirs]
    paths = tuple(Path(p) for p in results_dirs)
    if not paths:
        raise UserError("results_dir: give at least one results directory")
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"results_dir {path} is not a directory")
    resolved = [p.resolve() for p in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise UserError(f"results_dir {paths[index]} is given twice")
    return paths


def _cell_content(results_dir: Path, cell_id: str) -> dict[str, str]:
    """sha256 of every file the analysis reads from a cell (cell.json, eval records, representation.json)."""
    files = [cell_file(results_dir, cell_id), *record_files(results_dir, cell_id),
             representation_file(results_dir, cell_id)]
    root = cell_file(results_dir, cell_id).parent
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in files if path.is_file()}


def _merge_cells(results_dirs: Sequence[Path], issues: list[str]) -> tuple[list[Cell], dict[str, Path]]:
    """Every directory's cells merged by id with the directory each is read from; an id found twice with different
    content is a UserError naming both directories."""
    cells: dict[str, Cell] = {}
    homes: dict[str, Path] = {}
    for results_dir in results_dirs:
        found, notes = discover_cells(results_dir)
        issues.extend(notes if len(results_dirs) == 1 else [f"{results_dir}: {note}" for note in notes])
        for cell in found:
            if cell.cell_id not in homes:
                cells[cell.cell_id], homes[cell.cell_id] = cell, results_dir
                continue
            first = homes[cell.cell_id]
            mine, theirs = _cell_content(first, cell.cell_id), _cell_content(results_dir, cell.cell_id)
            if mine != theirs:
                differing = sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))
                raise UserError(
                    f"cell {cell.cell_id!r} is in both {first} and {results_dir} with different content "
                    f"({', '.join(differing)}); a cell id names one run, so keep one of the two")
            issues.append(f"cell {cell.cell_id!r} is in both {first} and {results_dir} with identical content; "
                          f"loaded once")
    return sorted(cells.values(), key=lambda c: c.cell_id), homes


def _benchmark_scope(con: duckdb.DuckDBPyConnection, cells: Sequence[Cell]) -> pa.Table:
    """(cell_id, benchmark, in_domain, is_target) for every post-trained cell and benchmark of its baseline."""
    benchmarks: dict[str, list[tuple[str, str]]] = {}
    for cell_id, benchmark, family in con.execute(
            "SELECT DISTINCT c.cell_id, r.benchmark, r.family FROM cells c JOIN records r ON r.cell_id = c.baseline_id "
            "ORDER BY ALL").fetchall():
        benchmarks.setdefault(cell_id, []).append((benchmark, family))
    rows = []
    for cell in cells:
        for benchmark, family in benchmarks.get(cell.cell_id, []):
            rows.append({"cell_id": cell.cell_id, "benchmark": benchmark,
                         "in_domain": is_in_domain(cell.domain, cell.targets, benchmark, family),
                         "is_target": benchmark in cell.targets})
    schema = pa.schema([("cell_id", pa.string()), ("benchmark", pa.string()), ("in_domain", pa.bool_()),
                        ("is_target", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


def _select_cells(
    homes: Mapping[str, Path], cells: Sequence[Cell], issues: list[str]
) -> tuple[list[Cell], dict[str, list[Path]], dict[tuple[str, str], Cell]]:
    """Keep done cells with records and a baseline; note every cell left out and why."""
    files: dict[str, list[Path]] = {}
    ready = []
    for cell in cells:
        if cell.status != DONE_STATUS:
            issues.append(f"cell {cell.cell_id!r} skipped: status {cell.status!r}")
            continue
        paths = record_files(homes[cell.cell_id], cell.cell_id)
        if not paths:
            where = cell_eval_dir(homes[cell.cell_id], cell.cell_id)
            issues.append(f"cell {cell.cell_id!r} skipped: no record files under {where}")
            continue
        files[cell.cell_id] = paths
        ready.append(cell)
    baselines: dict[tuple[str, str], Cell] = {}
    for cell in ready:
        if cell.is_baseline:
            if cell.baseline_key in baselines:
                other = baselines[cell.baseline_key].cell_id
                raise UserError(
                    f"two baseline cells for (start_point, scale) = {cell.baseline_key}: {other!r} in {homes[other]} "
                    f"and {cell.cell_id!r} in {homes[cell.cell_id]}; keep one"
                )
            baselines[cell.baseline_key] = cell
    analysed = []
    for cell in ready:
        if not cell.is_baseline and cell.baseline_key not in baselines:
            issues.append(
                f"cell {cell.cell_id!r} skipped: no finished baseline for (start_point, scale) = {cell.baseline_key}"
            )
            continue
        analysed.append(cell)
    return analysed, files, baselines


def load_study(
    results_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], threads: int = 2
) -> Study:
    """Read every cell.json of one or several results directories, load the records of the analysable cells into
    DuckDB and pair them with baselines."""
    dirs = results_dir_list(results_dirs)
    issues: list[str] = []
    all_cells, homes = _merge_cells(dirs, issues)
    cells, files, baselines = _select_cells(homes, all_cells, issues)
    con = duckdb.connect()
    con.execute(f"SET threads TO {max(1, int(threads))}")
    con.register("cells_source", _cells_table(cells, baselines))
    con.execute("CREATE TABLE cells AS SELECT * FROM cells_source")
    con.unregister("cells_source")
    file_rows = [{"path": str(p), "cell_id": cell_id} for cell_id, paths in files.items() for p in paths]
    files_schema = pa.schema([("path", pa.string()), ("cell_id", pa.string())])
    con.register("files_source", pa.Table.from_pylist(file_rows, schema=files_schema))
    con.execute("CREATE TABLE files AS SELECT * FROM files_source")
    con.unregister("files_source")
    con.register("benchmark_source", _benchmark_info())
    con.execute("CREATE TABLE benchmark_info AS SELECT * FROM benchmark_source")
    con.unregister("benchmark_source")
    if file_rows:
        relation = con.read_parquet([row["path"] for row in file_rows], filename=True, union_by_name=True)
        relation.create("raw")
    else:
        con.execute(_EMPTY_RAW)
    con.execute(_RECORDS_SQL)
    duplicates = con.execute(
        "SELECT cell_id, benchmark, item_id, count(*) AS n FROM records GROUP BY ALL HAVING n > 1 "
        "ORDER BY ALL LIMIT 5"
    ).fetchall()
    if duplicates:
        listed = "; ".join(f"cell {c!r} {b}/{i} x{n}" for c, b, i, n in duplicates)
        raise ValueError(f"duplicate records for the same (cell, benchmark, item_id): {listed}")
    con.register("scope_source", _benchmark_scope(con, cells))
    con.execute("CREATE TABLE benchmark_scope AS SELECT * FROM scope_source")
    con.unregister("scope_source")
    check_pair_formats(con)
    con.execute(_PAIRED_SQL)
    representations = {}
    for cell in cells:
        path = representation_file(homes[cell.cell_id], cell.cell_id)
        if path.is_file():
            representations[cell.cell_id] = read_representation(path)
    reference = [c for c in cells if c.is_baseline or c.axis_reference]
    return Study(dirs, con, reference, baselines, representations, issues,
                 axis_cells=[c for c in cells if not (c.is_baseline or c.axis_reference)])
