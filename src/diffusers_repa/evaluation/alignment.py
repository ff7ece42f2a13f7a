"""Representation-alignment measures between two feature sets of the same N inputs: CKNNA, linear CKA, and a
linear probe — the quantities the REPA paper plots per SiT block against a vision encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _paired_features(features_a: torch.Tensor, features_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features_a, features_b = torch.as_tensor(features_a), torch.as_tensor(features_b)
    if features_a.ndim != 2 or features_b.ndim != 2 or len(features_a) != len(features_b):
        raise ValueError(
            "Alignment metrics compare two (N, D) feature sets of the same N inputs, got shapes "
            f"{tuple(features_a.shape)} and {tuple(features_b.shape)}; pool or flatten tokens first."
        )
    return features_a.double(), features_b.double()


def _hsic_unbiased(kernel_k: torch.Tensor, kernel_l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5) of two (N, N) kernels; centring is implicit in it."""
    n = kernel_k.shape[0]
    k_tilde = kernel_k.clone().fill_diagonal_(0)
    l_tilde = kernel_l.clone().fill_diagonal_(0)
    # 1ᵀ K̃ L̃ 1 = (K̃ᵀ1)·(L̃1): O(N²) instead of forming K̃ L̃.
    cross = k_tilde.sum(dim=0) @ l_tilde.sum(dim=1)
    value = (k_tilde * l_tilde.T).sum() + k_tilde.sum() * l_tilde.sum() / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
    return value / (n * (n - 3))


def cknna(
    features_a: torch.Tensor, features_b: torch.Tensor, k: int = 10, normalize: bool = True, eps: float = 1e-6
) -> float:
    """Centered Kernel Nearest-Neighbour Alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    The variant of minyoungg/platonic-rep ``metrics.AlignmentMetrics.cknna`` with its defaults
    (``unbiased=True``, ``distance_agnostic=False``), used for REPA's alignment plots:

    1. rows are L2-normalised (``normalize=True``, as platonic-rep's ``measure_alignment.compute_score`` does);
    2. linear kernels K = A Aᵀ, L = B Bᵀ;
    3. each row's k nearest neighbours by kernel value, the sample itself excluded; the mask keeps the pairs (i, j)
       where j is among i's k nearest neighbours in *both* spaces (mutual k-NN);
    4. sim(K, L) = unbiased HSIC(mask ∘ K, mask ∘ L) — the estimator centres the kernels implicitly;
    5. CKNNA = sim(K, L) / (sqrt(sim(K, K) · sim(L, L)) + eps), where sim(K, K) uses K's own k-NN mask.

    ``eps=1e-6`` is platonic-rep's guard; pass 0 for the exact ratio. Computed in float64 with O(N²) memory.

    Args:
        features_a, features_b: (N, D_a) and (N, D_b) features of the same N inputs.
        k: neighbourhood size (the paper: 10); at least 2 and below N − 1.
    """
    features_a, features_b = _paired_features(features_a, features_b)
    n = len(features_a)
    if not 2 <= k < n - 1:
        raise ValueError(f"CKNNA needs 2 <= k < N - 1, got k={k} with N={n}.")
    if normalize:
        features_a, features_b = F.normalize(features_a, dim=-1), F.normalize(features_b, dim=-1)
    kernel_a, kernel_b = features_a @ features_a.T, features_b @ features_b.T

    def neighbour_mask(kernel: torch.Tensor) -> torch.Tensor:
        indices = kernel.clone().fill_diagonal_(float("-inf")).topk(k, dim=1).indices
        return torch.zeros_like(kernel).scatter_(1, indices, 1.0)

    mask_a, mask_b = neighbour_mask(kernel_a), neighbour_mask(kernel_b)

    def similarity(kernel_k: torch.Tensor, mask_k: torch.Tensor, kernel_l: torch.Tensor, mask_l: torch.Tensor):
        mask = mask_k * mask_l
        return _hsic_unbiased(mask * kernel_k, mask * kernel_l)

    sim_ab = similarity(kernel_a, mask_a, kernel_b, mask_b)
    sim_aa = similarity(kernel_a, mask_a, kernel_a, mask_a)
    sim_bb = similarity(kernel_b, mask_b, kernel_b, mask_b)
    return float(sim_ab / (torch.sqrt(sim_aa * sim_bb) + eps))


def cka(features_a: torch.Tensor, features_b: torch.Tensor, unbiased: bool = False) -> float:
    """Linear Centered Kernel Alignment (Kornblith et al. 2019).

    ``unbiased=False``: ‖AcᵀBc‖²_F / (‖AcᵀAc‖_F ‖BcᵀBc‖_F) with column-centred Ac, Bc — the biased-HSIC CKA, computed in
    feature space (O(N·D²)). It has a positive bias of about D/N for unrelated features.
    ``unbiased=True``: the same ratio of unbiased HSIC estimates on the linear kernels (platonic-rep's
    ``unbiased_cka``), near 0 for unrelated features; O(N²) memory.
    Invariant to orthogonal transforms and isotropic scaling of either side. Computed in float64.
    """
    features_a, features_b = _paired_features(features_a, features_b)
    if unbiased:
        if len(features_a) < 4:
            raise ValueError("Unbiased CKA needs at least 4 samples.")
        kernel_a, kernel_b = features_a @ features_a.T, features_b @ features_b.T
        hsic_ab = _hsic_unbiased(kernel_a, kernel_b)
        return float(hsic_ab / torch.sqrt(_hsic_unbiased(kernel_a, kernel_a) * _hsic_unbiased(kernel_b, kernel_b)))
    centered_a = features_a - features_a.mean(dim=0)
    centered_b = features_b - features_b.mean(dim=0)
    cross = torch.linalg.matrix_norm(centered_a.T @ centered_b) ** 2
    norm_a = torch.linalg.matrix_norm(centered_a.T @ centered_a)
    norm_b = torch.linalg.matrix_norm(centered_b.T @ centered_b)
    return float(cross / (norm_a * norm_b))


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
    seed: int = 0,
) -> float:
    """Top-1 test accuracy of a linear classifier on frozen features (e.g. globally pooled hidden states).

    The probe is ``BatchNorm1d(D, affine=False)`` (parameter-free feature standardisation, as MAE's linear probe) followed
    by ``Linear(D, num_classes)``, trained with Adam on cross-entropy for ``epochs`` passes over shuffled
    mini-batches. Initialisation and shuffling use their own generator seeded with ``seed``, so the result is
    reproducible and the global RNG is untouched. Runs on the device of ``train_features``.

    Args:
        train_features, test_features: (N, D) features; train_labels, test_labels: (N,) integer class ids.
        num_classes: default ``max(label) + 1`` over both splits.
    """
    train_features, test_features = torch.as_tensor(train_features).float(), torch.as_tensor(test_features).float()
    train_labels, test_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Probe features must be (N, D) with one D, got {tuple(train_features.shape)} and {tuple(test_features.shape)}."
        )
    if len(train_labels) != len(train_features) or len(test_labels) != len(test_features):
        raise ValueError("Each feature row needs exactly one label.")
    device = train_features.device
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Sequential(
            nn.BatchNorm1d(train_features.shape[1], affine=False), nn.Linear(train_features.shape[1], num_classes)
        ).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_features), generator=generator).to(device)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm cannot standardise a single row
                continue
            loss = F.cross_entropy(probe(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    probe.eval()
    with torch.no_grad():
        predictions = probe(test_features.to(device)).argmax(dim=1)
    return float((predictions == test_labels).float().mean())
