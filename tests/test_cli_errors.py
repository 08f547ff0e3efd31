"""Malformed input through the `forgetjax` command line (issue #15, "Errors and the door").

Every case must end with exit status 2 and a `forgetjax <command>: error: ...` message that names the offending
file, field, flag or index, print no traceback, load no model and write nothing (the inputs and the working
directory are compared before and after). All checks run before any weights are read, so the file stays fast.
"""
from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

import forgetjax
from forgetjax import cli
from forgetjax.convert.safetensors_io import save_file

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16, "max_position_embeddings": 32,
               "rms_norm_eps": 1e-6}


def _model_dir(path: Path, config: dict | str | None = TINY_CONFIG, weights: bytes | None = None) -> Path:
    """A model directory: config.json (a dict, raw text, or none) and model.safetensors (valid, raw bytes)."""
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is None:
        save_file({"model.embed_tokens.weight": np.zeros((16, 8), np.float32)}, path / "model.safetensors")
    elif weights:
        (path / "model.safetensors").write_bytes(weights)
    return path


def _safetensors_bytes(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data


@pytest.fixture(scope="session")
def fx(tmp_path_factory) -> Path:
    """Read-only inputs shared by all cases: model directories (valid and broken), prompts, configs, batteries."""
    root = tmp_path_factory.mktemp("cli_errors_inputs")
    _model_dir(root / "model")
    _model_dir(root / "no_weights", weights=b"")
    (root / "empty_dir").mkdir()
    _model_dir(root / "truncated", weights=b"\x10\x00\x00")
    _model_dir(root / "huge_header", weights=_safetensors_bytes({}, header_len=10**12))
    entry = {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 512]}
    _model_dir(root / "past_eof", weights=_safetensors_bytes({"model.embed_tokens.weight": entry}, b"\0" * 64))
    _model_dir(root / "bad_dtype", weights=_safetensors_bytes(
        {"model.embed_tokens.weight": {**entry, "dtype": "F128"}}, b"\0" * 512))
    _model_dir(root / "size_mismatch", weights=_safetensors_bytes(
        {"model.embed_tokens.weight": {**entry, "shape": [16, 16]}}, b"\0" * 512))
    _model_dir(root / "bad_shape", weights=_safetensors_bytes(
        {"model.embed_tokens.weight": {**entry, "shape": [16, -8]}}, b"\0" * 512))
    _model_dir(root / "garbled_header", weights=_safetensors_bytes(b"{not json at all", b""))
    _model_dir(root / "bad_config_json", config="{\"model_type\": ")
    _model_dir(root / "gpt2_config", config={**TINY_CONFIG, "model_type": "gpt2"})
    (root / "half_ckpt" / "params").mkdir(parents=True)
    (root / "weights.bin").write_bytes(b"\0" * 16)
    (root / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 16)
    (root / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (root / "corrupt.jsonl").write_text('{"prompt": "hi"}\n{"prompt": oops}\n')
    (root / "no_field.jsonl").write_text('{"text": "hi"}\n')
    (root / "bad_messages.jsonl").write_text('{"messages": "hi"}\n')
    (root / "empty.jsonl").write_text("\n")
    (root / "battery.yaml").write_text("name: tiny\nbenchmarks: [piqa]\n")
    (root / "unknown_benchmark.yaml").write_text("benchmarks: [piqa, no_such_benchmark]\n")
    (root / "not_results").mkdir()
    (root / "not_results" / "notes.txt").write_text("not a study\n")
    (root / "plain.txt").write_text("a file\n")
    run = {"train": {"model": str(root / "model"), "out_dir": "runs/train", "budget": {"kind": "steps", "value": 1}},
           "method": "gt_sft", "domain": {"name": "math", "source": "word_problems"}}
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    (root / "typo_top.yaml").write_text(yaml.safe_dump({**run, "trian": {}}))
    (root / "typo_nested.yaml").write_text(yaml.safe_dump({**run, "train": {**run["train"], "optimizer": {"lrr": 1}}}))
    (root / "wrong_type.yaml").write_text(yaml.safe_dump({**run, "train": {**run["train"], "max_length": "long"}}))
    (root / "list.yaml").write_text("- train\n- method\n")
    (root / "invalid.yaml").write_text("train: [1,\n")
    (root / "cycle.yaml").write_text("base: cycle.yaml\n")
    study = {"name": "tiny", "results_dir": "runs/study", "data_dir": str(root),
             "models": [{"scale": "tiny", "safe": str(root / "model")}], "scales": ["tiny"],
             "start_points": ["safe"], "methods": ["gt_sft"], "domains": ["math"], "seeds": [0],
             "budget": {"kind": "steps", "value": 1}, "battery": str(root / "battery.yaml"),
             "safety_stage": {"enabled": True}}
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    (root / "study_missing_model.yaml").write_text(yaml.safe_dump(
        {**study, "models": [{"scale": "tiny", "safe": str(root / "gone")}]}))
    return root


def _snapshot(*roots: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for root in roots for p in root.rglob("*")}


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Any model load inside a case is a failure: every error here must be found before weights are read."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a malformed-input case loaded a model")

    monkeypatch.setattr(forgetjax, "load", refuse)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # {fx}: the shared inputs, {tmp}: this case's own directory (also the working directory)
    names: tuple[str, ...]  # what the error message must name


