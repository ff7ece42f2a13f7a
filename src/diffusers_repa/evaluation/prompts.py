"""Prompts of text-to-image sampling and evaluation: read from a text file or a captions dataset (e.g. COCO val
captions, the original REPA MMDiT protocol), and read back next to the samples they produced, so that the CLIP
score pairs every image with its own prompt.

[`generate_samples`](generate.py) writes ``prompts.json`` (a JSON list, entry i the prompt of ``{i:06d}.png``) into
the sample folder and a ``prompts`` string array into the packed ``.npz``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .image_io import npz_keys

PROMPTS_NAME = "prompts.json"
NPZ_PROMPTS_KEY = "prompts"


def check_prompts(prompts: Sequence[str], source: str = "prompts") -> list[str]:
    """``prompts`` as a list of strings; a ValueError for an empty list or a non-string entry (naming ``source``)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{source} holds no prompts.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{source}: prompt {index} is a {type(prompt).__name__}, not a string: {prompt!r}.")
    return prompts


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a file: a ``.json`` list of strings, or text with one prompt per line (stripped; blank lines are
    skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompts file {path} does not exist.")
    if path.suffix == ".json":
        prompts = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(prompts, list):
            raise ValueError(f"{path} must hold a JSON list of prompts, got a {type(prompts).__name__}.")
        return check_prompts(prompts, str(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    return check_prompts([line.strip() for line in lines if line.strip()], str(path))


def load_dataset_captions(
    dataset: str | os.PathLike,
    caption_column: str = "caption",
    split: str | None = None,
    max_rows: int | None = None,
    **load_kwargs,
) -> list[str]:
    """The captions of a dataset, in its row order: a Hub id, a local folder of data files (``.jsonl``, ``.csv``,
    ``.parquet``, ...), an image folder with a ``metadata.jsonl`` (or ``.csv``, ``.parquet``: read alone, as
    `prepare_coco.py` writes it) or a folder written by ``save_to_disk``.

    A row whose caption column holds a list (COCO's five captions per image) contributes its first caption, so every
    image of a split gives one prompt. Captions are stripped of surrounding white space.

    Args:
        dataset: Hub dataset id or local folder.
        caption_column: the column holding the captions.
        split: the split to read; by default the only one, else ``"validation"`` when there is one.
        max_rows: read only the first ``max_rows`` rows.
        **load_kwargs: passed to ``datasets.load_dataset`` (``revision``, ``cache_dir``, ``token``, ...).
    """
    import datasets

    path = Path(dataset).expanduser()
    metadata = [path / f"metadata.{suffix}" for suffix in ("jsonl", "csv", "parquet")] if path.is_dir() else []
    metadata = [file for file in metadata if file.is_file()]
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        splits = list(loaded) if isinstance(loaded, datasets.DatasetDict) else None
    elif metadata:  # an image folder with captions (e.g. prepare_coco.py's val2014/): its metadata, images unread
        builder = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[metadata[0].suffix]
        loaded, splits = datasets.load_dataset(builder, data_files=str(metadata[0]), split="train"), None
    else:
        loaded, splits = None, datasets.get_dataset_split_names(str(dataset), **load_kwargs)
    if splits is not None:
        if split is None:
            split = splits[0] if len(splits) == 1 else "validation" if "validation" in splits else None
            if split is None:
                raise ValueError(f"{dataset} has the splits {splits}; choose one with --captions_split.")
        if split not in splits:
            raise ValueError(f"{dataset} has no split {split!r}; its splits are {splits}.")
        loaded = (
            loaded[split] if loaded is not None else datasets.load_dataset(str(dataset), split=split, **load_kwargs)
        )
    if caption_column not in loaded.column_names:
        raise ValueError(
            f"{dataset} has no column {caption_column!r} (columns: {loaded.column_names}); choose it with "
            "--caption_column."
        )
    captions = loaded.select_columns([caption_column])
    if max_rows is not None:
        captions = captions.select(range(min(max_rows, len(captions))))
    rows = [value[0] if isinstance(value, list) and value else value for value in captions[caption_column]]
    return check_prompts([row.strip() if isinstance(row, str) else row for row in rows], f"{dataset}:{caption_column}")


def read_sample_prompts(samples: str | os.PathLike, prompts: str | os.PathLike | None = None) -> list[str]:
    """The prompt of every sample of a generated set, in sample order.

    From ``prompts`` when given (see [`read_prompts_file`]); else the ``prompts`` array of a samples ``.npz``, else
    ``prompts.json`` in the samples folder, or in the folder the ``.npz`` was packed from (``samples.npz`` →
    ``samples/``), as [`generate_samples`] writes them.
    """
    if prompts is not None:
        return read_prompts_file(prompts)
    samples = Path(samples)
    if samples.suffix == ".npz":
        if NPZ_PROMPTS_KEY in npz_keys(samples):
            with np.load(samples, allow_pickle=False) as stored:
                return check_prompts(stored[NPZ_PROMPTS_KEY].tolist(), f"{samples}:{NPZ_PROMPTS_KEY}")
        folder = samples.with_suffix("")
    else:
        folder = samples
    if not (folder / PROMPTS_NAME).is_file():
        raise FileNotFoundError(
            f"No prompts for {samples}: neither a '{NPZ_PROMPTS_KEY}' array in it nor {folder / PROMPTS_NAME}; "
            "pass the prompts file (one prompt per line, or a JSON list in sample order) with --prompts."
        )
    return read_prompts_file(folder / PROMPTS_NAME)
