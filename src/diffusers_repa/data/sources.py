"""Image-classification sources: ImageNet-1k on the Hub, any Hub dataset, a local image folder, or a dataset object."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

__all__ = ["IMAGENET_1K_REPO_ID", "load_image_source"]

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
            optionally inside ``train/``, ``validation/``, ...), or an in-memory ``Dataset`` / ``IterableDataset`` /
            ``DatasetDict``.
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
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise ValueError(f"Split '{split}' not found; available splits: {sorted(dataset)}.")
        dataset = dataset[split]
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset).expanduser()
        if path.is_dir():
            source = datasets.load_dataset(
                "imagefolder", data_dir=str(path), split=split, streaming=streaming, **load_kwargs
            )
        elif path.exists():
            raise ValueError(f"{path} is a file; pass a directory of class sub-folders or a Hub dataset id.")
        else:
            repo_id = _DATASET_ALIASES.get(str(dataset), str(dataset))
            source = _load_hub_dataset(repo_id, split, streaming, **load_kwargs)
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
