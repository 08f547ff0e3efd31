"""Forgetting metrics and statistics against hand-computed cases and scipy/statsmodels references."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from forgetjax.analysis import stats as fstats
from forgetjax.analysis.forgetting import (
    accuracy_delta,
    category_aggregate,
    chance_adjusted_transitions,
    relative_drift,
    spurious_transition_rate,
    transition_rates,
)
from forgetjax.analysis.stats import (
    mcnemar_exact,
    mean_std_over_seeds,
    multiple_comparison,
    paired_bootstrap_ci,
    paired_bootstrap_distribution,
    wilson_interval,
)


# ---------------------------------------------------------------- forgetting.py


def test_accuracy_delta_hand_case():
    result = accuracy_delta([1, 0, 1, 1], [0, 0, 1, 1])
    assert result.pre == pytest.approx(0.75)
    assert result.post == pytest.approx(0.5)
    assert result.delta == pytest.approx(-0.25)
    assert result.n == 4


def test_accuracy_delta_accepts_continuous_scores_and_bools():
    result = accuracy_delta([0.2, 0.4, 0.9], [0.5, 0.1, 0.9])
    assert result.delta == pytest.approx((1.5 - 1.5) / 3)
    assert accuracy_delta(np.array([True, False]), np.array([True, True])).delta == pytest.approx(0.5)


def test_relative_drift_rules():
    assert relative_drift(0.5, 0.4) == pytest.approx(-0.2)
    assert relative_drift(0.25, 0.5) == pytest.approx(1.0)
    assert relative_drift(0.0, 0.0) == 0.0
    assert math.isnan(relative_drift(0.0, 0.3))
    drift = relative_drift([0.5, 0.0, 0.0], [0.25, 0.0, 0.1])
    np.testing.assert_allclose(drift, [-0.5, 0.0, np.nan])
    with pytest.raises(ValueError, match="pre_acc"):
        relative_drift(-0.1, 0.2)


def test_transition_rates_hand_case():
    pre = [1, 1, 1, 0, 0, 0, 1, 0, 1]
    post = [1, 0, 0, 1, 0, 0, 1, 1, 0]
    result = transition_rates(pre, post)
    assert (result.n11, result.n10, result.n01, result.n00, result.n) == (2, 3, 2, 2, 9)
    assert result.forgetting == pytest.approx(3 / 9)
    assert result.backward_transfer == pytest.approx(2 / 9)


@pytest.mark.parametrize(
    "pre, post, message",
    [
        ([1, 0, 1], [1, 0], "pre and post"),
        ([1, 2, 0], [1, 0, 0], "pre"),
        ([1, 0], [np.nan, 1], "post"),
        ([], [], "pre"),
        ([[1, 0]], [[1, 0]], "pre"),
    ],
)
def test_transition_rates_rejects_bad_input(pre, post, message):
    with pytest.raises(ValueError, match=message):
        transition_rates(pre, post)


def test_chance_adjustment_single_k_hand_case():
    pre = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    post = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    # a_pre = 0.5, a_post = 0.4, F = 0.2, BT = 0.1; spurious with k=4: 0.5 * 0.6 / 3 = 0.1
    result = chance_adjusted_transitions(pre, post, k=4)
    assert result.forgetting == pytest.approx(0.2)
    assert result.backward_transfer == pytest.approx(0.1)
    assert result.spurious_rate == pytest.approx(0.1)
    assert result.forgetting_true == pytest.approx(0.1)
    assert result.backward_transfer_true == pytest.approx(0.0, abs=1e-15)
    # k=2: spurious 0.3 exceeds both rates, so both are floored at 0
    binary = chance_adjusted_transitions(pre, post, k=2)
    assert binary.spurious_rate == pytest.approx(0.3)
    assert binary.forgetting_true == 0.0 and binary.backward_transfer_true == 0.0
    assert spurious_transition_rate(0.5, 0.4, 4) == pytest.approx(0.1)


def test_chance_adjustment_none_means_no_adjustment():
    pre, post = [1, 0, 1, 0], [0, 0, 1, 1]
    result = chance_adjusted_transitions(pre, post, k=None)
    assert result.forgetting_true == result.forgetting == pytest.approx(0.25)
    assert result.backward_transfer_true == result.backward_transfer == pytest.approx(0.25)
    assert result.spurious_rate == 0.0


def test_chance_adjustment_per_item_k_groups_hand_case():
    # group k=2 (4 items): pre 1,1,1,0 post 0,0,1,0 -> a_pre .75, a_post .25, F .5, BT 0, spurious .1875
    # group k=5 (6 items): pre 1,1,0,0,0,0 post 1,0,1,1,0,0 -> a_pre 1/3, a_post 1/2, F 1/6, BT 1/3, spurious 1/12
    group2 = [(1, 0), (1, 0), (1, 1), (0, 0)]
    group5 = [(1, 1), (1, 0), (0, 1), (0, 1), (0, 0), (0, 0)]
    items = [(p, q, 2) for p, q in group2] + [(p, q, 5) for p, q in group5]
    order = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]
    pre, post, k = (np.array([items[i][column] for i in order]) for column in range(3))
    result = chance_adjusted_transitions(pre, post, k)
    assert result.spurious_rate == pytest.approx(0.4 * 0.1875 + 0.6 / 12)
    assert result.forgetting_true == pytest.approx(0.4 * (0.5 - 0.1875) + 0.6 * (1 / 6 - 1 / 12))
    assert result.backward_transfer_true == pytest.approx(0.4 * 0.0 + 0.6 * (1 / 3 - 1 / 12))
    assert result.forgetting == pytest.approx(3 / 10)
    assert result.backward_transfer == pytest.approx(2 / 10)
    constant = chance_adjusted_transitions(pre, post, np.full(10, 4))
    assert constant == chance_adjusted_transitions(pre, post, 4)


def test_chance_adjustment_removes_pure_guessing():
    rng = np.random.default_rng(0)
    k, n = 4, 200_000
    answer = rng.integers(0, k, n)
    pre = (rng.integers(0, k, n) == answer).astype(int)
    post = (rng.integers(0, k, n) == answer).astype(int)
    result = chance_adjusted_transitions(pre, post, k)
    assert result.forgetting == pytest.approx((1 / k) * (1 - 1 / k), abs=0.005)
    assert result.forgetting_true < 0.004
    assert result.backward_transfer_true < 0.004


@pytest.mark.parametrize("k, message", [(1, "k"), (2.5, "k"), ([4, 4], "k")])
def test_chance_adjustment_rejects_bad_k(k, message):
    with pytest.raises(ValueError, match=message):
        chance_adjusted_transitions([1, 0, 1], [1, 1, 0], k)


def test_category_aggregate_default_mean_and_macro():
    categories = ["a", "b", "a", "b", "c"]
    values = [1.0, 0.0, 0.0, 0.0, 1.0]
    result = category_aggregate(categories, values)
    assert result.per_category == {"a": 0.5, "b": 0.0, "c": 1.0}
    assert result.counts == {"a": 2, "b": 2, "c": 1}
    assert result.macro == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert result.overall == pytest.approx(2 / 5)


def test_category_aggregate_with_transition_statistic():
    categories = np.array([0, 0, 0, 1, 1])
    pre = [1, 1, 0, 1, 0]
    post = [0, 1, 0, 1, 1]
    result = category_aggregate(
        categories, pre, post, statistic=lambda p, q: transition_rates(p, q).forgetting
    )
    assert result.per_category == {0: pytest.approx(1 / 3), 1: pytest.approx(0.0)}
    assert result.macro == pytest.approx(1 / 6)
    assert result.overall == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="arrays\\[1\\]"):
        category_aggregate(categories, pre, post[:4])


# ---------------------------------------------------------------- stats.py: McNemar


@pytest.mark.parametrize("n10, n01", [(0, 0), (3, 0), (0, 7), (5, 5), (12, 4), (4, 12), (30, 17), (1, 60)])
def test_mcnemar_exact_matches_statsmodels_and_binomtest(n10, n01):
    table = [[40, n10], [n01, 25]]
    expected = sm_mcnemar(table, exact=True).pvalue
    assert mcnemar_exact(n10, n01) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if n10 + n01 > 0:
        binom = scipy_stats.binomtest(n10, n10 + n01, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact(n10, n01) == pytest.approx(binom, rel=1e-9)


@pytest.mark.parametrize("n10, n01", [(12, 4), (5, 5), (0, 3), (30, 17)])
def test_mcnemar_mid_p_hand_formula(n10, n01):
    n, smaller = n10 + n01, min(n10, n01)
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    expected = min(2 * sum(pmf[: smaller + 1]) - pmf[smaller], 1.0)
    assert mcnemar_exact(n10, n01, mid_p=True) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(n10, n01, mid_p=True) <= mcnemar_exact(n10, n01)


def test_mcnemar_rejects_bad_counts():
    with pytest.raises(ValueError, match="n10"):
        mcnemar_exact(-1, 3)
    with pytest.raises(ValueError, match="n01"):
        mcnemar_exact(2, 1.5)


# ---------------------------------------------------------------- stats.py: multiplicity, seeds, Wilson


@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh"])
def test_multiple_comparison_matches_statsmodels(method):
    rng = np.random.default_rng(3)
    pvalues = np.concatenate([rng.uniform(0, 0.02, 6), rng.uniform(0, 1, 14), [0.01, 0.01, 0.5]])
    rng.shuffle(pvalues)
    reject_ref, adjusted_ref, _, _ = multipletests(pvalues, alpha=0.05, method=method)
    adjusted, reject = multiple_comparison(pvalues, method=method, alpha=0.05)
    np.testing.assert_allclose(adjusted, adjusted_ref, rtol=1e-12)
    np.testing.assert_array_equal(reject, reject_ref)


def test_multiple_comparison_rejects_bad_input():
    with pytest.raises(ValueError, match="pvalues"):
        multiple_comparison([0.1, 1.2])
    with pytest.raises(ValueError, match="method"):
        multiple_comparison([0.1], method="sidak")


def test_mean_std_over_seeds():
    result = mean_std_over_seeds([1.0, 2.0, 4.0])
    assert result.mean == pytest.approx(7 / 3)
    deviations = np.array([1.0, 2.0, 4.0]) - 7 / 3
    assert result.std == pytest.approx(math.sqrt(np.sum(deviations**2) / 2))
    assert result.n == 3
    single = mean_std_over_seeds([0.7])
    assert single.mean == pytest.approx(0.7) and math.isnan(single.std)
    table = mean_std_over_seeds([[1.0, 10.0], [3.0, 10.0]])
    np.testing.assert_allclose(table.mean, [2.0, 10.0])
    np.testing.assert_allclose(table.std, [math.sqrt(2.0), 0.0])


@pytest.mark.parametrize("successes, n", [(0, 10), (10, 10), (3, 10), (57, 100), (1, 1), (999, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_statsmodels(successes, n, confidence):
    low_ref, high_ref = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    low, high = wilson_interval(successes, n, confidence)
    assert low == pytest.approx(low_ref, abs=1e-12)
    assert high == pytest.approx(high_ref, abs=1e-12)


def test_wilson_vectorised_and_validation():
    low, high = wilson_interval([3, 57], [10, 100])
    for i, (k, n) in enumerate([(3, 10), (57, 100)]):
        low_ref, high_ref = proportion_confint(k, n, method="wilson")
        assert low[i] == pytest.approx(low_ref) and high[i] == pytest.approx(high_ref)
    with pytest.raises(ValueError, match="n must"):
        wilson_interval(1, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


# ---------------------------------------------------------------- stats.py: paired bootstrap


def _simulated_pairs(rng, n, p_pre=0.6, p_forget=0.2, p_gain=0.3):
    """Pre correctness ~ Bernoulli(p_pre); correct items forget w.p. p_forget, wrong ones are learned w.p. p_gain."""
    pre = (rng.random(n) < p_pre).astype(int)
    flip = rng.random(n)
    post = np.where(pre == 1, flip >= p_forget, flip < p_gain).astype(int)
    return pre, post


def _reference_bootstrap(pre, post, per_item, n_resamples, seed, confidence):
    """Independent loop: one rng.integers draw per resample, percentile interval via np.percentile."""
    rng = np.random.default_rng(seed)
    pre, post = np.asarray(pre, float), np.asarray(post, float)
    replicates = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(pre), size=len(pre))
        replicates.append(np.mean(per_item(pre[idx], post[idx])))
    tail = 100 * (1 - confidence) / 2
    return np.array(replicates), np.percentile(replicates, [tail, 100 - tail])


REFERENCE_STATISTICS = {
    "delta": lambda p, q: q - p,
    "forgetting": lambda p, q: (p == 1) & (q == 0),
    "backward_transfer": lambda p, q: (p == 0) & (q == 1),
}


@pytest.mark.parametrize("statistic", sorted(REFERENCE_STATISTICS))
def test_bootstrap_matches_hand_loop_with_same_seed(statistic, monkeypatch):
    monkeypatch.setattr(fstats, "_RESAMPLE_BLOCK_ENTRIES", 7 * 37)  # several blocks, ragged last block
    pre, post = _simulated_pairs(np.random.default_rng(11), 37)
    replicates_ref, (low_ref, high_ref) = _reference_bootstrap(
        pre, post, REFERENCE_STATISTICS[statistic], 300, seed=4, confidence=0.9
    )
    np.testing.assert_allclose(paired_bootstrap_distribution(pre, post, statistic, 300, seed=4), replicates_ref)
    result = paired_bootstrap_ci(pre, post, statistic, n_resamples=300, confidence=0.9, seed=4)
    assert result.low == pytest.approx(low_ref) and result.high == pytest.approx(high_ref)
    assert result.standard_error == pytest.approx(np.std(replicates_ref, ddof=1))
    point = np.mean(REFERENCE_STATISTICS[statistic](np.asarray(pre), np.asarray(post)))
    assert result.estimate == pytest.approx(point)


def test_bootstrap_is_deterministic_and_seed_sensitive():
    pre, post = _simulated_pairs(np.random.default_rng(2), 50)
    first = paired_bootstrap_distribution(pre, post, "delta", 200, seed=9)
    np.testing.assert_array_equal(first, paired_bootstrap_distribution(pre, post, "delta", 200, seed=9))
    assert not np.array_equal(first, paired_bootstrap_distribution(pre, post, "delta", 200, seed=10))


def test_bootstrap_callable_statistic_equals_builtin():
    pre, post = _simulated_pairs(np.random.default_rng(5), 40)
    builtin = paired_bootstrap_ci(pre, post, "forgetting", n_resamples=200, seed=1, method="bca")
    custom = paired_bootstrap_ci(
        pre, post, lambda p, q: np.mean(p * (1 - q)), n_resamples=200, seed=1, method="bca"
    )
    assert custom.low == pytest.approx(builtin.low) and custom.high == pytest.approx(builtin.high)
    assert custom.estimate == pytest.approx(builtin.estimate)


@pytest.mark.parametrize("method", ["percentile", "bca"])
@pytest.mark.parametrize("statistic", ["delta", "forgetting"])
def test_bootstrap_matches_scipy_bootstrap(method, statistic):
    pre, post = _simulated_pairs(np.random.default_rng(21), 60)
    per_item = REFERENCE_STATISTICS[statistic]
    reference = scipy_stats.bootstrap(
        (pre.astype(float), post.astype(float)),
        lambda p, q, axis=-1: np.mean(per_item(p, q), axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=1000,
        confidence_level=0.95,
        method="BCa" if method == "bca" else "percentile",
        rng=np.random.default_rng(8),
    )
    result = paired_bootstrap_ci(pre, post, statistic, n_resamples=1000, seed=8, method=method)
    assert result.low == pytest.approx(reference.confidence_interval.low, abs=1e-12)
    assert result.high == pytest.approx(reference.confidence_interval.high, abs=1e-12)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_covers_true_delta_at_nominal_rate(method):
    p_pre, p_forget, p_gain = 0.6, 0.2, 0.3
    true_delta = (1 - p_pre) * p_gain - p_pre * p_forget
    rng = np.random.default_rng(123)
    covered = []
    for trial in range(150):
        pre, post = _simulated_pairs(rng, 150, p_pre, p_forget, p_gain)
        result = paired_bootstrap_ci(pre, post, "delta", n_resamples=400, seed=trial, method=method)
        covered.append(result.low <= true_delta <= result.high)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_covers_true_delta_on_large_sample():
    pre, post = _simulated_pairs(np.random.default_rng(7), 4000)
    result = paired_bootstrap_ci(pre, post, "delta", n_resamples=500, seed=0)
    assert result.low <= 0.4 * 0.3 - 0.6 * 0.2 <= result.high
    assert result.high - result.low < 0.06


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap_ci([1, 0], [1, 1], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci([1, 0], [1, 1], confidence=1.5)
    with pytest.raises(ValueError, match="statistic"):
        paired_bootstrap_ci([1, 0], [1, 1], statistic="accuracy")
    with pytest.raises(ValueError, match="method"):
        paired_bootstrap_ci([1, 0], [1, 1], method="studentized")
    with pytest.raises(ValueError, match="pre"):
        paired_bootstrap_ci([1, 0.5], [1, 1], statistic="forgetting")
