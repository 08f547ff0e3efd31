"""Stage chains (`pipelines:`): expansion (stage ids shared by prefix, the chain in the cell id, the domain rule,
errors naming the dotted field), a two-stage chain equal to the two stages trained by hand with `forgetjax train`
(same final parameters), and a study killed in its second stage resuming without retraining the first."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from study_runs import ENV, run_study
from tiny_models import make_tiny_chat_model

TRAIN = {"batch_size": 4, "max_length": 256, "checkpoint": {"every": 1, "keep": 2},
         "log": {"progress": False, "tensorboard": False, "peak_flops": 1.0e11}}
RECORDS = [{"prompt": f"Say the word number {i}.", "completion": f"Word {i} is {'abcdefgh'[i % 8] * (i % 5 + 1)}."}
           for i in range(12)]


def chain_study(tmp_path: Path, data_dir: Path | None, second_steps: int = 2, **changes) -> Path:
    """A study of one two-stage chain on a tiny chat model: GT-SFT on math, then GT-SFT on a records file."""
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        make_tiny_chat_model(model_dir)
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    battery = tmp_path / "battery.yaml"
    battery.write_text(yaml.safe_dump({"name": "tiny", "format": "chat", "batch_size": 8,
                                       "benchmarks": [{"name": "mmlu", "limit": 2, "n_shots": 0}]}))
    study = {
        "name": "chain", "results_dir": str(tmp_path / "results"), "data_dir": str(data_dir or tmp_path),
        "models": [{"scale": "tiny", "safe": str(model_dir)}], "scales": ["tiny"], "start_points": ["safe"],
        "methods": [], "domains": ["math"], "seeds": [0], "budget": {"kind": "steps", "value": 2}, "train": TRAIN,
        "domain_sources": {"math": {"limit": 8}}, "battery": str(battery), "representation": False,
        "pipelines": {"two": {"stages": [
            {"name": "first", "method": "gt_sft"},
            {"name": "second", "method": "gt_sft", "budget": {"kind": "steps", "value": second_steps},
             "method_args": {"records": [str(records)], "verify": False}}],
            "evaluate": ["first", "second"]}},
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def load(path: Path):
    from forgetjax.study.schema import load_study_config

    return load_study_config(path)


def pipeline_cells(cfg):
    from forgetjax.study.matrix import expand

    return [cell for cell in expand(cfg) if cell.pipeline is not None]


# ------------------------------------------------------------------------------------------------ expansion


def test_stages_shared_by_prefix_have_one_id_and_the_chain_is_in_the_cell_id(tmp_path):
    path = chain_study(tmp_path, None)
    study = yaml.safe_load(path.read_text())
    first = study["pipelines"]["two"]["stages"][0]
    study["pipelines"]["one"] = [dict(first)]  # the same first stage, in the plain-list form
    path.write_text(yaml.safe_dump(study))
    cells = {cell.method: cell for cell in pipeline_cells(load(path))}
    assert sorted(cells) == ["one.first", "two.first", "two.second"]
    one, after_first, after_second = cells["one.first"], cells["two.first"], cells["two.second"]
    assert one.pipeline.stages[0].stage_id == after_first.pipeline.stages[0].stage_id
    assert [s.stage_id for s in after_second.pipeline.stages[:1]] == [after_first.pipeline.stages[0].stage_id]
    second = after_second.pipeline.stages[1]
    assert second.parent == after_first.pipeline.stages[0].stage_id
    assert second.run["train"]["model"].endswith(f"stages/{second.parent}/train/final")
    assert after_first.cell_id != one.cell_id  # another pipeline, another evaluated cell (same stage)

    # a change to the first stage changes both stage ids and every cell id downstream
    study["pipelines"]["two"]["stages"][0]["budget"] = {"kind": "steps", "value": 3}
    path.write_text(yaml.safe_dump(study))
    changed = {cell.method: cell for cell in pipeline_cells(load(path))}
    assert changed["one.first"].cell_id == one.cell_id
    assert changed["two.first"].cell_id != after_first.cell_id
    assert changed["two.second"].cell_id != after_second.cell_id
    assert changed["two.second"].pipeline.stages[1].stage_id != second.stage_id
    # ... and a change to the second stage leaves the first stage and its cell alone
    study["pipelines"]["two"]["stages"][1]["budget"] = {"kind": "steps", "value": 5}
    path.write_text(yaml.safe_dump(study))
    again = {cell.method: cell for cell in pipeline_cells(load(path))}
    assert again["two.first"].cell_id == changed["two.first"].cell_id
    assert again["two.second"].cell_id != changed["two.second"].cell_id


def test_the_domain_rule_a_pipeline_crosses_domains_unless_every_stage_names_one(tmp_path):
    path = chain_study(tmp_path, None, domains=["math", "qa"])
    cells = pipeline_cells(load(path))
    # the second stage names no domain: it trains on the cell's domain; the first stage too
    assert sorted((c.method, c.domain) for c in cells) == [
        ("two.first", "math"), ("two.first", "qa"), ("two.second", "math"), ("two.second", "qa")]
    study = yaml.safe_load(path.read_text())
    study["pipelines"]["two"]["stages"][0]["domain"] = "qa"
    study["pipelines"]["two"]["stages"][1]["domain"] = "math"
    path.write_text(yaml.safe_dump(study))
    cells = {c.method: c for c in pipeline_cells(load(path))}
    assert len(pipeline_cells(load(path))) == 2  # every stage fixes its domain: one chain, not one per domain
    assert cells["two.first"].domain == "qa" and cells["two.second"].domain == "math"
    assert cells["two.second"].target_benchmarks == ("gsm8k",)
    assert [s.domain for s in cells["two.second"].pipeline.stages] == ["qa", "math"]


@pytest.mark.parametrize("stages, message", [
    ([{"method": "gt_sft", "domian": "math"}], "unknown key pipelines.p.stages[0].domian (did you mean domain?)"),
    ([{"method": "sft"}], "pipelines.p: stages[0].method: unknown method 'sft'"),
    ([{"method": "gt_sft", "domain": "chem"}], "pipelines.p.stages[0].domain: unknown domain 'chem'"),
    ([{"method": "gt_sft", "train": {"seed": 1}}], "pipelines.p.stages[0].train.seed: set by the chain"),
    ([{"method": "gt_sft", "train": {"optimizer": {"lrr": 1}}}],
     "pipelines.p.stages[0]: unknown key train.optimizer.lrr (did you mean lr?)"),
    ([{"method": "gt_sft"}, {"method": "gt_sft"}], "stages[1].name: two stages are named 'gt_sft'"),
    ({"stages": [{"method": "gt_sft"}], "evaluate": ["nope"]}, "pipelines.p: evaluate: ['nope'] must name stages"),
    ([{"method": "off_rl_dpo", "train": {"replay": {"source": "general", "fraction": 0.25}}}],
     "pipelines.p.stages[0]: train.replay: method off_rl_dpo cannot replay"),
])
def test_a_bad_pipeline_fails_at_load_naming_the_study_file_and_dotted_field(tmp_path, stages, message):
    from forgetjax.config import ConfigError

    path = chain_study(tmp_path, None)
    study = yaml.safe_load(path.read_text())
    study["pipelines"] = {"p": stages}
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_study_list_and_plan_show_the_chains_and_their_shared_stages(tmp_path):
    path = chain_study(tmp_path, None)
    cells = {cell.method: cell for cell in pipeline_cells(load(path))}
    first, second = cells["two.second"].pipeline.stages
    out = subprocess.run([sys.executable, "-m", "forgetjax.cli", "study", str(path), "--list"], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"chain: first [{first.stage_id}] -> second [{second.stage_id}]" in out.stdout
    assert "pipeline stages: 2 (each trained once; 1 shared by several evaluated cells)" in out.stdout
    assert f"{first.stage_id}  gt_sft on math, steps 2" in out.stdout and "in 2 cell(s)" in out.stdout
    plan = subprocess.run([sys.executable, "-m", "forgetjax.cli", "plan", str(path), "--topology", "cpu:1"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert f"{second.stage_id}  gt_sft on math, steps 2, from {first.stage_id}; in 1 cell(s)" in plan.stdout


# ------------------------------------------------------------------------------------------------ running


def parameter_digest(checkpoint: Path) -> str:
    """sha256 over every parameter array of a saved model, in path order."""
    import jax
    from flax import nnx

    import forgetjax

    model, _ = forgetjax.load(str(checkpoint))
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)),
                             key=lambda item: jax.tree_util.keystr(item[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def train_by_hand(tmp_path: Path, name: str, model: str, run: dict) -> Path:
    """`forgetjax train` on a run config written here (not the study's), in its own process; its final model."""
    out = tmp_path / "by_hand" / name
    config = {"train": {**TRAIN, "model": model, "seed": 0, "out_dir": str(out), **run.pop("train")}, **run}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "forgetjax.cli", "train", str(path)], capture_output=True,
                          text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "final"


