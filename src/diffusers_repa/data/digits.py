"""scikit-learn's handwritten digits as a small real dataset that needs no download.

``sklearn.datasets.load_digits`` ships 1,797 grey 8×8 images of the digits 0–9 (about 180 per class) inside the
scikit-learn wheel. Pixels there are ink counts 0..16 (bright ink on a black background); here they are scaled to
uint8 0..255 as ``round(value * 255 / 16)``. There is one split, ``"train"``, with all 1,797 images: what a model
trains on and what Fréchet distances compare against. An evaluation classifier that needs held-out data splits
:func:`load_digits_arrays` itself.

``"digits-captions"`` is the same images and labels with a ``caption`` column: a few fixed sentences per image made
from its digit (:func:`digit_captions`), the offline text-to-image data. The labels stay, so an evaluation can
check which digit a caption made the model draw.
"""

from __future__ import annotations

import hashlib

import datasets
import numpy as np
import PIL.Image

__all__ = [
    "DIGITS_CAPTIONS_DATASET",
    "DIGITS_CLASS_NAMES",
    "DIGITS_DATASET",
    "digit_captions",
    "digits_captions_dataset",
    "digits_captions_fingerprint",
    "digits_dataset",
    "digits_fingerprint",
    "load_digits_arrays",
    "split_digits",
]

DIGITS_DATASET = "digits"
"""The name that :func:`~diffusers_repa.data.load_image_source` (and ``--dataset``) resolves to this dataset."""

DIGITS_CLASS_NAMES = [str(digit) for digit in range(10)]
"""Class ``i`` is the digit ``i``; these names become the pipeline's ``id2label``."""

DIGITS_CAPTIONS_DATASET = "digits-captions"
"""The digits with a ``caption`` column (see :func:`digits_captions_dataset`)."""

_SPLITS = ("train",)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Number words, not numerals: the built-in tiny-clip tokenizer knows only letters, so "3" and "4" would encode alike.
_CAPTION_TEMPLATES = ("a handwritten digit {word}", "the number {word}", "a drawing of {article} {word}")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits as arrays, in scikit-learn's order.

    Returns:
        ``(images, labels)``: ``images`` uint8 (1797, 8, 8) in 0..255 (the same pixels as the ``image`` column of
        :func:`digits_dataset`), ``labels`` int64 (1797,), the digit 0..9 each image shows.
    """
    # scikit-learn is imported only here: it is slow to import and only this dataset needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_dataset(split: str = "train") -> datasets.Dataset:
    """The digits as an image-classification ``datasets.Dataset``.

    Args:
        split: ``"train"``, the only split (all 1,797 images).

    Returns:
        ``datasets.Dataset`` with ``image`` (``datasets.Image``; 8×8 RGB, three equal channels, so the RGB crop
        path treats it like any photo) and ``label`` (``datasets.ClassLabel`` named ``"0"`` … ``"9"``).
    """
    if split not in _SPLITS:
        raise ValueError(f"The digits dataset has one split, 'train' (all 1,797 images); got split '{split}'.")
    images, labels = load_digits_arrays()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGITS_CLASS_NAMES)})
    rows = {"image": [PIL.Image.fromarray(image).convert("RGB") for image in images], "label": labels.tolist()}
    return datasets.Dataset.from_dict(rows, features=features)


def digit_captions(digit: int) -> list[str]:
    """The captions of an image of ``digit`` (0..9), one per template, e.g. for 8: ``["a handwritten digit eight",
    "the number eight", "a drawing of an eight"]``."""
    word = _NUMBER_WORDS[digit]
    article = "an" if word[0] in "aeiou" else "a"
    return [template.format(word=word, article=article) for template in _CAPTION_TEMPLATES]


def digits_captions_dataset(split: str = "train") -> datasets.Dataset:
    """:func:`digits_dataset` with a ``caption`` column: the list :func:`digit_captions` of each image's label."""
    dataset = digits_dataset(split)
    captions = [digit_captions(label) for label in dataset["label"]]
    return dataset.add_column("caption", captions, feature=datasets.Sequence(datasets.Value("string")))


def digits_fingerprint() -> str:
    """Identifies the digits data: the scikit-learn version and a SHA-256 of the uint8 images and labels."""
    import sklearn

    images, labels = load_digits_arrays()
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return f"sklearn-{sklearn.__version__}-{digest}"


def digits_captions_fingerprint() -> str:
    """:func:`digits_fingerprint` and a SHA-256 of the caption templates and number words (a new wording is new
    data)."""
    wording = hashlib.sha256("\n".join([*_CAPTION_TEMPLATES, *_NUMBER_WORDS]).encode()).hexdigest()
    return f"{digits_fingerprint()}-captions-{wording[:16]}"


def split_digits(labels: np.ndarray, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the digits) of a training part and a held-out part, stratified by ``labels`` (1797,) with
    ``seed``: the split the digits encoder and the evaluation classifier each measure themselves on."""
    from sklearn.model_selection import train_test_split

    return tuple(
        train_test_split(np.arange(len(labels)), test_size=held_out_fraction, stratify=labels, random_state=seed)
    )
