"""The digits encoder: pretrained once per module (default settings, ~15 s on one CPU thread), then loaded by
`load_encoder` like any checkpoint; its patch tokens carry the digit; pretraining is cached and written atomically."""

import json
import shutil

import numpy as np
import pytest
import torch

from diffusers_repa.data.digits import load_digits_arrays
from diffusers_repa.data.preprocessing import center_crop_imagenet
from diffusers_repa.encoders import check_token_grid, load_encoder
from diffusers_repa.encoders import digits as digits_module
from diffusers_repa.encoders.digits import (
    DIGITS_PRETRAINING_FILE,
    held_out_split,
    pretrain_digits_encoder,
    read_digits_encoder_record,
)
from diffusers_repa.evaluation.alignment import linear_probe_accuracy

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory, single_thread):
    return pretrain_digits_encoder(tmp_path_factory.mktemp("digits") / "encoder")


@pytest.fixture(scope="module")
def digit_crops():
    """The 1,797 digits as the trainer's uint8 16×16 crops (N, 3, 16, 16), and their labels."""
    images, labels = load_digits_arrays()
    crops = np.stack([center_crop_imagenet(image, 16) for image in images])
    return torch.from_numpy(crops).permute(0, 3, 1, 2), torch.from_numpy(labels)


def test_folder_is_a_safetensors_checkpoint_with_a_card_and_a_record(encoder_folder):
    assert sorted(path.name for path in encoder_folder.iterdir()) == [
        "README.md",
        "config.json",
        DIGITS_PRETRAINING_FILE,
        "model.safetensors",
    ]
    config = json.loads((encoder_folder / "config.json").read_text())
    assert (config["model_type"], config["patch_size"], config["repa_token_stride"]) == ("dinov2", 4, 4)
    record = read_digits_encoder_record(encoder_folder)
    assert record["settings"]["version"] == digits_module.DIGITS_ENCODER_VERSION
    assert record["data"].startswith("sklearn-")
    card = (encoder_folder / "README.md").read_text()
    assert f"{record['results']['probe_accuracy']:.3f}" in card and "held out" in card


def test_load_encoder_reads_a_four_by_four_token_grid(encoder_folder, digit_crops):
    crops, _ = digit_crops
    encoder = load_encoder(encoder_folder, resolution=16)
    assert (encoder.token_stride, encoder.grid_size, encoder.input_size, encoder.embed_dim) == (4, 4, 16, 64)
    tokens = encoder(crops[:5])
    assert tokens.shape == (5, 16, 64) and tokens.dtype == torch.float32
    check_token_grid(encoder, 16)  # the 16-px SiT with patch 4
    assert load_encoder(encoder_folder, resolution=32)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (
        1,
        64,
        64,
    )


def test_patch_tokens_carry_the_digit(encoder_folder, digit_crops):
    """The probe recorded at pretraining is reproduced from `load_encoder`'s tokens (so the saved weights and the
    loading path are what was measured), and it is far above chance (0.1) and above the untrained network."""
    crops, labels = digit_crops
    record = read_digits_encoder_record(encoder_folder)
    settings, results = record["settings"], record["results"]
    train, held_out = held_out_split(labels, settings)
    pooled = load_encoder(encoder_folder, resolution=16)(crops).mean(dim=1)
    accuracy = linear_probe_accuracy(pooled[train], labels[train], pooled[held_out], labels[held_out], seed=0)
    assert accuracy == pytest.approx(results["probe_accuracy"], abs=1e-4)
    assert accuracy > 0.85
    assert accuracy > results["probe_accuracy_untrained"] + 0.15
    # Tokens differ between images of one class: not a function of the class label alone.
    assert 0.2 < results["class_variance_fraction"] < 0.9


def test_second_call_reuses_the_folder(encoder_folder, monkeypatch):
    weights = encoder_folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_training(settings):
        raise AssertionError("pretrained again although the folder holds this encoder")

    monkeypatch.setattr(digits_module, "_train", no_training)
    assert pretrain_digits_encoder(encoder_folder) == encoder_folder
    assert weights.stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match=r"other settings \(num_epochs: 25 there, 1 asked\).*overwrite=True"):
        pretrain_digits_encoder(encoder_folder, num_epochs=1)
    assert weights.stat().st_mtime_ns == mtime


def test_overwrite_retrains_in_place_and_foreign_folders_are_refused(tmp_path):
    folder = pretrain_digits_encoder(tmp_path / "encoder", num_epochs=1, hidden_size=16)
    assert read_digits_encoder_record(folder)["settings"]["hidden_size"] == 16
    pretrain_digits_encoder(folder, num_epochs=1, hidden_size=32, overwrite=True)
    assert read_digits_encoder_record(folder)["settings"]["hidden_size"] == 32
    assert load_encoder(folder, resolution=16).embed_dim == 32
    assert [path.name for path in tmp_path.iterdir()] == ["encoder"]  # no staging or retired folders left

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no digits encoder"):
        pretrain_digits_encoder(other, num_epochs=1, overwrite=True)
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


def test_losing_a_race_to_an_identical_encoder_uses_the_winner(tmp_path, monkeypatch):
    """Two processes pretrain into one folder: the second rename fails, and the second process uses the first's."""
    winner = pretrain_digits_encoder(tmp_path / "winner", num_epochs=1, hidden_size=16)
    train = digits_module._train

    def train_while_another_process_finishes(settings):
        result = train(settings)
        shutil.copytree(winner, tmp_path / "shared")
        return result

    monkeypatch.setattr(digits_module, "_train", train_while_another_process_finishes)
    assert pretrain_digits_encoder(tmp_path / "shared", num_epochs=1, hidden_size=16) == tmp_path / "shared"
    assert (tmp_path / "shared" / "model.safetensors").read_bytes() == (winner / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "shared")
    with pytest.raises(FileExistsError):  # a different encoder won: refuse rather than mix them up
        pretrain_digits_encoder(tmp_path / "shared", num_epochs=1, hidden_size=8, num_attention_heads=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shared", "winner"]
