"""An independent classifier of scikit-learn's handwritten digits, to judge generated digit images.

It is its own model with its own training (a one-hidden-layer tanh MLP fitted with scikit-learn's
``MLPClassifier`` on 80 % of the digits of [`~diffusers_repa.data.load_digits_arrays`]), unrelated to any alignment encoder, so it can referee samples
of a SiT trained with REPA on the digits: its hidden activations are the features of a Fréchet distance
(``fd_digits``) and its predictions give the class accuracy of class-conditional samples.

Input convention: every image, real or generated, goes through the same steps — uint8 (via
[`~diffusers_repa.evaluation.training_eval.to_uint8_images`], so floats are quantised as a PNG would be) → [0, 1] →
mean of the channels → area average down to 8 × 8 (the mean of each (R/8)² block when R is a multiple of 8, adaptive
average pooling otherwise). For 8 × 8 digits upsampled by an integer factor with nearest neighbours this recovers the
original pixels; smoother upsamplings (the data path's PIL bicubic, bilinear) give slightly blurred digits, which the
training augmentation covers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic_files import write_file_atomically
from .training_eval import Images, to_uint8_images

logger = logging.getLogger(__name__)

DIGITS_SIDE = 8
DIGITS_NUM_CLASSES = 10
CLASSIFIER_FORMAT = "diffusers_repa.digits_classifier"
CLASSIFIER_VERSION = 1


def digit_classifier_settings(seed: int = 0) -> dict:
    """Everything that determines the trained classifier; stored with it and compared when a cached one is loaded."""
    return {
        "version": CLASSIFIER_VERSION,
        "model": "sklearn.neural_network.MLPClassifier",
        "hidden_layer_sizes": [128],
        "activation": "tanh",
        "alpha": 1e-2,
        "batch_size": 500,
        "learning_rate_init": 3e-3,
        # Stops once the training loss improves by < tol for 10 epochs (about 100 epochs, a second or two).
        "tol": 1e-3,
        "max_iter": 500,
        "held_out_fraction": 0.2,
        "augmentation": "1-px shifts (4 directions) + bilinear x2 up / area down blur",
        "seed": seed,
    }


def digits_to_classifier_input(images: Images) -> np.ndarray:
    """Images (N, 3, R, R) or (N, R, R, 3), uint8 or float in [0, 1], R ≥ 8 → grey 8 × 8 pixels (N, 64) in [0, 1].

    See the module docstring for the steps; they are the same for real and generated images.
    """
    pixels = to_uint8_images(images).double() / 255.0
    if pixels.shape[-1] < DIGITS_SIDE:
        raise ValueError(f"Digit images must be at least {DIGITS_SIDE} px, got {pixels.shape[-1]} px.")
    grey = pixels.mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, DIGITS_SIDE).reshape(len(grey), -1).numpy()


class DigitClassifier:
    """A trained digit MLP in NumPy (float64): ``tanh(x W₀ + b₀) … → logits``; deterministic, CPU only.

    Args:
        weights: per layer (in, out) matrices; the first takes the 64 pixels, the last gives 10 logits.
        biases: per layer (out,) vectors.
        settings: [`digit_classifier_settings`] it was trained with.
        held_out_accuracy: accuracy on the digits held out from its training (20 %, stratified).
    """

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        biases: Sequence[np.ndarray],
        settings: Mapping,
        held_out_accuracy: float,
    ) -> None:
        if len(weights) != len(biases) or len(weights) < 2:
            raise ValueError("A DigitClassifier needs matching weights and biases for at least two layers.")
        self.weights = [np.asarray(weight, dtype=np.float64) for weight in weights]
        self.biases = [np.asarray(bias, dtype=np.float64) for bias in biases]
        if self.weights[0].shape[0] != DIGITS_SIDE**2 or self.weights[-1].shape[1] != DIGITS_NUM_CLASSES:
            raise ValueError(
                f"Expected {DIGITS_SIDE**2} inputs and {DIGITS_NUM_CLASSES} outputs, got layers "
                f"{[weight.shape for weight in self.weights]}."
            )
        self.settings = dict(settings)
        self.held_out_accuracy = float(held_out_accuracy)

    @property
    def feature_dim(self) -> int:
        """D of [`features`]: the width of the last hidden layer."""
        return self.weights[-1].shape[0]

    def _hidden(self, pixels: np.ndarray) -> np.ndarray:
        hidden = pixels
        for weight, bias in zip(self.weights[:-1], self.biases[:-1]):
            hidden = np.tanh(hidden @ weight + bias)
        return hidden

    def _logits(self, pixels: np.ndarray) -> np.ndarray:
        return self._hidden(pixels) @ self.weights[-1] + self.biases[-1]

    def features(self, images: Images) -> np.ndarray:
        """Penultimate-layer activations (N, D) float64 in (−1, 1), for a Fréchet distance."""
        return self._hidden(digits_to_classifier_input(images))

    def logits(self, images: Images) -> np.ndarray:
        """Class logits (N, 10) float64."""
        return self._logits(digits_to_classifier_input(images))

    def predict(self, images: Images) -> np.ndarray:
        """Predicted digit (N,) int64."""
        return self.logits(images).argmax(axis=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights and settings to a ``.safetensors`` file, atomically."""
        from safetensors.numpy import save_file

        tensors = {}
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            tensors[f"layers.{index}.weight"] = np.ascontiguousarray(weight)
            tensors[f"layers.{index}.bias"] = np.ascontiguousarray(bias)
        metadata = {
            "format": CLASSIFIER_FORMAT,
            "settings": json.dumps(self.settings, sort_keys=True),
            "held_out_accuracy": repr(self.held_out_accuracy),
        }
        return write_file_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DigitClassifier:
        """Read a classifier written by [`save`] (safetensors: no code is run)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != CLASSIFIER_FORMAT:
                raise ValueError(f"{path} is not a digit classifier file (format {metadata.get('format')!r}).")
            num_layers = len(file.keys()) // 2
            weights = [file.get_tensor(f"layers.{index}.weight") for index in range(num_layers)]
            biases = [file.get_tensor(f"layers.{index}.bias") for index in range(num_layers)]
        return cls(weights, biases, json.loads(metadata["settings"]), float(metadata["held_out_accuracy"]))


def _shifted(digits: np.ndarray) -> np.ndarray:
    """The four 1-pixel shifts (up, down, left, right; zeros enter) of (N, 8, 8) digits → (4N, 8, 8)."""
    padded = np.pad(digits, ((0, 0), (1, 1), (1, 1)))
    offsets = ((0, 1), (2, 1), (1, 0), (1, 2))
    return np.concatenate([padded[:, dy : dy + DIGITS_SIDE, dx : dx + DIGITS_SIDE] for dy, dx in offsets])


def _blurred(digits: np.ndarray) -> np.ndarray:
    """(N, 8, 8) digits upsampled ×2 bilinearly and area-averaged back: what a smooth upsampling leaves after
    [`digits_to_classifier_input`]."""
    pixels = torch.from_numpy(digits)[:, None]
    up = F.interpolate(pixels, scale_factor=2, mode="bilinear", align_corners=False)
    return F.avg_pool2d(up, 2)[:, 0].numpy()


def train_digit_classifier(seed: int = 0) -> DigitClassifier:
    """Fit the classifier of [`digit_classifier_settings`] on the training part of the digits'
    [`~diffusers_repa.data.split_digits`].

    The training digits (uint8 8 × 8, from [`~diffusers_repa.data.load_digits_arrays`], through
    [`digits_to_classifier_input`]) are augmented with their 1-pixel shifts and a blurred copy (6× the data); the
    held-out 20 % give ``held_out_accuracy``. Deterministic given ``seed``; one to three seconds on one CPU core.
    """
    from sklearn.neural_network import MLPClassifier

    from ..data.digits import load_digits_arrays, split_digits

    settings = digit_classifier_settings(seed)
    images, labels = load_digits_arrays()
    digits = digits_to_classifier_input(images[:, None]).reshape(-1, DIGITS_SIDE, DIGITS_SIDE)
    train, held_out = split_digits(labels, digit_classifier_settings(seed)["held_out_fraction"], seed)
    inputs = np.concatenate([digits[train], _shifted(digits[train]), _blurred(digits[train])])
    targets = np.tile(labels[train], len(inputs) // len(train))
    model = MLPClassifier(
        hidden_layer_sizes=tuple(settings["hidden_layer_sizes"]),
        activation=settings["activation"],
        alpha=settings["alpha"],
        batch_size=settings["batch_size"],
        learning_rate_init=settings["learning_rate_init"],
        tol=settings["tol"],
        max_iter=settings["max_iter"],
        random_state=seed,
    )
    model.fit(inputs.reshape(len(inputs), -1), targets)
    if not np.array_equal(model.classes_, np.arange(DIGITS_NUM_CLASSES)):
        raise RuntimeError(f"Expected classes 0..9, got {model.classes_}.")
    classifier = DigitClassifier(model.coefs_, model.intercepts_, settings, held_out_accuracy=float("nan"))
    classifier.held_out_accuracy = float(np.mean(classifier.predict(images[held_out, None]) == labels[held_out]))
    return classifier


def default_digit_classifier_dir() -> Path:
    """``<HF_HOME>/diffusers_repa/digits_classifier``."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "diffusers_repa" / "digits_classifier"


