"""Teacher stages: one generation per (teacher, domain, sampling settings) shared by every distillation cell, its id,
its reuse by the cells of a tiny study, its resumption, and `forgetjax plan` counting it once against a hand
computation; every shipped study config loads and expands."""
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from forgetjax.config import from_dict
from forgetjax.methods.run import DomainConfig
from forgetjax.models.config import config_from_hf
from forgetjax.study.matrix import expand
from forgetjax.study.plan import parse_topology, teacher_stage_plan
from forgetjax.study.schema import ModelEntry, StudyConfig, load_study_config
from tiny_models import make_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]
TEACHERS = REPO / "configs" / "models" / "teachers"


def matrix_study(tmp_path, **method_args) -> StudyConfig:
    models = [ModelEntry(scale=scale, base=f"org/base-{scale}", safe=f"org/safe-{scale}",
                         same_family_teacher="org/same-teacher", cross_family_teacher="other/cross-teacher",
                         dtype="bfloat16") for scale in ("s", "m")]
    return StudyConfig(results_dir=str(tmp_path / "results"), models=models, scales=["s", "m"],
                       start_points=["base", "safe"], methods=["gt_sft", "sf_sft", "cf_sft"],
                       domains=["math", "qa"], seeds=[0, 1], method_args=method_args)


def stages_by_cell(cfg: StudyConfig) -> dict[tuple, str | None]:
    return {(c.start_point, c.scale, c.method, c.domain, c.seed): c.teacher_stage for c in expand(cfg)
            if not c.is_baseline}


def test_teacher_stage_is_shared_across_seeds_starts_and_scales_and_follows_teacher_and_sampling(tmp_path):
    cfg = matrix_study(tmp_path)
    stages = stages_by_cell(cfg)
    assert all(stages[key] is None for key in stages if key[2] == "gt_sft")
    for method in ("sf_sft", "cf_sft"):
        for domain in ("math", "qa"):
            shared = {stages[(point, scale, method, domain, seed)]
                      for point in ("base", "safe") for scale in ("s", "m") for seed in (0, 1)}
            assert len(shared) == 1 and None not in shared
    distinct = {stage for stage in stages.values() if stage}
    assert len(distinct) == 4  # (same, cross teacher) x (math, qa)
    cell = next(c for c in expand(cfg) if c.method == "sf_sft" and c.domain == "math")
    assert cell.run["method_args"]["teacher_data"] == str(tmp_path / "results" / "stages" / cell.teacher_stage)
    assert "same-teacher" in cell.teacher_stage and "math" in cell.teacher_stage

    def sf_stage(**args):
        return stages_by_cell(matrix_study(tmp_path, sf_sft=args))[("base", "s", "sf_sft", "math", 0)]

    def cf_stage(**args):
        return stages_by_cell(matrix_study(tmp_path, sf_sft=args))[("base", "s", "cf_sft", "math", 0)]

    base = sf_stage()
    for change in ({"temperature": 0.3}, {"n_samples": 7}, {"top_p": 0.9},
                   {"generation_seed": 5}, {"teacher": "org/other-teacher"}, {"teacher_dtype": "float32"},
                   {"system": "Be brief."}):
        assert sf_stage(**change) != base, change
        assert cf_stage(**change) == cf_stage(), change
    # selection and training settings act on the cell, not on the generations
    assert sf_stage(require_finished=False, dedupe=False, kd_weight=0.5, packing=True) == base
    limited = matrix_study(tmp_path)
    limited.domain_sources = {"math": {"limit": 5}}
    assert stages_by_cell(limited)[("base", "s", "sf_sft", "math", 0)] != base
    longer = matrix_study(tmp_path)
    longer.max_new_tokens = 99  # the generation length is the study's (or the domain's), for every method
    assert stages_by_cell(longer)[("base", "s", "sf_sft", "math", 0)] != base
    shared_dir = matrix_study(tmp_path)
    shared_dir.teacher_stages_dir = str(tmp_path / "shared")
    cell = next(c for c in expand(shared_dir) if c.method == "cf_sft")
    assert cell.run["method_args"]["teacher_data"] == str(tmp_path / "shared" / cell.teacher_stage)
    assert stages_by_cell(matrix_study(tmp_path, sf_sft={"teacher": "self"}))[("base", "s", "sf_sft", "math", 0)] is None


