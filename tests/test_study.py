"""The study runner on a tiny chat model: cells, resumption after SIGKILL, failure isolation, manifest, report
input; SLURM/TPU-pod launch scripts (dry run); the memory planner against a hand computation."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgetjax.models.config import config_from_hf
from forgetjax.study.plan import choose_mesh, estimate, parse_topology
from tiny_models import make_tiny_chat_model


def write_study(tmp_path: Path, data_dir: Path, methods=("gt_sft",), method_args=None) -> Path:
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        make_tiny_chat_model(model_dir)
    battery = tmp_path / "battery.yaml"
    battery.write_text(yaml.safe_dump({"name": "tiny", "format": "chat", "batch_size": 8, "benchmarks": [
        {"name": "mmlu", "limit": 3, "n_shots": 0},
        {"name": "gsm8k", "limit": 2, "max_new_tokens": 8, "n_shots": 0},
        {"name": "xstest_unsafe", "limit": 2, "max_new_tokens": 8}]}))
    study = {
        "name": "tiny", "results_dir": str(tmp_path / "results"), "data_dir": str(data_dir),
        "models": [{"scale": "tiny", "safe": str(model_dir), "same_family_teacher": str(model_dir)}],
        "scales": ["tiny"], "start_points": ["safe"], "methods": list(methods), "domains": ["math"], "seeds": [0],
        "budget": {"kind": "steps", "value": 2},
        "train": {"batch_size": 4, "max_length": 256, "checkpoint": {"every": 1, "keep": 2},
                  "log": {"progress": False, "tensorboard": False, "peak_flops": 1.0e11}},
        "method_args": method_args or {},
        "domain_sources": {"math": {"limit": 8}},
        "battery": str(battery), "representation": True, "representation_probe": 4,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def cells(results: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((results / "cells").glob("*/cell.json")):
        data = json.loads(path.read_text())
        out[data["method"]] = data
    return out


def run_study(config: Path, *extra, kill_when=None):
    cmd = [sys.executable, "-m", "forgetjax.cli", "study", str(config), "--no-report", *extra]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    if kill_when is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None and not kill_when():
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return None


def test_killed_study_resumes_without_redoing_finished_cells(tmp_path, data_dir):
    config = write_study(tmp_path, data_dir)
    results = tmp_path / "results"
    baseline_done = lambda: cells(results).get("baseline", {}).get("status") == "done"  # noqa: E731
    run_study(config, kill_when=lambda: baseline_done() and "gt_sft" in cells(results))
    before = cells(results)
    assert before["baseline"]["status"] == "done" and before["gt_sft"]["status"] == "running"
    finished_at = before["baseline"]["finished"]

    out = run_study(config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done already, skipped" in out.stdout
    after = cells(results)
    assert after["baseline"]["finished"] == finished_at
    assert after["gt_sft"]["status"] == "done"
    assert after["gt_sft"]["budget"]["used"]["steps"] == 2
    data, examples = after["gt_sft"]["budget"]["data"], after["gt_sft"]["budget"]["used"]["examples"]
    assert after["gt_sft"]["budget"]["flags"] == [] and data["epochs"] == pytest.approx(examples / data["size"])
    assert data["unique"] == min(examples, data["size"])
    assert after["gt_sft"]["budget"]["used"]["flops_by_component"]["rollout"] == 0.0
    cell_dir = results / "cells" / after["gt_sft"]["cell_id"]
    assert {p.stem for p in (cell_dir / "eval").rglob("*.parquet")} == {"mmlu", "gsm8k", "xstest_unsafe"}
    representation = json.loads((cell_dir / "representation.json").read_text())
    assert representation["layers"] == [0, 1] and len(representation["cka"]) == 2
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["config_hash"] and manifest["packages"]["jax"].startswith("0.10")
    assert {c["status"] for c in manifest["cells"]} == {"done"}

    from forgetjax.report import build_report

    index = build_report(results, tmp_path / "report", n_resamples=200)
    assert index.is_file() and "gt_sft" in index.read_text().lower().replace("-", "_")


def test_a_failing_cell_is_recorded_and_the_study_goes_on(tmp_path, data_dir):
    config = write_study(tmp_path, data_dir, methods=("sf_sft", "gt_sft"),
                         method_args={"sf_sft": {"teacher": str(tmp_path / "no_such_teacher")}})
    out = run_study(config)
    assert out.returncode == 1
    state = cells(tmp_path / "results")
    assert state["sf_sft"]["status"] == "failed" and "no_such_teacher" in state["sf_sft"]["error"]
    assert state["gt_sft"]["status"] == "done" and state["baseline"]["status"] == "done"


def test_slurm_and_tpu_pod_scripts_are_generated(tmp_path, data_dir):
    config = write_study(tmp_path, data_dir, methods=("gt_sft", "self_sdft"))
    dry = run_study(config, "--executor", "slurm", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --array=0-2" in dry.stdout and not (tmp_path / "results").exists()
    slurm = run_study(config, "--executor", "slurm")  # no sbatch here: the script is written, not submitted
    assert slurm.returncode == 0, slurm.stderr
    script = (tmp_path / "results" / "launch" / "slurm_array.sh").read_text()
    assert script == dry.stdout and '--cell-index "$SLURM_ARRAY_TASK_ID"' in script
    pod = run_study(config, "--executor", "tpu_pod")
    assert pod.returncode == 0, pod.stderr
    script = (tmp_path / "results" / "launch" / "tpu_pod.sh").read_text()
    assert "--worker=all" in script and "--distributed" in script
    listing = run_study(config, "--list")
    assert len(listing.stdout.strip().splitlines()) == 3


QWEN_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def test_memory_plan_matches_hand_computation():
    config = config_from_hf(QWEN_05B)
    est = estimate(config, data=2, fsdp=2, tensor=2, global_batch=16, seq_len=512, param_bytes=4,
                   compute_bytes=2, remat="full", rollout_batch=0, logit_chunk=0)
    n = 494_032_768  # Qwen2.5-0.5B parameters, counted from its config by hand
    assert config.num_params() == n
    assert est.params == pytest.approx(n * 4 / 4)
    assert est.gradients == pytest.approx(n * 4 / 4)
    assert est.optimizer == pytest.approx(2 * n * 4 / 4)
    tokens = 16 // 4 * 512
    d, f, q, kv = 896, 4864, 896, 128
    recomputed = (4 * d + 2 * q + 2 * kv + 3 * f) * 2 + (2 * d + f) * 4  # bf16 matmul inputs, f32 norms and SiLU
    assert est.activations == pytest.approx((24 * d * 2 + recomputed) * tokens / 2)
    assert est.logits == pytest.approx(2 * tokens * 151936 * 4 / 2)
    halved = estimate(config, data=2, fsdp=2, tensor=2, global_batch=16, seq_len=512, moments_bytes=2,
                      logit_chunk=256)
    assert halved.optimizer == pytest.approx(est.optimizer / 2)
    assert halved.logits == pytest.approx(2 * 256 * 151936 * 4 / 2)
    topology = parse_topology("v5e-8")
    assert topology.devices == 8 and topology.hbm_bytes == 16 * 2**30
    chosen = choose_mesh(config, topology, global_batch=16, seq_len=512)
    assert chosen.total <= 0.85 * topology.hbm_bytes and chosen.data * chosen.fsdp * chosen.tensor == 8
    smaller = [estimate(config, 8 // f, f, 1, global_batch=16, seq_len=512).total for f in (1, 2, 4, 8)]
    assert chosen.fsdp == next(f for f, total in zip((1, 2, 4, 8), smaller) if total <= 0.85 * topology.hbm_bytes)
    with pytest.raises(ValueError, match="--topology"):
        parse_topology("tpu-64")


# ---------------------------------------------------------------------------------------------- cell identity

def id_study(tmp_path: Path, battery_limit: int = 3, **changes):
    """A one-method (DPO) study on an unloaded model path; `changes` override StudyConfig fields."""
    from forgetjax.study.schema import ModelEntry, StudyConfig

    battery = tmp_path / "battery.yaml"
    battery.write_text(yaml.safe_dump({"name": "ids", "format": "chat", "benchmarks": [
        {"name": "mmlu", "limit": battery_limit, "n_shots": 0}, {"name": "gsm8k", "limit": 2}]}))
    fields = {"models": [ModelEntry(scale="tiny", safe="some/model")], "scales": ["tiny"], "start_points": ["safe"],
              "methods": ["off_rl_dpo"], "domains": ["math"], "seeds": [0], "battery": str(battery),
              "results_dir": str(tmp_path / "results"),
              "train": {"batch_size": 4, "optimizer": {"lr": 1e-5}}, "method_args": {"off_rl_dpo": {"beta": 0.1}}}
    fields.update(changes)
    cfg = StudyConfig(**fields)
    cfg.validate()
    return cfg


def cell_ids(cfg) -> tuple[str, str]:
    """(baseline id, DPO cell id)."""
    from forgetjax.study.matrix import expand

    baseline, dpo = expand(cfg)
    assert (baseline.method, dpo.method) == ("baseline", "off_rl_dpo")
    return baseline.cell_id, dpo.cell_id


def test_every_setting_that_changes_what_a_cell_computes_changes_its_id(tmp_path):
    from forgetjax.training.budget import BudgetConfig

    baseline, dpo = cell_ids(id_study(tmp_path))
    assert cell_ids(id_study(tmp_path)) == (baseline, dpo)
    trained = {
        "lr": {"train": {"batch_size": 4, "optimizer": {"lr": 2e-5}}},
        "beta": {"method_args": {"off_rl_dpo": {"beta": 0.2}}},
        "budget": {"budget": BudgetConfig("tokens", 100_000)},
        "representation_probe": {"representation_probe": 8},
    }
    for name, change in trained.items():
        changed = cell_ids(id_study(tmp_path, **change))
        assert changed[1] != dpo and changed[0] == baseline, name
    evaluated = {"eval_limit": {"eval_limit": 5}, "eval_format": {"eval_format": "fewshot"}}
    for name, change in evaluated.items():
        changed = cell_ids(id_study(tmp_path, **change))
        assert changed[0] != baseline and changed[1] != dpo, name
    same_path_new_battery = cell_ids(id_study(tmp_path, battery_limit=4))
    assert same_path_new_battery[0] != baseline and same_path_new_battery[1] != dpo


def test_cell_id_hashes_the_resolved_config_not_its_spelling(tmp_path):
    """Spelling out defaults (DPO's label_smoothing 0.0, the trainer's micro_batches 1) runs the same cell."""
    _, dpo = cell_ids(id_study(tmp_path))
    spelled = id_study(tmp_path, train={"batch_size": 4, "micro_batches": 1, "optimizer": {"lr": 1e-5}},
                       method_args={"off_rl_dpo": {"beta": 0.1, "label_smoothing": 0.0}})
    assert cell_ids(spelled)[1] == dpo


def test_every_generating_method_samples_the_domain_generation_length(tmp_path):
    """Each generating method of the catalog (checked against its argument dataclass) gets the domain's
    max_new_tokens in its resolved run (hence its cell id), whatever its own default; the study's max_new_tokens
    replaces it for all; gt_sft gets none; a per-method max_new_tokens is an error naming the field."""
    import dataclasses

    from forgetjax.config import ConfigError
    from forgetjax.methods.catalog import METHODS
    from forgetjax.methods.registry import get_method_spec
    from forgetjax.study.matrix import expand, resolved_run
    from forgetjax.study.schema import ModelEntry
    from forgetjax.tasks.domains import domain_specs

    lengths = {name: spec.max_new_tokens for name, spec in domain_specs().items()}
    assert lengths == {"math": 512, "code": 512, "qa": 256}  # configs/domains: room for chain of thought
    models = [ModelEntry(scale="tiny", safe="some/model", same_family_teacher="t/sf", cross_family_teacher="t/cf")]
    for override in (None, 96):
        cfg = id_study(tmp_path, models=models, methods=sorted(METHODS), domains=["math", "code", "qa"],
                       method_args={}, max_new_tokens=override)
        seen = {}
        for cell in expand(cfg):
            if cell.is_baseline:
                continue
            fields = {f.name for f in dataclasses.fields(get_method_spec(cell.method).args_class)}
            assert METHODS[cell.method].generates == ("max_new_tokens" in fields), cell.method
            resolved = resolved_run(cell.run)["method_args"]
            if METHODS[cell.method].generates:
                seen.setdefault(cell.domain, set()).add(resolved["max_new_tokens"])
            else:
                assert "max_new_tokens" not in resolved
        assert seen == {domain: {override or length} for domain, length in lengths.items()}
    short = expand(id_study(tmp_path, max_new_tokens=96))[1].cell_id
    assert short != cell_ids(id_study(tmp_path))[1]
    with pytest.raises((ValueError, ConfigError), match="method_args.off_rl_dpo.max_new_tokens"):
        id_study(tmp_path, method_args={"off_rl_dpo": {"max_new_tokens": 128}})


def test_rerun_after_a_config_change_does_not_pool_old_cells(tmp_path):
    """Cells of an earlier config (another lr) stay on disk with their own ids; the analysis reads only the cells of
    the manifest the runner writes for the current config, so one seed gives n_seeds 1 and no std."""
    import math as pymath

    from forgetjax.analysis.tables import analyze
    from forgetjax.study.matrix import expand
    from forgetjax.study.runner import StudyRunner
    from test_analysis_queries import SETTINGS, CellSpec, build_synthetic_study

    old_cfg = id_study(tmp_path, methods=["gt_sft"], method_args={})
    new_cfg = id_study(tmp_path, methods=["gt_sft"], method_args={},
                       train={"batch_size": 4, "optimizer": {"lr": 3e-5}})
    (baseline, old), (same_baseline, new) = expand(old_cfg), expand(new_cfg)
    assert baseline.cell_id == same_baseline.cell_id and old.cell_id != new.cell_id
    results = tmp_path / "results"
    build_synthetic_study(results, (
        CellSpec(baseline.cell_id, "safe", "baseline", None, 0),
        CellSpec(old.cell_id, "safe", "gt_sft", "math", 0, forget=0.6, gain=0.05),
        CellSpec(new.cell_id, "safe", "gt_sft", "math", 0, forget=0.1, gain=0.2)))
    StudyRunner(new_cfg, log=lambda *_: None).write_manifest(expand(new_cfg), started=0.0)
    analysis = analyze(results, SETTINGS)
    try:
        assert {c.cell_id for c in analysis.study.cells} == {baseline.cell_id, new.cell_id}
        assert any(old.cell_id in issue and "manifest.json" in issue for issue in analysis.study.issues)
        overall = [r for r in analysis["forgetting_seeds"] if r["level"] == "overall"]
        assert len(overall) == 1
        assert (overall[0]["n_seeds"], overall[0]["cell_ids"]) == (1, new.cell_id)
        assert pymath.isnan(overall[0]["forgetting_std"])
    finally:
        analysis.study.connection.close()
    (results / "manifest.json").unlink()
    with pytest.raises(ValueError, match="share a seed"):
        analyze(results, SETTINGS)


def test_plan_reads_the_training_config_defaults(tmp_path, capsys):
    from forgetjax import cli
    from forgetjax.config import from_dict
    from forgetjax.study.plan import train_memory_settings
    from forgetjax.training.trainer import TrainConfig

    assert train_memory_settings(TrainConfig()) == {
        "global_batch": 8, "seq_len": 512, "param_bytes": 4, "compute_bytes": 4, "remat": "none", "lora_rank": None,
        "moments_bytes": 4, "logit_chunk": 1024}
    half = train_memory_settings(from_dict(TrainConfig, {"dtype": "bfloat16", "lora": {"rank": 8},
                                                         "optimizer": {"moments_dtype": "bfloat16"}}))
    assert (half["param_bytes"], half["compute_bytes"], half["moments_bytes"], half["lora_rank"]) == (2, 2, 2, 8)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"models": [{"scale": "0.5b", "base": "x", "safe": "x", "hf_config": QWEN_05B}],
                                      "scales": ["0.5b"], "methods": ["gt_sft"], "train": {"batch_size": 16}}))
    assert cli.main(["plan", str(config), "--topology", "v5e-8"]) == 0
    out = capsys.readouterr().out
    assert "global batch 16 x 512 tokens, remat none" in out
    expected = choose_mesh(config_from_hf(QWEN_05B), parse_topology("v5e-8"), global_batch=16, seq_len=512,
                           param_bytes=4, compute_bytes=4, remat="none", moments_bytes=4, rollout_batch=256,
                           rollout_len=1024, logit_chunk=1024)
    assert f"{expected.total / 2**30:8.2f} GiB" in out


def test_safety_stage_trains_with_the_study_optimizer():
    from forgetjax.study.matrix import safety_stage_id, safety_stage_optimizer
    from forgetjax.study.schema import ModelEntry, SafetyStage, StudyConfig

    def study(optimizer):
        return StudyConfig(models=[ModelEntry(scale="tiny", safe="some/model")], scales=["tiny"],
                           start_points=["safe"], methods=["gt_sft"], train={"optimizer": optimizer},
                           safety_stage=SafetyStage(enabled=True, lr=5e-5))

    cfg = study({"lr": 1e-5, "warmup_ratio": 0.05, "max_grad_norm": 0.5, "moments_dtype": "bfloat16"})
    assert safety_stage_optimizer(cfg) == {"lr": 5e-5, "warmup_ratio": 0.05, "max_grad_norm": 0.5,
                                           "moments_dtype": "bfloat16"}
    assert safety_stage_id(cfg, "tiny") != safety_stage_id(study({"lr": 1e-5, "warmup_ratio": 0.1}), "tiny")
