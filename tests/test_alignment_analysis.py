"""Representation alignment: CKNNA, linear CKA, linear probe (and the per-block analysis of a SiT)."""

import numpy as np
import pytest
import torch

from diffusers_repa.evaluation import cka, cknna, linear_probe_accuracy


def reference_cknna(a, b, k, eps=1e-6):
    """Independent NumPy transcription of platonic-rep `cknna` (unbiased, O(N³) HSIC as written there)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    K, L = a @ a.T, b @ b.T
    n = len(a)

    def hsic_unbiased(K, L):
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        value = (K * L.T).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * (K @ L).sum() / (n - 2)
        return value / (n * (n - 3))

    def mask(kernel):
        kernel = kernel.copy()
        np.fill_diagonal(kernel, -np.inf)
        indices = np.argsort(-kernel, axis=1, kind="stable")[:, :k]
        result = np.zeros_like(kernel)
        np.put_along_axis(result, indices, 1.0, axis=1)
        return result

    def similarity(K, L):
        m = mask(K) * mask(L)
        return hsic_unbiased(m * K, m * L)

    return similarity(K, L) / (np.sqrt(similarity(K, K) * similarity(L, L)) + eps)


def kernel_cka(a, b):
    """Linear CKA through centred Gram matrices: HSIC(K, L) = tr(KHLH)."""
    n = len(a)
    H = np.eye(n) - 1.0 / n
    K, L = a @ a.T, b @ b.T

    def hsic(K, L):
        return np.trace(K @ H @ L @ H)

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def random_orthogonal(dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


@pytest.fixture
def related_features():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(200, 8))
    a = latent @ rng.normal(size=(8, 24)) + 0.3 * rng.normal(size=(200, 24))
    b = np.tanh(latent @ rng.normal(size=(8, 16))) + 0.3 * rng.normal(size=(200, 16))
    return a, b


def test_cknna_matches_platonic_rep_formula(related_features):
    a, b = related_features
    expected = reference_cknna(a, b, k=10)
    assert cknna(torch.from_numpy(a).float(), torch.from_numpy(b).float(), k=10) == pytest.approx(expected, rel=1e-4)
    assert 0.1 < expected < 0.99


def test_cknna_identity_invariances_and_unrelated(related_features):
    a, b = related_features
    a_t = torch.from_numpy(a)
    assert cknna(a_t, a_t, k=10, eps=0.0) == pytest.approx(1.0, abs=1e-12)
    assert cknna(a_t, a_t, k=10) == pytest.approx(1.0, abs=1e-2)  # platonic-rep's 1e-6 guard in the denominator
    base = cknna(a_t, torch.from_numpy(b), k=10)
    rotated = torch.from_numpy(b @ random_orthogonal(16, 1))
    assert cknna(a_t, rotated, k=10) == pytest.approx(base, rel=1e-9)
    assert cknna(a_t * 7.5, torch.from_numpy(b) * 0.01, k=10) == pytest.approx(base, rel=1e-9)
    # Without the row normalisation the kernel scale cancels too (up to the eps guard).
    unnormalised = cknna(a_t, torch.from_numpy(b), k=10, normalize=False, eps=0.0)
    assert cknna(a_t * 3.0, torch.from_numpy(b) * 0.5, k=10, normalize=False, eps=0.0) == pytest.approx(unnormalised)

    rng = np.random.default_rng(5)
    unrelated = cknna(torch.from_numpy(rng.normal(size=(400, 32))), torch.from_numpy(rng.normal(size=(400, 32))), k=10)
    assert abs(unrelated) < 0.05
    with pytest.raises(ValueError, match="k"):
        cknna(a_t, a_t, k=1)
    with pytest.raises(ValueError, match="same N"):
        cknna(a_t, a_t[:10])


def test_cka_identity_invariances_and_unrelated(related_features):
    a, b = related_features
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    assert cka(a_t, a_t) == pytest.approx(1.0, abs=1e-12)
    assert cka(a_t, b_t) == pytest.approx(kernel_cka(a, b), rel=1e-10)
    rotated = torch.from_numpy(b @ random_orthogonal(16, 2))
    assert cka(a_t, rotated) == pytest.approx(cka(a_t, b_t), rel=1e-10)
    assert cka(a_t * 1e3, b_t) == pytest.approx(cka(a_t, b_t), rel=1e-10)
    assert cka(a_t, a_t, unbiased=True) == pytest.approx(1.0, abs=1e-12)
    assert cka(a_t, rotated * 4.0, unbiased=True) == pytest.approx(cka(a_t, b_t, unbiased=True), rel=1e-9)

    rng = np.random.default_rng(6)
    x, y = torch.from_numpy(rng.normal(size=(500, 32))), torch.from_numpy(rng.normal(size=(500, 32)))
    assert abs(cka(x, y, unbiased=True)) < 0.02
    # The biased estimator sits at about D / (N + D) for unrelated features; with D ≪ N it is near 0.
    x, y = torch.from_numpy(rng.normal(size=(2000, 4))), torch.from_numpy(rng.normal(size=(2000, 4)))
    assert cka(x, y) < 0.01


def test_linear_probe_separates_clusters_and_is_reproducible():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(4, 10))
    labels = rng.integers(0, 4, size=400)
    features = torch.from_numpy(centers[labels] + rng.normal(size=(400, 10)) + 50.0).float()
    labels = torch.from_numpy(labels)
    state = torch.get_rng_state()
    accuracy = linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], epochs=20, lr=1e-2)
    assert torch.equal(torch.get_rng_state(), state)
    assert accuracy >= 0.97
    again = linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], epochs=20, lr=1e-2)
    assert again == accuracy

    shuffled = labels[torch.randperm(400)]
    chance = linear_probe_accuracy(features[:300], shuffled[:300], features[300:], shuffled[300:], epochs=20, lr=1e-2)
    assert chance < 0.5
    with pytest.raises(ValueError, match="one label"):
        linear_probe_accuracy(features, labels[:10], features, labels)
