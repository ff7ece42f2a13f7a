"""Evaluation metrics: FID Inception module, FID / sFID / IS / precision-recall, ADM-layout I/O, CLI and `evaluate`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffusers_repa.data import center_crop_imagenet
from diffusers_repa.evaluation import (
    FID_INCEPTION_WEIGHTS_FILENAME,
    FID_METRIC_PATH,
    INCEPTION_WEIGHTS_ENV,
    DINOv2Features,
    FIDInceptionV3,
    InceptionFeatures,
    NpzWriter,
    RunningStatistics,
    compute_reference_batch,
    compute_statistics,
    evaluate_samples,
    frechet_distance,
    inception_score,
    iter_npz_batches,
    load_fid_inception,
    open_image_set,
    precision_recall,
    preprocess_for_inception,
    resize_bilinear_tf1,
    resolve_inception_weights,
)

from .conftest import load_script

# ---------------------------------------------------------------- independent NumPy / SciPy references


def numpy_frechet(mu1, sigma1, mu2, sigma2):
    # tr((Σ1Σ2)^½) via the symmetric form Σ1^½ Σ2 Σ1^½, whose eigenvalues are those of Σ1Σ2.
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def numpy_inception_score(logits, splits):
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(probs, splits):
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def numpy_precision_recall(real, fake, k):
    def squared_distances(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    real_radii = np.sort(squared_distances(real, real), axis=1)[:, k]
    fake_radii = np.sort(squared_distances(fake, fake), axis=1)[:, k]
    cross = squared_distances(real, fake)
    precision = (cross <= real_radii[:, None]).any(axis=0).mean()
    recall = (cross <= fake_radii[None, :]).any(axis=1).mean()
    return precision, recall


def numpy_tf1_resize(image, size):
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) on an (H, W) float64 array."""
    height, width = image.shape
    out = np.empty((size, size))
    for i in range(size):
        y = i * height / size
        y0, dy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, height - 1)
        for j in range(size):
            x = j * width / size
            x0, dx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, width - 1)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


