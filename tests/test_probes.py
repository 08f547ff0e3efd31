"""Linear knowledge probes against scikit-learn's LogisticRegression on the same features (held-out items)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from forgetjax.analysis.probes import fit_logistic, layer_probe_accuracies


def _data(seed: int, n: int = 120, d: int = 16):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + 2.0
    y = ((x - 2.0) @ direction + rng.normal(scale=2.0, size=n) > 0).astype(int)
    return x, y


@pytest.mark.parametrize("seed, C", [(0, 1.0), (1, 0.1), (2, 10.0)])
def test_probe_equals_scikit_learn_on_held_out_items(seed, C):
    x, y = _data(seed)
    train, test = slice(0, 80), slice(80, None)
    probe = fit_logistic(x[train], y[train], C=C)
    scaler = StandardScaler().fit(x[train])
    reference = LogisticRegression(C=C, solver="lbfgs", max_iter=10_000, tol=1e-12).fit(scaler.transform(x[train]),
                                                                                         y[train])
    expected = reference.predict_proba(scaler.transform(x[test]))[:, 1]
    np.testing.assert_allclose(probe.probabilities(x[test]), expected, atol=1e-3)
    assert probe.accuracy(x[test], y[test]) == pytest.approx(reference.score(scaler.transform(x[test]), y[test]),
                                                             abs=1e-3)


def test_layer_probes_fit_on_start_and_evaluate_both_models():
    x, y = _data(3, n=100)
    train, test = x[:60], x[60:]
    start = np.stack([train, train * 0.5])
    held_start = np.stack([test, test * 0.5])
    rng = np.random.default_rng(9)
    held_post = np.stack([test, rng.normal(size=test.shape)])  # layer 1 loses the information under the post model
    out = layer_probe_accuracies(start, y[:60], {"start": held_start, "post": held_post}, y[60:])
    scaler = StandardScaler().fit(train)
    reference = LogisticRegression(max_iter=10_000, tol=1e-12).fit(scaler.transform(train), y[:60])
    expected = reference.score(scaler.transform(test), y[60:])
    assert out["start"][0] == pytest.approx(expected, abs=1e-3) and out["post"][0] == out["start"][0]
    assert out["post"][1] < out["start"][1]


def test_refit_probe_separates_moved_from_lost_knowledge(tmp_path):
    """Post-training that permutes and flips the features (the knowledge moved) breaks the start model's read-out
    but not a probe refit on the post-trained activations, which equals scikit-learn fit on them; pure noise (the
    knowledge lost) breaks both. representation.json keeps the refit curve and the representation table reads it."""
    from forgetjax import results

    x, y = _data(4, n=160)
    permutation = np.random.default_rng(5).permutation(x.shape[1])
    moved = -x[:, permutation]
    lost = np.random.default_rng(6).normal(size=x.shape)
    start = np.stack([x, x])
    post = np.stack([moved, lost])
    train = np.arange(160) < 100
    fit_on_start = layer_probe_accuracies(start[:, train], y[train], {"post": post[:, ~train]}, y[~train])
    refit = layer_probe_accuracies(post[:, train], y[train], {"post_refit": post[:, ~train]}, y[~train])
    scaler = StandardScaler().fit(moved[train])
    reference = LogisticRegression(max_iter=10_000, tol=1e-12).fit(scaler.transform(moved[train]), y[train])
    assert refit["post_refit"][0] == pytest.approx(reference.score(scaler.transform(moved[~train]), y[~train]),
                                                   abs=1e-3)
    assert refit["post_refit"][0] > 0.75 and fit_on_start["post"][0] < 0.6  # moved: the refit probe recovers it
    assert refit["post_refit"][1] < 0.7  # lost: nothing to refit on

    probe = {"start": [0.9, 0.9], "post": fit_on_start["post"], **refit, "n_train": 100, "n_test": 60}
    path = results.write_representation(tmp_path / "representation.json",
                                        results.representation_json([0, 1], knowledge_probe=probe))
    assert results.read_representation(path).knowledge_probe["post_refit"] == pytest.approx(refit["post_refit"])


def test_bad_probe_inputs_are_rejected():
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="C must be"):
        fit_logistic(np.ones((4, 2)), np.array([0, 1, 0, 1]), C=0)
