"""Streaming access to image sets: ADM-layout ``.npz`` batches (``arr_0``: uint8 N×H×W×3), folders of image files,
and in-memory arrays.

A 50,000 × 256 × 256 × 3 sample batch is 9.8 GB, so ``.npz`` members are read and written piece by piece through
the zip file rather than with ``np.load`` / ``np.savez`` (works for stored and deflated archives alike).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MIN_DISPLAY_SIDE = 64  # pixels per image in a grid meant to be looked at, at least


def enlarge_small_images(images: list[Image.Image], min_side: int = MIN_DISPLAY_SIDE) -> list[Image.Image]:
    """`images` for a grid to look at: those narrower than `min_side` (e.g. 16-px digits) enlarged by one integer
    factor, nearest neighbour, so that every pixel stays a sharp square; larger ones unchanged."""
    if not images or images[0].width >= min_side:
        return images
    factor = -(-min_side // images[0].width)
    return [image.resize((image.width * factor, image.height * factor), Image.NEAREST) for image in images]


@contextmanager
def _open_npy_member(path: str | os.PathLike, key: str) -> Iterator[tuple[IO[bytes], tuple[int, ...], np.dtype]]:
    with zipfile.ZipFile(path) as archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            keys = [name.removesuffix(".npy") for name in archive.namelist()]
            raise KeyError(f"{path} has no array {key!r} (it holds {keys}).")
        with archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"{path}:{member} uses .npy format {version}; only 1.0 and 2.0 can be streamed.")
            if fortran_order or dtype.hasobject:
                raise ValueError(
                    f"{path}:{member} is Fortran-ordered or holds objects; save it C-ordered with np.savez."
                )
            yield handle, shape, dtype


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays in an ``.npz`` file, without reading them."""
    with zipfile.ZipFile(path) as archive:
        return [name.removesuffix(".npy") for name in archive.namelist()]


def read_npz_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an ``.npz`` file, from its header only."""
    with _open_npy_member(path, key) as (_, shape, dtype):
        return shape, dtype


def iter_npz_batches(path: str | os.PathLike, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Consecutive chunks of at most ``batch_size`` rows of ``key`` in an ``.npz`` file, read without loading it all."""
    with _open_npy_member(path, key) as (handle, shape, dtype):
        for start in range(0, shape[0], batch_size):
            batch = np.empty((min(batch_size, shape[0] - start), *shape[1:]), dtype=dtype)
            buffer, filled = memoryview(batch).cast("B"), 0
            while filled < len(buffer):
                read = handle.readinto(buffer[filled:])
                if not read:
                    raise ValueError(f"{path}:{key} is truncated at row {start} of {shape[0]}.")
                filled += read
            yield batch


class NpzWriter:
    """Writes an ``.npz`` file (uncompressed, zip64) array by array, the large ones in chunks, atomically.

    The archive is built under a temporary name in the target folder and moved into place by `close`; leaving the
    ``with`` block through an exception deletes it instead::

        with NpzWriter("samples.npz") as writer:
            writer.write_batches("arr_0", batches, shape=(n, 256, 256, 3), dtype=np.uint8)
            writer.write("labels", labels)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(handle)
        self._temporary = Path(temporary)
        self._archive = zipfile.ZipFile(self._temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write(self, name: str, array: np.ndarray) -> None:
        """Store a whole array as ``name``."""
        with self._archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)

    def write_batches(
        self, name: str, batches: Iterable[np.ndarray], shape: tuple[int, ...], dtype: np.dtype | type
    ) -> None:
        """Store an array of the given shape and dtype from row chunks (any sizes) that add up to exactly ``shape``."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        rows = 0
        with self._archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            for batch in batches:
                batch = np.asarray(batch)
                if batch.dtype != dtype or batch.shape[1:] != tuple(shape[1:]):
                    raise ValueError(
                        f"Chunk of {name!r} has dtype {batch.dtype} and row shape {batch.shape[1:]}, expected "
                        f"{dtype} and {tuple(shape[1:])}."
                    )
                rows += len(batch)
                if rows > shape[0]:
                    raise ValueError(f"More than the declared {shape[0]} rows were given for {name!r}.")
                handle.write(np.ascontiguousarray(batch).tobytes())
        if rows != shape[0]:
            raise ValueError(f"{name!r} got {rows} rows, but {shape[0]} were declared.")

    def close(self) -> None:
        self._archive.close()
        os.replace(self._temporary, self.path)

    def abort(self) -> None:
        self._archive.close()
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """An image file as a uint8 H×W×3 RGB array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class ImageSet:
    """A fixed, ordered set of same-size RGB images, read in uint8 N×H×W×3 batches.

    Build with [`open_image_set`] from an ``.npz`` (``arr_0``), a folder of image files (sorted by name) or an array.
    With `center_crop`, the images of a folder are read as ADM's center crop to that side (`center_crop_imagenet`,
    as the training data), so a folder of real images of any sizes (e.g. COCO val2014) can be a reference.
    """

    def __init__(
        self, source: str | os.PathLike | np.ndarray, key: str = "arr_0", center_crop: int | None = None
    ) -> None:
        self.key = key
        self.center_crop = center_crop
        self.array: np.ndarray | None = None
        self.npz_path: Path | None = None
        self.files: list[Path] | None = None
        if isinstance(source, np.ndarray):
            if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
                raise ValueError(f"Image arrays must be uint8 (N, H, W, 3), got {source.dtype} {source.shape}.")
            self.array = source
            return
        path = Path(source)
        if center_crop is not None and not path.is_dir():
            raise ValueError(f"{path}: center-cropping reads a folder of image files; an .npz holds its images as is.")
        if path.is_dir():
            self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self.files:
                raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        elif path.suffix == ".npz":
            shape, dtype = read_npz_shape(path, key)
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                raise ValueError(f"{path}:{key} must be uint8 (N, H, W, 3) images (ADM layout), got {dtype} {shape}.")
            self.npz_path = path
        else:
            raise ValueError(f"{path} is neither an .npz file nor a folder of images.")

    def __len__(self) -> int:
        if self.array is not None:
            return len(self.array)
        if self.files is not None:
            return len(self.files)
        return read_npz_shape(self.npz_path, self.key)[0][0]

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (n ≤ batch_size, H, W, 3) chunks in order; all images must share one size."""
        if self.npz_path is not None:
            yield from iter_npz_batches(self.npz_path, batch_size, self.key)
            return
        if self.array is not None:
            for start in range(0, len(self.array), batch_size):
                yield self.array[start : start + batch_size]
            return
        size = None
        for start in range(0, len(self.files), batch_size):
            images = [self._read(path) for path in self.files[start : start + batch_size]]
            for path, image in zip(self.files[start : start + batch_size], images):
                size = size or image.shape
                if image.shape != size:
                    raise ValueError(f"{path} is {image.shape}, other images are {size}; center-crop them first.")
            yield np.stack(images)

    def _read(self, path: Path) -> np.ndarray:
        if self.center_crop is None:
            return read_image_file(path)
        from ..data.preprocessing import center_crop_imagenet  # the data stack, only when cropping

        with Image.open(path) as image:
            return center_crop_imagenet(image.convert("RGB"), self.center_crop)


def open_image_set(
    source: str | os.PathLike | np.ndarray | ImageSet, key: str = "arr_0", center_crop: int | None = None
) -> ImageSet:
    """An [`ImageSet`] over an ``.npz`` path, a folder of images (optionally center-cropped to `center_crop`) or a
    uint8 (N, H, W, 3) array."""
    return source if isinstance(source, ImageSet) else ImageSet(source, key, center_crop)
