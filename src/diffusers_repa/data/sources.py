"""Image sources, class-labelled or captioned: ImageNet-1k on the Hub, any Hub dataset (MS-COCO captions, ...), a
local image folder (class sub-folders, or a ``metadata.jsonl`` / ``metadata.csv`` with a caption column),
scikit-learn's digits (with captions: ``"digits-captions"``), or a dataset object; and the record that identifies a
source in a latent cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from .digits import (
    DIGITS_CAPTIONS_DATASET,
    DIGITS_DATASET,
    digits_captions_dataset,
    digits_captions_fingerprint,
    digits_dataset,
    digits_fingerprint,
)

__all__ = ["IMAGENET_1K_REPO_ID", "describe_source", "load_image_source"]

IMAGENET_1K_REPO_ID = "ILSVRC/imagenet-1k"
_DATASET_ALIASES = {"imagenet-1k": IMAGENET_1K_REPO_ID, "imagenet": IMAGENET_1K_REPO_ID}

SourceDataset = datasets.Dataset | datasets.IterableDataset
# What datasets' imagefolder reads as per-image metadata (captions) when it lies in the folder itself.
_METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_BUILTIN_DIGITS = {
    DIGITS_DATASET: (digits_dataset, digits_fingerprint),
    DIGITS_CAPTIONS_DATASET: (digits_captions_dataset, digits_captions_fingerprint),
}


def _is_gated_or_unauthorized(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the Hub refused access for lack of auth or accepted terms."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, GatedRepoError):
            return True
        if isinstance(error, HfHubHTTPError) and getattr(error.response, "status_code", None) == 401:
            return True
        # datasets turns GatedRepoError into DatasetNotFoundError("... is a gated dataset on the Hub ...").
        if isinstance(error, DatasetNotFoundError) and "gated" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def _load_hub_dataset(repo_id: str, split: str, streaming: bool, **load_kwargs) -> SourceDataset:
    try:
        return datasets.load_dataset(repo_id, split=split, streaming=streaming, **load_kwargs)
    except Exception as error:
        if _is_gated_or_unauthorized(error):
            raise PermissionError(
                f"The Hub dataset '{repo_id}' is gated and this machine is not authorised to read it. Open "
                f"https://huggingface.co/datasets/{repo_id}, log in and accept its terms of access, then authenticate "
                "here with `hf auth login` (or `huggingface-cli login`) or set the HF_TOKEN environment variable."
            ) from error
        raise


def _resolve_name(name: str | os.PathLike) -> tuple[str, str | Path]:
    """What a source name means, in this order: a local folder, the built-in digits, a Hub id (aliases resolved).

    Returns ``(kind, value)``: ``("local folder", Path)``, ``("digits", "digits" or "digits-captions")`` or
    ``("hub", repo_id)``.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return "local folder", path
    if path.exists():
        raise ValueError(f"{path} is a file; pass a directory of class sub-folders or a Hub dataset id.")
    if str(name) in _BUILTIN_DIGITS:
        return "digits", str(name)
    return "hub", _DATASET_ALIASES.get(str(name), str(name))


def _select_split(dataset: Any, split: str) -> Any:
    """The split of a ``DatasetDict`` / ``IterableDatasetDict``; anything else unchanged."""
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise ValueError(f"Split '{split}' not found; available splits: {sorted(dataset)}.")
        return dataset[split]
    return dataset


