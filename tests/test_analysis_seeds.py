"""Off-target forgetting and seeds inside the intervals (issue #16, items 1 and 8).

A study whose only forgotten items are in the training domain has off-target F = 0 and reports the target task
apart; the two-stage bootstrap (seeds within each configuration, then items) is checked against a hand-written
loop over the same draws, against the item bootstrap with one seed, for widening under between-seed variance and
for coverage on simulated data with a known mean; the answers name their seed counts and caveat single seeds."""
from __future__ import annotations

import numpy as np
import pytest

from forgetjax.analysis import comparisons, tables
from forgetjax.analysis.estimates import BootstrapSettings, mean_ci, two_stage_bootstrap
from forgetjax.analysis.stats import paired_bootstrap_ci
from forgetjax.report.questions import SINGLE_SEED, answer_all
from test_analysis_queries import CellSpec, build_synthetic_study, expected_transitions, row_for

SETTINGS = BootstrapSettings(n_resamples=300, confidence=0.95, seed=5)

IN_DOMAIN_ONLY = (
    CellSpec("base-baseline", "base", "baseline", None, 0),
    CellSpec("base-sf_sft-math-s0", "base", "sf_sft", "math", 0, forget=0.6, forget_only=("gsm8k",)),
    CellSpec("base-gt_sft-math-s0", "base", "gt_sft", "math", 0, forget=0.3, forget_only=("gsm8k",)),
)
SEEDED = (
    CellSpec("base-baseline", "base", "baseline", None, 0),
    *(CellSpec(f"base-gt_sft-math-s{s}", "base", "gt_sft", "math", s, forget=0.6) for s in range(3)),
    *(CellSpec(f"base-on_rl-math-s{s}", "base", "on_rl", "math", s, forget=0.02) for s in range(3)),
)


@pytest.fixture(scope="module")
def in_domain_only(tmp_path_factory):
    synthetic = build_synthetic_study(tmp_path_factory.mktemp("in_domain"), IN_DOMAIN_ONLY)
    analysis = tables.analyze(synthetic.root, SETTINGS)
    yield synthetic, analysis
    analysis.study.connection.close()


def test_forgetting_only_in_domain_gives_zero_off_target_forgetting(in_domain_only):
    """The defect: a math cell that forgets only gsm8k items (its target) must show off-target F = 0, with the
    gsm8k loss reported as the target task's (negative) gain."""
    synthetic, analysis = in_domain_only
    for cell_id in ("base-sf_sft-math-s0", "base-gt_sft-math-s0"):
        gsm8k = expected_transitions(*synthetic.pairs(cell_id, "gsm8k")[1:])
        assert gsm8k["n10"] > 0
        overall = row_for(analysis["forgetting"], cell_id=cell_id, level="overall")
        assert overall["n10"] == 0 and overall["forgetting"] == 0.0 and overall["n"] == 50
        target = row_for(analysis["target"], cell_id=cell_id)
        assert target["target_benchmarks"] == "gsm8k" and target["n"] == 20
        assert target["acc_pre"] == pytest.approx(gsm8k["acc_pre"])
        assert target["acc_post"] == pytest.approx(gsm8k["acc_post"])
        assert target["gain"] == pytest.approx(gsm8k["delta"]) and gsm8k["delta"] < 0
        summary = row_for(analysis["cell_summary"], cell_id=cell_id)
        assert summary["capability_forgetting"] == 0.0
        assert summary["target_gain"] == pytest.approx(gsm8k["delta"])
        assert row_for(analysis["forgetting"], cell_id=cell_id, level="in_domain")["forgetting"] == \
            pytest.approx(gsm8k["F"])
        assert not [r for r in analysis["forgetting"] if r["cell_id"] == cell_id and r["level"] == "family"
                    and r["family"] == "math"]
    estimate = comparisons.group_estimate(analysis.study, ["base-sf_sft-math-s0"], "forgetting", SETTINGS)
    assert (estimate["estimate"], estimate["low"], estimate["high"]) == (0.0, 0.0, 0.0)
    rq1 = answer_all(analysis)[0].paragraphs[0]
    assert "Off-target capability forgetting F" in rq1 and "SF-SFT 0.0% (95% CI 0.0% to 0.0%" in rq1
    gain = comparisons.group_estimate(analysis.study, ["base-sf_sft-math-s0"], "delta", SETTINGS, scope="target")
    assert gain["estimate"] == pytest.approx(expected_transitions(
        *synthetic.pairs("base-sf_sft-math-s0", "gsm8k")[1:])["delta"])
    assert "Target-task gain" in rq1 and f"SF-SFT {100 * gain['estimate']:+.1f} pp" in rq1


