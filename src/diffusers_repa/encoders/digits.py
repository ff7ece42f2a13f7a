"""A tiny DINOv2-architecture encoder pretrained in seconds on scikit-learn's handwritten digits: a real (not random)
REPA alignment target for a pixel-space SiT trained on the digits offline.

Geometry. The digits run trains a SiT on 16×16 crops (the 8×8 digits through the data path's
`center_crop_imagenet`, a PIL bicubic ×2) with patch 4: a 4×4 grid of tokens, each covering a 4×4-pixel square.
This encoder reads the same uint8 crops at 16 px with patch 4, so its token grid is the SiT's and every target token
describes exactly the pixels of the SiT token it is aligned to; nothing is resized. Its config declares
``repa_token_stride: 4`` (pixels per token), which `load_encoder` reads: ``load_encoder(folder, resolution=16)``
gives (N, 16, D) tokens.

Objective. REPA aligns PATCH tokens, so every patch token is trained, not a CLS token: on the tokens that
`load_encoder` returns (after the final LayerNorm), a shared linear head classifies the digit from EACH token
(cross-entropy averaged over the 16 tokens), and a shared linear decoder reconstructs each token's own 4×4 patch
(mean squared error on the normalised pixels, weight `reconstruction_weight`). Classification alone makes the 16
tokens of an image nearly identical (a function of the class, which a class-conditional SiT is already given);
the reconstruction term keeps what each token sees of this particular image.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from ..atomic_files import write_folder_atomically
from ..data.digits import digits_fingerprint, load_digits_arrays, split_digits
from ..data.preprocessing import center_crop_imagenet
from ..evaluation.alignment import linear_probe_accuracy
from ..local_models import save_local_model
from .families import FAMILIES
from .registry import DIGITS_ENCODER_NAME, TOKEN_STRIDE_CONFIG_KEY

# Bump when the recipe changes in a way the settings below do not capture: cached encoders are then not reused.
DIGITS_ENCODER_VERSION = 1
# The record of settings and measurements written next to the weights; a later call compares settings with it.
DIGITS_PRETRAINING_FILE = "digits_pretraining.json"
DIGITS_ENCODER_RESOLUTION = 16
DIGITS_TOKEN_STRIDE = 4
_NUM_CLASSES = 10
_FAMILY = FAMILIES["dinov2"]

_MODEL_CARD = """# Digits ViT: a tiny DINOv2-architecture encoder pretrained on scikit-learn's handwritten digits

A REPA alignment target for pixel-space SiTs trained on the digits, written by
`diffusers_repa.encoders.digits.pretrain_digits_encoder`. Load it with
`diffusers_repa.encoders.load_encoder(folder, resolution=16)`: uint8 images (N, 3, 16, 16) → float32 patch tokens
(N, 16, {hidden_size}), a 4×4 grid (the config declares `repa_token_stride: 4`), the tokens after the final LayerNorm.

## Model
`Dinov2Model` (transformers), {num_hidden_layers} layers, width {hidden_size}, {num_attention_heads} heads, MLP ratio 2,
patch 4 on 16×16 RGB, ImageNet mean/std normalisation; {num_parameters:,} parameters.

## Training
- Data: scikit-learn's `load_digits` (UCI ML hand-written digits, 1,797 grey 8×8 images, CC BY 4.0), scaled to uint8
  and brought to 16×16 RGB exactly as the training data path does (`center_crop_imagenet`, PIL bicubic ×2).
  {num_train} images train the encoder; {num_held_out} ({held_out_percent}%, stratified, seed {seed}) are held out.
- Objective: on every one of the 16 patch tokens, a shared linear head classifies the digit (cross-entropy) and a
  shared linear decoder reconstructs the token's own 4×4 patch (MSE on normalised pixels, weight
  {reconstruction_weight}). REPA aligns patch tokens, so each must carry the digit; the reconstruction keeps them
  specific to the image rather than a function of its class.
- AdamW (weight decay 0.05), one-cycle learning rate peaking at {learning_rate}, batch {batch_size}, {num_epochs} epochs
  ({num_steps} steps), seed {seed}, on CPU: {train_seconds:.1f} s with {num_threads} thread(s). Recipe version
  {version}; everything is recorded in `digits_pretraining.json`.

## Measurements (the held-out digits)
| | linear-probe accuracy, mean-pooled patch tokens |
|---|---|
| this encoder | {probe_accuracy:.3f} |
| the same network before training | {probe_accuracy_untrained:.3f} |

The probe is `diffusers_repa.evaluation.linear_probe_accuracy` (standardised features, a linear layer trained with
Adam on the {num_train} training digits). The class explains {class_variance_fraction:.0%} of the variance of the
held-out patch tokens (the rest is what differs between images of one class and between positions).

