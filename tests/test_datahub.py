"""The data hub: the shipped manifest against the data pack, `data pull` against local copies of its sources
(only `download` is replaced), `data check`, and the converters on hand-built inputs."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from forgetjax.cli import main
from forgetjax.datahub import DataError, check, count_rows, load_manifest, pull
from forgetjax.datahub import fetch
from forgetjax.datahub.convert import reserialize_jsonl
from forgetjax.datahub.manifest import parse_manifest

REPO = Path(__file__).resolve().parents[1]
PACK = Path(os.environ.get("FORGETJAX_DATA_DIR", REPO.parent / "shared" / "data"))
STAGES = {"safety_stage", "representation"}


@pytest.fixture(scope="module")
def pack() -> Path:
    """The data pack; CI must have it, elsewhere its absence skips."""
    if not PACK.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"data pack {PACK} not found in CI")
        pytest.skip(f"data pack {PACK} not found (set FORGETJAX_DATA_DIR)")
    return PACK


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The shipped manifest and the data pack
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_manifest_agrees_with_the_pack_manifest(pack):
    with open(pack / "MANIFEST.tsv", newline="", encoding="utf-8") as handle:
        published = {row["file"]: row for row in csv.DictReader(handle, delimiter="\t")}
    entries = [entry for entry in load_manifest().entries if not entry.hub_only]
    assert entries and all(entry.path in published for entry in entries)
    assert not {entry.path for entry in load_manifest().entries if entry.hub_only} & published.keys()
    for entry in entries:
        row = published[entry.path]
        assert (entry.sha256, entry.rows, entry.license) == (row["sha256"], int(row["rows"]), row["license"])


def test_check_reports_every_pack_file_present_and_intact(pack, capsys):
    states = check(load_manifest().entries, pack)
    assert [s.entry.path for s in states if s.state != "present"] == [
        e.path for e in load_manifest().entries if e.hub_only]
    assert all(s.state == "missing" for s in states if s.entry.hub_only)
    assert main(["data", "check", "--data-dir", str(pack)]) == 1
    hub = sum(e.hub_only for e in load_manifest().entries)
    assert f"{len(states) - hub} present, {hub} missing, 0 altered" in capsys.readouterr().out


def test_row_counts_of_the_pack_files_equal_the_manifest(pack):
    entries = [e for e in load_manifest().entries if not e.hub_only]
    assert {e.path: count_rows(pack / e.path, e.format) for e in entries} == {e.path: e.rows for e in entries}


def test_consumers_are_the_benchmarks_sources_and_study_steps_that_read_the_files():
    from forgetjax.envs.problems import GENERATED, SOURCES
    from forgetjax.eval.benchmarks import get_benchmark, list_benchmarks

    benchmarks = {name for name in list_benchmarks() if get_benchmark(name).reads_data}
    sources = {source for by_domain in SOURCES.values() for source in by_domain}
    consumers = {name for entry in load_manifest().entries for name in entry.used_by}
    assert consumers <= benchmarks | sources | STAGES
    assert (benchmarks | sources | STAGES) - GENERATED <= consumers


def test_demo_set_holds_everything_the_demo_study_reads(pack, tmp_path):
    from forgetjax.study.safety import HELPFUL_SOURCES, safety_records
    from forgetjax.envs.problems import GENERATED, load_problems
    from forgetjax.eval.battery import load_battery
    from forgetjax.eval.benchmarks import get_benchmark
    from forgetjax.study.representation import probe_prompts
    from forgetjax.study.schema import load_study_config, study_domains

    study = load_study_config(REPO / "configs" / "studies" / "demo.yaml")
    battery = [entry.name for entry in load_battery(REPO / study.battery).entries]
    domains = study_domains(study)
    consumers = set(battery) | {domains[name].source for name in study.domains}
    consumers |= {"safety_stage"} if study.safety_stage.enabled else set()
    consumers |= {"representation"} if study.representation else set()
    manifest = load_manifest()
    demo = manifest.select(["demo"])
    assert set(manifest.select(sorted(consumers - GENERATED))) <= set(demo)

    for entry in demo:
        (tmp_path / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pack / entry.path, tmp_path / entry.path)
    for name in battery:
        assert get_benchmark(name).load(tmp_path), name
    for domain, source in HELPFUL_SOURCES:
        assert load_problems(domain, source, tmp_path, "train", limit=4)
    stage = study.safety_stage
    assert safety_records(tmp_path, stage.harmful_limit, stage.helpful_limit, stage.borderline_limit)
    harmful, harmless = probe_prompts(tmp_path, study.representation_probe)
    assert len(harmful) == len(harmless) == study.representation_probe


# ---------------------------------------------------------------------------------------------------------------
# `data pull` against local copies of the sources in their real URL layout
# ---------------------------------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
WHEEL_URL = "https://files.pythonhosted.org/packages/ab/cd/ef/toy_evals-1.0-py3-none-any.whl"
QA_JSONL = b'{"question": "Capital of France", "answer": ["Paris"]}\n{"question": "2+2", "answer": ["4"]}\n'
LABELS = b"0\n1\n1\n"
CRLF_JSONL = b'{"task_id": 1,"text":"caf\xc3\xa9"}\r\n{"task_id": 2, "text": "tea"}'
CONVERTED_JSONL = b'{"task_id": 1, "text": "caf\\u00e9"}\n{"task_id": 2, "text": "tea"}\n'
HARMFUL_JSONL = b'{"prompt": "Do harm"}\n'
MC_CSV = b'question,choice0,choice1,answer\n"Two\nlines",a,b,0\nOne line,a,b,1\n'


class Remote:
    """Source files under <root>/<host>/<url path>, served by a stand-in for `fetch.download`."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[str] = []
        self.fail_after: dict[str, int] = {}

    def put(self, url: str, data: bytes) -> None:
        path = self.path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def path(self, url: str) -> Path:
        parsed = urlparse(url)
        return self.root / parsed.netloc / unquote(parsed.path).lstrip("/")

    def download(self, url: str, sink) -> None:
        self.calls.append(url)
        data = self.path(url).read_bytes()
        if url in self.fail_after:
            sink.write(data[: self.fail_after[url]])
            raise ConnectionResetError("connection reset by peer")
        sink.write(data)