def test_single_seed_answers_name_the_seed_and_make_no_significance_claim(in_domain_only):
    _, analysis = in_domain_only
    for answer in answer_all(analysis):
        text = " ".join(answer.paragraphs)
        assert "significant at that level" not in text and "significant loss" not in text, answer.key
    rq1 = answer_all(analysis)[0].paragraphs[0]
    assert "1 seed vs 1 seed" in rq1 and SINGLE_SEED in rq1


def test_seeded_answers_name_their_seed_counts(tmp_path):
    build_synthetic_study(tmp_path, SEEDED)
    analysis = tables.analyze(tmp_path, SETTINGS)
    try:
        rq1 = answer_all(analysis)[0].paragraphs[0]
        comparison = comparisons.compare_groups(
            analysis.study, [f"base-on_rl-math-s{s}" for s in range(3)], [f"base-gt_sft-math-s{s}" for s in range(3)],
            "forgetting", SETTINGS)
    finally:
        analysis.study.connection.close()
    assert comparison["seeds_a"]["n_seeds"] == comparison["seeds_b"]["n_seeds"] == 3 and comparison["significant"]
    assert "3 seeds vs 3 seeds" in rq1 and "significant at that level" in rq1 and SINGLE_SEED not in rq1


# --------------------------------------------------------------------------------------------- two-stage bootstrap


def reference_two_stage(groups, strata, signs, settings):
    """The documented scheme written as plain loops: per group and configuration (first-appearance order) one
    integers(0, m, (R, m)) draw from default_rng([seed, 1]); item indices integers(0, n, (R, n)) from
    default_rng(seed); per resample, each item's mean over the drawn cells (with repeats, skipping missing)."""
    n_items = groups[0].shape[1]
    item_rng, seed_rng = np.random.default_rng(settings.seed), np.random.default_rng([settings.seed, 1])
    chosen = []
    for cells in strata:
        per_config = []
        for config in dict.fromkeys(cells):
            members = [i for i, c in enumerate(cells) if c == config]
            per_config.append((members, seed_rng.integers(0, len(members), size=(settings.n_resamples, len(members)))))
        chosen.append([[members[d] for members, draws in per_config for d in draws[b]]
                       for b in range(settings.n_resamples)])
    indices = item_rng.integers(0, n_items, size=(settings.n_resamples, n_items))
    replicates = []
    for b in range(settings.n_resamples):
        values = []
        for i in indices[b]:
            total, defined = 0.0, True
            for g, sign in enumerate(signs):
                drawn = [groups[g][c, i] for c in chosen[g][b] if np.isfinite(groups[g][c, i])]
                if not drawn:
                    defined = False
                    break
                total += sign * sum(drawn) / len(drawn)
            if defined:
                values.append(total)
        replicates.append(sum(values) / len(values))
    tail = (1 - settings.confidence) / 2
    return np.quantile(replicates, [tail, 1 - tail])


def test_two_stage_bootstrap_matches_a_hand_written_loop():
    rng = np.random.default_rng(11)
    a = rng.integers(0, 2, size=(4, 15)).astype(float)
    b = rng.integers(0, 2, size=(3, 15)).astype(float)
    a[0, 3] = a[2, 7] = b[1, 0] = np.nan
    strata_a = ["x", "x", "y", "x"]  # configuration x has three seeds, y one
    strata_b = ["z", "z", "z"]
    settings = BootstrapSettings(n_resamples=120, confidence=0.9, seed=7)
    result = two_stage_bootstrap([a, b], [strata_a, strata_b], [-1.0, 1.0], settings)
    low, high = reference_two_stage([a, b], [strata_a, strata_b], [-1.0, 1.0], settings)
    assert (result["low"], result["high"]) == (pytest.approx(low), pytest.approx(high))
    assert result["estimate"] == pytest.approx(np.mean(np.nanmean(b, axis=0) - np.nanmean(a, axis=0)))