## Limitations
Only meaningful for 16×16 crops of the digits. It has seen {num_train} small images; it is a stand-in for DINOv2
that makes an offline REPA run on the digits align to real features, not a general vision encoder.
"""


def _digit_crops() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as the trainer's crops: uint8 (1797, 3, 16, 16) and int64 labels (1797,)."""
    images, labels = load_digits_arrays()
    crops = np.stack([center_crop_imagenet(image, DIGITS_ENCODER_RESOLUTION) for image in images])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _patch_tokens(model: Dinov2Model, images: torch.Tensor) -> torch.Tensor:
    """uint8 crops → (N, 16, D) patch tokens, through the code `FrozenVisionEncoder` runs."""
    return _FAMILY.patch_tokens(model, _FAMILY.pixel_values(images, DIGITS_ENCODER_RESOLUTION))


def _evaluate(
    model: Dinov2Model,
    crops: torch.Tensor,
    labels: torch.Tensor,
    train: torch.Tensor,
    held_out: torch.Tensor,
    seed: int,
) -> tuple[float, float]:
    """On the held-out digits: the linear-probe accuracy of mean-pooled patch tokens (the probe fitted on the
    training digits), and the share of the patch tokens' variance that their class explains."""
    model.eval()
    with torch.no_grad():
        tokens = _patch_tokens(model, crops)
    pooled = tokens.mean(dim=1)
    accuracy = linear_probe_accuracy(pooled[train], labels[train], pooled[held_out], labels[held_out], seed=seed)
    flat = tokens[held_out].flatten(0, 1)
    token_labels = labels[held_out].repeat_interleave(tokens.shape[1])
    total = (flat - flat.mean(dim=0)).square().sum()
    within = sum(
        (flat[token_labels == label] - flat[token_labels == label].mean(dim=0)).square().sum()
        for label in token_labels.unique()
    )
    return accuracy, float(1 - within / total)