def cell_data(results: Path) -> dict[str, dict]:
    return {d["method"]: d for d in (json.loads(p.read_text()) for p in (results / "cells").glob("*/cell.json"))}


def test_a_two_stage_chain_equals_the_two_stages_trained_by_hand(tmp_path, data_dir):
    config = chain_study(tmp_path, data_dir, train={**TRAIN, "kl_to_start": {"every": 1}})
    out = run_study(config)
    assert out.returncode == 0, out.stdout + out.stderr
    results = tmp_path / "results"
    cells = cell_data(results)
    first_id, second_id = [entry["stage_id"] for entry in cells["two.second"]["pipeline"]["path"]]
    for method, stage_id in (("two.first", first_id), ("two.second", second_id)):  # the evaluated stage's KL
        stage_result = json.loads((results / "stages" / stage_id / "train" / "train_result.json").read_text())
        assert stage_result["kl_to_start"]["measured_steps"] == 2
        assert cells[method]["kl_to_start"] == stage_result["kl_to_start"]
    assert cells["two.first"]["pipeline"]["path"][0]["stage_id"] == first_id
    assert cells["two.second"]["pipeline"]["stage"] == "second" and cells["two.second"]["status"] == "done"
    assert [e["budget"]["used"]["steps"] for e in cells["two.second"]["pipeline"]["path"]] == [2, 2]
    assert out.stdout.count(f"stage {first_id}: gt_sft on math") == 1  # trained once for both cells
    from forgetjax.results import discover_cells

    parsed = {cell.method: cell for cell in discover_cells(results)[0]}
    assert [e["name"] for e in parsed["two.second"].pipeline["path"]] == ["first", "second"]
    assert parsed["two.first"].pipeline["stage"] == "first" and parsed["baseline"].pipeline == {}

    domain = {"name": "math", "limit": 8, "data_dir": str(data_dir)}
    first = train_by_hand(tmp_path, "first", str(tmp_path / "model"),
                          {"train": {"budget": {"kind": "steps", "value": 2}}, "method": "gt_sft", "domain": domain})
    second = train_by_hand(tmp_path, "second", str(first),
                           {"train": {"budget": {"kind": "steps", "value": 2}}, "method": "gt_sft", "domain": domain,
                            "method_args": {"records": [str(tmp_path / "records.jsonl")], "verify": False}})
    stage_first = results / "stages" / first_id / "train" / "final"
    stage_second = results / "stages" / second_id / "train" / "final"
    assert parameter_digest(stage_first) == parameter_digest(first)
    assert parameter_digest(stage_second) == parameter_digest(second)
    assert parameter_digest(stage_second) != parameter_digest(stage_first)