class TinyInception(nn.Module):
    """Stand-in for FIDInceptionV3 with small feature sizes, so end-to-end tests run in milliseconds."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(48, 6, generator=generator))
        self.classifier = nn.Parameter(torch.randn(6, 5, generator=generator))

    def forward(self, images):
        assert images.dtype == torch.uint8
        pooled = F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        pool = torch.tanh(pooled @ self.proj)
        return InceptionFeatures(pool=pool, spatial=pooled[:, :5] * 2.0, logits=3.0 * pool @ self.classifier)


def random_images(seed, count, size=16, offset=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 200, (count, size, size, 3)).astype(np.int64) + offset
    return np.clip(images, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- Inception module


def test_inception_state_dict_round_trip_and_output_shapes(tmp_path):
    torch.manual_seed(1)
    model = FIDInceptionV3().eval()
    path = tmp_path / FID_INCEPTION_WEIGHTS_FILENAME
    torch.save(model.state_dict(), path)
    loaded = load_fid_inception(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected, features = model(images), loaded(images)
    assert features.pool.shape == (2, 2048)
    assert features.spatial.shape == (2, 2023)
    assert features.logits.shape == (2, 1008)
    torch.testing.assert_close(features.pool, expected.pool, rtol=0, atol=0)

    from safetensors.torch import save_file

    safetensors_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(safetensors_path))
    assert torch.equal(load_fid_inception(safetensors_path).fc.weight, model.fc.weight)


def test_inception_key_layout_matches_pytorch_fid_file():
    state_dict = FIDInceptionV3().state_dict()
    for key, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_1.conv.weight": (128, 768, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.bn.running_mean": (384,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }.items():
        assert tuple(state_dict[key].shape) == shape, key
    assert not any("AuxLogits" in key for key in state_dict)
    # The port was saved before BatchNorm had `num_batches_tracked`; such a file must load strictly.
    legacy = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    FIDInceptionV3().load_state_dict(legacy)


def test_inception_blocks_follow_the_tensorflow_graph():
    model = FIDInceptionV3().eval()
    captured = {}

    def keep_input(name):
        def hook(module, args):
            captured[name] = args[0]

        return hook

    def keep_output(name):
        def hook(module, args, output):
            captured[name] = output

        return hook

    model.Mixed_5b.branch_pool.register_forward_pre_hook(keep_input("5b_pool_input"))
    model.Mixed_5b.register_forward_pre_hook(keep_input("5b_input"))
    model.Mixed_7c.branch_pool.register_forward_pre_hook(keep_input("7c_pool_input"))
    model.Mixed_7c.register_forward_pre_hook(keep_input("7c_input"))
    model.Mixed_6d.branch1x1.register_forward_hook(keep_output("6d_branch1x1"))
    with torch.no_grad():
        model.fc.bias.fill_(5.0)
        features = model(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))

    # Average pools exclude padding (TF); Mixed_7c pools with a max.
    x = captured["5b_input"]
    expected_avg = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(captured["5b_pool_input"], expected_avg)
    assert not torch.allclose(expected_avg, F.avg_pool2d(x, 3, 1, 1, count_include_pad=True))
    torch.testing.assert_close(captured["7c_pool_input"], F.max_pool2d(captured["7c_input"], 3, 1, 1))
    # sFID features: first 7 channels of Mixed_6d's 1×1 branch (TF mixed_6/conv), flattened as NHWC.
    branch = captured["6d_branch1x1"]
    assert branch.shape[1:] == (192, 17, 17)
    torch.testing.assert_close(features.spatial, branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    # IS logits are ADM's softmax/logits/MatMul: no bias.
    torch.testing.assert_close(features.logits, features.pool @ model.fc.weight.T)


def test_pytorch_fid_resize_convention_is_f_interpolate():
    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    expected = F.interpolate(images.float() / 255.0, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(preprocess_for_inception(images, "pytorch_fid"), expected, rtol=0, atol=1e-6)


def test_tensorflow_resize_convention_matches_tf1_legacy_bilinear():
    images = torch.randint(0, 256, (1, 3, 23, 31), dtype=torch.uint8)
    resized = resize_bilinear_tf1(images.float(), 41)
    for channel in range(3):
        expected = numpy_tf1_resize(images[0, channel].double().numpy(), 41)
        np.testing.assert_allclose(resized[0, channel].numpy(), expected, atol=1e-3)
    # Known answer: halving samples exactly the even pixels (no half-pixel offset, unlike F.interpolate).
    big = torch.randint(0, 256, (1, 3, 598, 598), dtype=torch.uint8)
    torch.testing.assert_close(resize_bilinear_tf1(big.float(), 299), big[..., ::2, ::2].float())
    network_input = preprocess_for_inception(big, "tensorflow")
    torch.testing.assert_close(network_input, (big[..., ::2, ::2].float() - 128) / 128)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_for_inception(big.float(), "tensorflow")
    with pytest.raises(ValueError, match="Unknown resize convention"):
        preprocess_for_inception(big, "bicubic")


def test_inception_weights_resolution_and_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as error:
        resolve_inception_weights()
    message = str(error.value)
    assert FID_INCEPTION_WEIGHTS_FILENAME in message and INCEPTION_WEIGHTS_ENV in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / FID_INCEPTION_WEIGHTS_FILENAME) in message

    weights = tmp_path / "weights.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights))
    assert resolve_inception_weights() == weights
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / FID_INCEPTION_WEIGHTS_FILENAME
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    assert resolve_inception_weights() == cached

    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_inception_weights(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a FID Inception state dict"):
        load_fid_inception(wrong)


# ---------------------------------------------------------------- metrics on features


def test_frechet_distance_closed_form_and_independent_computation():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    closed_form = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed_form, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-10)

    features1 = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    features2 = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    stats1, stats2 = compute_statistics(features1), compute_statistics(torch.from_numpy(features2).float())
    np.testing.assert_allclose(stats1[1], np.cov(features1, rowvar=False), rtol=1e-12)
    expected = numpy_frechet(features1.mean(0), np.cov(features1, rowvar=False), *stats2)
    assert frechet_distance(*stats1, *stats2) == pytest.approx(expected, rel=1e-8)

    # Rank-deficient covariances (fewer samples than dimensions) still give a finite, correct distance.
    low_rank = rng.normal(size=(5, 20))
    mu, sigma = compute_statistics(low_rank)
    assert frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(20.0, abs=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_running_statistics_over_batches_equals_np_cov():
    features = np.random.default_rng(1).normal(loc=1000.0, size=(257, 9))
    statistics = RunningStatistics()
    for chunk in np.array_split(features, 6):
        statistics.update(chunk)
    mu, sigma = statistics.finalize()
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9)


def test_inception_score_known_answers():
    uniform_rows = np.full((50, 10), 0.1)
    assert inception_score(uniform_rows, splits=5) == pytest.approx(1.0)
    assert inception_score(np.tile(np.random.default_rng(0).normal(size=10), (40, 1)), splits=4) == pytest.approx(1.0)
    one_hot = np.eye(8)
    assert inception_score(one_hot, splits=1) == pytest.approx(8.0)
    assert inception_score(torch.eye(8) * 50.0, splits=1) == pytest.approx(8.0, rel=1e-6)

    logits = np.random.default_rng(2).normal(scale=3.0, size=(200, 17))
    assert inception_score(logits, splits=10) == pytest.approx(numpy_inception_score(logits, 10), rel=1e-10)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=500)


def test_precision_recall_known_answers_and_independent_computation():
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    assert precision_recall(grid, grid, k=3) == (1.0, 1.0)
    assert precision_recall(grid, grid + 1000.0, k=3) == (0.0, 0.0)
    # Nested sets: every fake point is a real point (precision 1); the fake manifold covers part of the real one.
    inner = grid[(grid[:, 0] < 5) & (grid[:, 1] < 5)]
    precision, recall = precision_recall(grid, inner, k=3)
    assert precision == 1.0
    assert recall == pytest.approx(numpy_precision_recall(grid, inner, 3)[1])
    assert 0.25 <= recall < 1.0

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(60, 5)), rng.normal(loc=0.4, size=(45, 5))
    expected = numpy_precision_recall(real, fake, 3)
    assert precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected)
    with pytest.raises(ValueError, match="same D"):
        precision_recall(real, fake[:, :3])


# ---------------------------------------------------------------- image I/O


def test_npz_streaming_round_trip_and_atomic_writes(tmp_path):
    images = random_images(0, 11)
    with NpzWriter(tmp_path / "images.npz") as writer:
        writer.write_batches("arr_0", (images[:4], images[4:]), images.shape, np.uint8)
        writer.write("labels", np.arange(11))
    with np.load(tmp_path / "images.npz") as stored:
        np.testing.assert_array_equal(stored["arr_0"], images)
        np.testing.assert_array_equal(stored["labels"], np.arange(11))
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    batches = list(iter_npz_batches(tmp_path / "compressed.npz", batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)

    with pytest.raises(ValueError, match="declared"), NpzWriter(tmp_path / "broken.npz") as writer:
        writer.write_batches("arr_0", (images[:4],), images.shape, np.uint8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed.npz", "images.npz"]

    folder = tmp_path / "pngs"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:06d}.png")
    from_folder = np.concatenate(list(open_image_set(folder).iter_batches(4)))
    np.testing.assert_array_equal(from_folder, images)
    with pytest.raises(KeyError, match="no array"):
        open_image_set(tmp_path / "images.npz", key="images")
    with pytest.raises(ValueError, match="uint8"):
        open_image_set(images.astype(np.float32))


# ---------------------------------------------------------------- end to end


def expected_metrics(samples, reference, splits):
    model = TinyInception()
    with torch.no_grad():
        fake = model(torch.from_numpy(samples).permute(0, 3, 1, 2))
        real = model(torch.from_numpy(reference).permute(0, 3, 1, 2))
    fake_pool, real_pool = fake.pool.double().numpy(), real.pool.double().numpy()
    fake_spatial, real_spatial = fake.spatial.double().numpy(), real.spatial.double().numpy()

    def stats(x):
        return x.mean(0), np.cov(x, rowvar=False)

    precision, recall = numpy_precision_recall(real_pool, fake_pool, 3)
    return {
        "inception_score": numpy_inception_score(fake.logits.double().numpy(), splits),
        "fid": numpy_frechet(*stats(fake_pool), *stats(real_pool)),
        "sfid": numpy_frechet(*stats(fake_spatial), *stats(real_spatial)),
        "precision": precision,
        "recall": recall,
    }


def test_evaluate_samples_matches_independent_computation(tmp_path):
    samples, reference = random_images(1, 40), random_images(2, 30, offset=30)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "reference.npz", arr_0=reference)
    metrics = evaluate_samples(
        tmp_path / "samples.npz",
        tmp_path / "reference.npz",
        inception=TinyInception(),
        batch_size=16,
        device="cpu",
        inception_score_splits=4,
        show_progress=False,
    )
    expected = expected_metrics(samples, reference, splits=4)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    assert metrics["fid"] > 0.01 and metrics["num_samples"] == 40 and metrics["num_reference_images"] == 30

    # A reference with stored statistics (ADM's layout) uses them for FID/sFID instead of its images.
    mu, sigma = np.zeros(6), np.eye(6)
    mu_s, sigma_s = np.ones(5), 2 * np.eye(5)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    stats_only = evaluate_samples(
        samples,
        tmp_path / "stats_only.npz",
        inception=TinyInception(),
        device="cpu",
        inception_score_splits=4,
        show_progress=False,
    )
    with torch.no_grad():
        fake = TinyInception()(torch.from_numpy(samples).permute(0, 3, 1, 2))
    fake_spatial = fake.spatial.double().numpy()
    expected_sfid = numpy_frechet(fake_spatial.mean(0), np.cov(fake_spatial, rowvar=False), mu_s, sigma_s)
    assert stats_only["sfid"] == pytest.approx(expected_sfid, rel=1e-6)
    assert "precision" not in stats_only and stats_only["num_reference_images"] == 0
    with pytest.raises(ValueError, match="neither images"):
        np.savez(tmp_path / "empty.npz", labels=np.arange(3))
        evaluate_samples(samples, tmp_path / "empty.npz", inception=TinyInception(), show_progress=False)


def test_compute_reference_batch_writes_adm_layout(tmp_path):
    real = random_images(4, 25)
    path = compute_reference_batch(
        real,
        tmp_path / "ref.npz",
        inception=TinyInception(),
        num_images_to_keep=10,
        batch_size=8,
        device="cpu",
        show_progress=False,
    )
    with np.load(path) as stored:
        assert set(stored.files) == {"mu", "sigma", "mu_s", "sigma_s", "arr_0"}
        kept = stored["arr_0"]
        with torch.no_grad():
            features = TinyInception()(torch.from_numpy(real).permute(0, 3, 1, 2))
        np.testing.assert_allclose(stored["mu"], features.pool.double().mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(
            stored["sigma_s"], np.cov(features.spatial.double().numpy(), rowvar=False), atol=1e-7
        )
    assert kept.shape == (10, 16, 16, 3)
    kept_rows = [int(np.flatnonzero((real == image).all(axis=(1, 2, 3)))[0]) for image in kept]
    assert kept_rows == sorted(kept_rows) and len(set(kept_rows)) == 10
    metrics = evaluate_samples(
        real, path, inception=TinyInception(), device="cpu", inception_score_splits=5, show_progress=False
    )
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-6) and metrics["precision"] == 1.0


def test_evaluate_cli_prints_table_and_writes_json(tmp_path, monkeypatch, capsys):
    evaluate_script = load_script("pipelines/evaluate.py")
    import diffusers_repa.evaluation.evaluator as evaluator

    requested = []

    def fake_loader(weights_path, device):
        requested.append(weights_path)
        return TinyInception()

    monkeypatch.setattr(evaluator, "load_fid_inception", fake_loader)
    samples, reference = random_images(5, 20), random_images(6, 20)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez(tmp_path / "r.npz", arr_0=reference)
    output = tmp_path / "out" / "metrics.json"
    weights = tmp_path / "w.pth"
    weights.touch()
    evaluate_script.main(
        [
            "--samples",
            str(tmp_path / "s.npz"),
            "--reference",
            str(tmp_path / "r.npz"),
            "--inception_weights",
            str(weights),
            "--batch_size",
            "8",
            "--device",
            "cpu",
            "--output",
            str(output),
        ]
    )
    assert requested == [str(weights)]
    printed = capsys.readouterr().out
    assert "FID" in printed and "Precision" in printed
    written = json.loads(output.read_text())
    expected = expected_metrics(samples, reference, splits=10)
    assert written["fid"] == pytest.approx(expected["fid"], rel=1e-5)
    assert written["samples"] == str(tmp_path / "s.npz")

    evaluate_script.main(["--make_reference", str(tmp_path / "r.npz"), "--reference", str(tmp_path / "made.npz")])
    with np.load(tmp_path / "made.npz") as made:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} <= set(made.files) and len(made["arr_0"]) == 20
    with pytest.raises(SystemExit):
        evaluate_script.main(["--reference", str(tmp_path / "r.npz")])


def test_evaluate_metric_module_loads_offline_and_matches_library():
    import evaluate

    metric = evaluate.load(str(FID_METRIC_PATH))
    samples, reference = random_images(7, 12), random_images(8, 12, offset=20)
    result = metric.compute(
        predictions=list(samples),
        references=[Image.fromarray(image) for image in reference],
        inception=TinyInception(),
        inception_score_splits=3,
        device="cpu",
    )
    expected = expected_metrics(samples, reference, splits=3)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key


def test_fd_dinov2_with_tiny_local_model(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    extractor = DINOv2Features.from_pretrained(tmp_path / "dinov2", resolution=28)
    samples, reference = random_images(9, 12), random_images(10, 12, offset=40)
    with torch.no_grad():
        fake = extractor(torch.from_numpy(samples).permute(0, 3, 1, 2)).double().numpy()
        real = extractor(torch.from_numpy(reference).permute(0, 3, 1, 2)).double().numpy()
        # The feature is the CLS token after the final LayerNorm of ImageNet-normalised, resized pixels.
        pixels = F.interpolate(
            torch.from_numpy(samples[:2]).permute(0, 3, 1, 2).float() / 255, size=28, mode="bicubic", antialias=True
        )
        pixels = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
            :, None, None
        ]
        cls = extractor.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert fake.shape == (12, 16)
    np.testing.assert_allclose(fake[:2], cls.numpy(), rtol=1e-5, atol=1e-5)
    metrics = evaluate_samples(
        samples,
        reference,
        inception=TinyInception(),
        dinov2=extractor,
        device="cpu",
        inception_score_splits=2,
        show_progress=False,
    )
    expected = numpy_frechet(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False))
    assert metrics["fd_dinov2"] == pytest.approx(expected, rel=1e-5)


def test_fd_dinov2_needs_reference_images_or_statistics(tmp_path):
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(5), sigma_s=np.eye(5))
    with pytest.raises(ValueError, match="FD-DINOv2 needs"):
        evaluate_samples(
            random_images(0, 4),
            tmp_path / "stats_only.npz",
            inception=TinyInception(),
            dinov2=nn.Identity(),
            show_progress=False,
        )


def test_a_reference_from_a_folder_of_images_of_any_size_is_center_cropped(tmp_path):
    """COCO val2014's images have many sizes: --center_crop reads them as the training data's ADM crop."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "val"
    folder.mkdir()
    originals = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for height, width in [(24, 40), (37, 20)]]
    for index, image in enumerate(originals):
        Image.fromarray(image).save(folder / f"{index}.png")
    common = {"inception": TinyInception(), "device": "cpu", "show_progress": False}
    with pytest.raises(ValueError, match="center-crop them first"):
        compute_reference_batch(folder, tmp_path / "uncropped.npz", **common)
    path = compute_reference_batch(folder, tmp_path / "ref.npz", center_crop=16, **common)
    with np.load(path) as stored:
        expected = np.stack([center_crop_imagenet(image, 16) for image in originals])
        np.testing.assert_array_equal(stored["arr_0"], expected)
    with pytest.raises(ValueError, match="center-cropping reads a folder"):
        compute_reference_batch(path, tmp_path / "again.npz", center_crop=16, **common)
