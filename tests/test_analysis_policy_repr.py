"""Policy-level and representation metrics against hand cases, explicit loops, nltk, sklearn and kernel formulas."""
import math

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu
from sklearn.calibration import calibration_curve

from forgetjax.analysis.policy import (
    distinct_n,
    expected_calibration_error,
    format_compliance,
    refusal_rate,
    reliability_diagram_data,
    repetition_rate,
    response_length_stats,
    self_bleu,
    sentence_bleu,
)
from forgetjax.analysis.representation import (
    difference_of_means,
    direction_attenuation,
    effective_rank,
    energy_rank,
    linear_cka,
    singular_values,
    spectrum_summary,
    stable_rank,
)


# ---------------------------------------------------------------- lengths, diversity, repetition


def test_response_length_stats():
    result = response_length_stats([3, 7, 5, 1])
    assert result.mean == pytest.approx(4.0)
    assert result.median == pytest.approx(4.0)
    assert result.std == pytest.approx(math.sqrt((1 + 9 + 1 + 9) / 3))
    assert (result.min, result.max, result.n) == (1.0, 7.0, 4)
    assert math.isnan(response_length_stats([12]).std)
    with pytest.raises(ValueError, match="lengths"):
        response_length_stats([])


def test_distinct_n_hand_cases():
    texts = ["a b a", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # a b a a b c
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab ba ab bc
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert math.isnan(distinct_n(["a", "b"], 2))
    assert distinct_n([[1, 2, 1], [2, 1]], 2) == pytest.approx(2 / 3)  # token ids: (1,2) (2,1) (2,1)
    with pytest.raises(ValueError, match="n"):
        distinct_n(texts, 0)


def test_repetition_rate_hand_cases():
    assert repetition_rate("a b a b a b", 2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate("a b a b a b", 1) == pytest.approx(1 - 2 / 6)
    assert repetition_rate("the cat sat on the mat", 1) == pytest.approx(1 / 6)
    assert repetition_rate("the cat sat", 2) == 0.0
    assert math.isnan(repetition_rate("word", 2))


# ---------------------------------------------------------------- BLEU / self-BLEU


def _random_texts(rng, count, vocabulary, max_length):
    words = [f"w{i}" for i in range(vocabulary)]
    return [" ".join(rng.choice(words, size=rng.integers(0, max_length + 1))) for _ in range(count)]


def _nltk_self_bleu(texts, n_max):
    tokenised = [text.split() for text in texts]
    weights = tuple([1.0 / n_max] * n_max)
    smoothing = SmoothingFunction().method1
    scores = [
        nltk_sentence_bleu(tokenised[:i] + tokenised[i + 1 :], hypothesis, weights, smoothing_function=smoothing)
        for i, hypothesis in enumerate(tokenised)
    ]
    return float(np.mean(scores))


@pytest.mark.parametrize("n_max", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_bleu_matches_nltk_method1(n_max, seed):
    texts = _random_texts(np.random.default_rng(seed), count=12, vocabulary=6, max_length=9)
    texts += ["w1 w2 w3", "w1 w2 w3", ""]  # duplicates (tied top counts) and an empty output
    assert self_bleu(texts, n_max=n_max) == pytest.approx(_nltk_self_bleu(texts, n_max), rel=1e-12, abs=1e-15)


def test_sentence_bleu_matches_nltk_method1():
    rng = np.random.default_rng(4)
    smoothing = SmoothingFunction().method1
    for _ in range(20):
        hypothesis, *references = _random_texts(rng, count=4, vocabulary=5, max_length=8)
        expected = nltk_sentence_bleu(
            [r.split() for r in references], hypothesis.split(), smoothing_function=smoothing
        )
        assert sentence_bleu(hypothesis, references) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_self_bleu_hand_cases():
    assert self_bleu(["a b c d e", "a b c d e", "a b c d e"]) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h"]) == 0.0
    # "a b" vs "a c", n_max=2: p1 = 1/2, p2 = 0.1/1 (smoothed), equal lengths so BP = 1
    assert self_bleu(["a b", "a c"], n_max=2) == pytest.approx(math.sqrt(0.5 * 0.1))
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


# ---------------------------------------------------------------- calibration


def test_ece_hand_cases():
    confidence = [0.15, 0.25, 0.35, 0.85, 0.95]
    correct = [0, 1, 0, 1, 1]
    assert expected_calibration_error(confidence, correct) == pytest.approx((0.15 + 0.75 + 0.35 + 0.15 + 0.05) / 5)
    # two bins: (0.2, 0.4 | acc 0.5, conf 0.3) and (0.6, 0.8 | acc 1, conf 0.7)
    assert expected_calibration_error([0.2, 0.4, 0.6, 0.8], [0, 1, 1, 1], n_bins=2) == pytest.approx(
        0.5 * 0.2 + 0.5 * 0.3
    )
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0


def _ece_loop(confidence, correct, edges):
    """Explicit loop: right-closed bins, the first bin also closed on the left."""
    total = 0.0
    for b in range(len(edges) - 1):
        low, high = edges[b], edges[b + 1]
        members = [
            i for i, c in enumerate(confidence) if (c <= high or b == len(edges) - 2) and (c > low or b == 0)
        ]
        if members:
            gap = abs(np.mean([correct[i] for i in members]) - np.mean([confidence[i] for i in members]))
            total += len(members) / len(confidence) * gap
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
def test_ece_matches_explicit_loop(n_bins):
    rng = np.random.default_rng(n_bins)
    confidence = np.round(rng.beta(4, 2, 400), 2)  # rounding puts items exactly on bin edges
    correct = (rng.random(400) < confidence**1.5).astype(int)
    uniform_edges = np.linspace(0, 1, n_bins + 1)
    assert expected_calibration_error(confidence, correct, n_bins) == pytest.approx(
        _ece_loop(confidence, correct, uniform_edges), abs=1e-12
    )
    quantile_edges = np.percentile(confidence, np.linspace(0, 100, n_bins + 1))
    assert expected_calibration_error(confidence, correct, n_bins, "quantile") == pytest.approx(
        _ece_loop(confidence, correct, quantile_edges), abs=1e-12
    )


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_diagram_matches_sklearn(strategy):
    rng = np.random.default_rng(0)
    confidence = np.round(rng.uniform(0.2, 1.0, 300), 2)
    correct = (rng.random(300) < confidence).astype(int)
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=10, strategy=strategy)
    diagram = reliability_diagram_data(confidence, correct, n_bins=10, strategy=strategy)
    occupied = diagram.count > 0
    np.testing.assert_allclose(diagram.accuracy[occupied], prob_true)
    np.testing.assert_allclose(diagram.confidence[occupied], prob_pred)
    assert diagram.count.sum() == 300
    if strategy == "uniform":
        assert diagram.count[0] == 0 and np.isnan(diagram.accuracy[0])


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="confidence"):
        expected_calibration_error([0.5, 1.2], [1, 0])
    with pytest.raises(ValueError, match="correct"):
        expected_calibration_error([0.5, 0.2], [1])
    with pytest.raises(ValueError, match="strategy"):
        expected_calibration_error([0.5], [1], strategy="adaptive")


def test_refusal_rate_and_format_compliance():
    assert refusal_rate([True, False, False, True]) == pytest.approx(0.5)
    assert refusal_rate([0, 0, 1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="flags"):
        refusal_rate([0, 2])
    assert format_compliance(["42", None, "  ", "B", 7]) == pytest.approx(3 / 5)
    assert format_compliance([True, False, False, False]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="extracted"):
        format_compliance([])


# ---------------------------------------------------------------- CKA


def _hsic_with_centring_matrix(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _kernel_cka(x, y):
    k, l = x @ x.T, y @ y.T
    return _hsic_with_centring_matrix(k, l) / math.sqrt(
        _hsic_with_centring_matrix(k, k) * _hsic_with_centring_matrix(l, l)
    )


def _u_centre(gram):
    """U-centring (Szekely & Rizzo 2014), written with explicit row/column sums."""
    n = gram.shape[0]
    g = gram.copy()
    np.fill_diagonal(g, 0.0)
    row = g.sum(axis=1, keepdims=True)
    col = g.sum(axis=0, keepdims=True)
    centred = g - row / (n - 2) - col / (n - 2) + g.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(centred, 0.0)
    return centred


def _debiased_kernel_cka(x, y):
    k, l = _u_centre(x @ x.T), _u_centre(y @ y.T)
    return np.sum(k * l) / math.sqrt(np.sum(k * k) * np.sum(l * l))


@pytest.fixture
def activations():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) + 3.0
    y = x @ rng.normal(size=(12, 7)) + 0.8 * rng.normal(size=(40, 7))
    return x, y


def test_cka_matches_kernel_formula(activations):
    x, y = activations
    assert linear_cka(x, y) == pytest.approx(_kernel_cka(x, y), rel=1e-10)
    wide = np.random.default_rng(1).normal(size=(15, 90))  # p > n: Gram-product path
    assert linear_cka(wide, wide[:, :30] ** 2) == pytest.approx(_kernel_cka(wide, wide[:, :30] ** 2), rel=1e-10)


def test_cka_identity_and_invariances(activations):
    x, y = activations
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 12)))
    assert linear_cka(x @ rotation, y) == pytest.approx(linear_cka(x, y), rel=1e-10)
    assert linear_cka(x, 5.0 * y) == pytest.approx(linear_cka(x, y), rel=1e-10)
    assert linear_cka(x, y) < 0.999
    independent = np.random.default_rng(9).normal(size=(40, 7))
    assert linear_cka(x, independent) < linear_cka(x, y)