def file_states(directory: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_study_killed_in_its_second_stage_resumes_without_retraining_the_first(tmp_path, data_dir):
    config = chain_study(tmp_path, data_dir, second_steps=6)
    results = tmp_path / "results"
    cells = {cell.method: cell for cell in pipeline_cells(load(config))}
    first_id, second_id = [stage.stage_id for stage in cells["two.second"].pipeline.stages]
    partial = results / "stages" / f".{second_id}.partial" / "train" / "checkpoints"
    def second_stage_checkpointed() -> bool:
        """A checkpoint at step >= 2 of the second stage exists (checkpoints keep 2, so which two varies)."""
        try:
            return any(p.name.isdigit() and int(p.name) >= 2 for p in list(partial.iterdir()))
        except FileNotFoundError:
            return False

    run_study(config, kill_when=second_stage_checkpointed)
    assert (results / "stages" / first_id).is_dir() and not (results / "stages" / second_id).exists()
    before = file_states(results / "stages" / first_id)

    out = run_study(config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert file_states(results / "stages" / first_id) == before  # not retrained, not rewritten
    assert f"stage {first_id} (first): done already, reused" in out.stdout
    assert f"stage {first_id}: gt_sft" not in out.stdout
    assert "resumed from checkpoint step" in out.stderr
    result = json.loads((results / "stages" / second_id / "train" / "train_result.json").read_text())
    assert result["resumed_from"] >= 2 and result["steps"] == 6
    assert {c["status"] for c in cell_data(results).values()} == {"done"}


def test_a_malformed_pipeline_in_cell_json_is_an_error_naming_the_field():
    from forgetjax.results import parse_cell

    cell = {"cell_id": "c", "start_point": "safe", "model": "m", "scale": "s", "method": "p.b", "seed": 0,
            "status": "done", "pipeline": {"name": "p", "stage": "b", "path": [
                {"stage_id": "stage-1", "name": "a", "method": "gt_sft", "domain": "math"}]}}
    with pytest.raises(ValueError, match="cell.json: field 'pipeline' must be an object"):
        parse_cell(cell, "cell.json")  # the path ends at stage a, not at the evaluated stage b
    cell["pipeline"]["stage"] = "a"
    assert parse_cell(cell, "cell.json").pipeline["path"][0]["stage_id"] == "stage-1"


def test_a_distillation_stage_names_its_shared_teacher_stage_and_plan_counts_it(tmp_path):
    from forgetjax.study.plan import teacher_stages

    path = chain_study(tmp_path, None)
    study = yaml.safe_load(path.read_text())
    study["models"][0]["same_family_teacher"] = "some/teacher"
    study["pipelines"] = {"kd_then_sft": [{"name": "kd", "method": "sf_sft"}, {"name": "sft", "method": "gt_sft"}],
                          "kd_only": [{"name": "kd", "method": "sf_sft"}]}
    path.write_text(yaml.safe_dump(study))
    cfg = load(path)
    cells = {cell.method: cell for cell in pipeline_cells(cfg)}
    kd = cells["kd_then_sft.sft"].pipeline.stages[0]
    assert kd.teacher_stage and kd.run["method_args"]["teacher_data"].endswith(f"stages/{kd.teacher_stage}")
    assert cells["kd_only.kd"].pipeline.stages[0].stage_id == kd.stage_id
    assert {stage: count for stage, (_, count) in teacher_stages(cfg).items()} == {kd.teacher_stage: 2}