def held_out_split(labels: torch.Tensor, settings: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the encoder's training digits and of the held-out ones its probe is measured on."""
    split = split_digits(labels.numpy(), settings["held_out_fraction"], settings["seed"])
    return tuple(torch.from_numpy(np.sort(indices)) for indices in split)


def _train(settings: dict[str, Any]) -> tuple[Dinov2Model, dict[str, Any]]:
    """Pretrain the encoder described by `settings`; return it with the measurements of the record."""
    crops, labels = _digit_crops()
    train, held_out = held_out_split(labels, settings)
    config = Dinov2Config(
        image_size=DIGITS_ENCODER_RESOLUTION,
        patch_size=DIGITS_TOKEN_STRIDE,
        num_channels=3,
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        mlp_ratio=2,
        **{TOKEN_STRIDE_CONFIG_KEY: DIGITS_TOKEN_STRIDE},
    )
    patch_pixels = 3 * DIGITS_TOKEN_STRIDE**2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = Dinov2Model(config)
        class_head = nn.Linear(config.hidden_size, _NUM_CLASSES)
        patch_decoder = nn.Linear(config.hidden_size, patch_pixels)
    untrained = copy.deepcopy(model)
    parameters = [*model.parameters(), *class_head.parameters(), *patch_decoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings["learning_rate"], weight_decay=0.05)
    batch_size = settings["batch_size"]
    steps_per_epoch = -(-len(train) // batch_size)
    num_steps = settings["num_epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["learning_rate"], total_steps=num_steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(settings["seed"])

    start = time.perf_counter()
    model.train()
    for _ in range(settings["num_epochs"]):
        order = train[torch.randperm(len(train), generator=generator)]
        for batch in order.split(batch_size):
            pixels = _FAMILY.pixel_values(crops[batch], DIGITS_ENCODER_RESOLUTION)
            tokens = _FAMILY.patch_tokens(model, pixels)  # (n, 16, D), what `FrozenVisionEncoder` returns
            class_loss = F.cross_entropy(
                class_head(tokens).flatten(0, 1), labels[batch].repeat_interleave(tokens.shape[1])
            )
            # (n, 16, 3·4·4): token i's own 4×4 pixels (unfold and the patch embedding both go row-major).
            patches = F.unfold(pixels, DIGITS_TOKEN_STRIDE, stride=DIGITS_TOKEN_STRIDE).transpose(1, 2)
            loss = class_loss + settings["reconstruction_weight"] * F.mse_loss(patch_decoder(tokens), patches)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.perf_counter() - start

    probe_accuracy, class_variance_fraction = _evaluate(model, crops, labels, train, held_out, settings["seed"])
    probe_accuracy_untrained, _ = _evaluate(untrained, crops, labels, train, held_out, settings["seed"])
    results = {
        "train_seconds": round(train_seconds, 2),
        "num_threads": torch.get_num_threads(),
        "num_steps": num_steps,
        "final_loss": round(loss.item(), 4),
        "num_train": len(train),
        "num_held_out": len(held_out),
        "probe_accuracy": round(probe_accuracy, 4),
        "probe_accuracy_untrained": round(probe_accuracy_untrained, 4),
        "class_variance_fraction": round(class_variance_fraction, 4),
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
    }
    return model, results


def default_digits_encoder_dir() -> Path:
    """Where the built-in `digits-vit` encoder lives: `<HF_HOME>/diffusers_repa/encoders/digits-vit`."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "diffusers_repa" / "encoders" / DIGITS_ENCODER_NAME


def read_digits_encoder_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record a pretrained digits encoder folder holds (``{"settings": ..., "results": ..., "data": ...}``), or
    None if `folder` holds none."""
    path = Path(folder) / DIGITS_PRETRAINING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def pretrain_digits_encoder(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_epochs: int = 25,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    reconstruction_weight: float = 1.0,
    held_out_fraction: float = 0.2,
    overwrite: bool = False,
) -> Path:
    """Pretrain the digits encoder into `output_dir` (or reuse it there) and return the folder.

    The folder is a transformers `Dinov2Model` checkpoint (safetensors) with a README model card and
    `digits_pretraining.json` (these settings, the recipe version, and the measurements: training seconds, the
    linear-probe accuracy of mean-pooled patch tokens on the held-out digits, and that of the untrained network).
    ``load_encoder(folder, resolution=16)`` reads it: (N, 16, `hidden_size`) tokens of uint8 16×16 crops. See the
    module docstring for the geometry and the objective; the defaults take about 10–20 s on one CPU thread.

    Caching: if `output_dir` already holds an encoder pretrained with the same settings (and recipe version), it is
    returned without training. The folder is written to a temporary sibling and renamed into place, so it is
    complete or absent; processes racing to create it each train, and the first rename wins.

    Args:
        output_dir: the folder to write or reuse.
        seed: seed of the initialisation, the held-out split and the batch order (the caller's RNG is untouched).
        hidden_size / num_hidden_layers / num_attention_heads: the ViT (MLP ratio 2, patch 4 on 16×16 images).
        num_epochs / batch_size / learning_rate: AdamW with a one-cycle schedule peaking at `learning_rate`.
        reconstruction_weight: weight of the per-token patch reconstruction against the per-token classification.
        held_out_fraction: share of the digits (stratified) kept out of training to measure the probe.
        overwrite: replace an existing digits encoder trained with other settings instead of refusing.

    Returns:
        `output_dir` as a `Path`.

    Raises:
        FileExistsError: `output_dir` is a non-empty folder that holds no digits encoder, or one pretrained with
            other settings (without `overwrite`); the message names the differing settings.
    """
    settings = {
        "version": DIGITS_ENCODER_VERSION,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_epochs": num_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "reconstruction_weight": reconstruction_weight,
        "held_out_fraction": held_out_fraction,
    }
    output_dir = Path(output_dir)
    existing = read_digits_encoder_record(output_dir)
    if existing is not None and existing["settings"] == settings:
        return output_dir
    _refuse_to_replace(output_dir, existing, settings, overwrite)

    model, results = _train(settings)
    record = {"settings": settings, "results": results, "data": digits_fingerprint()}
    card = _MODEL_CARD.format(**settings, **results, held_out_percent=round(100 * held_out_fraction))
    try:
        with write_folder_atomically(output_dir, replace=overwrite) as staging:
            save_local_model(model, staging)  # every process writes (see local_models)
            (staging / "README.md").write_text(card, encoding="utf-8")
            (staging / DIGITS_PRETRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except FileExistsError:
        # Another process renamed its encoder into place while this one trained: use it if it is the same recipe.
        winner = read_digits_encoder_record(output_dir)
        if winner is None or winner["settings"] != settings:
            raise
    return output_dir


def _refuse_to_replace(folder: Path, record: dict[str, Any] | None, settings: dict[str, Any], overwrite: bool) -> None:
    """Raise unless `folder` is absent or empty, or holds a digits encoder (`record`) that `overwrite` replaces."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if record is None:
        raise FileExistsError(
            f"{folder} is not empty and holds no digits encoder ({DIGITS_PRETRAINING_FILE} is missing); pick another "
            "folder for pretrain_digits_encoder."
        )
    if overwrite:
        return
    differences = ", ".join(
        f"{key}: {record['settings'].get(key)!r} there, {value!r} asked"
        for key, value in settings.items()
        if record["settings"].get(key) != value
    )
    raise FileExistsError(
        f"{folder} holds a digits encoder pretrained with other settings ({differences}). Pass overwrite=True to "
        "retrain it in place, or pick another folder."
    )
