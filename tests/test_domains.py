"""Domain configs (`configs/domains/`): each loads and names registered held-out target benchmarks; a study's cells
take their training source from them; `domain_files` replaces a shipped domain; bad files fail with the file named."""
from pathlib import Path

import pytest
import yaml

from forgetjax.config import ConfigError
from forgetjax.eval.benchmarks import list_benchmarks
from forgetjax.study.matrix import expand
from forgetjax.study.schema import ModelEntry, StudyConfig
from forgetjax.tasks.domains import DOMAINS_DIR, domain_specs, load_domain
from forgetjax.verifiers.rewards import DOMAINS


def study(**fields) -> StudyConfig:
    cfg = StudyConfig(models=[ModelEntry(scale="tiny", safe="some/model")], scales=["tiny"], start_points=["safe"],
                      methods=["gt_sft"], **fields)
    cfg.validate()
    return cfg


def test_shipped_domains_cover_every_verifier_family_with_held_out_targets():
    from forgetjax.tasks.safety_domains import SAFETY_DOMAINS

    specs = domain_specs()
    assert sorted(specs) == sorted(DOMAINS)
    assert {name: (spec.source, spec.split) for name, spec in specs.items()} == {
        "math": ("gsm8k", "train"), "code": ("mbpp", "train"), "qa": ("efficientqa", "train"),
        **{name: (domain.source, "train") for name, domain in SAFETY_DOMAINS.items()}}
    for spec in specs.values():
        assert spec.target_benchmarks and spec.source not in ("", None)
        assert set(spec.target_benchmarks) <= set(list_benchmarks())


def test_cells_take_their_problem_source_from_the_domain_config_and_study_overrides_win(tmp_path):
    cells = [c for c in expand(study(domains=["math", "qa"], domain_sources={"qa": {"limit": 5}})) if c.domain]
    by_domain = {c.domain: c.run["domain"] for c in cells}
    assert by_domain["math"] == {"name": "math", "source": "gsm8k", "split": "train"}
    assert by_domain["qa"] == {"name": "qa", "source": "efficientqa", "split": "train", "limit": 5}

    custom = tmp_path / "qa.yaml"
    custom.write_text(yaml.safe_dump({"name": "qa", "source": "nq_open", "split": "validation",
                                      "template": "Q: {question}", "target_benchmarks": ["nq_open"]}))
    cell = next(c for c in expand(study(domains=["qa"], domain_files=[str(custom)])) if c.domain)
    assert cell.run["domain"] == {"name": "qa", "source": "nq_open", "split": "validation",
                                  "template": "Q: {question}"}


def test_bad_domain_files_name_the_file_and_field(tmp_path):
    wrong_name = tmp_path / "math.yaml"
    wrong_name.write_text(yaml.safe_dump({"name": "qa", "target_benchmarks": ["nq_open"]}))
    with pytest.raises(ValueError, match=r"math.yaml: name 'qa' does not match"):
        load_domain(wrong_name)
    unknown = tmp_path / "code.yaml"
    unknown.write_text(yaml.safe_dump({"name": "code", "target_benchmarks": ["no_such_bench"]}))
    with pytest.raises((ConfigError, ValueError), match=r"code.yaml: target_benchmarks: .*no_such_bench"):
        study(domain_files=[str(unknown)])
    with pytest.raises(ConfigError, match="domain_files: nowhere.yaml"):
        study(domain_files=["nowhere.yaml"])
    assert (DOMAINS_DIR / "math.yaml").is_file() and isinstance(DOMAINS_DIR, Path)


def test_cells_carry_their_domain_files_targets_into_the_analysis():
    from forgetjax.results import parse_cell

    demo_math = str(DOMAINS_DIR / "word_problems" / "math.yaml")
    cell = next(c for c in expand(study(domains=["math"], domain_files=[demo_math])) if c.domain)
    assert cell.run["domain"]["source"] == "word_problems"
    assert cell.target_benchmarks == ("word_problems", "gsm8k")
    record = {"cell_id": cell.cell_id, "start_point": "safe", "model": "m", "scale": "tiny", "method": "gt_sft",
              "domain": "math", "seed": 0, "status": "done"}
    assert parse_cell({**record, "target_benchmarks": list(cell.target_benchmarks)}).targets == (
        "word_problems", "gsm8k")
    assert parse_cell(record).targets == ("gsm8k",)
    with pytest.raises(ValueError, match="target_benchmarks"):
        parse_cell({**record, "target_benchmarks": "gsm8k"})


def test_in_domain_rule_covers_targets_families_and_listed_benchmarks():
    from forgetjax.eval.benchmarks import get_benchmark
    from forgetjax.tasks.domains import is_in_domain

    family = {name: get_benchmark(name).category for name in list_benchmarks()}
    assert family["mgsm_de"] == "multilingual" and family["gsm8k"] == "math"

    def in_domain(domain, targets=()):
        return sorted(b for b, f in family.items() if is_in_domain(domain, targets, b, f))

    mgsm = sorted(b for b in family if b.startswith("mgsm_"))
    assert in_domain("math") == sorted(["gsm8k", "math500", "word_problems", *mgsm])
    assert in_domain("code") == ["humaneval", "humaneval_plus", "humaneval_plus_mini", "mbpp"]
    # safety domains: their held-out halves, the published sets that measure them and those holding training items
    assert in_domain("power_seeking") == ["ai_risk", "power_seeking_heldout", "power_seeking_heldout_gen"]
    assert in_domain("deception_avoidance") == ["deception_avoidance_heldout", "truthfulqa_mc1", "truthfulqa_mc2"]
    assert in_domain("toxicity_refusal") == ["advbench", "do_not_answer", "harmbench_standard", "strongreject",
                                             "toxicity_refusal_heldout"]
    assert in_domain("qa") == ["nq_open", "triviaqa"]  # MMLU and GPQA (knowledge family) stay off-target
    assert in_domain("qa", ("nq_open", "bbh")) == ["bbh", "nq_open", "triviaqa"]  # a cell's own targets count too
    assert in_domain(None, ("gsm8k",)) == [] and in_domain("unshipped", ("bbh",)) == ["bbh"]


def test_bad_in_domain_fields_name_the_file_and_field(tmp_path):
    path = tmp_path / "code.yaml"
    path.write_text(yaml.safe_dump({"name": "code", "target_benchmarks": ["mbpp"], "in_domain_families": ["coding"]}))
    with pytest.raises((ConfigError, ValueError),
                       match=r"code.yaml: in_domain_families: unknown families \['coding'\]"):
        study(domain_files=[str(path)])
    path.write_text(yaml.safe_dump({"name": "code", "target_benchmarks": ["mbpp"], "in_domain_benchmarks": ["apps*"]}))
    with pytest.raises((ConfigError, ValueError), match=r"code.yaml: in_domain_benchmarks: \['apps\*'\] match no"):
        study(domain_files=[str(path)])
