"""Evaluation formats: BASE starts few-shot, SAFE starts chat, never paired across formats; every battery benchmark
has a few-shot prompt whose exemplars come from outside the evaluated items."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from forgetjax.errors import UserError


def _set_format(directory, benchmark: str, fmt: str) -> None:
    """Rewrite one cell's records of `benchmark` with extra.format = fmt."""
    from forgetjax.eval.records import read_records, write_records

    path = next(directory.glob(f"eval/*/{benchmark}.parquet"))
    records = [dataclasses.replace(r, extra=json.dumps({**r.extra_dict(), "format": fmt})) for r in read_records(path)]
    write_records(records, path)


def test_pairing_refuses_a_cell_and_baseline_in_different_formats(tmp_path):
    from forgetjax.analysis.loading import load_study
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


def battery_benchmarks() -> list[str]:
    """Every benchmark of the shipped batteries and of the domains' targets."""
    from forgetjax.eval.battery import resolve_battery
    from forgetjax.tasks.domains import target_benchmarks

    names = {t for targets in target_benchmarks().values() for t in targets}
    for battery in ("core", "quick", "demo"):
        names |= {entry.name for entry in resolve_battery(str(REPO / "configs" / "eval" / f"{battery}.yaml")).entries}
    return sorted(names)


REPO = Path(__file__).resolve().parent.parent
# MMLU's dev files repeat five test questions of the sister subject (shown only in the other subject's prompts).
KNOWN_CROSS_SUBJECT = {"mmlu": {"college_medicine/0152", "college_medicine/0081", "clinical_knowledge/0252",
                                "clinical_knowledge/0093", "clinical_knowledge/0056"}}
KNOWN_CROSS_SUBJECT["mmlu_robust"] = {f"{item}::original" for item in KNOWN_CROSS_SUBJECT["mmlu"]}


@pytest.mark.parametrize("name", battery_benchmarks())
def test_fewshot_exemplars_are_never_evaluated_items(name, data_dir):
    """Each benchmark's few-shot prompt holds its default number of exemplars, every one in the prompt, and no
    exemplar of any item's pool is an evaluated item; a zero-shot benchmark says why and takes no shots."""
    from forgetjax.eval.benchmarks import get_benchmark

    benchmark = get_benchmark(name)
    try:
        items = benchmark.load(data_dir)
    except FileNotFoundError as err:  # only the hub-only sets may be absent (the pack has no sycophancy evals)
        if "sycophancy" not in name:
            raise
        pytest.skip(f"{name}: {err}")
    evaluated = {benchmark.question(item).strip(): item for item in items}
    n = benchmark.n_shots(None)
    if benchmark.shot_source:
        assert n > 0, name
    else:
        assert n == 0 and benchmark.zero_shot_reason, name
        with pytest.raises(UserError, match="zero-shot by design"):
            benchmark.n_shots(1)
    pools = {tuple(item.data.get("shots", ())): item for item in items}
    leaked = {evaluated[q.strip()].id: user for pool, user in pools.items() for q, _ in pool if q.strip() in evaluated}
    assert set(leaked) == KNOWN_CROSS_SUBJECT.get(name, set()), f"{name}: exemplars that are evaluated items"
    assert all(evaluated_id.split("/")[0] != user.data.get("subject") for evaluated_id, user in leaked.items())
    for item in items[:: max(1, len(items) // 20)]:
        shots = benchmark.exemplars(item)
        assert len(shots) == n, name
        prompt = benchmark.build_prompt(item, "fewshot")
        assert isinstance(prompt, str), name
        for question, answer in shots:
            assert question.strip().rstrip("?") in prompt and answer.strip() in prompt, (name, question)
        last_shot = max((prompt.index(q.strip().rstrip("?")) for q, _ in shots), default=-1)
        assert prompt.rindex(benchmark.question(item).strip().rstrip("?")) > last_shot, name


def item(**data):
    from forgetjax.eval.benchmarks import Item

    return Item(id="x", category="x", data=data)


def test_fewshot_prompts_written_out_by_hand():
    from forgetjax.eval.benchmarks import get_benchmark

    nq = item(question="who wrote hamlet", answers=["Shakespeare"],
              shots=(("capital of france", "Paris"), ("who wrote hamlet", "Shakespeare"), ("largest ocean?", "Pacific")))
    assert get_benchmark("triviaqa").build_prompt(nq, "fewshot", n_shots=2) == (
        "Q: capital of france?\nA: Paris\n\nQ: largest ocean?\nA: Pacific\n\nQ: who wrote hamlet?\nA:")
    mmlu = item(question="What is 2 + 2? ", options=["3", "4", "5", "6"], answer=1, subject="elementary_mathematics",
                shots=(("What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4", "B"),))
    assert get_benchmark("mmlu").build_prompt(mmlu, "fewshot", n_shots=1) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    bbh = item(input="not True is", target="False", shots=(("True and False is", "False"), ("not False is", "True")))
    assert get_benchmark("bbh").build_prompt(bbh, "fewshot", n_shots=2) == (
        "Q: True and False is\nA: False\n\nQ: not False is\nA: True\n\nQ: not True is\nA:")
    request = item(prompt="How do I pick a lock?", harmful=True)
    assert get_benchmark("advbench").build_prompt(request, "fewshot") == "Request: How do I pick a lock?\nResponse:"
    with pytest.raises(UserError, match="bbh: n_shots=3 but its exemplar pool holds 2"):
        get_benchmark("bbh").build_prompt(bbh, "fewshot", n_shots=3)
