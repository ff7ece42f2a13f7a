"""scikit-learn's digits as a built-in source, and pixel-space caches (no VAE) built from it and read by the loader."""

import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import DatasetCard

from diffusers_repa.data import (
    DIGITS_CLASS_NAMES,
    build_latent_cache,
    center_crop_imagenet,
    check_cache_source,
    load_digits_arrays,
    load_image_source,
    load_latent_cache,
    make_train_dataloader,
    read_cache_info,
)
from diffusers_repa.data import latent_cache as latent_cache_module

NUM_DIGITS = 1797


def test_load_digits_arrays_scales_sklearn_pixels_to_uint8():
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    assert images.dtype == np.uint8 and images.shape == (NUM_DIGITS, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (NUM_DIGITS,)
    raw = load_digits()
    # Ink counts 0..16 -> 0..255: 16 is white, 1 is 16 (15.94 rounded).
    np.testing.assert_array_equal(images, np.rint(raw.images * 255 / 16).astype(np.uint8))
    assert (images.min(), images.max()) == (0, 255) and np.isin(images, np.rint(np.arange(17) * 255 / 16)).all()
    np.testing.assert_array_equal(labels, raw.target)
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_source_through_load_image_source():
    images, labels = load_digits_arrays()
    source = load_image_source("digits", split="train")
    assert isinstance(source, datasets.Dataset) and len(source) == NUM_DIGITS
    assert source.column_names == ["image", "label"]
    assert isinstance(source.features["image"], datasets.Image)
    assert source.features["label"] == datasets.ClassLabel(names=DIGITS_CLASS_NAMES)
    assert DIGITS_CLASS_NAMES == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert source["label"] == labels.tolist()
    for index in (0, 1000, NUM_DIGITS - 1):
        image = source[index]["image"]
        assert image.mode == "RGB" and image.size == (8, 8)
        pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, np.repeat(images[index][:, :, None], 3, axis=2))

    streamed = load_image_source("digits", streaming=True, max_samples=3)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["label"] for row in streamed] == labels[:3].tolist()
    with pytest.raises(ValueError, match="one split, 'train'"):
        load_image_source("digits", split="test")


def test_digits_crop_upsamples_bicubic():
    """8x8 -> 16 px is one PIL bicubic resize (the ADM crop's upscaling step); no box halving, nothing cut off."""
    image = load_image_source("digits")[7]["image"]
    crop = center_crop_imagenet(image, 16)
    expected = np.asarray(image.resize((16, 16), resample=PIL.Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(crop, expected)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("digits") / "pixels16"
    return build_latent_cache("digits", output, None, 16, shard_size=512, num_workers=0, show_progress=False)


def test_pixel_space_digits_cache_holds_crops_and_labels(digits_cache):
    info = read_cache_info(digits_cache)
    assert info.pixel_space and info.vae is None and info.vae_hash is None
    assert (info.resolution, info.latent_channels, info.latent_size) == (16, 3, 16)
    assert info.scaling_factor == 1.0 and info.shift_factor is None
    assert info.latents_mean is None and info.latents_std is None
    assert info.num_samples == NUM_DIGITS and info.num_skipped == 0
    assert info.num_classes == 10 and info.id2label == {digit: str(digit) for digit in range(10)}
    assert info.shard_num_samples == [512, 512, 512, 261] and len(info.shards) == 4
    assert info.source["dataset"] == "digits" and info.source["kind"] == "digits"
    assert info.source["fingerprint"].startswith("sklearn-")

    cache = load_latent_cache(digits_cache)
    assert cache.column_names == ["image", "label"]
    images, labels = load_digits_arrays()
    rows = cache[:]
    np.testing.assert_array_equal(rows["label"].numpy(), labels)
    source = load_image_source("digits")
    for index in (0, 555, NUM_DIGITS - 1):
        expected = center_crop_imagenet(source[index]["image"], 16).transpose(2, 0, 1)
        np.testing.assert_array_equal(rows["image"][index].numpy(), expected)

    card = DatasetCard.load(digits_cache / "README.md").text
    assert "pixel space (no VAE)" in card and "latent_mean" not in card


def test_pixel_space_build_loads_no_vae_and_accepts_the_string_none(tmp_path, digits_cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pixel-space build must not load a VAE")

    monkeypatch.setattr(latent_cache_module.AutoencoderKL, "from_pretrained", refuse)
    cache = build_latent_cache("digits", tmp_path / "none", "None", 16, max_samples=40, show_progress=False)
    got, reference = load_latent_cache(cache)[:], load_latent_cache(digits_cache)[:40]
    assert got.keys() == reference.keys() == {"image", "label"}
    for name in got:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0)
    assert read_cache_info(cache).pixel_space
    with pytest.raises(ValueError, match="positive integer"):
        build_latent_cache("digits", tmp_path / "bad", None, 0, show_progress=False)


def test_pixel_space_loader_batches_and_hflip(digits_cache):
    cache = load_latent_cache(digits_cache)
    plain = list(make_train_dataloader(cache, batch_size=64, seed=3))
    assert len(plain) == NUM_DIGITS // 64
    batch = plain[0]
    assert batch.keys() == {"image", "label"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (64, 3, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (64,)

    flipped = list(make_train_dataloader(cache, batch_size=64, seed=3, hflip=True))
    flips = []
    for batch_plain, batch_flipped in zip(plain[:3], flipped[:3]):
        torch.testing.assert_close(batch_flipped["label"], batch_plain["label"])
        for image_plain, image_flipped in zip(batch_plain["image"], batch_flipped["image"]):
            is_flipped = not torch.equal(image_plain, image_flipped)
            assert torch.equal(image_flipped, image_plain.flip(-1) if is_flipped else image_plain)
            flips.append(is_flipped)
    assert 0.3 < np.mean(flips) < 0.7


def test_check_cache_source_on_digits(digits_cache):
    check_cache_source(digits_cache, "digits")
    with pytest.raises(ValueError, match=rf"{re.escape(str(digits_cache))}.*max_samples None -> 100.*delete"):
        check_cache_source(digits_cache, "digits", max_samples=100)
