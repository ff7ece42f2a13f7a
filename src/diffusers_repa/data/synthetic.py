"""A small synthetic image-classification dataset for offline quickstarts and tests."""

from __future__ import annotations

import colorsys

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw

__all__ = ["synthetic_class_dataset"]

_SHAPES = ("circle", "square", "triangle", "cross")


def _draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=fill)
    else:
        arm = r / 3
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)


def synthetic_class_dataset(
    num_classes: int, samples_per_class: int, resolution: int, seed: int = 0
) -> datasets.Dataset:
    """Images whose class is visible: class ``c`` is one coloured shape (hue ``c / num_classes``, shape ``c % 4``).

    Every sample jitters the shape's position, size and shade and the dark background, so a small model has
    something to learn yet class-dependent samples are easy to recognise after a few hundred steps. Rows go
    round-robin over the classes, so any prefix is class-balanced. Deterministic for a given ``seed``.

    Returns:
        ``datasets.Dataset`` with ``image`` (``datasets.Image``, RGB, ``resolution`` x ``resolution``) and
        ``label`` (``datasets.ClassLabel`` named like ``"circle-hue000"``).
    """
    if num_classes <= 0 or samples_per_class <= 0 or resolution < 8:
        raise ValueError(
            "num_classes and samples_per_class must be positive and resolution at least 8 pixels; got "
            f"{num_classes}, {samples_per_class}, {resolution}."
        )
    rng = np.random.default_rng(seed)
    hues = [c / num_classes for c in range(num_classes)]
    names = [f"{_SHAPES[c % len(_SHAPES)]}-hue{round(360 * hues[c]) % 360:03d}" for c in range(num_classes)]
    images, labels = [], []
    for _ in range(samples_per_class):
        for c in range(num_classes):
            background = rng.integers(10, 60, size=3)
            pixels = np.clip(background + rng.normal(0, 4, size=(resolution, resolution, 3)), 0, 255)
            image = PIL.Image.fromarray(pixels.astype(np.uint8))
            saturation, value = rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
            fill = tuple(round(255 * channel) for channel in colorsys.hsv_to_rgb(hues[c], saturation, value))
            radius = resolution * rng.uniform(0.22, 0.32)
            cx, cy = resolution / 2 + rng.uniform(-0.12, 0.12, size=2) * resolution
            _draw_shape(PIL.ImageDraw.Draw(image), _SHAPES[c % len(_SHAPES)], cx, cy, radius, fill)
            images.append(image)
            labels.append(c)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
