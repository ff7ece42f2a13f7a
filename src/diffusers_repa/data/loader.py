"""Training loader over a latent cache: whole batches gathered from Arrow; order, flips and the caption drawn per
sample fixed by (seed, epoch)."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

__all__ = ["EpochBatchSampler", "LatentCacheBatches", "SeededEpochSampler", "make_train_dataloader"]

_LATENT_COLUMNS = ("latent_mean", "latent_std")
_OTHER_COLUMNS = ("label", "caption")  # text_features are read apart (see _RaggedBlocks)


class SeededEpochSampler(Sampler[int]):
    """Dataset indices in an order that depends only on ``(seed, epoch)``: a permutation, or ``0..n-1``.

    ``set_epoch`` selects the epoch (``accelerate``'s prepared loaders call it at every ``__iter__``);
    :class:`EpochBatchSampler` also advances it after each complete pass.
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0):
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)

    def __iter__(self):
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.num_samples


class EpochBatchSampler(BatchSampler):
    """Batches of ``(index, flip)`` pairs, or with ``draw_captions`` ``(index, flip, draw)`` triples; order and flips
    depend only on the sampler's ``(seed, epoch)``, the draw (uniform in [0, 1), which picks one of the sample's
    captions) only on ``(seed, epoch, index)``.

    Flips and draws are made here, not in the workers, so a resumed run (``accelerate.skip_first_batches``) sees the
    same flips and captions as an uninterrupted one.
    """

    def __init__(
        self,
        sampler: SeededEpochSampler,
        batch_size: int,
        drop_last: bool,
        hflip: bool = False,
        draw_captions: bool = False,
    ):
        super().__init__(sampler, batch_size, drop_last)
        self.hflip = hflip
        self.draw_captions = draw_captions

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        sampler = self.sampler
        order = sampler.order().tolist()
        if self.hflip:
            flips = (np.random.default_rng([sampler.seed, sampler.epoch, 1]).random(len(order)) < 0.5).tolist()
        else:
            flips = [False] * len(order)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        if self.draw_captions:
            # Indexed by the sample, not by its position in the order: the caption depends on (seed, epoch, index).
            draws = np.random.default_rng([sampler.seed, sampler.epoch, 2]).random(sampler.num_samples)
            columns = (order, flips, draws[order].tolist())
        else:
            columns = (order, flips)
        for start in range(0, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            yield list(zip(*(column[start:end] for column in columns)))
        sampler.set_epoch(sampler.epoch + 1)


def _fixed_shape_column(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """A column of a fixed-shape ``datasets`` array feature as one new numpy array (rows, *shape).

    Each chunk is viewed without copying (list arrays flatten to their value buffer); the only copy is the final
    concatenation, which also makes the result writable for ``torch.from_numpy``.
    """
    parts = []
    for chunk in column.chunks:
        values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        while (
            pa.types.is_list(values.type)
            or pa.types.is_large_list(values.type)
            or pa.types.is_fixed_size_list(values.type)
        ):
            values = values.flatten()
        parts.append(values.to_numpy(zero_copy_only=False).reshape(-1, *shape))
    return np.concatenate(parts) if parts else np.empty((0, *shape))


class _RaggedBlocks:
    """Memory-mapped view of a column whose rows hold a varying number of ``shape`` blocks (a ``datasets`` array
    feature with a ``None`` first dimension, such as ``text_features``): block ``k`` of row ``i`` is read without
    copying the row's other blocks (an Arrow ``take`` would copy all of them, five captions where one is drawn)."""

    def __init__(self, dataset: datasets.Dataset, column: str, shape: tuple[int, ...]):
        self.blocks, chunk_of_row, first_of_row = [], [], []
        for chunk in dataset.data.column(column).chunks:
            rows = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            counts = rows.value_lengths().to_numpy()
            # flatten() honours the chunk's slice offset; the inner levels are the block's own lists.
            values = rows.flatten()
            while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
                values = values.flatten()
            chunk_of_row.append(np.full(len(counts), len(self.blocks)))
            first_of_row.append(np.cumsum(counts) - counts)
            # A view of the memory-mapped file: a copy would hold every caption's features in memory.
            self.blocks.append(values.to_numpy(zero_copy_only=True).reshape(-1, *shape))
        self.chunk_of_row = np.concatenate(chunk_of_row)
        self.first_of_row = np.concatenate(first_of_row)
        # A selected or shuffled dataset maps its row numbers to the table's through an indices table.
        self.table_row = None if dataset._indices is None else dataset._indices.column(0).to_numpy()

    def pick(self, rows: list[int], picks: list[int]) -> np.ndarray:
        """Block ``picks[i]`` of row ``rows[i]``, as one new array (len(rows), *shape)."""
        rows = np.asarray(rows) if self.table_row is None else self.table_row[rows]
        chunks, firsts = self.chunk_of_row[rows], self.first_of_row[rows]
        return np.stack([self.blocks[c][first + k] for c, first, k in zip(chunks, firsts, picks)])


class LatentCacheBatches(torch.utils.data.Dataset):
    """Map-style view of a latent cache that fetches a whole batch with one Arrow ``take``.

    ``__getitems__`` takes the ``(index, flip)`` pairs (or ``(index, flip, draw)`` triples) of
    :class:`EpochBatchSampler` and returns ``image`` uint8 (B, 3, R, R), ``latent_mean`` / ``latent_std`` float32
    (B, C, h, w), ``label`` int64 (B,); a pixel-space cache has no latent columns. A caption cache adds ``caption``,
    a list of B strings: caption ``floor(draw · n)`` of the sample's n captions (the first without a draw), and, when
    the cache holds text features, that caption's ``text_features`` float32 (B, L, D); ``label`` only if the cache
    has labels. A flip mirrors the pixel crop and both latent moments along the width. The cache was encoded from
    the unflipped crop, so the flipped moments are only approximately the posterior of the flipped crop (the VAE is
    not exactly flip-equivariant); the original REPA trains without flips, hence the default ``hflip=False``.
    """

    def __init__(self, dataset: datasets.Dataset):
        latents = [name for name in _LATENT_COLUMNS if name in dataset.column_names]
        self.has_captions = "caption" in dataset.column_names
        required = ("image",) if self.has_captions else ("image", "label")
        missing = [name for name in required if name not in dataset.column_names]
        if latents and len(latents) < len(_LATENT_COLUMNS):
            missing += [name for name in _LATENT_COLUMNS if name not in latents]
        if missing:
            raise ValueError(
                f"Not a latent cache: columns {missing} are missing (has {dataset.column_names}); "
                "open caches with diffusers_repa.data.load_latent_cache."
            )
        self._array_columns = ("image", *latents)
        self._shapes = {name: tuple(dataset.features[name].shape) for name in self._array_columns}
        self._has_labels = "label" in dataset.column_names
        self._has_text_features = self.has_captions and "text_features" in dataset.column_names
        self._dataset = dataset
        self._text_features = None  # a _RaggedBlocks, made in the process that reads (views are not pickled)
        columns = [*self._array_columns, *(name for name in _OTHER_COLUMNS if name in dataset.column_names)]
        self._table_view = dataset.with_format("arrow", columns=columns)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy; the memory-mapped views are rebuilt there rather than pickled as data.
        return {**self.__dict__, "_text_features": None}

    def __len__(self) -> int:
        return len(self._table_view)

    def __getitems__(self, batch: list[tuple[int, bool] | tuple[int, bool, float]]) -> dict[str, Any]:
        indices = [item[0] for item in batch]
        table = self._table_view[indices]
        samples = {
            name: torch.from_numpy(_fixed_shape_column(table[name], self._shapes[name]))
            for name in self._array_columns
        }
        if self._has_labels:
            samples["label"] = torch.from_numpy(table["label"].to_numpy()).to(torch.int64)
        flips = torch.tensor([item[1] for item in batch], dtype=torch.bool)
        if flips.any():
            mask = flips.view(-1, 1, 1, 1)
            for name in self._array_columns:
                samples[name] = torch.where(mask, samples[name].flip(-1), samples[name])
        if self.has_captions:
            captions = table["caption"].to_pylist()
            draws = [item[2] if len(item) > 2 else 0.0 for item in batch]
            # min(): a draw just below 1 must not round up to n.
            picks = [min(int(draw * len(row)), len(row) - 1) for draw, row in zip(draws, captions)]
            samples["caption"] = [row[pick] for row, pick in zip(captions, picks)]
            if self._has_text_features:
                if self._text_features is None:
                    shape = tuple(self._dataset.features["text_features"].shape[1:])
                    self._text_features = _RaggedBlocks(self._dataset, "text_features", shape)
                features = self._text_features.pick(indices, picks)
                samples["text_features"] = torch.from_numpy(features).float()
        return samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: value[0] for name, value in self.__getitems__([(index, False)]).items()}


def _batch_as_is(batch: dict[str, Any]) -> dict[str, Any]:
    # __getitems__ already returns the collated batch.
    return batch


def make_train_dataloader(
    dataset: datasets.Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    hflip: bool = False,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """A torch ``DataLoader`` over a latent cache (from :func:`load_latent_cache`), batch by batch.

    Each batch is a dict: ``image`` uint8 (B, 3, R, R), ``latent_mean`` and ``latent_std`` float32 (B, C, h, w)
    (not in a pixel-space cache), ``label`` int64 (B,) (in a caption cache only if it has labels). A caption cache
    adds ``caption`` (a list of B strings, one of each sample's captions drawn uniformly) and, when it holds text
    features, ``text_features`` float32 (B, L, D) of that caption. The caption drawn for a sample depends only on
    ``(seed, epoch, sample index)``. The sample order (and the flips, when ``hflip``) depend only on ``(seed, epoch)``: ``loader.batch_sampler.set_epoch(epoch)`` selects the epoch, and after
    ``accelerator.prepare`` the prepared loader's ``set_epoch`` forwards to it (it is also called at each
    ``__iter__`` with accelerate's own iteration count). The epoch also advances by itself after each complete
    pass. To resume mid-epoch, call ``set_epoch(epoch)`` on the prepared loader, then iterate
    ``accelerator.skip_first_batches(loader, n)``; call ``set_epoch`` again at the start of every later epoch,
    since the skipping loader does not forward it.

    With ``accelerator.prepare`` each process gets every ``num_processes``-th batch (``batch_size`` is per
    process). ``hflip`` mirrors image and latent moments together (see :class:`LatentCacheBatches`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    batches = LatentCacheBatches(dataset)
    if drop_last and len(batches) < batch_size:
        raise ValueError(
            f"The cache has {len(batches)} samples, fewer than one batch of {batch_size} with drop_last=True; "
            "lower the batch size or pass drop_last=False."
        )
    sampler = SeededEpochSampler(len(batches), shuffle=shuffle, seed=seed)
    batch_sampler = EpochBatchSampler(sampler, batch_size, drop_last, hflip=hflip, draw_captions=batches.has_captions)
    return DataLoader(
        batches,
        batch_sampler=batch_sampler,
        collate_fn=_batch_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # Each new iterator draws a base seed from this generator; without one it would draw from the global RNG
        # (which also drives label dropout), so a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
