"""Image-classification sources: ImageNet-1k on the Hub, any Hub dataset, a local image folder, scikit-learn's
digits, or a dataset object; and the record that identifies a source in a latent cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from .digits import DIGITS_DATASET, digits_dataset, digits_fingerprint

__all__ = ["IMAGENET_1K_REPO_ID", "describe_source", "load_image_source"]

IMAGENET_1K_REPO_ID = "ILSVRC/imagenet-1k"
_DATASET_ALIASES = {"imagenet-1k": IMAGENET_1K_REPO_ID, "imagenet": IMAGENET_1K_REPO_ID}

SourceDataset = datasets.Dataset | datasets.IterableDataset


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

    Returns ``(kind, value)``: ``("local folder", Path)``, ``("digits", "digits")`` or ``("hub", repo_id)``.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return "local folder", path
    if path.exists():
        raise ValueError(f"{path} is a file; pass a directory of class sub-folders or a Hub dataset id.")
    if str(name) == DIGITS_DATASET:
        return "digits", DIGITS_DATASET
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
    label_column: str = "label",
    streaming: bool = False,
    *,
    max_samples: int | None = None,
    **load_kwargs,
) -> SourceDataset:
    """Opens an image-classification source with exactly two columns, ``image`` and ``label``.

    Args:
        dataset: ``"imagenet-1k"`` (alias of the gated Hub dataset ``ILSVRC/imagenet-1k``), any Hub dataset id
            (``"user/name"``), a local directory read with the ``imagefolder`` builder (one sub-folder per class,
            optionally inside ``train/``, ``validation/``, ...), ``"digits"`` (scikit-learn's 1,797 8×8 digits,
            split ``"train"`` only; see :mod:`~diffusers_repa.data.digits`), or an in-memory ``Dataset`` /
            ``IterableDataset`` / ``DatasetDict``. A local directory takes precedence over a name.
        split: split to read (ignored for a ``Dataset`` / ``IterableDataset`` object).
        image_column, label_column: source column names; they are renamed to ``image`` and ``label``.
        streaming: read lazily as an ``IterableDataset`` instead of downloading first (a ``Dataset`` object is
            turned into an ``IterableDataset``).
        max_samples: keep only the first ``max_samples`` rows.
        **load_kwargs: passed to ``datasets.load_dataset`` (``token``, ``cache_dir``, ``revision``, ...).

    Returns:
        ``datasets.Dataset`` (or ``IterableDataset`` when streaming). Images are not decoded or preprocessed here.

    Raises:
        PermissionError: the Hub dataset is gated and the terms were not accepted / no login (message says how).
        ValueError: a column is missing, or the split does not exist in a ``DatasetDict``.
    """
    dataset = _select_split(dataset, split)
    if isinstance(dataset, (str, os.PathLike)):
        kind, value = _resolve_name(dataset)
        if kind == "local folder":
            source = datasets.load_dataset(
                "imagefolder", data_dir=str(value), split=split, streaming=streaming, **load_kwargs
            )
        elif kind == "digits":
            source = digits_dataset(split)
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
    if columns is not None:
        for role, column in (("image", image_column), ("label", label_column)):
            if column not in columns:
                raise ValueError(
                    f"The source has no {role} column '{column}' (columns: {columns}); "
                    f"choose it with --{role}_column / {role}_column=."
                )
    source = source.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
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
    label_column: str = "label",
    max_samples: int | None = None,
    *,
    loaded: datasets.Dataset | datasets.IterableDataset | None = None,
) -> dict[str, Any]:
    """What identifies a source in a latent cache: portable (no absolute path) and, where cheap, content-based.

    The ``fingerprint`` is

    - a local folder: a SHA-256 of every non-hidden file's relative path, size and modification time (files are
      not read; a change anywhere in the folder, also in another split's sub-folder, counts);
    - ``"digits"``: the scikit-learn version and a SHA-256 of the arrays;
    - an in-memory ``Dataset`` / ``DatasetDict``: the selected split's ``_fingerprint`` (``datasets`` derives it
      from the content for in-memory tables and from the loading recipe for loaded ones);
    - a Hub dataset: the ``_fingerprint`` of ``loaded`` when it is a map-style (downloaded) dataset, which
      ``datasets`` derives from its cache folder, named after the repository's resolved commit; ``None`` for a
      stream or when ``loaded`` is not given (then only the repository id, split, columns and ``max_samples``
      identify it);
    - an in-memory ``IterableDataset``: ``None`` (nothing identifies its content).

    Args:
        dataset, split, image_column, label_column, max_samples: as for :func:`load_image_source`.
        loaded: the dataset :func:`load_image_source` returned for these arguments, if already loaded.

    Returns:
        ``{"dataset", "kind", "split", "image_column", "label_column", "max_samples", "fingerprint"}`` where
        ``dataset`` is a local folder's name, the Hub repository id, ``"digits"`` or ``"in-memory dataset"`` and
        ``kind`` is ``"local folder"``, ``"hub"``, ``"digits"`` or ``"in-memory"``.
    """
    if isinstance(dataset, (str, os.PathLike)):
        kind, value = _resolve_name(dataset)
        if kind == "local folder":
            name, fingerprint = value.resolve().name, _folder_fingerprint(value)
        elif kind == "digits":
            name, fingerprint = DIGITS_DATASET, digits_fingerprint()
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
        "max_samples": max_samples,
        "fingerprint": fingerprint,
    }
