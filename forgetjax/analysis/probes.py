"""Linear knowledge probes: is a fact still linearly decodable from a layer's residual stream after post-training?

Per layer, an L2-regularised logistic regression is fit on the START model's activations of a training split of
true and false statements and evaluated on held-out statements with both the start model's and the post-trained
model's activations (the probe is fixed: a drop under the post model means the start's knowledge direction no
longer separates the statements). Features are standardised with the training split's mean and standard
deviation (of the start model), applied unchanged to every evaluated set.

`fit_logistic` minimises scikit-learn's LogisticRegression objective (penalty "l2", intercept unpenalised):
    C * sum_i log(1 + exp(-s_i (w.x_i + b))) + ||w||^2 / 2,   s_i = +-1,
with L-BFGS (scipy) and the analytic gradient, so its probabilities equal scikit-learn's on the same features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import expit, log_expit


@dataclass(frozen=True)
class LogisticProbe:
    """Weights, intercept and the standardisation of a fitted probe."""

    weights: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray

    def probabilities(self, features: ArrayLike) -> np.ndarray:
        """P(true) per row of `features` [n, d]."""
        x = (np.asarray(features, np.float64) - self.mean) / self.scale
        return expit(x @ self.weights + self.intercept)

    def accuracy(self, features: ArrayLike, labels: ArrayLike) -> float:
        labels = np.asarray(labels).astype(bool)
        return float(np.mean((self.probabilities(features) >= 0.5) == labels))


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the columns; constant columns get scale 1."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    return mean, np.where(scale > 0, scale, 1.0)


def fit_logistic(features: ArrayLike, labels: ArrayLike, C: float = 1.0, max_iter: int = 1000,
                 tol: float = 1e-10, standardise: bool = True) -> LogisticProbe:
    """The L2 logistic regression of the module docstring on `features` [n, d] and 0/1 `labels` [n]."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be [n, d] and labels [n], got {x.shape} and {y.shape}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("labels must hold both classes 0 and 1")
    mean, scale = standardiser(x) if standardise else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    x = (x - mean) / scale
    signs = np.where(y == 1, 1.0, -1.0)

    def objective(theta):
        w, b = theta[:-1], theta[-1]
        margin = signs * (x @ w + b)
        loss = -C * np.sum(log_expit(margin)) + 0.5 * w @ w
        coefficient = -C * signs * expit(-margin)
        return loss, np.append(x.T @ coefficient + w, coefficient.sum())

    result = minimize(objective, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "gtol": tol, "ftol": tol * 1e-3})
    return LogisticProbe(result.x[:-1], float(result.x[-1]), mean, scale)


def layer_probe_accuracies(train: np.ndarray, train_labels: ArrayLike, evaluated: Mapping[str, np.ndarray],
                           test_labels: ArrayLike, C: float = 1.0) -> dict[str, list[float]]:
    """Per layer, a probe fit on `train` [L, n, d] and its accuracy on each evaluated set [L, m, d] (e.g. "start"
    and "post": the held-out statements under the start and the post-trained model)."""
    out: dict[str, list[float]] = {name: [] for name in evaluated}
    for layer in range(train.shape[0]):
        probe = fit_logistic(train[layer], train_labels, C=C)
        for name, features in evaluated.items():
            out[name].append(probe.accuracy(features[layer], test_labels))
    return out