def C(case_id: str, command: str, *names: str) -> Case:
    return Case(case_id, command, names)


GEN = "generate {fx}/model --prompts {fx}/prompts.jsonl --out {tmp}/out.jsonl"
STUDY = "study {fx}/study.yaml"
EVAL = "eval {fx}/model --battery {fx}/battery.yaml --out {tmp}/eval --data-dir {fx}"
CASES = [
    # configs: typos, types, overrides, files
    C("train-typo-top-level-key", "train {fx}/typo_top.yaml", "trian", "did you mean train"),
    C("train-typo-nested-key-in-file", "train {fx}/typo_nested.yaml", "train.optimizer.lrr", "did you mean lr"),
    C("train-typo-nested-override", "train {fx}/run.yaml train.optimizer.lrr=1e-5", "train.optimizer.lrr"),
    C("train-unknown-override-section", "train {fx}/run.yaml nonsense.key=1", "nonsense"),
    C("train-wrong-type-in-file", "train {fx}/wrong_type.yaml", "train.max_length", "long"),
    C("train-wrong-type-override", "train {fx}/run.yaml train.batch_size=abc", "train.batch_size", "abc"),
    C("train-bad-literal", "train {fx}/run.yaml train.dtype=float64", "train.dtype", "float64"),
    C("train-override-without-equals", "train {fx}/run.yaml train.batch_size", "train.batch_size", "key=value"),
    C("train-override-empty-key-part", "train {fx}/run.yaml train..lr=1", "train..lr"),
    C("train-override-bad-yaml-value", "train {fx}/run.yaml train.batch_size=[1,", "train.batch_size"),
    C("train-override-through-scalar", "train {fx}/run.yaml method.x=1", "method"),
    C("train-negative-budget", "train {fx}/run.yaml train.budget.value=-5", "budget", "-5"),
    C("train-zero-batch-size", "train {fx}/run.yaml train.batch_size=0", "batch_size=0"),
    C("train-unknown-method", "train {fx}/run.yaml method=gt_sfft", "method", "gt_sfft"),
    C("train-unknown-method-arg", "train {fx}/run.yaml method_args.pakcing=true", "method_args", "pakcing"),
    C("train-missing-config", "train {tmp}/nope.yaml", "nope.yaml"),
    C("train-config-is-directory", "train {fx}/empty_dir", "empty_dir"),
    C("train-invalid-yaml", "train {fx}/invalid.yaml", "invalid.yaml"),
    C("train-config-not-a-mapping", "train {fx}/list.yaml", "list.yaml", "mapping"),
    C("train-base-include-cycle", "train {fx}/cycle.yaml", "cycle.yaml", "cycle"),
    C("train-missing-model", "train {fx}/run.yaml train.model={tmp}/gone", "train.model", "gone"),
    C("train-out-dir-is-file", "train {fx}/run.yaml train.out_dir={fx}/plain.txt", "train.out_dir", "plain.txt"),
    # model sources
    C("model-missing-path", "generate {tmp}/gone --prompts {fx}/prompts.jsonl --out {tmp}/o.jsonl", "gone"),
    C("model-dir-without-weights", "generate {fx}/no_weights --prompts {fx}/prompts.jsonl --out {tmp}/o.jsonl",
      "no_weights", "no weights"),
    C("model-empty-dir", "chat {fx}/empty_dir hello", "empty_dir", "config.json"),
    C("model-truncated-safetensors", "chat {fx}/truncated hi", "truncated/model.safetensors", "truncated"),
    C("model-lying-header-length", "chat {fx}/huge_header hi", "huge_header/model.safetensors", "1000000000000"),
    C("model-offsets-past-eof", "chat {fx}/past_eof hi", "past_eof/model.safetensors", "model.embed_tokens"),
    C("model-unknown-tensor-dtype", "chat {fx}/bad_dtype hi", "bad_dtype/model.safetensors", "F128"),
    C("model-offsets-disagree-with-shape", "chat {fx}/size_mismatch hi", "size_mismatch/model.safetensors",
      "model.embed_tokens"),
    C("model-negative-shape", "chat {fx}/bad_shape hi", "bad_shape/model.safetensors", "shape"),
    C("model-garbled-header", "chat {fx}/garbled_header hi", "garbled_header/model.safetensors", "header"),
    C("model-config-json-invalid", "chat {fx}/bad_config_json hi", "bad_config_json/config.json"),
    C("model-unsupported-architecture", "chat {fx}/gpt2_config hi", "gpt2"),
    C("model-incomplete-checkpoint", "chat {fx}/half_ckpt hi", "half_ckpt", "incomplete"),
    C("model-file-not-gguf", "chat {fx}/weights.bin hi", "weights.bin", ".gguf"),
    C("model-gguf-bad-magic", "chat {fx}/fake.gguf hi", "fake.gguf", "GGUF"),
    C("model-unknown-embedded-name", "chat embedded:smollm9 hi", "smollm9"),
    # generate and chat flags
    C("generate-batch-size-zero", GEN + " --batch-size 0", "--batch-size"),
    C("generate-batch-size-negative", GEN + " --batch-size -3", "--batch-size", "-3"),
    C("generate-batch-size-not-int", GEN + " --batch-size many", "--batch-size", "many"),
    C("generate-n-zero", GEN + " --n 0", "--n"),
    C("generate-max-new-tokens-zero", GEN + " --max-new-tokens 0", "--max-new-tokens"),
    C("generate-negative-temperature", GEN + " --temperature -1", "--temperature"),
    C("generate-nan-temperature", GEN + " --temperature nan", "--temperature", "nan"),
    C("generate-top-p-zero", GEN + " --top-p 0", "--top-p"),
    C("generate-top-p-above-one", GEN + " --top-p 1.5", "--top-p", "1.5"),
    C("generate-negative-top-k", GEN + " --top-k -1", "--top-k"),
    C("generate-corrupt-prompts-line", "generate {fx}/model --prompts {fx}/corrupt.jsonl --out {tmp}/o.jsonl",
      "corrupt.jsonl:2", "JSON"),
    C("generate-prompt-field-missing", "generate {fx}/model --prompts {fx}/no_field.jsonl --out {tmp}/o.jsonl",
      "no_field.jsonl:1", "prompt"),
    C("generate-messages-not-a-list", "generate {fx}/model --prompts {fx}/bad_messages.jsonl --out {tmp}/o.jsonl",
      "bad_messages.jsonl:1", "messages"),
    C("generate-empty-prompts", "generate {fx}/model --prompts {fx}/empty.jsonl --out {tmp}/o.jsonl",
      "empty.jsonl", "no prompts"),
    C("generate-missing-prompts", "generate {fx}/model --prompts {tmp}/none.jsonl --out {tmp}/o.jsonl",
      "--prompts", "none.jsonl"),
    C("generate-prompts-is-directory", "generate {fx}/model --prompts {fx}/empty_dir --out {tmp}/o.jsonl",
      "--prompts", "empty_dir"),
    C("generate-out-parent-missing", "generate {fx}/model --prompts {fx}/prompts.jsonl --out {tmp}/a/b/o.jsonl",
      "--out", "a/b"),
    C("generate-out-is-directory", "generate {fx}/model --prompts {fx}/prompts.jsonl --out {fx}/empty_dir",
      "--out", "empty_dir"),
    C("generate-unknown-flag", GEN + " --temprature 0.5", "--temprature"),
    C("chat-negative-temperature", "chat {fx}/model hi --temperature -0.5", "--temperature"),
    # convert and export
    C("convert-unknown-format", "convert {fx}/model {tmp}/ckpt --format onnx", "--format", "onnx"),
    C("convert-unknown-dtype", "convert {fx}/model {tmp}/ckpt --dtype float64", "--dtype", "float64"),
    C("convert-out-is-a-file", "convert {fx}/model {fx}/plain.txt", "OUT", "plain.txt"),
    C("convert-out-is-the-source", "convert {fx}/model {fx}/model", "OUT", "model source itself"),
    C("export-non-checkpoint-dir", "export {fx}/not_results {tmp}/hf", "CKPT", "not_results"),
    C("export-plain-file", "export {fx}/plain.txt {tmp}/hf", "CKPT", "plain.txt"),
    C("export-zero-shard-size", "export {fx}/model {tmp}/hf --max-shard-gb 0", "--max-shard-gb"),
    C("export-unknown-export-dtype", "export {fx}/model {tmp}/hf --export-dtype int8", "--export-dtype", "int8"),
    # study
    C("study-cell-index-out-of-range", STUDY + " --cell-index 99", "--cell-index 99", "0 to 1"),
    C("study-cell-index-negative", STUDY + " --cell-index -1", "--cell-index -1"),
    C("study-cell-index-out-of-range-dry-run", STUDY + " --dry-run --cell-index 7", "--cell-index 7"),
    C("study-cell-index-with-slurm", STUDY + " --executor slurm --cell-index 0", "--cell-index", "slurm"),
    C("study-unknown-executor-flag", STUDY + " --executor k8s", "--executor", "k8s"),
    C("study-unknown-executor-override", STUDY + " executor=k8s", "executor", "k8s"),
    C("study-unknown-method", STUDY + " methods=[gt_sft,sft9]", "methods", "sft9"),
    C("study-unknown-scale", STUDY + " scales=[huge]", "scales", "huge"),
    C("study-negative-budget", STUDY + " budget.value=-1", "budget", "-1"),
    C("study-typo-key", STUDY + " seeeds=[1]", "seeeds", "did you mean seeds"),
    C("study-unknown-flag", STUDY + " --dry-rn", "--dry-rn"),
    C("study-unknown-battery", STUDY + " battery={tmp}/nope.yaml --dry-run", "battery", "nope.yaml"),
    C("study-unknown-benchmark", STUDY + " battery={fx}/unknown_benchmark.yaml --dry-run", "no_such_benchmark"),
    C("study-missing-data-dir", STUDY + " data_dir={tmp}/nodata --dry-run", "data_dir", "nodata"),
    C("study-missing-model", "study {fx}/study_missing_model.yaml --dry-run", "models[tiny].safe", "gone"),
    C("study-missing-config", "study {tmp}/nope.yaml --list", "nope.yaml"),
    C("study-list-optimizer-typo", STUDY + " --list train.optimizer.lrr=1e-5", "study.yaml", "train.optimizer.lrr",
      "did you mean lr"),
    C("study-list-dpo-arg-typo", STUDY + " --list methods=[off_rl_dpo] method_args.off_rl_dpo.betta=0.2",
      "study.yaml", "method_args.off_rl_dpo.betta", "did you mean beta"),
    # eval
    C("eval-unknown-battery-name", "eval {fx}/model --battery no_such_battery --out {tmp}/e --data-dir {fx}",
      "--battery", "no_such_battery"),
    C("eval-unknown-benchmark", "eval {fx}/model --battery {fx}/unknown_benchmark.yaml --out {tmp}/e "
                                "--data-dir {fx}", "no_such_benchmark"),
    C("eval-zero-batch-size", EVAL + " --batch-size 0", "--batch-size"),
    C("eval-zero-limit", EVAL + " --limit 0", "--limit"),
    C("eval-missing-data-dir", "eval {fx}/model --battery {fx}/battery.yaml --out {tmp}/e --data-dir {tmp}/no",
      "--data-dir"),
    C("eval-missing-model", "eval {tmp}/gone --battery {fx}/battery.yaml --out {tmp}/e --data-dir {fx}",
      "MODEL", "gone"),
    C("eval-broken-judge", EVAL + " --judge {fx}/truncated", "--judge", "truncated"),
    C("eval-unknown-backend", EVAL + " --backend vllm", "--backend", "vllm"),
    # report and plan
    C("report-not-a-results-dir", "report {fx}/not_results --out {tmp}/r", "not_results", "cells/"),
    C("report-missing-dir", "report {tmp}/nothing --out {tmp}/r", "nothing"),
    C("report-zero-resamples", "report {fx}/not_results --out {tmp}/r --resamples 0", "--resamples"),
    C("plan-unknown-topology", "plan {fx}/study.yaml --topology v9-3", "--topology", "v9-3"),
    C("plan-unknown-device-kind", "plan {fx}/study.yaml --topology gpu:8:x9000", "--topology", "x9000"),
    C("plan-zero-devices", "plan {fx}/study.yaml --topology gpu:0", "--topology", "gpu:0"),
    C("plan-zero-rollout-len", "plan {fx}/study.yaml --topology v5e-8 --rollout-len 0", "--rollout-len"),
    C("plan-zero-teacher-prompt-len", "plan {fx}/study.yaml --topology v5e-8 --teacher-prompt-len 0",
      "--teacher-prompt-len"),
    # the command itself
    C("unknown-command", "trian {fx}/run.yaml", "trian", "invalid choice"),
]


