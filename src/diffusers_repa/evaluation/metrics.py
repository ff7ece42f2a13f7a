"""Sample-quality metrics on feature vectors, following ADM's ``evaluations/evaluator.py``.

All functions take NumPy arrays or torch tensors of features; images → features is the job of
[`~diffusers_repa.evaluation.inception.FIDInceptionV3`] and [`~diffusers_repa.evaluation.dinov2.DINOv2Features`].
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import rel_entr, softmax


def _as_float64_array(features: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {features.shape}.")
    return features


class RunningStatistics:
    """Mean and covariance of feature vectors fed in batches, in float64 with O(D²) memory.

    Sums are taken around a shift (the first batch's mean) so that large offsets do not cancel catastrophically;
    with one batch the result is exactly ``np.mean`` / ``np.cov(rowvar=False)``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: np.ndarray | torch.Tensor) -> RunningStatistics:
        features = _as_float64_array(features, "features")
        if self.shift is None:
            self.shift = features.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((self.shift.size, self.shift.size))
        elif features.shape[1] != self.shift.size:
            raise ValueError(f"Feature dimension changed from {self.shift.size} to {features.shape[1]}.")
        centered = features - self.shift
        self.count += len(features)
        self.sum += centered.sum(axis=0)
        self.outer += centered.T @ centered
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) with the unbiased (n − 1) covariance."""
        if self.count < 2:
            raise ValueError(f"Statistics need at least 2 feature vectors, got {self.count}.")
        mean_offset = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mean_offset, mean_offset)) / (self.count - 1)
        return self.shift + mean_offset, sigma


def compute_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (``np.cov`` as ADM)."""
    return RunningStatistics().update(features).finalize()


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) between two Gaussians, in float64.

    As ADM (after TTUR): ``scipy.linalg.sqrtm`` of Σ₁Σ₂; if the product is singular enough for the root to be
    non-finite, ``eps`` is added to both diagonals; a small imaginary part from round-off is dropped, a large one
    (|imag| > 1e-3 on the diagonal) raises `ValueError`.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"Statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}. "
            "Both sides must come from the same feature (e.g. pool 2048 for FID, spatial 2023 for sFID)."
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular covariance product, adding {eps} to the diagonals.", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(Σ₁Σ₂).")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(
    logits_or_probs: np.ndarray | torch.Tensor, splits: int = 10, is_probs: bool | None = None
) -> float:
    """Inception Score exp(E_x KL(p(y|x) ‖ p(y))), averaged over ``splits`` consecutive chunks (ADM: 10 × 5,000).

    Args:
        logits_or_probs: (N, C) class logits or probabilities (rows summing to 1).
        splits: number of chunks (``np.array_split``; equal to ADM's 5,000-sample chunks for N = 50,000).
        is_probs: whether the input holds probabilities; ``None`` decides from the values (non-negative rows summing
            to 1 are probabilities). Logits go through a float64 softmax.

    Returns the mean of the per-chunk scores (ADM reports the mean only). Zero probabilities contribute 0 to the KL.
    """
    values = _as_float64_array(logits_or_probs, "logits_or_probs")
    if is_probs is None:
        is_probs = bool((values >= 0).all() and np.allclose(values.sum(axis=1), 1.0, atol=1e-4))
    probs = values if is_probs else softmax(values, axis=1)
    if not 1 <= splits <= len(probs):
        raise ValueError(f"splits must be between 1 and the number of samples ({len(probs)}), got {splits}.")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        scores.append(np.exp(rel_entr(part, marginal).sum(axis=1).mean()))
    return float(np.mean(scores))


def _pairwise_squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    # ‖u‖² − 2u·v + ‖v‖², clamped at 0 against round-off (ADM's `_batch_pairwise_distances`).
    squared = rows.square().sum(1, keepdim=True) - 2.0 * rows @ cols.T + cols.square().sum(1)[None]
    return squared.clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance (N,) from each vector to its k-th nearest neighbour in the same set (itself excluded).

    As ADM's ``ManifoldEstimator.manifold_radii``: the (k+1)-th smallest distance of a row, counting the 0 to itself.
    """
    if len(features) <= k:
        raise ValueError(f"The k-NN radius with k={k} needs more than {k} feature vectors, got {len(features)}.")
    radii = []
    for row_start in range(0, len(features), batch_size):
        rows = features[row_start : row_start + batch_size]
        nearest = []
        for col_start in range(0, len(features), batch_size):
            distances = _pairwise_squared_distances(rows, features[col_start : col_start + batch_size])
            nearest.append(distances.topk(min(k + 1, distances.shape[1]), dim=1, largest=False).values)
        radii.append(torch.cat(nearest, dim=1).topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 10000,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls, as ADM's ``ManifoldEstimator``.

    Each set's manifold is the union of balls around its vectors with radius = distance to the k-th nearest
    neighbour within the set. Precision = fraction of fake vectors inside the real manifold; recall = fraction of
    real vectors inside the fake manifold (a point on a ball's boundary counts as inside). Distances are computed in
    float32 blocks of ``batch_size`` × ``batch_size`` (ADM tries float16 first; the difference only moves points
    that sit on a boundary to ~1e-3 relative precision).

    Returns ``(precision, recall)``.
    """
    real = torch.as_tensor(real_features, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake_features, dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"Real and fake features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}."
        )
    real_radii = manifold_radii(real, k, batch_size)
    fake_radii = manifold_radii(fake, k, batch_size)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for real_start in range(0, len(real), batch_size):
        real_block = real[real_start : real_start + batch_size]
        real_block_radii = real_radii[real_start : real_start + batch_size]
        for fake_start in range(0, len(fake), batch_size):
            distances = _pairwise_squared_distances(real_block, fake[fake_start : fake_start + batch_size])
            fake_block_radii = fake_radii[fake_start : fake_start + batch_size]
            real_in_fake[real_start : real_start + batch_size] |= (distances <= fake_block_radii[None]).any(dim=1)
            fake_in_real[fake_start : fake_start + batch_size] |= (distances <= real_block_radii[:, None]).any(dim=0)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())
