"""Study analysis over a synthetic RESULTS_DIR: every statistic is recomputed here independently (numpy by hand,
scipy / statsmodels references) from the raw outcomes the builder wrote, never from the module's own output."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from forgetjax import results
from forgetjax.analysis import comparisons, estimates, export, loading, tables
from forgetjax.analysis.estimates import BootstrapSettings
from forgetjax.eval.records import EvalRecord, write_records

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
SETTINGS = BootstrapSettings(n_resamples=300, confidence=0.95, seed=3)

BENCHMARKS = {
    "gsm8k": ("math", [("main", 20)]),
    "nq_open": ("knowledge", [("main", 16)]),
    "mmlu": ("knowledge", [("stem", 12), ("humanities", 12)]),
    "bbh": ("reasoning", [("boolean_expressions", 10)]),
    "harmbench": ("safety_refusal", [("chemical_biological", 6), ("illegal", 6)]),
    "xstest_safe": ("over_refusal", [("homonyms", 8)]),
}
CAPABILITY = ("gsm8k", "nq_open", "mmlu", "bbh")
OFF_TARGET = {"math": ("nq_open", "mmlu", "bbh"), "qa": ("gsm8k", "mmlu", "bbh")}
"""Capability benchmarks outside each domain: gsm8k is math (math family), nq_open is the QA domain's target."""


@dataclass(frozen=True)
class CellSpec:
    """A synthetic cell: forget / gain probabilities for capability items, refusal-drop probability for harmful ones."""

    cell_id: str
    start_point: str
    method: str
    domain: str | None
    seed: int
    forget: float = 0.0
    gain: float = 0.0
    refusal_drop: float = 0.0
    status: str = "done"
    drop_items: tuple[tuple[str, str], ...] = ()
    representation: bool = True
    forget_only: tuple[str, ...] | None = None  # benchmarks whose items may be forgotten (None: every one)


SPECS = (
    CellSpec("base-baseline", "base", "baseline", None, 0),
    CellSpec("base-gt_sft-math-s0", "base", "gt_sft", "math", 0, 0.5, 0.1, 0.3),
    CellSpec("base-gt_sft-math-s1", "base", "gt_sft", "math", 1, 0.4, 0.15, 0.4),
    CellSpec("base-on_rl-math-s0", "base", "on_rl", "math", 0, 0.1, 0.25, 0.1, drop_items=(("gsm8k", "g19"),)),
    CellSpec("base-self-qa-s0", "base", "self", "qa", 0, 0.05, 0.1, 0.0),
    CellSpec("base-sf_sft-qa-s0", "base", "sf_sft", "qa", 0, 0.3, 0.05, 0.2, representation=False),
    CellSpec("base-dpo-math-s0", "base", "dpo", "math", 0, status="failed"),
    CellSpec("safe-baseline", "safe", "baseline", None, 0),
    CellSpec("safe-gt_sft-math-s0", "safe", "gt_sft", "math", 0, 0.3, 0.1, 0.5),
    CellSpec("safe-on_rl-math-s0", "safe", "on_rl", "math", 0, 0.1, 0.2, 0.1),
)


@dataclass
class Outcome:
    """What the builder wrote for one item of one cell."""

    category: str
    correct: int
    refusal: bool | None = None
    confidence: float | None = None
    output: str | None = None
    tokens: int | None = None
    extracted: str | None = None


@dataclass
class Synthetic:
    root: Path
    specs: dict[str, CellSpec]
    outcomes: dict[str, dict[str, dict[str, Outcome]]] = field(default_factory=dict)

    def post_ids(self) -> list[str]:
        return [s.cell_id for s in self.specs.values() if s.method != "baseline" and s.status == "done"]

    def baseline_id(self, cell_id: str) -> str:
        return f"{self.specs[cell_id].start_point}-baseline"

    def pairs(self, cell_id: str, benchmark: str, category: str | None = None):
        """(item ids, pre outcomes, post outcomes) of the items in both the cell and its baseline."""
        pre = self.outcomes[self.baseline_id(cell_id)][benchmark]
        post = self.outcomes[cell_id][benchmark]
        ids = sorted(i for i in pre if i in post and (category is None or pre[i].category == category))
        return ids, [pre[i] for i in ids], [post[i] for i in ids]


def _item_ids(benchmark: str) -> list[tuple[str, str]]:
    _, categories = BENCHMARKS[benchmark]
    ids, index = [], 0
    for category, count in categories:
        for _ in range(count):
            ids.append((f"{benchmark[0]}{index:02d}", category))
            index += 1
    return ids


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _generation(rng: np.random.Generator, correct: int) -> tuple[str, str | None]:
    length = int(rng.integers(3, 9))
    text = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=length))
    extracted = None if rng.random() < 0.2 else ("42" if correct else "41")
    return text, extracted


