"""ImageNet preprocessing of ADM and REPA: image decoding, RGB conversion and the center crop."""

from __future__ import annotations

import io
import os
from typing import Any

import fsspec
import numpy as np
import PIL.Image

__all__ = ["center_crop_imagenet", "decode_image", "to_rgb"]


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Converts any PIL mode (grayscale, palette, CMYK, RGBA, 16-bit, ...) to RGB like ADM's ``convert("RGB")``.

    Alpha is dropped, not composited, as in the original preprocessing.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        # Same pixels as P -> RGB; going through RGBA avoids PIL's warning about palette transparency.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _as_pil(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image array, got dtype {array.dtype}; convert it to uint8 in [0, 255].")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return PIL.Image.fromarray(array)
    raise ValueError(
        f"Expected an HWC image array with 1, 3 or 4 channels (or HW grayscale), got shape {tuple(array.shape)}."
    )


def center_crop_imagenet(image: PIL.Image.Image | np.ndarray, resolution: int) -> np.ndarray:
    """The center crop of ADM / REPA's ImageNet preparation, bit-identical to the original.

    While the short side is at least ``2 * resolution`` both sides are halved (``side // 2``) with PIL ``BOX``;
    then a PIL ``BICUBIC`` resize brings the short side to ``resolution`` (each side ``round(side * scale)``);
    finally the center ``resolution x resolution`` window is cut out (offset ``(side - resolution) // 2``).
    Images smaller than ``resolution`` are upscaled by the same bicubic step.

    Args:
        image: a PIL image of any mode, or a uint8 array (H, W, C) with C in {1, 3, 4} or (H, W).
        resolution: side S of the square crop in pixels.

    Returns:
        uint8 array (S, S, 3), RGB.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}.")
    pil_image = to_rgb(_as_pil(image))
    while min(pil_image.size) >= 2 * resolution:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(side * scale) for side in pil_image.size), resample=PIL.Image.Resampling.BICUBIC
    )
    array = np.asarray(pil_image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def decode_image(value: Any) -> PIL.Image.Image:
    """Opens and fully decodes one image as ADM does (no EXIF rotation), so corrupt files fail here.

    Args:
        value: what an image column holds: a PIL image, a uint8 array, encoded ``bytes``, a file path or URL
            (anything ``fsspec`` opens, e.g. ``hf://``), or the ``{"bytes": ..., "path": ...}`` dict of a
            ``datasets.Image(decode=False)`` column.

    Raises:
        OSError, ValueError, ...: whatever PIL raises for unreadable or truncated data.
    """
    if isinstance(value, PIL.Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        image = _as_pil(value)
    else:
        data, path = value, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (str, os.PathLike)):
            data, path = None, value
        if data is None:
            if path is None:
                raise ValueError(f"Image value has neither bytes nor a path: {value!r}.")
            with fsspec.open(path, "rb") as file:
                data = file.read()
        image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image
