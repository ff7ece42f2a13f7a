"""The independent digit classifier: accuracy on held-out digits at the data path's resolutions, preprocessing, the
safetensors cache (trained once, then reused; stale or broken files retrained) and determinism."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from diffusers_repa.data import split_digits
from diffusers_repa.data.digits import load_digits_arrays
from diffusers_repa.data.preprocessing import center_crop_imagenet
from diffusers_repa.evaluation import digits as digits_module
from diffusers_repa.evaluation.digits import (
    DigitClassifier,
    digit_classifier_settings,
    digits_to_classifier_input,
    load_or_train_digit_classifier,
    train_digit_classifier,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_classifier")


@pytest.fixture(scope="module")
def classifier(cache_dir) -> DigitClassifier:
    return load_or_train_digit_classifier(cache_dir)


@pytest.fixture(scope="module")
def held_out():
    images, labels = load_digits_arrays()
    _, held_out = split_digits(labels, digit_classifier_settings()["held_out_fraction"])
    return images[held_out], labels[held_out]


def test_held_out_accuracy_is_high_and_recorded(classifier):
    assert classifier.held_out_accuracy >= 0.97
    assert classifier.settings == digit_classifier_settings(0)
    assert classifier.feature_dim == 128


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_held_out_digits_through_the_data_path_crop(classifier, held_out, resolution):
    images, labels = held_out
    crops = np.stack([center_crop_imagenet(image, resolution) for image in images])  # (N, R, R, 3) uint8, bicubic
    assert np.mean(classifier.predict(crops) == labels) >= 0.97


def test_float_images_in_any_layout_match_uint8(classifier, held_out):
    crops = np.stack([center_crop_imagenet(image, 16) for image in held_out[0]])
    as_floats = crops.astype(np.float32) / 255  # the pipeline's "np" output: (N, R, R, 3) in [0, 1]
    as_tensor = torch.from_numpy(crops).permute(0, 3, 1, 2)  # (N, 3, R, R) uint8
    np.testing.assert_array_equal(classifier.features(as_floats), classifier.features(crops))
    np.testing.assert_array_equal(classifier.features(as_tensor), classifier.features(crops))
    features = classifier.features(crops)
    assert features.dtype == np.float64 and features.shape == (len(crops), 128)
    assert np.abs(features).max() < 1


def test_preprocessing_is_an_area_average_of_the_grey_image():
    images, _ = load_digits_arrays()
    digits = torch.from_numpy(images[:5])[:, None]
    nearest = F.interpolate(digits.float(), scale_factor=3, mode="nearest").to(torch.uint8)  # (5, 1, 24, 24)
    expected = images[:5].reshape(5, 64) / 255
    np.testing.assert_allclose(digits_to_classifier_input(nearest), expected, atol=1e-12)
    coloured = torch.stack([nearest[:, 0], torch.zeros_like(nearest[:, 0]), nearest[:, 0]], dim=1)
    np.testing.assert_allclose(digits_to_classifier_input(coloured), expected * 2 / 3, atol=1e-12)
    with pytest.raises(ValueError, match="at least 8 px"):
        digits_to_classifier_input(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digits_to_classifier_input(torch.full((2, 3, 8, 8), -1.0))
    with pytest.raises(ValueError, match="dtype"):
        digits_to_classifier_input(np.zeros((2, 3, 8, 8), dtype=np.int64))


def test_cache_is_reused_without_training(classifier, cache_dir, monkeypatch):
    files = list(cache_dir.iterdir())
    assert [path.name for path in files] == ["mlp-v1-seed0.safetensors"]

    def fail(seed):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(digits_module, "train_digit_classifier", fail)
    again = load_or_train_digit_classifier(cache_dir)
    for loaded, trained in zip(again.weights + again.biases, classifier.weights + classifier.biases):
        np.testing.assert_array_equal(loaded, trained)
    assert again.held_out_accuracy == classifier.held_out_accuracy
    # A plain safetensors file: arrays and a JSON settings record, nothing executable.
    arrays = load_file(str(files[0]))
    assert sorted(arrays) == ["layers.0.bias", "layers.0.weight", "layers.1.bias", "layers.1.weight"]


def test_broken_or_stale_cache_is_retrained(classifier, tmp_path, monkeypatch):
    calls = []

    def train(seed):
        calls.append(seed)
        return classifier

    monkeypatch.setattr(digits_module, "train_digit_classifier", train)
    path = tmp_path / "mlp-v1-seed0.safetensors"
    path.write_bytes(b"not a safetensors file")
    load_or_train_digit_classifier(tmp_path)
    assert calls == [0] and DigitClassifier.load(path).settings == classifier.settings

    stale = DigitClassifier(classifier.weights, classifier.biases, {**classifier.settings, "alpha": 1.0}, 0.5)
    stale.save(path)
    load_or_train_digit_classifier(tmp_path)
    assert calls == [0, 0] and DigitClassifier.load(path).settings == classifier.settings
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_training_is_deterministic(classifier):
    retrained = train_digit_classifier(seed=0)
    for first, second in zip(classifier.weights + classifier.biases, retrained.weights + retrained.biases):
        np.testing.assert_array_equal(first, second)


def test_save_load_round_trip(classifier, held_out, tmp_path):
    path = classifier.save(tmp_path / "classifier.safetensors")
    loaded = DigitClassifier.load(path)
    np.testing.assert_array_equal(loaded.logits(held_out[0][:, None]), classifier.logits(held_out[0][:, None]))
    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"settings": json.dumps({})})
    with pytest.raises(ValueError, match="not a digit classifier"):
        DigitClassifier.load(tmp_path / "other.safetensors")