def _baseline_outcomes(rng: np.random.Generator, start_point: str) -> dict[str, dict[str, Outcome]]:
    refuse_p = 0.95 if start_point == "safe" else 0.6
    out: dict[str, dict[str, Outcome]] = {}
    for benchmark, (family, _) in BENCHMARKS.items():
        items = {}
        for item_id, category in _item_ids(benchmark):
            if family in ("safety_refusal", "over_refusal"):
                refused = bool(rng.random() < (refuse_p if family == "safety_refusal" else 0.25))
                correct = int(refused) if family == "safety_refusal" else int(not refused)
                items[item_id] = Outcome(category, correct, refusal=refused)
            else:
                items[item_id] = Outcome(category, int(rng.random() < 0.55))
        out[benchmark] = items
    return out


def _post_outcomes(rng: np.random.Generator, baseline: dict[str, dict[str, Outcome]], spec: CellSpec):
    out: dict[str, dict[str, Outcome]] = {}
    for benchmark, items in baseline.items():
        family = BENCHMARKS[benchmark][0]
        new = {}
        for item_id, before in items.items():
            if (benchmark, item_id) in spec.drop_items:
                continue
            if family == "safety_refusal":
                refused = before.refusal and not (rng.random() < spec.refusal_drop)
                new[item_id] = Outcome(before.category, int(refused), refusal=bool(refused))
            elif family == "over_refusal":
                refused = bool(rng.random() < 0.3)
                new[item_id] = Outcome(before.category, int(not refused), refusal=refused)
            else:
                forget = spec.forget if spec.forget_only is None or benchmark in spec.forget_only else 0.0
                flip = forget if before.correct else spec.gain
                correct = 1 - before.correct if rng.random() < flip else before.correct
                new[item_id] = Outcome(before.category, correct)
        out[benchmark] = new
    return out


def _finish(rng: np.random.Generator, outcomes: dict[str, dict[str, Outcome]]) -> None:
    """Fill outputs, token counts, extracted answers and confidences."""
    for benchmark, items in outcomes.items():
        family = BENCHMARKS[benchmark][0]
        for outcome in items.values():
            if benchmark == "mmlu":
                outcome.confidence = float(np.round(rng.uniform(0.25, 0.99), 3))
            elif family in ("safety_refusal", "over_refusal"):
                outcome.output = REFUSAL_TEXT if outcome.refusal else "Sure, here is what you asked for in detail."
                outcome.tokens = len(outcome.output.split())
            else:
                outcome.output, outcome.extracted = _generation(rng, outcome.correct)
                outcome.tokens = len(outcome.output.split())


def _record(spec: CellSpec, benchmark: str, item_id: str, outcome: Outcome) -> EvalRecord:
    family = BENCHMARKS[benchmark][0]
    extra = {"family": family}
    fields = dict(correct=outcome.correct, output=outcome.output, output_tokens=outcome.tokens,
                  extracted_answer=outcome.extracted)
    if benchmark == "mmlu":
        chosen = 0 if outcome.correct else 1
        fields.update(output=None, option_logprobs=[-0.5, -1.0, -2.0, -3.0], chosen_option=chosen,
                      confidence=outcome.confidence, k=4, score=outcome.confidence if outcome.correct else 0.1)
    if outcome.refusal is not None:
        fields["refusal"] = outcome.refusal
        extra["harmful"] = family == "safety_refusal"
    return EvalRecord(
        run_id=spec.cell_id, model_id=f"synthetic/{spec.start_point}", benchmark=benchmark, category=outcome.category,
        item_id=item_id, prompt_hash=f"{benchmark}:{item_id}", seed=spec.seed, extra=json.dumps(extra), **fields,
    )


def _representation(spec: CellSpec) -> dict:
    depth = np.array([0.1, 0.2, 0.3, 0.4])
    return {
        "version": 1,
        "layers": [0, 1, 2, 3],
        "cka": list(1.0 - spec.forget * depth),
        "refusal_direction": {
            "cosine": list(1.0 - spec.refusal_drop * depth),
            "norm_ratio": [1.0, 1.0, 0.9, None],
            "projection_gap_ratio": list(1.0 - spec.refusal_drop * 2 * depth),
        },
        "weight_delta": {"mlp.down_proj": {"frobenius_norm": list(spec.forget * (1 + depth)),
                                           "effective_rank": [1.0, 2.0, 3.0, 4.0]}},
    }


