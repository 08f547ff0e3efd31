"""The study runner on a tiny chat model: cells, resumption after SIGKILL, failure isolation, manifest, report
input; SLURM/TPU-pod launch scripts (dry run); the memory planner against a hand computation."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from forgetjax.models.config import config_from_hf
from forgetjax.study.plan import choose_mesh, parse_topology
from forgetjax.training.memory import estimate
from study_runs import run_study
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
    probe = representation["knowledge_probe"]
    assert len(probe["start"]) == len(probe["post"]) == 2 and probe["n_train"] + probe["n_test"] == 2 * 16
    assert len(probe["post_refit"]) == 2
    assert all(0.0 <= v <= 1.0 for v in probe["start"] + probe["post"] + probe["post_refit"])
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["config_hash"] and manifest["packages"]["jax"].startswith("0.10")
    assert {c["status"] for c in manifest["cells"]} == {"done"}

    from forgetjax.report import build_report

    index = build_report(results, tmp_path / "report", n_resamples=200)
    assert index.is_file() and "gt_sft" in index.read_text().lower().replace("-", "_")
    from forgetjax.analysis.tables import analyze
    from forgetjax.report.questions import answer_rq6

    best = max(range(2), key=lambda layer: probe["start"][layer])  # the first best layer, as max() picks it
    lost = 100 * (probe["start"][best] - probe["post"][best])
    refit = 100 * (probe["start"][best] - probe["post_refit"][best])
    assert f"GT-SFT {lost:+.1f} pp, refit probe {refit:+.1f} pp (1 cell(s))" in " ".join(answer_rq6(analyze(results)))


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


def test_launch_scripts_give_their_tasks_one_compilation_cache_unless_the_environment_names_one(tmp_path):
    """The export line each launch script runs (SLURM: a line of the script; TPU pod: a step of the command every
    worker runs), executed by bash: RESULTS_DIR/jax_compilation_cache by default (a path with a space and a quote
    survives), the caller's JAX_COMPILATION_CACHE_DIR when set."""
    import os
    import shlex

    from forgetjax.study.executors import slurm_array_text, tpu_pod_text

    results = tmp_path / "it's results"
    slurm = next(line for line in slurm_array_text("study.yaml", 3, results).splitlines()
                 if "JAX_COMPILATION_CACHE_DIR=" in line)
    ssh = next(line for line in tpu_pod_text("study.yaml", results).splitlines() if line.startswith("gcloud"))
    worker_command = shlex.split(ssh)[-1]
    pod = next(step for step in worker_command.split(" && ") if "JAX_COMPILATION_CACHE_DIR=" in step)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}

    def cache_after(line: str, **extra_env) -> str:
        return subprocess.run(["bash", "-c", f'{line}; printf %s "$JAX_COMPILATION_CACHE_DIR"'],
                              env={**env, **extra_env}, capture_output=True, text=True, check=True).stdout

    for line in (slurm, pod):
        assert cache_after(line) == str(results / "jax_compilation_cache")
        assert cache_after(line, JAX_COMPILATION_CACHE_DIR="/shared/cache") == "/shared/cache"


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
    # the recomputed layer holds what no remat keeps (bf16 inputs of the matmuls, rotated q/k, v, SwiGLU's gate, up
    # and output; each norm's bf16 input and f32 reciprocal RMS), less the layer input already counted
    recomputed = (4 * d + 2 * q + 2 * kv + 3 * f) * 2 + 2 * 4 - d * 2
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

    lengths = {name: spec.max_new_tokens for name, spec in domain_specs().items() if name in ("math", "code", "qa")}
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
    from forgetjax.training.memory import MEMORY_FRACTION, fitted_estimate, train_memory_settings
    from forgetjax.training.trainer import TrainConfig

    assert train_memory_settings(TrainConfig()) == {
        "global_batch": 8, "micro_batches": 1, "seq_len": 512, "param_bytes": 4, "compute_bytes": 4, "remat": "auto", "lora_rank": None,
        "moments_bytes": 4, "logit_chunk": 1024}
    half = train_memory_settings(from_dict(TrainConfig, {"dtype": "bfloat16", "lora": {"rank": 8},
                                                         "optimizer": {"moments_dtype": "bfloat16"}}))
    assert (half["param_bytes"], half["compute_bytes"], half["moments_bytes"], half["lora_rank"]) == (2, 2, 2, 8)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"models": [{"scale": "0.5b", "base": "x", "safe": "x", "hf_config": QWEN_05B}],
                                      "scales": ["0.5b"], "methods": ["gt_sft"], "train": {"batch_size": 16}}))
    assert cli.main(["plan", str(config), "--topology", "v5e-8"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 16 x 512 tokens (all devices), remat auto" in out
    expected = fitted_estimate(config_from_hf(QWEN_05B), MEMORY_FRACTION * 16 * 2**30, 1, 8, 1, global_batch=16,
                               seq_len=512, param_bytes=4, compute_bytes=4, remat="auto", moments_bytes=4,
                               rollout_batch=0, rollout_len=0, logit_chunk=1024,
                               reference=True)  # the default train.mesh: fsdp over all 8; study cells: KL to start
    assert f"(1, 8, 1)   train.mesh {expected.remat:>5}" in out
    assert f"{expected.total / 2**30:8.2f} GiB" in out
    assert "0.5b: rollout KV cache 0 rows x 0 tokens (no method samples the trained model)" in out


def test_plan_sizes_the_kv_cache_from_the_studys_own_sampler_calls(tmp_path, capsys):
    """The rollout KV cache is the largest sampler call of the study's training runs, cells and pipeline stages:
    DPO decodes prompts_per_call x samples_per_prompt rows (10 x 5 = 50, padded to the sampler's bucket 64), GRPO
    its step's batch (16), SPIN prompts_per_call (8), SDFT prompts_per_chunk x n_samples (4 x 3 = 12 -> 16), a
    GRPO pipeline stage with batch 96 (-> 128); each at its train.max_length. Flags override the derived shape."""
    from forgetjax import cli
    from forgetjax.models.config import config_from_hf

    study = {"models": [{"scale": "0.5b", "base": "x", "safe": "x", "hf_config": QWEN_05B}], "scales": ["0.5b"],
             "start_points": ["base"], "domains": ["math"], "train": {"batch_size": 16, "max_length": 384},
             "methods": ["gt_sft", "on_rl_grpo", "off_rl_dpo", "self_spin", "self_sdft"],
             "method_args": {"off_rl_dpo": {"prompts_per_call": 10, "samples_per_prompt": 5},
                             "self_spin": {"prompts_per_call": 8},
                             "self_sdft": {"prompts_per_chunk": 4, "n_samples": 3}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert cli.main(["plan", str(config), "--topology", "cpu:1"]) == 0
    out = capsys.readouterr().out
    assert "0.5b: rollout KV cache 64 rows x 384 tokens (largest sampler call: off_rl_dpo)" in out
    qwen = config_from_hf(QWEN_05B)
    kv_bytes = 2 * qwen.num_layers * 64 * 384 * qwen.num_kv_heads * qwen.head_dim * 4  # K and V, float32
    assert f"{kv_bytes / 2**30:8.2f} GiB" in out

    study["pipelines"] = {"long_rl": {"stages": [{"name": "sft", "method": "gt_sft"},
                                                 {"name": "rl", "method": "on_rl_grpo",
                                                  "train": {"batch_size": 96, "max_length": 512}}]}}
    config.write_text(yaml.safe_dump(study))
    assert cli.main(["plan", str(config), "--topology", "cpu:1"]) == 0
    assert "0.5b: rollout KV cache 128 rows x 512 tokens (largest sampler call: on_rl_grpo)" in capsys.readouterr().out
    assert cli.main(["plan", str(config), "--topology", "cpu:1", "--rollout-batch", "4", "--rollout-len", "100"]) == 0
    assert "0.5b: rollout KV cache 4 rows x 100 tokens (--rollout-batch / --rollout-len)" in capsys.readouterr().out


def plan_rows(out: str, scale: str) -> list[tuple[str, str, list[float]]]:
    """(mesh, origin, GiB values: params, grads, optimizer, activations, logits, reference, kv cache, total) of the
    plan's rows for `scale`."""
    import re

    rows = []
    for line in out.splitlines():
        found = re.match(rf"\s*{re.escape(scale)}\s+[\d.]+B\s+(\(\d+, \d+, \d+\))\s+(train\.mesh|smallest fit)\s", line)
        if found:
            rows.append((found.group(1), found.group(2), [float(v) for v in re.findall(r"([\d.]+) GiB", line)]))
    return rows


def test_plan_sizes_the_studys_configured_mesh_and_suggests_one_when_it_cannot(tmp_path, capsys):
    """The row that counts is the mesh the trainer will build from train.mesh (fsdp 4, data the rest: (4, 4, 1) on
    a v5p-32's 16 chips), with remat auto decided on it; where train.mesh cannot be laid out (fsdp 4 on 2 GPUs) the
    plan says so and prints the smallest model-parallel mesh that fits."""
    from forgetjax import cli
    from forgetjax.training.memory import MEMORY_FRACTION, fitted_estimate

    study = {"models": [{"scale": "0.5b", "base": "x", "safe": "x", "hf_config": QWEN_05B}], "scales": ["0.5b"],
             "methods": ["gt_sft"], "train": {"batch_size": 32, "max_length": 1024, "dtype": "bfloat16",
                                              "param_dtype": "float32", "mesh": {"data": -1, "fsdp": 4}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    settings = dict(global_batch=32, micro_batches=1, seq_len=1024, param_bytes=4, compute_bytes=2, remat="auto",
                    moments_bytes=4, logit_chunk=1024, reference=True, rollout_batch=0, rollout_len=0)
    qwen = config_from_hf(QWEN_05B)

    assert cli.main(["plan", str(config), "--topology", "v5p-32"]) == 0
    [(mesh, origin, values)] = plan_rows(capsys.readouterr().out, "0.5b")
    expected = fitted_estimate(qwen, MEMORY_FRACTION * 95 * 2**30, 4, 4, 1, **settings)
    assert (mesh, origin) == ("(4, 4, 1)", "train.mesh")
    assert values[-1] == pytest.approx(expected.total / 2**30, abs=0.006)
    assert values[0] == pytest.approx(qwen.num_params() * 4 / 4 / 2**30, abs=0.006)  # f32 weights over fsdp 4

    assert cli.main(["plan", str(config), "--topology", "gpu:2:h200"]) == 0
    out = capsys.readouterr().out
    assert ("train.mesh (data=-1, fsdp=4, tensor=1) cannot be laid out on gpu:2:h200: 2 devices cannot be split into "
            "data=-1 fsdp=4 tensor=1") in out
    [(mesh, origin, values)] = plan_rows(out, "0.5b")
    suggested = choose_mesh(qwen, parse_topology("gpu:2:h200"), **settings)
    assert (mesh, origin) == (str((suggested.data, suggested.fsdp, suggested.tensor)), "smallest fit")
    assert values[-1] == pytest.approx(suggested.total / 2**30, abs=0.006)


@pytest.mark.parametrize("beta, kl_every, keeps", [(0.0, 0, False), (0.04, 0, True), (0.0, 5, True)])
def test_plan_counts_the_start_copy_exactly_when_the_trainer_keeps_one(tmp_path, capsys, beta, kl_every, keeps):
    """A frozen start copy (compute dtype, over fsdp) is counted when GRPO's KL penalty needs it (beta > 0) or the run
    measures the KL to the start, and not for GRPO at beta 0 without the KL measurement: the plan reads the
    method's args as the trainer's `Method.keeps_start` does."""
    from forgetjax import cli
    from forgetjax.methods.grpo import GRPO, GRPOArgs

    assert GRPO(GRPOArgs(beta=beta), None, "grpo").keeps_start is (beta > 0)
    study = {"models": [{"scale": "0.5b", "base": "x", "safe": "x", "hf_config": QWEN_05B}], "scales": ["0.5b"],
             "methods": ["on_rl_grpo"], "domains": ["math"], "method_args": {"on_rl_grpo": {"beta": beta}},
             "train": {"batch_size": 16, "dtype": "bfloat16", "kl_to_start": {"every": kl_every}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert cli.main(["plan", str(config), "--topology", "cpu:1"]) == 0
    [(_, _, values)] = plan_rows(capsys.readouterr().out, "0.5b")
    start_copy = config_from_hf(QWEN_05B).num_params() * 2 / 2**30 if keeps else 0.0
    assert values[5] == pytest.approx(start_copy, abs=0.006)


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


# ---------------------------------------------------------------------------------------------- load-time checks

def study_yaml(tmp_path: Path, **changes) -> Path:
    """The id_study config as a YAML file (what `forgetjax study` loads)."""
    battery = tmp_path / "battery.yaml"
    battery.write_text(yaml.safe_dump({"name": "ids", "format": "chat", "benchmarks": [{"name": "mmlu", "limit": 3}]}))
    study = {"models": [{"scale": "tiny", "safe": "some/model", "same_family_teacher": "some/teacher"}],
             "scales": ["tiny"], "start_points": ["safe"], "methods": ["off_rl_dpo"], "domains": ["math"],
             "seeds": [0], "battery": str(battery), "results_dir": str(tmp_path / "results"),
             "train": {"batch_size": 4, "optimizer": {"lr": 1e-5}}, "method_args": {"off_rl_dpo": {"beta": 0.1}},
             **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.parametrize("override, message", [
    ("train.optimizer.lrr=1e-5", "unknown key train.optimizer.lrr (did you mean lr?)"),
    ("train.log.evrey=5", "unknown key train.log.evrey (did you mean every?)"),
    ("train.max_length=long", "train.max_length: expected int, got 'long'"),
    ("train.seed=3", "train.seed: set per cell"),
    ("method_args.off_rl_dpo.betta=0.2", "unknown key method_args.off_rl_dpo.betta (did you mean beta?)"),
    ("method_args.off_rl_dpo.beta=-1", "method_args.off_rl_dpo: beta must be > 0"),
    ("method_args.dpo.beta=0.2", "method_args.dpo: unknown method 'dpo'"),
    ("method_args.sf_sft.n_sampels=2", "unknown key method_args.sf_sft.n_sampels"),  # a method the study does not run
    ("domain_sources.math.limt=3", "unknown key domain_sources.math.limt (did you mean limit?)"),
    ("domain_sources.chem.limit=3", "domain_sources.chem: unknown domain 'chem'"),
    ("safety_stage.stepz=3", "unknown key safety_stage.stepz (did you mean steps?)"),
    ("model_files=[nowhere.yaml]", "model_files: nowhere.yaml not found"),
])
def test_every_section_is_typed_when_the_study_loads(tmp_path, override, message):
    from forgetjax.config import ConfigError
    from forgetjax.study.schema import load_study_config

    path = study_yaml(tmp_path)
    load_study_config(path)
    with pytest.raises(ConfigError) as caught:
        load_study_config(path, [override])
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_a_battery_with_an_unknown_benchmark_fails_when_the_study_loads(tmp_path):
    from forgetjax.errors import UserError
    from forgetjax.study.schema import load_study_config

    battery = tmp_path / "bad_battery.yaml"
    battery.write_text(yaml.safe_dump({"benchmarks": ["mmlu", "no_such_benchmark"]}))
    path = study_yaml(tmp_path, battery=str(battery))
    with pytest.raises(UserError, match=rf"^{path}: battery: .*no_such_benchmark"):
        load_study_config(path)


def test_the_safety_stage_run_is_typed_when_the_study_loads(tmp_path):
    """The stage trains with the study's train section: a bad stage setting fails at load, not when the stage runs."""
    from forgetjax.config import ConfigError
    from forgetjax.study.schema import load_study_config

    path = study_yaml(tmp_path, safety_stage={"enabled": True, "max_length": 4})
    with pytest.raises(ConfigError, match="max_length must be >= 8"):
        load_study_config(path)


def test_changing_a_method_default_in_code_changes_the_cell_id(tmp_path, monkeypatch):
    """A default the study does not spell out (DPO's label_smoothing) is part of the id: changing it in code gives
    new cells instead of silently reusing the old ones."""
    import dataclasses

    from forgetjax.methods import registry

    baseline, dpo = cell_ids(id_study(tmp_path))
    spec = registry.get_method_spec("off_rl_dpo")

    @dataclasses.dataclass
    class SmoothedDPOArgs(spec.args_class):
        label_smoothing: float = 0.1

    monkeypatch.setitem(registry._REGISTRY, "off_rl_dpo", dataclasses.replace(spec, args_class=SmoothedDPOArgs))
    assert cell_ids(id_study(tmp_path)) == (baseline, cell_ids(id_study(tmp_path))[1])
    assert cell_ids(id_study(tmp_path))[1] != dpo


def test_editing_a_method_or_its_loss_changes_its_code_digest_and_cell_ids(tmp_path, monkeypatch):
    import shutil

    from forgetjax.methods import catalog
    from forgetjax.study import matrix

    assert catalog.method_modules("off_rl_dpo") == [
        "forgetjax.losses.preference", "forgetjax.losses.token", "forgetjax.methods.dpo", "forgetjax.methods.pairs",
        "forgetjax.methods.sft", "forgetjax.methods.teacher_data"]
    copy = tmp_path / "forgetjax"
    for package in ("methods", "losses"):
        shutil.copytree(catalog.PACKAGE_DIR / package, copy / package)
    monkeypatch.setattr(catalog, "PACKAGE_DIR", copy)
    before = {method: catalog.method_code_digest(method) for method in ("off_rl_dpo", "gt_sft")}
    (copy / "methods" / "catalog.py").write_text((copy / "methods" / "catalog.py").read_text() + "\n# a label\n")
    assert {method: catalog.method_code_digest(method) for method in before} == before
    (copy / "losses" / "preference.py").write_text((copy / "losses" / "preference.py").read_text() + "\n# beta\n")
    after = {method: catalog.method_code_digest(method) for method in before}
    assert after["off_rl_dpo"] != before["off_rl_dpo"] and after["gt_sft"] == before["gt_sft"]

    baseline, dpo = cell_ids(id_study(tmp_path))
    monkeypatch.setattr(matrix, "method_code_digest", lambda method: "edited")
    assert cell_ids(id_study(tmp_path)) == (baseline, cell_ids(id_study(tmp_path))[1])
    assert cell_ids(id_study(tmp_path))[1] != dpo


def test_safety_stage_id_hashes_its_resolved_run():
    """Spelling out a trainer default leaves the stage as it was; changing one the stage trains with does not."""
    from forgetjax.study.matrix import safety_stage_id
    from forgetjax.study.schema import ModelEntry, SafetyStage, StudyConfig

    def stage_id(train):
        return safety_stage_id(StudyConfig(models=[ModelEntry(scale="tiny", safe="some/model")], scales=["tiny"],
                                           start_points=["safe"], methods=[], train=train,
                                           safety_stage=SafetyStage(enabled=True)), "tiny")

    plain = stage_id({})
    assert stage_id({"micro_batches": 1, "optimizer": {"max_grad_norm": 1.0}}) == plain
    assert stage_id({"micro_batches": 2}) != plain
    assert stage_id({"remat": "full"}) != plain


def test_the_runner_refuses_a_cell_directory_of_another_resolved_config(tmp_path):
    from forgetjax import results
    from forgetjax.errors import UserError
    from forgetjax.study.matrix import expand
    from forgetjax.study.runner import StudyRunner

    cfg = id_study(tmp_path)
    baseline, dpo = expand(cfg)
    runner = StudyRunner(cfg, log=lambda *_: None)
    stored = json.loads(json.dumps(dpo.resolved))
    results.write_cell_data(cfg.results_dir, {"cell_id": dpo.cell_id, "start_point": "safe", "model": "some/model",
                                              "scale": "tiny", "method": "off_rl_dpo", "domain": "math", "seed": 0,
                                              "status": "done", "resolved": stored})
    runner.check_stored_config(dpo)
    stored["run"]["method_args"]["beta"] = 0.3
    stored["evaluation"]["eval_limit"] = 7
    results.write_cell_data(cfg.results_dir, {**results.read_cell_data(cfg.results_dir, dpo.cell_id),
                                              "resolved": stored})
    with pytest.raises(UserError, match=rf"cell {dpo.cell_id}: .*\(differs at evaluation.eval_limit, "
                                        r"run.method_args.beta\)"):
        runner.run()
    assert not results.cell_file(cfg.results_dir, baseline.cell_id).exists()


def test_the_analysis_refuses_cells_evaluated_differently(tmp_path):
    from forgetjax import results
    from forgetjax.errors import UserError

    evaluation = {"battery": {"name": "ids", "benchmarks": [{"name": "mmlu", "limit": 3}]}, "eval_limit": None,
                  "eval_format": "auto"}
    cell = {"start_point": "safe", "model": "m", "scale": "tiny", "domain": None, "seed": 0, "status": "done"}
    results.write_cell_data(tmp_path, {**cell, "cell_id": "a-baseline", "method": "baseline",
                                       "evaluation": evaluation})
    results.write_cell_data(tmp_path, {**cell, "cell_id": "b-dpo", "method": "off_rl_dpo",
                                       "evaluation": evaluation})
    other_start = {**cell, "start_point": "base", "cell_id": "a-base-baseline", "method": "baseline",
                   "evaluation": {**evaluation, "eval_format": "fewshot"}}
    results.write_cell_data(tmp_path, other_start)  # another start point's format: checked per pair, not here
    assert [c.cell_id for c in results.discover_cells(tmp_path)[0]] == ["a-base-baseline", "a-baseline", "b-dpo"]
    changed = {**evaluation, "battery": {"name": "ids", "benchmarks": [{"name": "mmlu", "limit": 4}]}}
    results.write_cell_data(tmp_path, {**cell, "cell_id": "c-sft", "method": "gt_sft", "evaluation": changed})
    with pytest.raises(UserError, match=r"'a-base-baseline' and 'c-sft' .* differs at battery.benchmarks\)"):
        results.discover_cells(tmp_path)


def test_auto_eval_format_gives_base_cells_fewshot_and_safe_cells_chat(tmp_path):
    """`eval_format: auto` resolves per start point at expansion: a BASE start (baseline and post-trained cells) is
    evaluated few-shot, a SAFE start in chat; the format is in the evaluation settings and so in the ids."""
    from forgetjax.study.matrix import evaluation_settings, expand
    from forgetjax.study.schema import ModelEntry

    models = [ModelEntry(scale="tiny", base="some/base", safe="some/model")]
    cfg = id_study(tmp_path, models=models, start_points=["base", "safe"], eval_format="auto")
    cells = expand(cfg)
    assert {(c.start_point, c.method): c.eval_format for c in cells} == {
        ("base", "baseline"): "fewshot", ("base", "off_rl_dpo"): "fewshot",
        ("safe", "baseline"): "chat", ("safe", "off_rl_dpo"): "chat"}
    assert evaluation_settings(cfg, "base")["eval_format"] == "fewshot"
    assert evaluation_settings(cfg, "safe")["eval_format"] == "chat"
    by_point = {p: {c.method: c.cell_id for c in cells if c.start_point == p} for p in ("base", "safe")}
    assert by_point["base"]["baseline"] != by_point["safe"]["baseline"]
    chat_everywhere = {c.start_point + c.method: c for c in expand(id_study(
        tmp_path, models=models, start_points=["base", "safe"], eval_format="chat"))}
    assert {c.eval_format for c in chat_everywhere.values()} == {"chat"}
    assert chat_everywhere["safebaseline"].cell_id == by_point["safe"]["baseline"]
    assert chat_everywhere["basebaseline"].cell_id != by_point["base"]["baseline"]
    assert chat_everywhere["baseoff_rl_dpo"].cell_id != by_point["base"]["off_rl_dpo"]


def test_demo_study_expands_to_both_start_points_with_the_same_methods():
    from forgetjax.study.matrix import expand, safety_stage_id
    from forgetjax.study.schema import load_study_config

    cfg = load_study_config(Path(__file__).parents[1] / "configs" / "studies" / "demo.yaml")
    cells = expand(cfg)
    methods = {"gt_sft", "self_sdft", "on_rl_grpo", "off_rl_dpo"}
    expected = {(point, method) for point in ("base", "safe") for method in methods | {"baseline"}}
    assert sorted((c.start_point, c.method) for c in cells) == sorted(expected)
    assert {c.domain for c in cells if not c.is_baseline} == {"math"}
    base = {c.start_model for c in cells if c.start_point == "base"}
    safe = {c.start_model for c in cells if c.start_point == "safe"}
    assert base == {"smollm2-135m-instruct"}
    assert safe == {f"runs/demo/stages/{safety_stage_id(cfg, '135m')}/train/final"}
    stage = cfg.safety_stage
    assert stage.enabled and stage.harmful_limit > 0 and stage.borderline_limit > 0 and stage.helpful_limit > 0


@pytest.mark.slow
def test_study_attacks_every_cell_and_replays_the_baseline_suffixes(tmp_path, data_dir):
    """With `attacks` enabled the baseline attacks its model and replays its suffixes, the post-trained cell attacks
    itself and replays the baseline's (same suffix ids); the attack settings are in the cell ids; the analysis' jailbreak
    table has both with the baseline's ASR; a bad attack field fails at load naming it."""
    from forgetjax.analysis.tables import analyze
    from forgetjax.eval.records import read_records
    from forgetjax.study.matrix import expand
    from forgetjax.study.schema import load_study_config

    config = write_study(tmp_path, data_dir)
    plain_ids = {c.cell_id for c in expand(load_study_config(config))}
    study = yaml.safe_load(config.read_text())
    study["representation"] = False
    study["attacks"] = {"enabled": True, "limit": 2, "methods": ["gcg", "autodan"],
                        "gcg": {"steps": 2, "suffix_length": 3, "top_k": 16, "candidates": 8, "candidate_block": 8},
                        "autodan": {"generations": 2, "population": 4, "elite": 1, "answer_tokens": 4}}
    config.write_text(yaml.safe_dump(study))
    attacked = expand(load_study_config(config))
    assert not plain_ids & {c.cell_id for c in attacked}
    results = tmp_path / "results"
    baseline = next(c for c in attacked if c.is_baseline)
    trained = next(i for i, c in enumerate(attacked) if not c.is_baseline)
    # the post-trained cell first, alone (another array task would run the baseline): it builds the start model's
    # findings as a stage instead of failing on the missing baseline records
    out = run_study(config, "--cell-index", str(trained))
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (results / "cells" / baseline.cell_id / "cell.json").is_file()
    stages = {p.name for p in (results / "stages").iterdir()}
    assert {f"attack-gcg-{baseline.cell_id}", f"attack-autodan-{baseline.cell_id}"} <= stages
    out = run_study(config)
    assert out.returncode == 0, out.stdout + out.stderr
    from forgetjax.eval.battery import model_slug

    for attack in ("gcg", "autodan"):  # the baseline's own findings are the stage's, not a second attack
        stage = results / "stages" / f"attack-{attack}-{baseline.cell_id}" / model_slug(baseline.cell_id)
        own = results / "cells" / baseline.cell_id / "eval" / model_slug(baseline.cell_id)
        assert (stage / f"{attack}.parquet").read_bytes() == (own / f"{attack}.parquet").read_bytes()
    found = {c["method"]: c for c in cells(results).values()}
    suffixes = {}
    for method, cell in found.items():
        model_dir = next((results / "cells" / cell["cell_id"] / "eval").iterdir())
        own, replay = read_records(model_dir / "gcg.parquet"), read_records(model_dir / "gcg_transfer.parquet")
        assert len(own) == len(replay) == 2 and "eval_asr_gcg" not in cell["metrics"] and "asr_gcg" in cell["metrics"]
        suffixes[method] = ([json.loads(r.extra)["suffix_ids"] for r in own],
                            [json.loads(r.extra)["suffix_ids"] for r in replay])
        prompts = [read_records(model_dir / f"{name}.parquet") for name in ("autodan", "autodan_transfer")]
        assert all(len(p) == 2 for p in prompts) and "asr_autodan_transfer" in cell["metrics"]
        suffixes[f"{method}-autodan"] = [json.loads(r.extra)["template"] for r in prompts[1]]
    assert suffixes["gt_sft-autodan"] == suffixes["baseline-autodan"]
    assert suffixes["gt_sft"][1] == suffixes["baseline"][0] == suffixes["baseline"][1]
    analysis = analyze(results)
    rows = [r for r in analysis.tables["jailbreak"] if r["category"] == "ALL" and r["method"] == "gt_sft"]
    summary = next(r for r in analysis.tables["cell_summary"] if r["method"] == "gt_sft")
    assert summary["n_harmful"] == 2  # xstest_unsafe only: the attacks' records stay out of the safety loss
    assert {r["template"] for r in rows} >= {"gcg", "gcg_transfer", "autodan", "autodan_transfer"}
    assert all(r["baseline_asr"] is not None for r in rows if r["template"].startswith("gcg"))
    from forgetjax.analysis.comparisons import group_estimate
    from forgetjax.report.questions import answer_rq4

    post_dir = results / "cells" / found["gt_sft"]["cell_id"] / "eval" / model_slug(found["gt_sft"]["cell_id"])
    base_dir = results / "cells" / baseline.cell_id / "eval" / model_slug(baseline.cell_id)
    for attack in ("gcg", "gcg_transfer", "autodan", "autodan_transfer"):  # ASR after - before, by hand
        pre = {r.item_id: r.refusal for r in read_records(base_dir / f"{attack}.parquet")}
        post = {r.item_id: r.refusal for r in read_records(post_dir / f"{attack}.parquet")}
        expected = [float(pre[i]) - float(post[i]) for i in post if i in pre]
        estimate = group_estimate(analysis.study, [found["gt_sft"]["cell_id"]], "attack_erosion", benchmarks=[attack])
        assert estimate["n"] == len(expected) == 2 and estimate["estimate"] == pytest.approx(np.mean(expected))
    assert "Attack success rate, post-trained minus start model" in " ".join(answer_rq4(analysis))
    from forgetjax.report import build_report

    index = build_report(results, tmp_path / "report", n_resamples=100)
    assert (tmp_path / "report" / "figures" / "attacks_safe_tiny.png").is_file()
    assert "Optimised attacks (GCG, AutoDAN) before and after" in index.read_text()

    study["attacks"]["gcg"]["steps"] = 0
    config.write_text(yaml.safe_dump(study))
    bad = subprocess.run([sys.executable, "-m", "forgetjax.cli", "study", str(config), "--list"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "attacks.gcg.steps" in bad.stderr, bad.stderr
