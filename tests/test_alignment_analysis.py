"""Representation alignment: CKNNA, linear CKA, linear probe (and the per-block analysis of a SiT)."""

import numpy as np
import pytest
import torch

from diffusers_repa.evaluation import cka, cknna, linear_probe_accuracy

from .conftest import load_script, tiny_sit_pipeline


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


# ---------------------------------------------------------------- per-block analysis of a SiT


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A saved tiny pipeline (32 px images, 16×16×4 latents, 3 blocks) and a tiny random DINOv2 folder."""
    from diffusers_repa.encoders import save_tiny_random_encoder

    root = tmp_path_factory.mktemp("alignment_models")
    tiny_sit_pipeline(latent_size=16, depth=3, num_classes=4).save_pretrained(root / "pipeline")
    save_tiny_random_encoder("dinov2", root / "encoder", hidden_size=16, num_hidden_layers=1)
    return root


def test_collect_features_runs_the_null_class_at_time_t(tiny_models):
    from diffusers_repa.encoders import load_encoder
    from diffusers_repa.evaluation.alignment_analysis import collect_features
    from diffusers_repa.pipelines.pipeline_sit import SiTPipeline

    pipeline = SiTPipeline.from_pretrained(tiny_models / "pipeline")
    encoder = load_encoder(tiny_models / "encoder", resolution=32)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    hidden, targets = collect_features(
        pipeline.transformer, pipeline.vae, encoder, images, t=0.3, batch_size=2, seed=7
    )
    assert len(hidden) == 3 and all(h.shape == (5, 64, 32) for h in hidden)
    assert targets.shape == (5, 4, 16)

    # Independent recomputation of the first two images (the first batch): VAE mean, linear path, null class 4.
    pixels = torch.from_numpy(images[:2]).permute(0, 3, 1, 2)
    with torch.no_grad():
        z = pipeline.vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean * pipeline.vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        output = pipeline.transformer(
            0.7 * z + 0.3 * noise,
            timestep=torch.full((2,), 0.3),
            class_labels=torch.full((2,), 4),
            output_hidden_states=True,
        )
        torch.testing.assert_close(targets[:2], encoder(pixels))
    for block in range(3):
        torch.testing.assert_close(hidden[block][:2], output.hidden_states[block], rtol=1e-5, atol=1e-5)


def test_alignment_by_block_scores_and_pooling():
    from diffusers_repa.evaluation.alignment_analysis import alignment_by_block

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    centers = rng.normal(scale=3.0, size=(3, 12))
    encoder = torch.from_numpy(centers[labels][:, None, :] + rng.normal(size=(120, 4, 12))).float()
    aligned = encoder @ torch.from_numpy(random_orthogonal(12, 0)).float()  # a rotated copy: perfectly aligned
    unrelated = torch.from_numpy(rng.normal(size=(120, 4, 12))).float()
    results = alignment_by_block([unrelated, aligned], encoder, labels=labels, probe_epochs=30, probe_lr=1e-2)
    assert [r.block for r in results] == [1, 2]
    assert results[1].cknna == pytest.approx(1.0, abs=1e-2) and results[1].cka == pytest.approx(1.0, abs=1e-6)
    assert abs(results[0].cknna) < 0.1 and results[0].cka < 0.3
    assert results[1].probe_accuracy >= 0.9 > results[0].probe_accuracy
    per_token = alignment_by_block([aligned], encoder, pooling="tokens")
    assert per_token[0].cka == pytest.approx(1.0, abs=1e-6) and per_token[0].probe_accuracy is None
    with pytest.raises(ValueError, match="same number of tokens"):
        alignment_by_block([aligned[:, :2]], encoder, pooling="tokens")


def test_analyze_alignment_cli_writes_csv_and_plot(tiny_models, tmp_path, capsys):
    import csv

    from PIL import Image

    images = np.random.default_rng(1).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images, arr_1=np.arange(24) % 4)
    script = load_script("pipelines/analyze_alignment.py")
    script.main(
        [
            "--pipeline",
            str(tiny_models / "pipeline"),
            "--encoder",
            str(tiny_models / "encoder"),
            "--images",
            str(tmp_path / "images.npz"),
            "--output_dir",
            str(tmp_path / "out"),
            "--k",
            "5",
            "--probe_epochs",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert "CKNNA" in capsys.readouterr().out
    with open(tmp_path / "out" / "alignment.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["block"] for row in rows] == ["1", "2", "3"]
    assert all(-1 <= float(row["cknna"]) <= 1 and 0 <= float(row["cka"]) <= 1 for row in rows)
    assert all(0 <= float(row["probe_accuracy"]) <= 1 for row in rows)
    plot = np.asarray(Image.open(tmp_path / "out" / "alignment.png").convert("RGB"))
    assert plot.shape == (400, 640, 3)
    for colour in [(31, 119, 180), (255, 127, 14), (44, 160, 44)]:
        assert (plot == colour).all(axis=-1).sum() > 20, colour