def build_synthetic_study(root: Path, specs=SPECS) -> Synthetic:
    """Write cells/<id>/cell.json, eval/<model>/<benchmark>.parquet and representation.json for every spec."""
    synthetic = Synthetic(root, {s.cell_id: s for s in specs})
    baselines = {}
    for index, spec in enumerate(specs):
        rng = np.random.default_rng(1000 + index)
        if spec.method == "baseline":
            outcomes = _baseline_outcomes(rng, spec.start_point)
            baselines[spec.start_point] = outcomes
        else:
            outcomes = _post_outcomes(rng, baselines[spec.start_point], spec)
        _finish(rng, outcomes)
        directory = root / "cells" / spec.cell_id
        directory.mkdir(parents=True)
        cell = {"cell_id": spec.cell_id, "start_point": spec.start_point, "model": "smollm2-135m-instruct",
                "scale": "135m", "method": spec.method, "domain": spec.domain, "seed": spec.seed,
                "status": spec.status, "budget": {"steps": 10}, "metrics": {}}
        (directory / "cell.json").write_text(json.dumps(cell))
        if spec.status != "done":
            continue
        synthetic.outcomes[spec.cell_id] = outcomes
        for benchmark, items in outcomes.items():
            records = [_record(spec, benchmark, item_id, o) for item_id, o in items.items()]
            write_records(records, directory / "eval" / "synthetic_model" / f"{benchmark}.parquet")
        if spec.method != "baseline" and spec.representation:
            (directory / "representation.json").write_text(json.dumps(_representation(spec)))
    return synthetic


# ------------------------------------------------------------------------------------------ independent refs


def expected_transitions(pre: list[Outcome], post: list[Outcome]) -> dict:
    a = np.array([o.correct for o in pre], dtype=float)
    b = np.array([o.correct for o in post], dtype=float)
    n10 = int(np.sum((a == 1) & (b == 0)))
    n01 = int(np.sum((a == 0) & (b == 1)))
    return {"n": a.size, "acc_pre": a.mean(), "acc_post": b.mean(), "delta": b.mean() - a.mean(),
            "n10": n10, "n01": n01, "F": n10 / a.size, "BT": n01 / a.size}


def pooled(synthetic: Synthetic, cell_id: str, benchmarks) -> tuple[list[Outcome], list[Outcome]]:
    pre, post = [], []
    for benchmark in benchmarks:
        _, p, q = synthetic.pairs(cell_id, benchmark)
        pre += p
        post += q
    return pre, post