def test_teacher_stage_plan_matches_hand_computation():
    hf = yaml.safe_load((TEACHERS / "qwen2.5-72b-instruct.yaml").read_text())["hf_config"]
    config = config_from_hf(hf)
    topology = parse_topology("gpu:8:h200")
    plan = teacher_stage_plan(config, topology, prompts=100, samples=4, prompts_per_chunk=16, prompt_len=256,
                              new_tokens=512, compute_bytes=2)
    d, f, layers, vocab, head_dim = 8192, 29568, 80, 152064, 128
    q, kv = 64 * head_dim, 8 * head_dim
    per_layer = d * (q + 2 * kv) + (q + 2 * kv) + q * d + 3 * d * f + 2 * d  # q/k/v with bias, o, MLP, 2 norms
    params = 2 * vocab * d + layers * per_layer + d  # untied embedding and LM head, final norm
    assert params == pytest.approx(72.7e9, rel=1e-3)  # the published size
    assert plan.weights == params * 2 / 8
    rows, length = 16 * 4, 256 + 512
    assert plan.kv_cache == 2 * layers * rows * length * kv * 2 / 8
    assert plan.logits == (rows // 8) * vocab * 4
    flops_per_token = 2 * (layers * (d * (q + 2 * kv) + q * d + 3 * d * f) + vocab * d) + 4 * layers * q * length
    assert plan.flops == pytest.approx(100 * 4 * length * flops_per_token, rel=1e-12)
    assert plan.compute_seconds == pytest.approx(plan.flops / (8 * 989e12))
    decode_steps = math.ceil(100 / 16) * 512
    assert plan.bandwidth_seconds == pytest.approx(decode_steps * (plan.weights + plan.kv_cache) / 4800e9)
    assert plan.seconds == max(plan.compute_seconds, plan.bandwidth_seconds)


def test_plan_counts_one_teacher_stage_per_teacher_and_domain_and_flags_a_teacher_that_does_not_fit(
        tmp_path, data_dir, capsys):
    from forgetjax import cli

    student = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    study = {"results_dir": str(tmp_path / "results"), "data_dir": str(data_dir),
             "models": [{"scale": scale, "base": "b", "safe": "s", "dtype": "bfloat16", "hf_config": student,
                         "same_family_teacher": "Qwen/Qwen2.5-72B-Instruct",
                         "cross_family_teacher": "meta-llama/Llama-3.1-70B-Instruct"} for scale in ("s", "m")],
             "teacher_files": [str(TEACHERS / "qwen2.5-72b-instruct.yaml"),
                               str(TEACHERS / "llama-3.1-70b-instruct.yaml")],
             "scales": ["s", "m"], "start_points": ["base", "safe"], "methods": ["gt_sft", "sf_sft", "cf_sft"],
             "domains": ["math", "qa"], "seeds": [0, 1, 2], "train": {"dtype": "bfloat16"},
             "domain_sources": {"math": {"limit": 8}, "qa": {"limit": 6}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))

    def stage_lines(topology):
        assert cli.main(["plan", str(config), "--topology", topology]) == 0
        out = capsys.readouterr().out
        return out, [line.split() for line in out.splitlines() if line.strip().startswith("teacher-")]

    out, lines = stage_lines("gpu:1:h100")
    assert "teacher stages: 4" in out
    assert len(lines) == 4  # 2 teachers x 2 domains, not one per cell (2 scales x 2 starts x 3 seeds each)
    assert sorted((line[0].split("-")[-2], line[1], line[2]) for line in lines) == [
        ("math", "12", "8"), ("math", "12", "8"), ("qa", "12", "6"), ("qa", "12", "6")]
    assert all(line[-3:] == ["DOES", "NOT", "FIT"] for line in lines)  # ~145 GB of bf16 weights on one 80 GB GPU
    _, lines = stage_lines("gpu:8:h200")
    assert lines and not any("FIT" in line for line in lines)


def tiny_distill_study(tmp_path: Path, data_dir: Path) -> Path:
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    make_tiny_chat_model(student)
    make_tiny_chat_model(teacher, seed=1)
    battery = tmp_path / "battery.yaml"
    battery.write_text(yaml.safe_dump({"name": "tiny", "format": "chat", "batch_size": 4,
                                       "benchmarks": [{"name": "mmlu", "limit": 1, "n_shots": 0}]}))
    study = {
        "name": "tiny", "results_dir": str(tmp_path / "results"), "data_dir": str(data_dir),
        "models": [{"scale": "tiny", "safe": str(student), "same_family_teacher": str(teacher)}],
        "scales": ["tiny"], "start_points": ["safe"], "methods": ["sf_sft"], "domains": ["math"], "seeds": [0, 1],
        "budget": {"kind": "steps", "value": 1},
        "train": {"batch_size": 8, "max_length": 128, "checkpoint": {"every": 1, "keep": 1},
                  "log": {"progress": False, "tensorboard": False, "peak_flops": 1.0e11}},
        "max_new_tokens": 6,
        "method_args": {"sf_sft": {"n_samples": 2, "prompts_per_chunk": 2,
                                   "temperature": 1.0, "require_finished": False, "dedupe": False}},
        "domain_sources": {"math": {"limit": 4}},
        "battery": str(battery), "representation": False,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_cells_reuse_the_teacher_stage_and_a_killed_stage_resumes(tmp_path, data_dir, monkeypatch):
    from forgetjax.methods import distill
    from forgetjax.methods.teacher_data import Verifier
    from forgetjax.sampling.sampler import Sampler
    from forgetjax.study.runner import StudyRunner

    calls = {"generate": 0}
    generate = Sampler.generate_tokens

    def counting_generate(self, *args, **kwargs):
        calls["generate"] += 1
        return generate(self, *args, **kwargs)

    def all_correct(self, completions, references):  # a random tiny teacher solves nothing; keep every sample
        return [SimpleNamespace(correct=True, status="correct", timed_out=False) for _ in completions]

    monkeypatch.setattr(Sampler, "generate_tokens", counting_generate)
    monkeypatch.setattr(Verifier, "details", all_correct)
    cfg = load_study_config(tiny_distill_study(tmp_path, data_dir))
    summary = StudyRunner(cfg, log=lambda message: None).run()
    errors = [json.loads(path.read_text()).get("error") for path in Path(cfg.results_dir).glob("cells/*/cell.json")]
    assert (summary["done"], summary["failed"]) == (3, 0), errors
    assert calls["generate"] == 2  # 4 prompts in chunks of 2, generated once for both seeds
    cells = [c for c in expand(cfg) if not c.is_baseline]
    assert len({c.teacher_stage for c in cells}) == 1
    stage = Path(cells[0].run["method_args"]["teacher_data"])
    rows = [json.loads(line) for line in (stage / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and sorted({r["prompt_index"] for r in rows}) == [0, 1, 2, 3]
    for cell in cells:
        data = json.loads((Path(cfg.results_dir) / "cells" / cell.cell_id / "cell.json").read_text())
        assert data["status"] == "done" and data["run"]["method_args"]["teacher_data"] == str(stage)
        prepared = json.loads((Path(cfg.results_dir) / "cells" / cell.cell_id / "train" / "data" / "sf_sft" /
                               "stats.json").read_text())
        stage_stats = json.loads((stage / "stage.json").read_text())
        assert prepared["generation_flops"] == stage_stats["generation_flops"] > 0
        assert prepared["samples"] == 8 and prepared["teacher_data"] == str(stage)

    # a stage killed after its first chunk: the rebuild generates only the second one, and the same rows
    resumed = tmp_path / ".resumed.partial"
    (resumed / "chunks").mkdir(parents=True)
    shutil.copy(stage / "settings.json", resumed / "settings.json")
    shutil.copy(stage / "chunks" / "00000.jsonl", resumed / "chunks" / "00000.jsonl")
    args = from_dict(distill.DistillArgs, cells[0].run["method_args"])
    domain = from_dict(DomainConfig, cells[0].run["domain"])
    calls["generate"] = 0
    distill.build_teacher_stage(resumed, args, domain, "float32")
    assert calls["generate"] == 1
    assert (resumed / "rows.jsonl").read_text().splitlines()[:4] == (stage / "rows.jsonl").read_text().splitlines()[:4]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_study_config_loads_and_expands(path):
    cfg = load_study_config(path)
    cells = expand(cfg)
    raw_axes = dict(yaml.safe_load(path.read_text()).get("axes") or {})
    merge = raw_axes.pop("merge", None)
    frpo_only = {"frpo_lambda", "frpo_jackknife"}
    assert all(name in {"adapter", "budget"} | frpo_only or set(spec) >= {"key", "values"}
               for name, spec in raw_axes.items()), "extend this count for the study's new axis"
    trained_per_seed = 0
    for method in cfg.methods:
        settings = 1
        for name, spec in raw_axes.items():
            values, methods = (spec["values"], spec.get("methods")) if isinstance(spec, dict) else (spec, None)
            if name in frpo_only:
                methods = ["on_rl_frpo"]
            if methods is None or method in methods:
                settings *= len(values)
        merged = len(merge["interpolate"]) if merge and method in merge.get("methods", cfg.methods) else 0
        trained_per_seed += settings * (1 + merged)
    evaluated_per_seed = 0
    for pipeline in (yaml.safe_load(path.read_text()).get("pipelines") or {}).values():
        stages = pipeline if isinstance(pipeline, list) else pipeline["stages"]
        evaluated = len(pipeline.get("evaluate", [None])) if isinstance(pipeline, dict) else 1
        crossed = 1 if all("domain" in stage for stage in stages) else len(cfg.domains)
        evaluated_per_seed += evaluated * crossed
    assert len(cells) == len(cfg.scales) * len(cfg.start_points) * (
        1 + (trained_per_seed * len(cfg.domains) + evaluated_per_seed) * len(cfg.seeds))
    assert len({c.cell_id for c in cells}) == len(cells)
