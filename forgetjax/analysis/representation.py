"""Representation-level forgetting: CKA similarity, refusal-direction attenuation and weight-delta spectra."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class DirectionAttenuation:
    """How a (refusal) direction changed: angle, length and the harmful-vs-harmless separation along it.

    projection_gap_* = mean projection of harmful minus harmless activations onto the unit START direction.
    The start gap equals |dir_start| (dir_start is itself that difference of means); the ratio post/start
    measures how much of the original separation survives post-training (1 = intact, 0 = erased).
    """

    cosine: float
    norm_ratio: float
    projection_gap_start: float
    projection_gap_post: float
    projection_gap_ratio: float


@dataclass(frozen=True)
class SpectrumSummary:
    """Norms and rank measures of a weight delta; energy_rank[f] = fewest singular values holding >= f of |Δ|_F²."""

    shape: tuple[int, int]
    frobenius_norm: float
    spectral_norm: float
    nuclear_norm: float
    effective_rank: float
    stable_rank: float
    numerical_rank: int
    energy_rank: dict[float, int]


def _matrix(name: str, values: ArrayLike) -> np.ndarray:
    """Validate a finite 2-D matrix and return it as float64."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {array.shape}; reshape stacked weights first")
    if array.size == 0:
        raise ValueError(f"{name} is empty, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _vector(name: str, values: ArrayLike) -> np.ndarray:
    """Validate a finite non-empty 1-D vector and return it as float64."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _cross_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """|AᵀB|_F² (= tr(AAᵀBBᵀ)), via whichever of the feature or Gram products is cheaper."""
    n, width_a = a.shape
    width_b = b.shape[1]
    if n * width_a * width_b <= n * n * (width_a + width_b):
        return float(np.sum((a.T @ b) ** 2))
    return float(np.sum((a @ a.T) * (b @ b.T)))


def _unbiased_hsic(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of linear kernels on column-centred features, times n(n-3).

    With K = AAᵀ and zero-diagonal K̃: tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1, written in feature
    space using that centred columns give K1 = 0, so K̃1 = -(row squared norms).
    """
    n = a.shape[0]
    row_norms_a = np.sum(a**2, axis=1)
    row_norms_b = np.sum(b**2, axis=1)
    return (
        _cross_similarity(a, b)
        - n / (n - 2.0) * float(row_norms_a @ row_norms_b)
        + row_norms_a.sum() * row_norms_b.sum() / ((n - 1.0) * (n - 2.0))
    )


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between activations x (n, p1) and y (n, p2) of the same n inputs.

    Biased: |YᵀX|_F² / (|XᵀX|_F |YᵀY|_F) on column-centred features; 1 for identical representations and
    invariant to orthogonal transforms and isotropic scaling. debiased=True replaces each HSIC term with the
    unbiased estimator (needs n >= 4) and returns NaN if a self-similarity estimate is not positive.
    """
    features_x, features_y = _matrix("x", x), _matrix("y", y)
    if features_x.shape[0] != features_y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows (inputs): {features_x.shape[0]} vs {features_y.shape[0]}"
        )
    n = features_x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"linear_cka needs at least {4 if debiased else 2} rows, got {n}")
    centred_x = features_x - features_x.mean(axis=0)
    centred_y = features_y - features_y.mean(axis=0)
    for name, centred in (("x", centred_x), ("y", centred_y)):
        if not np.any(centred):
            raise ValueError(f"{name} has no variance across rows; CKA is undefined")
    similarity = _unbiased_hsic if debiased else _cross_similarity
    cross = similarity(centred_x, centred_y)
    self_product = similarity(centred_x, centred_x) * similarity(centred_y, centred_y)
    if self_product <= 0:
        return float("nan")
    return float(cross / np.sqrt(self_product))


def _masked_mean(name: str, activations: ArrayLike, mask: ArrayLike | None) -> np.ndarray:
    """Mean activation vector over all leading axes, counting only positions where mask is true."""
    acts = np.asarray(activations, dtype=np.float64)
    if acts.ndim < 2 or acts.shape[0] == 0 or acts.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., d) with at least one vector, got {acts.shape}")
    if not np.all(np.isfinite(acts)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if mask is None:
        return acts.reshape(-1, acts.shape[-1]).mean(axis=0)
    weights = np.asarray(mask, dtype=np.float64)
    if weights.shape != acts.shape[:-1]:
        raise ValueError(f"mask for {name} must have shape {acts.shape[:-1]}, got {weights.shape}")
    if not np.all((weights == 0) | (weights == 1)):
        raise ValueError(f"mask for {name} must be boolean or 0/1")
    total = weights.sum()
    if total == 0:
        raise ValueError(f"mask for {name} selects no positions")
    return np.tensordot(weights, acts, axes=weights.ndim) / total


def difference_of_means(
    harmful_acts: ArrayLike,
    harmless_acts: ArrayLike,
    harmful_mask: ArrayLike | None = None,
    harmless_mask: ArrayLike | None = None,
) -> np.ndarray:
    """Refusal direction (Arditi et al. 2024): mean harmful minus mean harmless activation, shape (d,).

    Activations are (n, d) or (n, T, d); optional masks of shape (n,) / (n, T) give a token-weighted mean over
    the selected positions only.
    """
    harmful_mean = _masked_mean("harmful_acts", harmful_acts, harmful_mask)
    harmless_mean = _masked_mean("harmless_acts", harmless_acts, harmless_mask)
    if harmful_mean.shape != harmless_mean.shape:
        raise ValueError(
            f"harmful_acts and harmless_acts have different widths: {harmful_mean.size} vs {harmless_mean.size}"
        )
    return harmful_mean - harmless_mean


def direction_attenuation(
    dir_start: ArrayLike,
    dir_post: ArrayLike,
    harmful_post: ArrayLike,
    harmless_post: ArrayLike,
    harmful_mask: ArrayLike | None = None,
    harmless_mask: ArrayLike | None = None,
) -> DirectionAttenuation:
    """Compare a start direction with the post-training one and measure the surviving projection gap.

    cosine is NaN when dir_post is the zero vector (no direction left to compare).
    """
    start, post = _vector("dir_start", dir_start), _vector("dir_post", dir_post)
    if start.shape != post.shape:
        raise ValueError(f"dir_start and dir_post must have the same width: {start.size} vs {post.size}")
    start_norm = float(np.linalg.norm(start))
    if start_norm == 0:
        raise ValueError("dir_start is the zero vector; no direction to compare against")
    post_norm = float(np.linalg.norm(post))
    unit_start = start / start_norm
    gap_vector = difference_of_means(harmful_post, harmless_post, harmful_mask, harmless_mask)
    if gap_vector.shape != start.shape:
        raise ValueError(f"post activations have width {gap_vector.size} but dir_start has {start.size}")
    gap_post = float(gap_vector @ unit_start)
    return DirectionAttenuation(
        cosine=float(start @ post) / (start_norm * post_norm) if post_norm > 0 else float("nan"),
        norm_ratio=post_norm / start_norm,
        projection_gap_start=start_norm,
        projection_gap_post=gap_post,
        projection_gap_ratio=gap_post / start_norm,
    )


def singular_values(delta: ArrayLike) -> np.ndarray:
    """Singular values of a 2-D weight delta (e.g. W_post - W_start), descending, in float64."""
    return np.linalg.svd(_matrix("delta", delta), compute_uv=False)


def _spectrum(values: ArrayLike) -> np.ndarray:
    """Validate a non-empty 1-D array of finite, non-negative singular values."""
    spectrum = _vector("singular_values", values)
    if np.any(spectrum < 0):
        raise ValueError("singular_values must be non-negative")
    return spectrum


def effective_rank(singular_values: ArrayLike) -> float:
    """Roy & Vetterli (2007) effective rank exp(H(p)), p_i = σ_i / Σσ; between 1 and rank. 0.0 for a zero matrix."""
    spectrum = _spectrum(singular_values)
    total = spectrum.sum()
    if total == 0:
        return 0.0
    shares = spectrum[spectrum > 0] / total
    return float(np.exp(-np.sum(shares * np.log(shares))))


def stable_rank(singular_values: ArrayLike) -> float:
    """Stable rank |Δ|_F² / |Δ|_2² = Σσ² / max σ²; between 1 and rank. 0.0 for a zero matrix."""
    spectrum = _spectrum(singular_values)
    largest = spectrum.max()
    if largest == 0:
        return 0.0
    return float(np.sum((spectrum / largest) ** 2))


def energy_rank(singular_values: ArrayLike, fraction: float) -> int:
    """Fewest top singular values whose squares sum to at least `fraction` of the total (0 for a zero matrix)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    energy = np.sort(_spectrum(singular_values))[::-1] ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = np.cumsum(energy) / total
    return int(min(np.searchsorted(cumulative, fraction * (1 - 1e-12), side="left") + 1, energy.size))


def spectrum_summary(delta: ArrayLike, energy_fractions: tuple[float, ...] = (0.5, 0.9, 0.99)) -> SpectrumSummary:
    """Norms, effective/stable/numerical rank and energy ranks of a weight delta in one SVD."""
    matrix = _matrix("delta", delta)
    spectrum = np.linalg.svd(matrix, compute_uv=False)
    tolerance = spectrum.max() * max(matrix.shape) * np.finfo(np.float64).eps
    return SpectrumSummary(
        shape=(int(matrix.shape[0]), int(matrix.shape[1])),
        frobenius_norm=float(np.sqrt(np.sum(spectrum**2))),
        spectral_norm=float(spectrum.max()),
        nuclear_norm=float(spectrum.sum()),
        effective_rank=effective_rank(spectrum),
        stable_rank=stable_rank(spectrum),
        numerical_rank=int(np.sum(spectrum > tolerance)),
        energy_rank={fraction: energy_rank(spectrum, fraction) for fraction in energy_fractions},
    )