def row_for(rows, **where):
    matches = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(matches) == 1, (where, len(matches))
    return matches[0]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Synthetic:
    return build_synthetic_study(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def analysis(synthetic):
    result = tables.analyze(synthetic.root, SETTINGS)
    yield result
    result.study.connection.close()


# ------------------------------------------------------------------------------------------------------ tests


def test_layout_helpers_and_cell_selection(synthetic, analysis):
    assert results.cell_eval_dir(synthetic.root, "x") == synthetic.root / "cells" / "x" / "eval"
    assert results.cell_file(synthetic.root, "x") == synthetic.root / "cells" / "x" / "cell.json"
    assert results.representation_file(synthetic.root, "x").name == "representation.json"
    with pytest.raises(ValueError, match="cell_id"):
        results.cell_dir(synthetic.root, "../escape")
    ids = {c.cell_id for c in analysis.study.cells}
    assert ids == {s.cell_id for s in SPECS if s.status == "done"}
    assert any("base-dpo-math-s0" in issue and "failed" in issue for issue in analysis.study.issues)
    assert {k: c.cell_id for k, c in analysis.study.baselines.items()} == {
        ("base", "135m"): "base-baseline", ("safe", "135m"): "safe-baseline"}


def test_pairing_reports_items_missing_on_either_side(synthetic, analysis):
    rows = analysis["pairing"]
    missing = row_for(rows, cell_id="base-on_rl-math-s0", benchmark="gsm8k")
    assert (missing["n_paired"], missing["n_missing_in_cell"], missing["n_missing_in_baseline"]) == (19, 1, 0)
    assert missing["missing_in_cell"] == "g19"
    complete = row_for(rows, cell_id="base-gt_sft-math-s0", benchmark="mmlu")
    assert (complete["n_paired"], complete["n_missing_in_cell"], complete["n_prompt_changed"]) == (24, 0, 0)
    assert len(rows) == len(synthetic.post_ids()) * len(BENCHMARKS)


@pytest.mark.parametrize("benchmark", CAPABILITY)
def test_benchmark_rows_match_hand_computation(synthetic, analysis, benchmark):
    for cell_id in synthetic.post_ids():
        _, pre, post = synthetic.pairs(cell_id, benchmark)
        expected = expected_transitions(pre, post)
        row = row_for(analysis["forgetting"], cell_id=cell_id, level="benchmark", benchmark=benchmark)
        assert row["n"] == expected["n"] == row["n_binary"]
        assert row["acc_pre"] == pytest.approx(expected["acc_pre"])
        assert row["acc_post"] == pytest.approx(expected["acc_post"])
        assert row["delta"] == pytest.approx(expected["delta"])
        assert row["relative_drift"] == pytest.approx(expected["delta"] / expected["acc_pre"])
        assert (row["n10"], row["n01"]) == (expected["n10"], expected["n01"])
        assert row["forgetting"] == pytest.approx(expected["F"])
        assert row["backward_transfer"] == pytest.approx(expected["BT"])
        discordant = expected["n10"] + expected["n01"]
        reference_p = scipy_stats.binomtest(expected["n10"], discordant, 0.5).pvalue if discordant else 1.0
        assert row["mcnemar_p"] == pytest.approx(reference_p)
        table = [[0, expected["n10"]], [expected["n01"], 0]]
        assert row["mcnemar_p"] == pytest.approx(min(sm_mcnemar(table, exact=True).pvalue, 1.0))
        if benchmark == "mmlu":
            spurious = (1 - expected["acc_pre"]) * (1 - expected["acc_post"]) / 3
            assert row["k"] == "4"
            assert row["forgetting_adj"] == pytest.approx(max(expected["F"] - spurious, 0.0))
            assert row["backward_transfer_adj"] == pytest.approx(max(expected["BT"] - spurious, 0.0))
        else:
            assert row["k"] == ""
            assert row["forgetting_adj"] == pytest.approx(expected["F"])
        assert row["delta_ci_low"] <= row["delta"] <= row["delta_ci_high"]
        assert row["forgetting_ci_low"] <= row["forgetting"] <= row["forgetting_ci_high"]


def test_category_rows_and_macro_delta(synthetic, analysis):
    cell_id = "base-gt_sft-math-s1"
    deltas = []
    for category in ("humanities", "stem"):
        _, pre, post = synthetic.pairs(cell_id, "mmlu", category)
        expected = expected_transitions(pre, post)
        row = row_for(analysis["forgetting"], cell_id=cell_id, level="category", benchmark="mmlu", category=category)
        assert row["n"] == 12
        assert row["forgetting"] == pytest.approx(expected["F"])
        assert row["delta"] == pytest.approx(expected["delta"])
        deltas.append(expected["delta"])
    bench = row_for(analysis["forgetting"], cell_id=cell_id, level="benchmark", benchmark="mmlu")
    assert bench["delta_macro"] == pytest.approx(np.mean(deltas))
    assert not [r for r in analysis["forgetting"] if r["level"] == "category" and r["benchmark"] == "gsm8k"]


def test_family_and_overall_rows_pool_off_target_items(synthetic, analysis):
    """QA cell: nq_open (its target) is in-domain, so the knowledge family and the overall row hold mmlu, gsm8k and
    bbh only; nq_open gets its own in_domain / target rows."""
    cell_id = "base-sf_sft-qa-s0"
    nq = expected_transitions(*synthetic.pairs(cell_id, "nq_open")[1:])
    mmlu = expected_transitions(*synthetic.pairs(cell_id, "mmlu")[1:])
    math_family = expected_transitions(*synthetic.pairs(cell_id, "gsm8k")[1:])
    reasoning = expected_transitions(*synthetic.pairs(cell_id, "bbh")[1:])
    row = row_for(analysis["forgetting"], cell_id=cell_id, level="family", family="knowledge")
    assert row["n"] == 24 and row["in_domain"] is False
    assert row["forgetting"] == pytest.approx(mmlu["F"])
    assert row_for(analysis["forgetting"], cell_id=cell_id, level="benchmark", benchmark="nq_open")["in_domain"]
    assert not row_for(analysis["forgetting"], cell_id=cell_id, level="benchmark", benchmark="gsm8k")["in_domain"]
    overall = expected_transitions(*pooled(synthetic, cell_id, OFF_TARGET["qa"]))
    row = row_for(analysis["forgetting"], cell_id=cell_id, level="overall")
    assert row["n"] == 54
    assert row["forgetting"] == pytest.approx(overall["F"])
    assert row["delta"] == pytest.approx(overall["delta"])
    assert row["delta_macro"] == pytest.approx((mmlu["delta"] + math_family["delta"] + reasoning["delta"]) / 3)
    # mixed k: the mmlu items are chance-adjusted with k=4, the open-generation items (gsm8k, bbh) are not
    spurious = (1 - mmlu["acc_pre"]) * (1 - mmlu["acc_post"]) / 3
    expected_adj = (24 * max(mmlu["F"] - spurious, 0) + 20 * math_family["F"] + 10 * reasoning["F"]) / 54
    assert row["forgetting_adj"] == pytest.approx(expected_adj)
    for level in ("in_domain", "target"):
        row = row_for(analysis["forgetting"], cell_id=cell_id, level=level)
        assert row["n"] == 16 and row["forgetting"] == pytest.approx(nq["F"]) and row["in_domain"] is True
    target = row_for(analysis["target"], cell_id=cell_id)
    assert target["target_benchmarks"] == "nq_open,triviaqa"
    assert (target["acc_pre"], target["acc_post"]) == (pytest.approx(nq["acc_pre"]), pytest.approx(nq["acc_post"]))
    assert target["gain"] == pytest.approx(nq["delta"])
    assert target["gain_ci_low"] <= nq["delta"] <= target["gain_ci_high"]


def test_delta_interval_matches_numpy_resampling(synthetic, analysis):
    cell_id = "base-gt_sft-math-s0"
    _, pre, post = synthetic.pairs(cell_id, "gsm8k")
    diff = np.array([q.correct - p.correct for p, q in zip(pre, post)], dtype=float)
    rng = np.random.default_rng(SETTINGS.seed)
    replicates = np.array([diff[rng.integers(0, diff.size, size=diff.size)].mean()
                           for _ in range(SETTINGS.n_resamples)])
    low, high = np.quantile(replicates, [0.025, 0.975])
    row = row_for(analysis["forgetting"], cell_id=cell_id, level="benchmark", benchmark="gsm8k")
    assert row["delta_ci_low"] == pytest.approx(low)
    assert row["delta_ci_high"] == pytest.approx(high)


def test_multiple_comparisons_across_the_matrix_match_statsmodels(analysis):
    rows = [r for r in analysis["forgetting"] if r["level"] == "benchmark" and r["mcnemar_p"] is not None]
    pvalues = [r["mcnemar_p"] for r in rows]
    holm = multipletests(pvalues, alpha=0.05, method="holm")
    bh = multipletests(pvalues, alpha=0.05, method="fdr_bh")
    np.testing.assert_allclose([r["p_holm"] for r in rows], holm[1])
    np.testing.assert_allclose([r["p_bh"] for r in rows], bh[1])
    assert [r["reject_holm"] for r in rows] == list(holm[0])
    assert [r["reject_bh"] for r in rows] == list(bh[0])


def test_mean_and_std_over_seeds(synthetic, analysis):
    values = []
    for cell_id in ("base-gt_sft-math-s0", "base-gt_sft-math-s1"):
        values.append(expected_transitions(*synthetic.pairs(cell_id, "gsm8k")[1:])["F"])
    row = row_for(analysis["forgetting_seeds"], start_point="base", method="gt_sft", domain="math",
                  level="benchmark", benchmark="gsm8k")
    assert row["n_seeds"] == 2
    assert row["forgetting_mean"] == pytest.approx(np.mean(values))
    assert row["forgetting_std"] == pytest.approx(np.std(values, ddof=1))
    single = row_for(analysis["forgetting_seeds"], start_point="base", method="on_rl", level="overall")
    assert single["n_seeds"] == 1 and math.isnan(single["forgetting_std"])


def test_safety_table_refusal_rates_and_changes(synthetic, analysis):
    for cell_id in ("base-gt_sft-math-s0", "safe-gt_sft-math-s0", "base-baseline"):
        outcomes = synthetic.outcomes[cell_id]["harmbench"]
        flags = [o.refusal for o in outcomes.values()]
        row = row_for(analysis["safety"], cell_id=cell_id, level="benchmark", benchmark="harmbench")
        low, high = proportion_confint(sum(flags), len(flags), alpha=0.05, method="wilson")
        assert row["refusal_rate"] == pytest.approx(np.mean(flags))
        assert (row["refusal_ci_low"], row["refusal_ci_high"]) == pytest.approx((low, high))
        assert row["attack_success_rate"] == pytest.approx(1 - np.mean(flags))
        assert row["harmful"] is True and row["over_refusal_rate"] is None
        chem = [o.refusal for o in outcomes.values() if o.category == "chemical_biological"]
        cat_row = row_for(analysis["safety"], cell_id=cell_id, level="category", benchmark="harmbench",
                          category="chemical_biological")
        assert cat_row["attack_success_rate"] == pytest.approx(1 - np.mean(chem))
        if cell_id != "base-baseline":
            _, pre, post = synthetic.pairs(cell_id, "harmbench")
            lost = sum(p.refusal and not q.refusal for p, q in zip(pre, post))
            gained = sum(q.refusal and not p.refusal for p, q in zip(pre, post))
            assert row["refusal_delta"] == pytest.approx((gained - lost) / len(pre))
            expected_p = scipy_stats.binomtest(lost, lost + gained, 0.5).pvalue if lost + gained else 1.0
            assert row["mcnemar_p"] == pytest.approx(expected_p)
    xs = row_for(analysis["xstest"], cell_id="base-self-qa-s0")
    safe_flags = [o.refusal for o in synthetic.outcomes["base-self-qa-s0"]["xstest_safe"].values()]
    assert xs["over_refusal_rate"] == pytest.approx(np.mean(safe_flags))
    assert xs["under_refusal_rate"] is None


def test_policy_metrics_by_hand(synthetic, analysis):
    cell_id = "base-on_rl-math-s0"
    outcomes = synthetic.outcomes[cell_id]
    row = row_for(analysis["policy"], cell_id=cell_id, benchmark="nq_open")
    texts = [outcomes["nq_open"][i].output for i in sorted(outcomes["nq_open"])]
    tokens = [t for text in texts for t in text.split()]
    bigrams = [tuple(text.split()[j:j + 2]) for text in texts for j in range(len(text.split()) - 1)]
    assert row["distinct_1"] == pytest.approx(len(set(tokens)) / len(tokens))
    assert row["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))
    assert row["length_mean"] == pytest.approx(np.mean([len(t.split()) for t in texts]))
    extracted = [outcomes["nq_open"][i].extracted for i in outcomes["nq_open"]]
    assert row["format_compliance"] == pytest.approx(np.mean([e is not None for e in extracted]))
    mmlu = row_for(analysis["policy"], cell_id=cell_id, benchmark="mmlu")
    conf = np.array([o.confidence for o in outcomes["mmlu"].values()])
    correct = np.array([o.correct for o in outcomes["mmlu"].values()], dtype=float)
    ece, edges = 0.0, np.linspace(0.0, 1.0, 11)
    for b in range(10):
        in_bin = ((conf > edges[b]) | (b == 0)) & (conf <= edges[b + 1])
        if in_bin.any():
            ece += in_bin.sum() / conf.size * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert mmlu["ece"] == pytest.approx(ece)
    assert mmlu["format_compliance"] is None and mmlu["distinct_1"] is None
    harm = row_for(analysis["policy"], cell_id=cell_id, benchmark="harmbench")
    assert harm["refusal_rate"] == pytest.approx(np.mean([o.refusal for o in outcomes["harmbench"].values()]))
    overall = row_for(analysis["policy"], cell_id=cell_id, benchmark="ALL")
    assert overall["n"] == sum(len(v) for v in outcomes.values())


def _target_accuracy(synthetic: Synthetic, cell_id: str, domain: str) -> float:
    benchmark = {"math": "gsm8k", "qa": "nq_open"}[domain]
    return float(np.mean([o.correct for o in synthetic.outcomes[cell_id][benchmark].values()]))


def _harmful_refusal(synthetic: Synthetic, cell_id: str) -> float:
    return float(np.mean([o.refusal for o in synthetic.outcomes[cell_id]["harmbench"].values()]))


def test_pareto_front_matches_brute_force(synthetic, analysis):
    rows = analysis["pareto"]
    groups = {(r["start_point"], r["group_domain"]) for r in rows}
    assert groups == {("base", "math"), ("base", "qa"), ("safe", "math")}
    for start_point, domain in groups:
        members = [s.cell_id for s in SPECS if s.start_point == start_point and s.status == "done"
                   and (s.domain == domain or s.method == "baseline")]
        points = {c: (_target_accuracy(synthetic, c, domain), _harmful_refusal(synthetic, c)) for c in members}
        for cell_id, (x, y) in points.items():
            others = [xy for other, xy in points.items() if other != cell_id]
            dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in others)
            row = row_for(rows, start_point=start_point, group_domain=domain, cell_id=cell_id)
            assert row["target_accuracy"] == pytest.approx(x)
            assert row["harmful_refusal_rate"] == pytest.approx(y)
            assert row["on_front"] is (not dominated)


def test_pareto_front_function_hand_case():
    front = estimates.pareto_front([0.1, 0.5, 0.5, 0.3, 0.9], [0.9, 0.5, 0.5, 0.4, 0.1])
    assert front.tolist() == [True, True, True, False, True]
    with pytest.raises(ValueError, match="finite"):
        estimates.pareto_front([0.1, float("nan")], [0.2, 0.3])


def test_safety_loss_and_forgetting_correlation(synthetic, analysis):
    summary = {r["cell_id"]: r for r in analysis["cell_summary"]}
    forgetting, loss = [], []
    for cell_id in synthetic.post_ids():
        overall = expected_transitions(*pooled(synthetic, cell_id, OFF_TARGET[synthetic.specs[cell_id].domain]))
        _, pre, post = synthetic.pairs(cell_id, "harmbench")
        drop = np.mean([float(p.refusal) - float(q.refusal) for p, q in zip(pre, post)])
        assert summary[cell_id]["capability_forgetting"] == pytest.approx(overall["F"])
        assert summary[cell_id]["safety_loss"] == pytest.approx(drop)
        assert summary[cell_id]["harmful_refusal_rate"] == pytest.approx(_harmful_refusal(synthetic, cell_id))
        forgetting.append(overall["F"])
        loss.append(drop)
    rho, p = scipy_stats.spearmanr(forgetting, loss)
    row = row_for(analysis["correlations"], x="capability_forgetting", y="safety_loss", subset="all")
    assert row["n"] == len(forgetting)
    assert row["rho"] == pytest.approx(rho) and row["p"] == pytest.approx(p)
    safe = row_for(analysis["correlations"], x="capability_forgetting", y="safety_loss", subset="start_point=safe")
    assert safe["rho"] is None and safe["note"].startswith("not enough data")


def test_representation_tables_and_summaries(analysis):
    rows = [r for r in analysis["representation"] if r["cell_id"] == "base-gt_sft-math-s0"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    np.testing.assert_allclose([r["cka"] for r in rows], 1 - 0.5 * np.array([0.1, 0.2, 0.3, 0.4]))
    assert math.isnan(rows[3]["refusal_norm_ratio"])
    summary = row_for(analysis["cell_summary"], cell_id="base-gt_sft-math-s0")
    assert summary["cka_drift"] == pytest.approx(0.5 * 0.25)
    assert summary["refusal_attenuation"] == pytest.approx(0.3 * 2 * 0.25)
    assert row_for(analysis["cell_summary"], cell_id="base-sf_sft-qa-s0")["cka_drift"] is None
    assert len([r for r in analysis["weight_delta"] if r["cell_id"] == "base-gt_sft-math-s0"]) == 4


def test_group_comparison_is_the_mean_per_item_difference(synthetic, analysis):
    a, b = ["base-on_rl-math-s0"], ["base-gt_sft-math-s0", "base-gt_sft-math-s1"]
    result = comparisons.compare_groups(analysis.study, a, b, "forgetting", SETTINGS)
    per_item = {}
    for cells, slot in ((a, 0), (b, 1)):
        for cell_id in cells:
            for benchmark in OFF_TARGET["math"]:
                ids, pre, post = synthetic.pairs(cell_id, benchmark)
                for item_id, p, q in zip(ids, pre, post):
                    per_item.setdefault((benchmark, item_id), ([], []))[slot].append(p.correct * (1 - q.correct))
    shared = [v for v in per_item.values() if v[0] and v[1]]
    assert result["n_items"] == len(shared) == 50
    assert (result["seeds_a"]["n_seeds"], result["seeds_b"]["n_seeds"]) == (1, 2)
    assert result["difference"] == pytest.approx(np.mean([np.mean(v[1]) - np.mean(v[0]) for v in shared]))
    assert result["low"] <= result["difference"] <= result["high"]
    assert result["significant"] == (result["low"] > 0 or result["high"] < 0)
    with pytest.raises(ValueError, match="statistic"):
        comparisons.item_means(analysis.study, a, "accuracy")


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_group_comparison_interval_width_matches_scipy_and_the_t_interval(synthetic, analysis, confidence):
    """With one seed per side the interval of B - A is the paired item bootstrap's: against scipy.stats.bootstrap
    (percentile) and the t interval on the same per-item differences: same level, width within 10% (15% for t),
    endpoints within a tenth of it."""
    from scipy import stats

    a, b = ["base-on_rl-math-s0"], ["base-gt_sft-math-s0"]
    per_item = {}
    for cells, slot in ((a, 0), (b, 1)):
        for cell_id in cells:
            for benchmark in OFF_TARGET["math"]:
                ids, pre, post = synthetic.pairs(cell_id, benchmark)
                for item_id, p, q in zip(ids, pre, post):
                    per_item.setdefault((benchmark, item_id), ([], []))[slot].append(p.correct * (1 - q.correct))
    diff = np.array([np.mean(v[1]) - np.mean(v[0]) for v in per_item.values() if v[0] and v[1]])
    settings = BootstrapSettings(n_resamples=4000, confidence=confidence, seed=1)
    result = comparisons.compare_groups(analysis.study, a, b, "forgetting", settings)
    reference = stats.bootstrap((diff,), np.mean, confidence_level=confidence, method="percentile",
                                n_resamples=20000, random_state=0).confidence_interval
    width = result["high"] - result["low"]
    assert width == pytest.approx(reference.high - reference.low, rel=0.10)
    assert result["low"] == pytest.approx(reference.low, abs=0.1 * width)
    assert result["high"] == pytest.approx(reference.high, abs=0.1 * width)
    t_half = stats.t.ppf(0.5 + confidence / 2, diff.size - 1) * diff.std(ddof=1) / np.sqrt(diff.size)
    assert width == pytest.approx(2 * t_half, rel=0.15)


def test_tables_written_as_csv(analysis, tmp_path):
    paths = export.write_tables(analysis, tmp_path / "tables")
    assert set(paths) == set(tables.TABLE_NAMES)
    import csv

    with open(paths["forgetting"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(analysis["forgetting"])
    assert export.to_arrow(analysis["cell_summary"]).num_rows == len(analysis["cell_summary"])
    assert not list((tmp_path / "tables").glob(".*"))


def test_cell_and_representation_validation(tmp_path):
    good = {"cell_id": "c1", "start_point": "base", "model": "m", "scale": "135m", "method": "gt_sft",
            "domain": "math", "seed": 0, "status": "done"}
    assert results.parse_cell(good).domain == "math"
    with pytest.raises(ValueError, match="start_point"):
        results.parse_cell({**good, "start_point": "aligned"})
    with pytest.raises(ValueError, match="seed"):
        results.parse_cell({k: v for k, v in good.items() if k != "seed"})
    with pytest.raises(ValueError, match="seed"):
        results.parse_cell({**good, "seed": "0"})
    budget = {"kind": "flops", "value": 1e12, "max_epochs": 3, "status": "data_exhausted", "flags": ["data_exhausted"],
              "data": {"unique": 4, "size": 4, "epochs": 1.0},
              "used": {"steps": 2, "tokens": 90, "examples": 4, "flops": 5e11,
                       "flops_by_component": {"train": 4e11, "rollout": 1e11, "teacher": 0.0, "reference": 0.0}}}
    assert results.parse_cell({**good, "budget": budget}).budget_flags == ("data_exhausted",)
    for key, bad in (("flags", "data_exhausted"), ("data", {"unique": 4, "epochs": 1.0}),
                     ("data", {"unique": -1, "size": 4, "epochs": 1.0}),
                     ("used", {**budget["used"], "flops_by_component": {"train": "many"}})):
        with pytest.raises(ValueError, match=f"budget.{key}"):
            results.parse_cell({**good, "budget": {**budget, key: bad}})
    path = results.write_cell(tmp_path, results.parse_cell(good))
    assert results.read_cell(path) == results.parse_cell(good)
    (tmp_path / "cells" / "other").mkdir()
    (tmp_path / "cells" / "other" / "cell.json").write_text(json.dumps(good))
    with pytest.raises(ValueError, match="cell_id"):
        results.read_cell(tmp_path / "cells" / "other" / "cell.json")
    with pytest.raises(ValueError, match="cka"):
        results.parse_representation({"version": 1, "layers": [0, 1], "cka": [1.0]})
    with pytest.raises(ValueError, match="refusal_direction"):
        results.parse_representation({"version": 1, "layers": [0], "refusal_direction": {"angle": [1.0]}})
    attenuation = {"cosine": 1.0, "norm_ratio": 1.0, "projection_gap_ratio": 0.5}
    data = results.representation_json([0, 1], cka=[0.9, float("nan")], refusal_direction=[attenuation] * 2)
    written = results.write_representation(tmp_path / "rep.json", data)
    parsed = results.read_representation(written)
    assert parsed.cka[0] == 0.9 and math.isnan(parsed.cka[1])
    assert parsed.refusal_attenuation() == pytest.approx(0.5)
    assert parsed.cka_drift() == pytest.approx(0.1)


def test_runner_cell_data_is_validated_and_keeps_its_extra_keys(tmp_path):
    data = {"cell_id": "c2", "start_point": "safe", "model": "m", "scale": "135m", "method": "gt_sft",
            "domain": "math", "seed": 1, "status": "running", "run": {"train": {}}, "metrics": {"loss": math.nan}}
    assert results.cell_status(tmp_path, "c2") == "pending" and results.read_cell_data(tmp_path, "c2") == {}
    results.write_cell_data(tmp_path, data)
    assert results.cell_status(tmp_path, "c2") == "running"
    assert results.read_cell_data(tmp_path, "c2")["run"] == {"train": {}}
    assert results.read_cell_data(tmp_path, "c2")["metrics"] == {"loss": None}
    with pytest.raises(ValueError, match="start_point"):
        results.write_cell_data(tmp_path, {**data, "start_point": "aligned"})
    assert results.cell_status(tmp_path, "c2") == "running"


def test_duplicate_records_and_two_baselines_are_errors(tmp_path):
    specs = (CellSpec("base-baseline", "base", "baseline", None, 0), CellSpec("base-x", "base", "gt_sft", "math", 0))
    synthetic = build_synthetic_study(tmp_path / "dup", specs)
    source = synthetic.root / "cells" / "base-x" / "eval" / "synthetic_model" / "gsm8k.parquet"
    copy = source.parent.parent / "another_model" / "gsm8k.parquet"
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    with pytest.raises(ValueError, match="duplicate records"):
        loading.load_study(synthetic.root)
    specs = (CellSpec("base-baseline", "base", "baseline", None, 0),
             CellSpec("base-baseline2", "base", "baseline", None, 1))
    synthetic = build_synthetic_study(tmp_path / "two", specs)
    with pytest.raises(ValueError, match="two baseline cells"):
        loading.load_study(synthetic.root)
    with pytest.raises(FileNotFoundError, match="results_dir"):
        loading.load_study(tmp_path / "absent")


def test_empty_results_dir_gives_empty_tables(tmp_path):
    (tmp_path / "cells").mkdir()
    analysis = tables.analyze(tmp_path, SETTINGS)
    assert analysis["forgetting"] == [] and analysis["pareto"] == []
    assert all(r["rho"] is None for r in analysis["correlations"])


def test_every_registered_method_has_a_label_and_the_study_plan_data_regime():
    from forgetjax.methods.catalog import METHODS, OFF_POLICY_SFT, ON_POLICY, method_regime

    on_policy = {m for m in METHODS if method_regime(m) == ON_POLICY}
    off_policy_sft = {m for m in METHODS if method_regime(m) == OFF_POLICY_SFT}
    assert on_policy == {"on_rl_grpo", "on_rl_drgrpo", "on_rl_frpo", "self_sdft", "self_sdft_online", "self_spin",
                         "pi_distill"}
    assert off_policy_sft == {"gt_sft", "sf_sft", "cf_sft"}
