"""Evaluation during training: image conversion, FrechetEvaluator, the evaluator kinds (a sanity check of the digits
metric on real data), and the CSV / plot helpers."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_repa.data.digits import load_digits_arrays
from diffusers_repa.data.preprocessing import center_crop_imagenet
from diffusers_repa.evaluation import inception as inception_module
from diffusers_repa.evaluation.digits import load_or_train_digit_classifier
from diffusers_repa.evaluation.inception import INCEPTION_WEIGHTS_ENV, FIDInceptionV3
from diffusers_repa.evaluation.training_eval import (
    FrechetEvaluator,
    append_eval_row,
    build_training_evaluator,
    plot_eval_curves,
    read_eval_rows,
    to_uint8_images,
)

# ---------------------------------------------------------------- image conversion


def test_to_uint8_images_accepts_the_pipeline_and_loader_layouts():
    uint8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    floats = uint8.double() / 255
    assert torch.equal(to_uint8_images(uint8), uint8)
    assert torch.equal(to_uint8_images(floats), uint8)  # (N, 3, R, R) float, the pipeline's "pt"
    assert torch.equal(to_uint8_images(floats.permute(0, 2, 3, 1).numpy()), uint8)  # (N, R, R, 3), "np"
    assert torch.equal(to_uint8_images(uint8[:, :1]), uint8[:, :1].expand(-1, 3, -1, -1))
    # Quantised like a PNG: round(255 x), as generate_samples does.
    assert to_uint8_images(torch.full((1, 3, 8, 8), 0.5)).unique().tolist() == [128]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_uint8_images(floats * 2 - 1)
    with_nan = floats.clone()
    with_nan[0, 0, 0, 0] = torch.nan
    with pytest.raises(ValueError, match="non-finite: 1"):
        to_uint8_images(with_nan)
    with pytest.raises(ValueError, match="square"):
        to_uint8_images(torch.zeros(2, 3, 8, 6))


# ---------------------------------------------------------------- FrechetEvaluator with a simple feature map

PROJECTION = torch.from_numpy(np.random.default_rng(0).normal(size=(3 * 8 * 8, 6)))


def project(images: torch.Tensor) -> torch.Tensor:
    return (images.double() / 255).flatten(1) @ PROJECTION


class BrightnessClassifier:
    """Labels an image 1 when its mean is above mid-grey, else 0."""

    def predict(self, images):
        return (to_uint8_images(images).double().mean(dim=(1, 2, 3)) > 127.5).long().numpy()


@pytest.fixture
def reference():
    return torch.randint(0, 256, (64, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_frechet_evaluator_statistics_and_determinism(reference):
    evaluator = FrechetEvaluator(project, reference, metric_name="fd_test", batch_size=10)
    assert evaluator.num_reference_images == 64 and evaluator.resolution == 8
    assert evaluator.features(reference).shape == (64, 6)
    assert evaluator.evaluate(reference)["fd_test"] == pytest.approx(0, abs=1e-9)
    shifted = (reference.int() + 40).clamp(max=255).to(torch.uint8)
    first = evaluator.evaluate(shifted)
    assert first == evaluator.evaluate(shifted) and first["fd_test"] > 0.1
    # Batches of another size or a list of chunks give the same statistics up to round-off.
    other = FrechetEvaluator(project, [reference[:30], reference[30:]], metric_name="fd_test", batch_size=64)
    assert other.evaluate(shifted)["fd_test"] == pytest.approx(first["fd_test"], rel=1e-9)
    with pytest.raises(ValueError, match="16 px but the reference images are 8 px"):
        evaluator.evaluate(torch.zeros(4, 3, 16, 16, dtype=torch.uint8))


def test_class_accuracy_needs_a_classifier_and_labels(reference):
    generator = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 100, (3, 3, 8, 8), generator=generator, dtype=torch.uint8)
    bright = torch.randint(156, 256, (5, 3, 8, 8), generator=generator, dtype=torch.uint8)
    images = torch.cat([dark, bright])
    evaluator = FrechetEvaluator(project, reference, classifier=BrightnessClassifier(), batch_size=3)
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 0])
    assert evaluator.evaluate(images, labels)["class_accuracy"] == pytest.approx(6 / 8)
    assert "class_accuracy" not in evaluator.evaluate(images)
    assert "class_accuracy" not in FrechetEvaluator(project, reference).evaluate(images, labels)
    with pytest.raises(ValueError, match="7 labels for 8 images"):
        evaluator.evaluate(images, labels[:7])


# ---------------------------------------------------------------- the digits metric on real digits


@pytest.fixture(scope="module")
def digit_crops():
    """All 1,797 digits through the data path's crop at 16 px (N, 16, 16, 3) uint8, their labels, and two disjoint
    halves of the indices."""
    images, labels = load_digits_arrays()
    crops = np.stack([center_crop_imagenet(image, 16) for image in images])
    order = np.random.default_rng(0).permutation(len(labels))
    return crops, labels, np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """A cache folder holding the trained digit classifier (trained once for this module)."""
    cache_dir = tmp_path_factory.mktemp("digits_classifier")
    load_or_train_digit_classifier(cache_dir)
    return cache_dir


@pytest.fixture(scope="module")
def digits_evaluator(digit_crops, classifier_cache):
    crops, _, first_half, _ = digit_crops
    return build_training_evaluator("digits", crops[first_half], resolution=16, cache_dir=classifier_cache)


def test_digits_metric_sanity(digits_evaluator, digit_crops):
    crops, labels, _, second_half = digit_crops
    real = digits_evaluator.evaluate(crops[second_half], labels[second_half])
    assert set(real) == {"fd_digits", "class_accuracy"}
    assert real["class_accuracy"] >= 0.9
    noise = np.random.default_rng(0).integers(0, 256, crops[second_half].shape, dtype=np.uint8)
    noise_fd = digits_evaluator.evaluate(noise)["fd_digits"]
    threes = second_half[labels[second_half] == 3]
    one_class_fd = digits_evaluator.evaluate(crops[threes])["fd_digits"]
    assert real["fd_digits"] < 1.0
    assert noise_fd > 20 * real["fd_digits"] and one_class_fd > 20 * real["fd_digits"]
    # The same images give the same numbers, as uint8 (N, R, R, 3) or as the pipeline's floats in [0, 1].
    assert digits_evaluator.evaluate(crops[second_half], labels[second_half]) == real
    as_floats = torch.from_numpy(crops[second_half]).permute(0, 3, 1, 2).float() / 255
    assert digits_evaluator.evaluate(as_floats, torch.from_numpy(labels[second_half])) == real
    # Asking for the wrong classes is seen.
    assert digits_evaluator.evaluate(crops[second_half], (labels[second_half] + 1) % 10)["class_accuracy"] < 0.05


# ---------------------------------------------------------------- other kinds


def test_encoder_kind_pools_patch_tokens(tmp_path, reference):
    from diffusers_repa.encoders import load_encoder, save_tiny_random_encoder

    path = save_tiny_random_encoder("dinov2", tmp_path / "tiny-dinov2", hidden_size=16, num_hidden_layers=1)
    images = torch.nn.functional.interpolate(reference.float(), size=16).to(torch.uint8)
    evaluator = build_training_evaluator(f"encoder:{path}", images, resolution=16, batch_size=16)
    assert evaluator.metric_name == "fd_tiny-dinov2"
    expected = load_encoder(path, resolution=16)(images).mean(dim=1).double().numpy()
    np.testing.assert_allclose(evaluator.features(images), expected, rtol=1e-6)
    assert evaluator.evaluate(images)["fd_tiny-dinov2"] == pytest.approx(0, abs=1e-6)


def test_inception_kind(monkeypatch, tmp_path, reference):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache; tests run with HF_HUB_OFFLINE=1
    with pytest.raises(FileNotFoundError, match="'digits' or 'encoder:<name>'"):
        build_training_evaluator("inception", reference, resolution=8)

    network = FIDInceptionV3().eval()
    monkeypatch.setattr(inception_module, "load_fid_inception", lambda weights, device: network)
    evaluator = build_training_evaluator("inception", reference[:2], resolution=8)
    assert evaluator.metric_name == "fid"
    with torch.inference_mode():
        expected = network(reference[:2]).pool.double().numpy()
    np.testing.assert_allclose(evaluator.features(reference[:2]), expected, rtol=1e-6)


def test_unknown_kind_and_wrong_resolution(reference, classifier_cache):
    with pytest.raises(ValueError, match="Unknown evaluation kind 'fid'"):
        build_training_evaluator("fid", reference, resolution=8)
    with pytest.raises(ValueError, match="Unknown evaluation kind 'encoder:'"):
        build_training_evaluator("encoder:", reference, resolution=8)
    with pytest.raises(ValueError, match="reference images are 8 px, but resolution=16"):
        build_training_evaluator("digits", reference, resolution=16, cache_dir=classifier_cache)


# ---------------------------------------------------------------- CSV and plot


def test_eval_csv_rows_header_and_resume(tmp_path):
    path = tmp_path / "eval" / "eval.csv"
    append_eval_row(path, 100, {"fd_digits": 40.5, "class_accuracy": 0.1})
    append_eval_row(path, 200, {"fd_digits": 12.25, "class_accuracy": 0.5})
    append_eval_row(path, 300, {"fd_digits": 3.0, "class_accuracy": 0.9, "fid": 80.0})
    assert path.read_text().splitlines()[0] == "step,fd_digits,class_accuracy,fid"
    rows = read_eval_rows(path)
    assert rows == [
        {"step": 100, "fd_digits": 40.5, "class_accuracy": 0.1},
        {"step": 200, "fd_digits": 12.25, "class_accuracy": 0.5},
        {"step": 300, "fd_digits": 3.0, "class_accuracy": 0.9, "fid": 80.0},
    ]
    assert isinstance(rows[0]["step"], int)
    # A run resumed from the checkpoint at step 200 logs step 200 again: later rows are replaced.
    append_eval_row(path, 200, {"fd_digits": 11.0, "class_accuracy": 0.6})
    assert [row["step"] for row in read_eval_rows(path)] == [100, 200]
    assert read_eval_rows(path)[-1]["fd_digits"] == 11.0
    assert path.read_text().splitlines()[0] == "step,fd_digits,class_accuracy,fid"  # the header is kept
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.csv"]  # no temporary file left behind


def test_plot_eval_curves_writes_a_png(tmp_path):
    rows = [
        {"step": 100, "fd_digits": 40.5, "class_accuracy": 0.1},
        {"step": 200, "fd_digits": 12.25, "class_accuracy": 0.5, "fid": 80.0},
    ]
    path = plot_eval_curves(rows, tmp_path / "eval.png", title="SiT-S/2 + REPA on digits")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 3 * image.height  # three panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.png"]
    with pytest.raises(ValueError, match="No metric"):
        plot_eval_curves([{"step": 1}], tmp_path / "empty.png")