def run_case(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_fuzz_covers_at_least_fifty_distinct_inputs():
    assert len(CASES) >= 50 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed_input_gets_one_clear_error(case, fx, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = shlex.split(case.command.format(fx=fx, tmp=cwd))
    before = _snapshot(fx, tmp_path)
    code, out, err = run_case(argv, capsys)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err
    prefix = "forgetjax: error: " if case.id == "unknown-command" else f"forgetjax {argv[0]}: error: "
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for name in case.names:
        assert name in err, f"{name!r} not named in: {err}"
    assert _snapshot(fx, tmp_path) == before, "a failing command wrote files"


def test_overrides_may_follow_flags_and_dry_run_writes_nothing(fx, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_case(["study", str(fx / "study.yaml"), "--dry-run", "seeds=[0,1]"], capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 3 and "nothing was written" in err  # a baseline and gt_sft with two seeds
    code, out, _ = run_case(["study", str(fx / "study.yaml"), "seeds=[0,1]", "--dry-run", "--cell-index", "2"],
                            capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["2"]
    code, out, err = run_case(["study", str(fx / "study.yaml"), "--executor", "slurm", "--dry-run", "seeds=[0,1]"],
                              capsys)
    assert code == 0 and "#SBATCH --array=0-2" in out and "seeds=[0,1]" in out and "launch/slurm_array.sh" in err
    assert list(tmp_path.iterdir()) == []


def test_the_runner_checks_the_cell_index_before_training_or_writing(fx, tmp_path):
    from forgetjax.errors import UserError
    from forgetjax.study.runner import StudyRunner
    from forgetjax.study.schema import load_study_config

    cfg = load_study_config(fx / "study.yaml", [f"results_dir={tmp_path / 'results'}"])
    for index in (2, -1):
        with pytest.raises(UserError, match=f"--cell-index {index}: out of range"):
            StudyRunner(cfg).run(only_index=index)
    assert not (tmp_path / "results").exists()


def test_debug_shows_the_traceback_and_bugs_exit_1_with_a_hint(fx, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["plan", str(fx / "study.yaml"), "--topology", "v9-3"]
    code, _, err = run_case(argv + ["--debug"], capsys)
    assert code == 2 and "Traceback" in err and "forgetjax plan: error: --topology" in err

    def broken(args):
        raise RuntimeError("internal invariant broken\nsecond line")

    monkeypatch.setattr(cli, "cmd_plan", broken)
    code, _, err = run_case(argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert "forgetjax plan: error: RuntimeError: internal invariant broken\n" in err and "--debug" in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    code, _, err = run_case(argv, capsys)
    assert code == 1 and "Traceback" in err and "second line" in err


def test_a_data_dir_change_is_not_served_from_prepared_data(tmp_path):
    from forgetjax.config import load_config
    from forgetjax.errors import UserError
    from forgetjax.methods.sft import domain_settings
    from forgetjax.methods.teacher_data import DataCache
    from forgetjax.study.matrix import safety_stage_id
    from forgetjax.study.schema import StudyConfig
    from forgetjax.methods.run import DomainConfig

    def settings(data_dir):
        return {"domain": domain_settings(DomainConfig(source="gsm8k", data_dir=str(data_dir)))}

    DataCache(tmp_path / "data", "gt_sft", settings(tmp_path / "a"))
    DataCache(tmp_path / "data", "gt_sft", settings(tmp_path / "a" / ".." / "a"))  # the same directory
    with pytest.raises(UserError, match=r"changed: domain\): domain.data_dir: .*/a\" -> .*/b\""):
        DataCache(tmp_path / "data", "gt_sft", settings(tmp_path / "b"))
    study = {"models": [{"scale": "s", "safe": "m"}], "scales": ["s"], "methods": [], "start_points": ["safe"],
             "safety_stage": {"enabled": True}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    ids = {safety_stage_id(load_config(StudyConfig, path, [f"data_dir={d}"]), "s") for d in ("x", "y")}
    assert len(ids) == 2


def _python_m_forgetjax(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(cli.DEBUG_ENV, None)
    return subprocess.run([sys.executable, "-m", "forgetjax", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_python_m_forgetjax_is_the_entry_point(fx, tmp_path):
    help_text = _python_m_forgetjax("--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "--debug" in help_text.stdout
    bad_batch = _python_m_forgetjax("generate", str(fx / "model"), "--prompts", str(fx / "prompts.jsonl"), "--out",
                                    str(tmp_path / "o.jsonl"), "--batch-size", "0", cwd=tmp_path)
    assert bad_batch.returncode == 2 and "Traceback" not in bad_batch.stderr
    assert bad_batch.stderr.strip().splitlines()[-1] == "forgetjax generate: error: --batch-size must be >= 1, got 0"
    bad_index = _python_m_forgetjax("study", str(fx / "study.yaml"), "--cell-index", "99", cwd=tmp_path)
    assert bad_index.returncode == 2 and "Traceback" not in bad_index.stderr
    assert "forgetjax study: error: --cell-index 99: out of range" in bad_index.stderr
    lying = _python_m_forgetjax("convert", str(fx / "huge_header"), str(tmp_path / "ckpt"), cwd=tmp_path)
    assert lying.returncode == 2 and "huge_header/model.safetensors" in lying.stderr
    assert "Traceback" not in lying.stderr and "MemoryError" not in lying.stderr
    assert list(tmp_path.iterdir()) == []


def test_study_list_fails_on_a_method_arg_typo_within_seconds(fx, tmp_path):
    """The issue's late error: a typo in a method argument used to pass `--list` and fail when its cell started."""
    started = time.monotonic()
    typo = _python_m_forgetjax("study", str(fx / "study.yaml"), "--list", "methods=[gt_sft,off_rl_dpo]",
                               "method_args.off_rl_dpo.betta=0.2", cwd=tmp_path)
    assert time.monotonic() - started < 60
    assert typo.returncode == 2 and "Traceback" not in typo.stderr and typo.stdout == ""
    assert typo.stderr.strip().splitlines() == [
        f"forgetjax study: error: {fx / 'study.yaml'}: unknown key method_args.off_rl_dpo.betta (did you mean beta?) "
        "(from override method_args.off_rl_dpo.betta=0.2)"]
    assert list(tmp_path.iterdir()) == []