def test_debiased_cka_matches_u_centred_kernel_formula(activations):
    x, y = activations
    assert linear_cka(x, y, debiased=True) == pytest.approx(_debiased_kernel_cka(x, y), rel=1e-9)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0)
    wide = np.random.default_rng(3).normal(size=(10, 50))
    assert linear_cka(wide, wide[:, ::2], debiased=True) == pytest.approx(
        _debiased_kernel_cka(wide, wide[:, ::2]), rel=1e-9
    )


def test_cka_rejects_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(np.ones((4, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="x has no variance"):
        linear_cka(np.ones((4, 2)), np.arange(8.0).reshape(4, 2))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(np.eye(3), np.eye(3), debiased=True)


# ---------------------------------------------------------------- refusal direction


def test_difference_of_means_plain_and_masked():
    harmful = np.array([[1.0, 2.0], [3.0, 4.0]])
    harmless = np.array([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(difference_of_means(harmful, harmless), [2.0 - 1.0, 3.0 - 1.0])
    rng = np.random.default_rng(0)
    tokens_harmful, tokens_harmless = rng.normal(size=(3, 5, 4)), rng.normal(size=(2, 6, 4))
    mask_harmful = rng.random((3, 5)) < 0.6
    mask_harmless = rng.random((2, 6)) < 0.6
    mean_harmful = sum(
        tokens_harmful[i, t] for i in range(3) for t in range(5) if mask_harmful[i, t]
    ) / mask_harmful.sum()
    mean_harmless = sum(
        tokens_harmless[i, t] for i in range(2) for t in range(6) if mask_harmless[i, t]
    ) / mask_harmless.sum()
    np.testing.assert_allclose(
        difference_of_means(tokens_harmful, tokens_harmless, mask_harmful, mask_harmless),
        mean_harmful - mean_harmless,
    )
    with pytest.raises(ValueError, match="harmful_acts"):
        difference_of_means(np.ones(3), harmless)


def test_direction_attenuation_hand_case():
    harmful_post = np.array([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1)
    harmless_post = np.array([[0.0, 0.0], [1.0, 0.0]])  # mean (0.5, 0)
    result = direction_attenuation([2.0, 0.0], [1.0, 1.0], harmful_post, harmless_post)
    assert result.cosine == pytest.approx(1 / math.sqrt(2))
    assert result.norm_ratio == pytest.approx(math.sqrt(2) / 2)
    assert result.projection_gap_start == pytest.approx(2.0)
    assert result.projection_gap_post == pytest.approx(1.5)
    assert result.projection_gap_ratio == pytest.approx(0.75)
    with pytest.raises(ValueError, match="dir_start"):
        direction_attenuation([0.0, 0.0], [1.0, 1.0], harmful_post, harmless_post)


# ---------------------------------------------------------------- weight-delta spectra


def _rank_r_matrix(rng, shape, spectrum):
    left, _ = np.linalg.qr(rng.normal(size=(shape[0], len(spectrum))))
    right, _ = np.linalg.qr(rng.normal(size=(shape[1], len(spectrum))))
    return left @ np.diag(spectrum) @ right.T


def test_singular_values_of_constructed_matrix():
    matrix = _rank_r_matrix(np.random.default_rng(0), (8, 6), [5.0, 2.0, 1.0])
    values = singular_values(matrix)
    np.testing.assert_allclose(values[:3], [5.0, 2.0, 1.0], rtol=1e-10)
    np.testing.assert_allclose(values[3:], 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="delta"):
        singular_values(np.ones((2, 2, 2)))


def test_effective_and_stable_rank_hand_cases():
    shares = np.array([0.75, 0.25])
    assert effective_rank([3.0, 1.0]) == pytest.approx(math.exp(-np.sum(shares * np.log(shares))))
    assert stable_rank([3.0, 1.0]) == pytest.approx(10 / 9)
    assert effective_rank([2.0, 2.0, 2.0, 0.0]) == pytest.approx(3.0)
    assert stable_rank([2.0, 2.0, 2.0, 0.0]) == pytest.approx(3.0)
    assert effective_rank([4.0]) == pytest.approx(1.0)
    assert effective_rank([0.0, 0.0]) == 0.0 and stable_rank([0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="singular_values"):
        effective_rank([1.0, -1.0])


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_effective_rank_bounds_for_rank_r_matrix(rank):
    rng = np.random.default_rng(rank)
    spectrum = rng.uniform(0.5, 3.0, rank)
    values = singular_values(_rank_r_matrix(rng, (20, 15), spectrum))
    assert 1.0 - 1e-9 <= effective_rank(values) <= rank + 1e-6
    assert 1.0 - 1e-9 <= stable_rank(values) <= rank + 1e-6
    flat = singular_values(_rank_r_matrix(rng, (20, 15), np.ones(rank)))
    assert effective_rank(flat) == pytest.approx(rank, rel=1e-6)


def test_spectrum_summary_against_numpy_norms():
    matrix = _rank_r_matrix(np.random.default_rng(5), (12, 9), [4.0, 3.0, 0.5])
    summary = spectrum_summary(matrix, energy_fractions=(0.5, 0.9, 0.995, 1.0))
    assert summary.shape == (12, 9)
    assert summary.frobenius_norm == pytest.approx(np.linalg.norm(matrix, "fro"))
    assert summary.spectral_norm == pytest.approx(np.linalg.norm(matrix, 2))
    assert summary.nuclear_norm == pytest.approx(np.linalg.norm(matrix, "nuc"))
    assert summary.numerical_rank == np.linalg.matrix_rank(matrix) == 3
    # energies 16, 9, 0.25 of 25.25: cumulative 0.634, 0.9901, 1.0
    assert summary.energy_rank == {0.5: 1, 0.9: 2, 0.995: 3, 1.0: 3}
    assert energy_rank([4.0, 3.0, 0.5], 0.98) == 2