def load_or_train_digit_classifier(cache_dir: str | os.PathLike | None = None, *, seed: int = 0) -> DigitClassifier:
    """The digit classifier for ``seed``, trained once and then read from ``cache_dir``.

    The file is ``<cache_dir>/mlp-v<version>-seed<seed>.safetensors`` (default folder:
    [`default_digit_classifier_dir`]), written atomically; a file that cannot be read or was trained with other
    settings is replaced by a freshly trained one.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_digit_classifier_dir()
    path = cache_dir / f"mlp-v{CLASSIFIER_VERSION}-seed{seed}.safetensors"
    settings = digit_classifier_settings(seed)
    if path.is_file():
        from safetensors import SafetensorError

        try:
            classifier = DigitClassifier.load(path)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            logger.warning("Retraining the digit classifier: %s is unreadable (%s).", path, error)
        else:
            if classifier.settings == settings:
                return classifier
            logger.warning("Retraining the digit classifier: %s was trained with other settings.", path)
    start = time.perf_counter()
    classifier = train_digit_classifier(seed)
    classifier.save(path)
    logger.info(
        "Trained the digit classifier in %.1f s (held-out accuracy %.4f); saved to %s.",
        time.perf_counter() - start,
        classifier.held_out_accuracy,
        path,
    )
    return classifier