def load_image_source(
    dataset: str | os.PathLike | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = "label",
    streaming: bool = False,
    *,
    caption_column: str | None = None,
    max_samples: int | None = None,
    **load_kwargs,
) -> SourceDataset:
    """Opens an image source with the columns ``image``, ``label`` (class data) and ``caption`` (captioned data).

    Class data has ``image`` and ``label``. Captioned data (``caption_column`` given) has ``image`` and ``caption``
    (a string, or a list of strings: several captions per image, as MS-COCO's five), plus ``label`` when the source
    has the label column (the digits keep theirs so that an evaluation can check the drawn digit). Local caption
    folders follow ``datasets``' imagefolder convention: the images and a ``metadata.jsonl`` / ``metadata.csv`` with
    a ``file_name`` column and the caption column (e.g. ``{"file_name": "0001.png", "text": ["a cat", "a pet"]}``);
    a folder with such a file in it is read whole as ``split`` (see
    :func:`~diffusers_repa.data.write_coco_captions_metadata` for MS-COCO).
    The original text-to-image REPA trains on MS-COCO 2014 train (82,783 images × about 5 captions); any Hub copy
    with an image column and a caption list column works, e.g. ``caption_column="sentences"`` or ``"captions"``,
    whichever the dataset card names.

    Args:
        dataset: ``"imagenet-1k"`` (alias of the gated Hub dataset ``ILSVRC/imagenet-1k``), any Hub dataset id
            (``"user/name"``), a local directory read with the ``imagefolder`` builder (one sub-folder per class,
            optionally inside ``train/``, ``validation/``, ...; or a caption metadata file), ``"digits"``
            (scikit-learn's 1,797 8×8 digits, split ``"train"`` only; see :mod:`~diffusers_repa.data.digits`),
            ``"digits-captions"`` (the same with a ``caption`` list column), or an in-memory ``Dataset`` /
            ``IterableDataset`` / ``DatasetDict``. A local directory takes precedence over a name.
        split: split to read (ignored for a ``Dataset`` / ``IterableDataset`` object).
        image_column, label_column, caption_column: source column names; they are renamed to ``image``, ``label``
            and ``caption``. ``label_column=None``: no labels. With ``caption_column``, a source without the
            default ``"label"`` column simply has no labels; a label column named otherwise must exist.
        streaming: read lazily as an ``IterableDataset`` instead of downloading first (a ``Dataset`` object is
            turned into an ``IterableDataset``).
        max_samples: keep only the first ``max_samples`` rows.
        **load_kwargs: passed to ``datasets.load_dataset`` (``token``, ``cache_dir``, ``revision``, ...).

    Returns:
        ``datasets.Dataset`` (or ``IterableDataset`` when streaming). Images are not decoded or preprocessed here,
        captions not checked (the cache does that row by row).

    Raises:
        PermissionError: the Hub dataset is gated and the terms were not accepted / no login (message says how).
        ValueError: a column is missing (the message lists the source's columns), neither labels nor captions are
            asked for, or the split does not exist in a ``DatasetDict``.
    """
    dataset = _select_split(dataset, split)
    if isinstance(dataset, (str, os.PathLike)):
        kind, value = _resolve_name(dataset)
        if kind == "local folder":
            if any((value / name).is_file() for name in _METADATA_FILES):
                # A caption folder is one split. datasets would otherwise infer splits from file names, and COCO's
                # "COCO_train2014_*.jpg" would make a "train" split of the images without the metadata file.
                folder = {"data_files": {split: str(value / "**")}}
            else:
                folder = {"data_dir": str(value)}
            source = datasets.load_dataset("imagefolder", split=split, streaming=streaming, **folder, **load_kwargs)
        elif kind == "digits":
            source = _BUILTIN_DIGITS[value][0](split)
            source = source.to_iterable_dataset() if streaming else source
        else:
            source = _load_hub_dataset(value, split, streaming, **load_kwargs)
    elif isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        source = dataset.to_iterable_dataset() if streaming and isinstance(dataset, datasets.Dataset) else dataset
    else:
        raise TypeError(
            f"Unsupported source of type {type(dataset).__name__}: pass a Hub id, a directory or a datasets object."
        )

    columns = source.column_names
    if caption_column is not None and label_column == "label" and columns is not None and "label" not in columns:
        label_column = None  # captioned data needs no labels (MS-COCO, a caption folder)
    if label_column is None and caption_column is None:
        raise ValueError("A source needs a label column (class data) or a caption column (text-to-image data).")
    roles = [("image", image_column), ("label", label_column), ("caption", caption_column)]
    roles = [(role, column) for role, column in roles if column is not None]
    if columns is not None:
        for role, column in roles:
            if column not in columns:
                raise ValueError(
                    f"The source has no {role} column '{column}' (columns: {columns}); "
                    f"choose it with --{role}_column / {role}_column=."
                )
    source = source.select_columns([column for _, column in roles])
    renames = {old: new for new, old in roles if old != new}
    if renames:
        source = source.rename_columns(renames)
    if max_samples is not None:
        if max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}.")
        if isinstance(source, datasets.Dataset):
            source = source.select(range(min(max_samples, len(source))))
        else:
            source = source.take(max_samples)
    return source