def wheel_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def github_url(repo: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{COMMIT}/{path}"


def toy_document(wheel: bytes) -> dict:
    def entry(path, fmt, rows, data, source, transform=None, used_by=("toy",)):
        return {"path": path, "dataset": path.split("/")[0], "used_by": list(used_by), "format": fmt, "rows": rows,
                "sha256": sha256(data), "license": "MIT", "source": source, "transform": transform,
                "provenance": "test fixture"}

    def github(path, **extra):
        return {"kind": "github", "repo": "someone/toy", "commit": COMMIT, "path": path, **extra}

    def member(name):
        return {"kind": "pypi_wheel", "package": "toy-evals", "version": "1.0", "url": WHEEL_URL,
                "sha256": sha256(wheel), "member": f"toy_evals/data/{name}"}

    return {"sets": {"small": ["qa", "refusal"]}, "entries": [
        entry("qa/dev.jsonl", "jsonl", 2, QA_JSONL, github("data/qa dev.jsonl"), used_by=["qa"]),
        entry("qa/labels.lst", "lines", 3, LABELS, github("data/labels.lst")),
        entry("code/tasks.jsonl", "jsonl", 2, CONVERTED_JSONL, github("tasks.jsonl", sha256=sha256(CRLF_JSONL)),
              transform="reserialize_jsonl"),
        entry("harm/harmful.jsonl", "jsonl", 1, HARMFUL_JSONL, member("harmful.jsonl"), used_by=["refusal"]),
        entry("mc/test.csv", "csv", 2, MC_CSV, member("test.csv")),
    ]}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """(manifest, remote, data dir) for a toy manifest whose sources are served from tmp_path/remote."""
    remote = Remote(tmp_path / "remote")
    wheel = wheel_bytes({"toy_evals/data/harmful.jsonl": HARMFUL_JSONL, "toy_evals/data/test.csv": MC_CSV,
                         "toy_evals/__init__.py": b""})
    remote.put(github_url("someone/toy", "data/qa dev.jsonl"), QA_JSONL)
    remote.put(github_url("someone/toy", "data/labels.lst"), LABELS)
    remote.put(github_url("someone/toy", "tasks.jsonl"), CRLF_JSONL)
    remote.put(WHEEL_URL, wheel)
    monkeypatch.setattr(fetch, "download", remote.download)
    return parse_manifest(toy_document(wheel)), remote, tmp_path / "data"


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pull_writes_the_verified_layout_and_fetches_each_source_once(toy):
    manifest, remote, data = toy
    outcomes = pull(manifest.entries, data)
    assert [o.action for o in outcomes] == ["pulled"] * 5
    assert files_under(data) == {"qa/dev.jsonl": QA_JSONL, "qa/labels.lst": LABELS,
                                 "code/tasks.jsonl": CONVERTED_JSONL, "harm/harmful.jsonl": HARMFUL_JSONL,
                                 "mc/test.csv": MC_CSV}
    assert remote.calls.count(WHEEL_URL) == 1 and len(remote.calls) == 4
    assert remote.calls[0] == f"https://raw.githubusercontent.com/someone/toy/{COMMIT}/data/qa%20dev.jsonl"
    assert {s.state for s in check(list(manifest.entries), data)} == {"present"}


def test_pull_resumes_by_skipping_verified_files(toy):
    manifest, remote, data = toy
    pull(manifest.select(["qa"]), data)
    remote.calls.clear()
    outcomes = pull(manifest.entries, data)
    assert [o.action for o in outcomes] == ["skipped", "skipped", "pulled", "pulled", "pulled"]
    assert len(remote.calls) == 2


def test_pull_refuses_a_source_that_does_not_match_the_manifest(toy):
    manifest, remote, data = toy
    changed = QA_JSONL + b'{"question": "new", "answer": ["x"]}\n'
    remote.put(github_url("someone/toy", "data/qa dev.jsonl"), changed)
    [outcome] = pull(manifest.select(["qa/dev.jsonl"]), data)
    assert outcome.action == "failed"
    assert outcome.detail == (f"qa/dev.jsonl: fetched file does not match the manifest: 3 rows (expected 2), "
                              f"sha256 {sha256(changed)} (expected {sha256(QA_JSONL)})")
    assert files_under(data) == {}


def test_pull_refuses_a_wheel_whose_sha256_differs_and_downloads_it_once(toy):
    manifest, remote, data = toy
    other = wheel_bytes({"toy_evals/data/harmful.jsonl": HARMFUL_JSONL, "toy_evals/data/test.csv": MC_CSV})
    remote.put(WHEEL_URL, other)
    outcomes = pull(manifest.select(["harm", "mc"]), data)
    expected = manifest.select(["harm"])[0].source.sha256
    assert [o.action for o in outcomes] == ["failed", "failed"]
    assert [o.detail for o in outcomes] == [f"{path}: toy-evals==1.0 wheel {WHEEL_URL} has sha256 {sha256(other)} "
                                            f"(expected {expected})" for path in ("harm/harmful.jsonl", "mc/test.csv")]
    assert remote.calls == [WHEEL_URL] and files_under(data) == {}


def test_a_download_that_fails_midway_leaves_no_partial_file(toy):
    manifest, remote, data = toy
    url = github_url("someone/toy", "tasks.jsonl")
    remote.fail_after[url] = 10
    outcomes = pull(manifest.entries, data)
    assert [o.action for o in outcomes] == ["pulled", "pulled", "failed", "pulled", "pulled"]
    assert outcomes[2].detail == (f"code/tasks.jsonl: download of {url} failed "
                                  "(ConnectionResetError: connection reset by peer)")
    assert sorted(files_under(data)) == ["harm/harmful.jsonl", "mc/test.csv", "qa/dev.jsonl", "qa/labels.lst"]
    assert sorted(p.name for p in data.iterdir()) == ["harm", "mc", "qa"]
    del remote.fail_after[url]
    assert [o.action for o in pull(manifest.entries, data)] == ["skipped"] * 2 + ["pulled"] + ["skipped"] * 2


def test_pull_refuses_to_replace_an_altered_file_unless_forced(toy):
    manifest, _, data = toy
    entries = manifest.select(["qa/labels.lst"])
    pull(entries, data)
    altered = b"1\n1\n1\n"
    (data / "qa" / "labels.lst").write_bytes(altered)
    [outcome] = pull(entries, data)
    assert outcome.action == "failed"
    assert outcome.detail == (f"qa/labels.lst: already present but sha256 {sha256(altered)} "
                              f"(expected {sha256(LABELS)}); --force replaces it")
    assert [o.action for o in pull(entries, data, force=True)] == ["pulled"]
    assert (data / "qa" / "labels.lst").read_bytes() == LABELS


def test_cli_pull_check_and_list(toy, monkeypatch, capsys):
    manifest, _, data = toy
    import forgetjax.datahub.cli as data_cli

    monkeypatch.setattr(data_cli, "load_manifest", lambda: manifest)
    assert main(["data", "check", "small", "--data-dir", str(data)]) == 1
    assert "0 present, 3 missing, 0 altered" in capsys.readouterr().out
    assert main(["data", "pull", "small", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"3 pulled, 0 skipped, 0 failed in {data}"
    (data / "qa" / "dev.jsonl").write_bytes(b"{}\n")
    assert main(["data", "check", "--data-dir", str(data)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("altered  qa/dev.jsonl  (sha256 ")
    assert lines[-1].startswith(f"2 present, 2 missing, 1 altered in {data}")
    assert main(["data", "pull", "--data-dir", str(data)]) == 1
    assert "failed   qa/dev.jsonl: already present but sha256" in capsys.readouterr().err
    assert main(["data", "list", "refusal"]) == 0
    assert capsys.readouterr().out.split("\t") == ["harm/harmful.jsonl", "1 rows", "MIT",
                                                   "pypi toy-evals==1.0 toy_evals/data/harmful.jsonl\n"]


def test_shipped_manifest_pulls_mbpp_through_its_converter(pack, tmp_path, monkeypatch):
    """The real entries of a converted and a copied file, served as their pinned sources publish them."""
    remote = Remote(tmp_path / "remote")
    monkeypatch.setattr(fetch, "download", remote.download)
    entries = load_manifest().select(["mbpp/mbpp.jsonl", "piqa"])
    for entry in entries:
        data = (pack / entry.path).read_bytes()
        if entry.transform:  # the MBPP copy: CRLF line ends, no final newline
            data = b"\r\n".join(data.rstrip(b"\n").split(b"\n"))
            assert sha256(data) == entry.source.sha256
        remote.put(entry.source.url, data)
    assert [o.action for o in pull(entries, tmp_path / "data")] == ["pulled"] * 3
    assert {s.state for s in check(entries, tmp_path / "data")} == {"present"}


def test_download_streams_a_url_into_the_sink(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 << 20))
    sink = io.BytesIO()
    fetch.download(source.as_uri(), sink)
    assert sink.getvalue() == source.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Manifest parsing and selection
# ---------------------------------------------------------------------------------------------------------------


def test_select_expands_sets_and_names_the_unknown_name():
    manifest = parse_manifest(toy_document(b"wheel"))
    assert [e.path for e in manifest.select(["small"])] == ["qa/dev.jsonl", "qa/labels.lst", "harm/harmful.jsonl"]
    assert [e.path for e in manifest.select(["code", "qa/labels.lst"])] == ["qa/labels.lst", "code/tasks.jsonl"]
    with pytest.raises(DataError, match=r"^'nope': no manifest entry has this dataset, consumer, set or path"):
        manifest.select(["nope"])


@pytest.mark.parametrize("change, message", [
    ({"commit": "0123abc"}, "commit '0123abc' is not a full 40-hex sha"),
    ({"kind": "hf_hub"}, "source kind 'hf_hub' is not one of github, pypi_wheel"),
    ({"sha256": None}, "a converted source needs its sha256"),
])
def test_manifest_rejects_unpinned_or_unknown_sources(change, message):
    document = toy_document(b"wheel")
    document["entries"][2]["source"].update(change)
    with pytest.raises(DataError, match=rf"^manifest entry 2 \(code/tasks.jsonl\): {message}"):
        parse_manifest(document)


def test_manifest_rejects_an_unknown_transform_and_a_path_outside_the_data_dir():
    document = toy_document(b"wheel")
    document["entries"][2]["transform"] = "guess"
    with pytest.raises(DataError, match="transform 'guess' is not one of reserialize_jsonl"):
        parse_manifest(document)
    document = toy_document(b"wheel")
    document["entries"][0]["path"] = "../escape.jsonl"
    with pytest.raises(DataError, match="path must stay inside the data directory"):
        parse_manifest(document)


# ---------------------------------------------------------------------------------------------------------------
# Converters and row counts on hand-built files
# ---------------------------------------------------------------------------------------------------------------


def test_reserialize_jsonl_normalises_line_ends_spacing_and_escapes():
    source = b'{"a":1,"b":"\xc3\xa9"}\r\n\r\n{"c": [1,2], "d": null}'
    assert reserialize_jsonl(source) == b'{"a": 1, "b": "\\u00e9"}\n{"c": [1, 2], "d": null}\n'
    assert reserialize_jsonl(b'{"x": 1}\n') == b'{"x": 1}\n'
    with pytest.raises(ValueError):
        reserialize_jsonl(b'{"x": 1}\n{broken\n')


def test_count_rows_per_format(tmp_path):
    def write(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    assert count_rows(write("a.jsonl", b'{"x": 1}\n\n{"x": 2}\n'), "jsonl") == 2
    assert count_rows(write("a.jsonl.gz", gzip.compress(b'{"x": 1}\n')), "jsonl") == 1
    assert count_rows(write("a.csv", b"\xef\xbb\xbfq,a\n\"multi\nline\",1\nplain,2\n"), "csv") == 2
    assert count_rows(write("a.json", json.dumps([{"x": 1}, {"x": 2}, {"x": 3}]).encode()), "json") == 3
    assert count_rows(write("a.tsv", b"question one\t1\nquestion \"two\t2\n"), "lines") == 2
    assert count_rows(write("task.json", json.dumps({"canary": "c", "examples": [{}, {}]}).encode()),
                      "json_examples") == 2
    with pytest.raises(DataError, match="invalid JSON"):
        count_rows(write("bad.jsonl", b'{"x": 1}\n{nope\n'), "jsonl")


def test_hellaswag_converter_writes_rowanz_layout_from_an_arrow_stream():
    import gzip
    import io

    import pyarrow as pa

    from forgetjax.datahub.convert import hellaswag_arrow_to_jsonl_gz

    table = pa.table({"ind": [24], "activity_label": ["Roof"], "ctx_a": ["A man."], "ctx_b": ["he"],
                      "ctx": ["A man. he"], "endings": [["a", "b", "c", "d"]], "source_id": ["s~1"],
                      "split": ["val"], "split_type": ["indomain"], "label": ["3"]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    converted = hellaswag_arrow_to_jsonl_gz(sink.getvalue())
    assert converted[:4] == b"\x1f\x8b\x08\x00" and converted[9:10] == b"\x03"  # gzip -n: no name, mtime 0, Unix
    assert gzip.decompress(converted).decode() == (
        '{"ind": 24, "activity_label": "Roof", "ctx_a": "A man.", "ctx_b": "he", "ctx": "A man. he", '
        '"split": "val", "split_type": "indomain", "label": 3, "endings": ["a", "b", "c", "d"], '
        '"source_id": "s~1"}\n')