def test_one_seed_per_configuration_is_exactly_the_item_bootstrap():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, size=(2, 37)).astype(float)
    settings = BootstrapSettings(n_resamples=500, confidence=0.95, seed=4)
    single = two_stage_bootstrap([b[None, :]], [["c"]], [1.0], settings)
    items = mean_ci(b, settings)
    assert (single["low"], single["high"]) == (items["low"], items["high"])
    two_configs = two_stage_bootstrap([np.stack([a, b])], [["c1", "c2"]], [1.0], settings)
    pooled = mean_ci((a + b) / 2, settings)
    assert (two_configs["low"], two_configs["high"]) == (pooled["low"], pooled["high"])
    difference = two_stage_bootstrap([a[None, :], b[None, :]], [["c"], ["d"]], [-1.0, 1.0], settings)
    reference = paired_bootstrap_ci(a, b, "delta", settings.n_resamples, settings.confidence, settings.seed)
    assert (difference["low"], difference["high"]) == (pytest.approx(reference.low), pytest.approx(reference.high))


def test_between_seed_variance_widens_the_interval_over_pooling():
    rng = np.random.default_rng(3)
    items = rng.normal(0, 0.3, size=60)
    seeds = np.array([-0.5, 0.0, 0.4, 0.9])[:, None]
    values = items[None, :] + seeds
    settings = BootstrapSettings(n_resamples=400, confidence=0.95, seed=1)
    two_stage = two_stage_bootstrap([values], [["c"] * 4], [1.0], settings)
    pooled = mean_ci(values.mean(axis=0), settings)
    assert two_stage["estimate"] == pytest.approx(pooled["estimate"])
    assert two_stage["high"] - two_stage["low"] > 3 * (pooled["high"] - pooled["low"])
    same_seeds = two_stage_bootstrap([np.repeat(items[None, :], 4, axis=0)], [["c"] * 4], [1.0], settings)
    assert (same_seeds["low"], same_seeds["high"]) == pytest.approx((mean_ci(items, settings)["low"],
                                                                     mean_ci(items, settings)["high"]))


def test_two_stage_interval_covers_a_known_mean_where_the_item_interval_does_not():
    """Crossed item and seed effects around a known mean 0.3 (8 seeds, 40 items, 200 simulated studies): the
    90% two-stage interval covers it in most studies; the item-only interval, blind to seed variance, far less."""
    rng = np.random.default_rng(0)
    covered_two_stage = covered_items = 0
    reps = 200
    for rep in range(reps):
        values = (0.3 + rng.normal(0, 0.5, 40)[None, :] + rng.normal(0, 0.5, 8)[:, None]
                  + rng.normal(0, 0.3, (8, 40)))
        settings = BootstrapSettings(n_resamples=300, confidence=0.9, seed=rep)
        two_stage = two_stage_bootstrap([values], [["c"] * 8], [1.0], settings)
        items = mean_ci(values.mean(axis=0), settings)
        covered_two_stage += two_stage["low"] <= 0.3 <= two_stage["high"]
        covered_items += items["low"] <= 0.3 <= items["high"]
    assert covered_two_stage / reps >= 0.75
    assert covered_items / reps <= 0.7 and covered_two_stage - covered_items >= 0.2 * reps


def test_two_stage_bootstrap_rejects_mismatched_groups():
    settings = BootstrapSettings(n_resamples=10)
    with pytest.raises(ValueError, match="group 0"):
        two_stage_bootstrap([np.ones((2, 3))], [["c"]], [1.0], settings)
    with pytest.raises(ValueError, match="no value"):
        two_stage_bootstrap([np.array([[1.0, np.nan]])], [["c"]], [1.0], settings)