def _folder_fingerprint(root: Path) -> str:
    """SHA-256 of (relative path, size, modification time) of every file under ``root``, hidden ones excluded.

    Any added, removed, renamed or rewritten file changes it; no file is read, so it stays cheap for a million
    images. A copy that does not keep modification times (``cp`` without ``-p``) counts as a change.
    """
    entries = []
    for folder, subfolders, files in os.walk(root):
        # Like the imagefolder builder, hidden files and folders are not data.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(folder, name)
                stat = path.stat()
                entries.append(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def describe_source(
    dataset: str | os.PathLike | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = "label",
    max_samples: int | None = None,
    *,
    caption_column: str | None = None,
    loaded: datasets.Dataset | datasets.IterableDataset | None = None,
) -> dict[str, Any]:
    """What identifies a source in a latent cache: portable (no absolute path) and, where cheap, content-based.

    The ``fingerprint`` is

    - a local folder: a SHA-256 of every non-hidden file's relative path, size and modification time (files are
      not read; a change anywhere in the folder, also in another split's sub-folder, counts);
    - ``"digits"``: the scikit-learn version and a SHA-256 of the arrays (``"digits-captions"``: and of the caption
      wording);
    - an in-memory ``Dataset`` / ``DatasetDict``: the selected split's ``_fingerprint`` (``datasets`` derives it
      from the content for in-memory tables and from the loading recipe for loaded ones);
    - a Hub dataset: the ``_fingerprint`` of ``loaded`` when it is a map-style (downloaded) dataset, which
      ``datasets`` derives from its cache folder, named after the repository's resolved commit; ``None`` for a
      stream or when ``loaded`` is not given (then only the repository id, split, columns and ``max_samples``
      identify it);
    - an in-memory ``IterableDataset``: ``None`` (nothing identifies its content).

    Args:
        dataset, split, image_column, label_column, max_samples, caption_column: as for
            :func:`load_image_source`.
        loaded: the dataset :func:`load_image_source` returned for these arguments, if already loaded.

    Returns:
        ``{"dataset", "kind", "split", "image_column", "label_column", "caption_column", "max_samples",
        "fingerprint"}`` where ``dataset`` is a local folder's name, the Hub repository id, ``"digits"``,
        ``"digits-captions"`` or ``"in-memory dataset"`` and ``kind`` is ``"local folder"``, ``"hub"``, ``"digits"``
        or ``"in-memory"``. The columns are recorded as given.
    """
    if isinstance(dataset, (str, os.PathLike)):
        kind, value = _resolve_name(dataset)
        if kind == "local folder":
            name, fingerprint = value.resolve().name, _folder_fingerprint(value)
        elif kind == "digits":
            name, fingerprint = value, _BUILTIN_DIGITS[value][1]()
        else:
            name = value
            fingerprint = loaded._fingerprint if isinstance(loaded, datasets.Dataset) else None
    else:
        dataset = _select_split(dataset, split)
        kind, name = "in-memory", "in-memory dataset"
        fingerprint = dataset._fingerprint if isinstance(dataset, datasets.Dataset) else None
    return {
        "dataset": name,
        "kind": kind,
        "split": split,
        "image_column": image_column,
        "label_column": label_column,
        "caption_column": caption_column,
        "max_samples": max_samples,
        "fingerprint": fingerprint,
    }
