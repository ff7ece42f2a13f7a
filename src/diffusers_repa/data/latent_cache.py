"""VAE latent cache: ADM crops encoded once, stored as sharded Arrow files with the VAE posterior moments.

Layout of a cache directory::

    cache_info.json          LatentCacheInfo (VAE id, resolution, scaling factor, classes, shard list, ...)
    skipped_images.json      unreadable / truncated source images: [{"shard", "index", "path", "error"}, ...];
                             index is the source row (when streaming: the row within the process's stream)
    README.md                dataset card, so the folder can be pushed to the Hub as a dataset
    data/<split>-*.arrow     shards; columns image uint8 (3,R,R), latent_mean / latent_std float32 (C,h,w), label
    .build/                  resume bookkeeping (build settings, one record per finished shard); not published

Each shard covers a fixed range of source rows, so a killed job resumes by skipping the shards whose ``.arrow``
file exists (written to a temporary file, then renamed). With ``accelerate launch`` every process encodes its
own subset of shards (shard ``g`` goes to process ``g % num_processes``; any process count can resume). A streamed
source is split between processes with ``datasets.distributed.split_dataset_by_node`` and each process numbers its
own shards, so a streamed job resumes with the same number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from datasets.arrow_writer import ArrowWriter
from datasets.distributed import split_dataset_by_node
from diffusers import AutoencoderKL
from huggingface_hub import DatasetCard, DatasetCardData, create_repo, snapshot_download, upload_folder
from tqdm.auto import tqdm

from .preprocessing import center_crop_imagenet, decode_image
from .sources import load_image_source

__all__ = [
    "CACHE_INFO_FILE",
    "DEFAULT_VAE",
    "SKIPPED_REPORT_FILE",
    "LatentCacheInfo",
    "build_latent_cache",
    "load_latent_cache",
    "push_latent_cache_to_hub",
    "read_cache_info",
]

logger = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
CACHE_INFO_FILE = "cache_info.json"
SKIPPED_REPORT_FILE = "skipped_images.json"
DATA_DIR = "data"
_BUILD_DIR = ".build"
_SETTINGS_FILE = "settings.json"
_FORMAT_VERSION = 1
_AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LatentCacheInfo:
    """Metadata of a latent cache (``cache_info.json``).

    Training latents are ``z = (latent_mean + latent_std * eps) * scaling_factor`` (minus ``shift_factor`` first
    when the VAE has one), re-sampled every step.
    """

    vae: str | None
    resolution: int
    scaling_factor: float
    shift_factor: float | None
    latent_channels: int
    latent_size: int
    num_classes: int
    id2label: dict[int, str] | None
    num_samples: int
    num_skipped: int = 0
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    format_version: int = _FORMAT_VERSION

    def to_json(self) -> str:
        payload = asdict(self)
        if self.id2label is not None:
            payload["id2label"] = {str(key): name for key, name in self.id2label.items()}
        return json.dumps(payload, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LatentCacheInfo:
        payload = json.loads(text)
        if payload.get("id2label") is not None:
            payload["id2label"] = {int(key): name for key, name in payload["id2label"].items()}
        return cls(**payload)


def _atomic_write_text(path: Path, text: str) -> None:
    """Writes through a temporary file in the same directory, so readers never see a partial file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def _resolve_cache_dir(path: str | os.PathLike, allow_patterns: list[str] | None = None, **hub_kwargs) -> Path:
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).count("/") != 1:
        raise FileNotFoundError(f"{path} is neither a latent-cache directory nor a Hub dataset id ('user/name').")
    return Path(snapshot_download(str(path), repo_type="dataset", allow_patterns=allow_patterns, **hub_kwargs))


def read_cache_info(path: str | os.PathLike, **hub_kwargs) -> LatentCacheInfo:
    """Reads ``cache_info.json`` of a finished cache (a local directory or a Hub dataset id)."""
    cache_dir = _resolve_cache_dir(path, allow_patterns=[CACHE_INFO_FILE], **hub_kwargs)
    info_file = cache_dir / CACHE_INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(
            f"{info_file} is missing: {cache_dir} is not a finished latent cache. Run (or resume) "
            "`training/prepare_dataset.py --output_dir` on it until it completes."
        )
    return LatentCacheInfo.from_json(info_file.read_text())


def load_latent_cache(path: str | os.PathLike, **hub_kwargs) -> datasets.Dataset:
    """Opens a finished cache (local directory or Hub dataset id) as one memory-mapped ``datasets.Dataset``.

    Columns: ``image`` (3, R, R), ``latent_mean`` and ``latent_std`` (C, h, w) float32, ``label`` int64. The
    dataset is in torch format; note that ``datasets`` widens integer arrays to int64 there, while
    :func:`~diffusers_repa.data.make_train_dataloader` reads the Arrow buffers directly and keeps images uint8.
    """
    cache_dir = _resolve_cache_dir(path, **hub_kwargs)
    info = read_cache_info(cache_dir)
    shards = [datasets.Dataset.from_file(str(cache_dir / shard)) for shard in info.shards]
    if not shards:
        raise ValueError(f"The latent cache at {cache_dir} lists no shards in {CACHE_INFO_FILE}.")
    dataset = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    return dataset.with_format("torch")


def push_latent_cache_to_hub(
    cache_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Uploads a finished cache (shards, ``cache_info.json``, skip report, card) as a Hub dataset; returns its URL."""
    cache_dir = Path(cache_dir)
    info = read_cache_info(cache_dir)
    repo_url = create_repo(repo_id, repo_type="dataset", private=private, token=token, exist_ok=True)
    upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(cache_dir),
        allow_patterns=[CACHE_INFO_FILE, SKIPPED_REPORT_FILE, "README.md", f"{DATA_DIR}/*.arrow"],
        commit_message=commit_message or f"Latent cache: {info.num_samples} samples at {info.resolution}px",
        token=token,
    )
    return str(repo_url)


def _load_vae(vae: AutoencoderKL | str | os.PathLike) -> tuple[AutoencoderKL, str | None]:
    if isinstance(vae, AutoencoderKL):
        return vae, vae.config.get("_name_or_path")
    return AutoencoderKL.from_pretrained(str(vae)), _describe_location(vae)


def _describe_location(name_or_path: str | os.PathLike) -> str:
    """Hub ids as given, local directories as absolute paths (what cache_info.json records)."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def _cache_features(
    resolution: int, latent_channels: int, latent_size: int, label_feature: Any | None
) -> datasets.Features:
    latent_shape = (latent_channels, latent_size, latent_size)
    label = label_feature if isinstance(label_feature, datasets.ClassLabel) else datasets.Value("int64")
    return datasets.Features(
        {
            "image": datasets.Array3D((3, resolution, resolution), "uint8"),
            "latent_mean": datasets.Array3D(latent_shape, "float32"),
            "latent_std": datasets.Array3D(latent_shape, "float32"),
            "label": label,
        }
    )


def _crop_or_error(value: Any, resolution: int) -> tuple[np.ndarray | None, str | None]:
    """ADM crop of one raw image value, CHW; or the error that made it unreadable."""
    try:
        return center_crop_imagenet(decode_image(value), resolution).transpose(2, 0, 1), None
    # Any failure of one image (PIL raises OSError, SyntaxError, ValueError, struct.error, ... on corrupt data)
    # must only skip that image, never stop a job of a million images.
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


def _image_path(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    return str(value) if isinstance(value, (str, os.PathLike)) else None


@dataclass
class _ShardJob:
    """One output shard: ``rows`` of the source (dict of columns, raw image values) starting at ``first_index``."""

    name: str
    first_index: int
    rows: dict[str, list]


class _ShardEncoder:
    """Decodes, crops and VAE-encodes one shard at a time, writing it atomically."""

    def __init__(
        self,
        vae: AutoencoderKL,
        features: datasets.Features,
        output_dir: Path,
        resolution: int,
        batch_size: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        executor: Executor | None,
        progress: tqdm,
    ):
        self.vae = vae
        self.features = features
        self.output_dir = output_dir
        self.resolution = resolution
        self.batch_size = batch_size
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.executor = executor
        self.progress = progress

    def _crops(self, images: list) -> Iterator[list[tuple[np.ndarray | None, str | None]]]:
        """Crops per batch; with threads the next batch is decoded while the current one is encoded."""
        batches = [images[start : start + self.batch_size] for start in range(0, len(images), self.batch_size)]
        if self.executor is None:
            for batch in batches:
                yield [_crop_or_error(value, self.resolution) for value in batch]
            return
        pending = None
        for batch in batches:
            submitted = [self.executor.submit(_crop_or_error, value, self.resolution) for value in batch]
            if pending is not None:
                yield [future.result() for future in pending]
            pending = submitted
        if pending is not None:
            yield [future.result() for future in pending]

    @torch.no_grad()
    def _encode(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std of uint8 crops (B, 3, R, R), scaled to [-1, 1] as x / 127.5 - 1 like the original."""
        pixels = torch.from_numpy(crops).to(self.device, torch.float32) / 127.5 - 1.0
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean.float().cpu().numpy(), posterior.std.float().cpu().numpy()

    def encode_shard(self, job: _ShardJob) -> None:
        shard_file = self.output_dir / DATA_DIR / f"{job.name}.arrow"
        temp_file = shard_file.with_name(f".{shard_file.name}.{os.getpid()}.tmp")
        images, labels = job.rows["image"], job.rows["label"]
        skipped, num_samples, max_label, position = [], 0, -1, 0
        writer = ArrowWriter(features=self.features, path=str(temp_file))
        try:
            for results in self._crops(images):
                kept_crops, kept_labels = [], []
                for crop, error in results:
                    index = job.first_index + position
                    if crop is None:
                        path = _image_path(images[position])
                        logger.warning("Skipping unreadable image %d (%s): %s", index, path, error)
                        skipped.append({"shard": job.name, "index": index, "path": path, "error": error})
                    else:
                        label = labels[position]
                        if label is None or int(label) < 0:
                            raise ValueError(
                                f"Row {index} has label {label!r}: this split carries no class labels "
                                "(e.g. the ImageNet test split); use a labelled split."
                            )
                        kept_crops.append(crop)
                        kept_labels.append(int(label))
                    position += 1
                    self.progress.update(1)
                if kept_crops:
                    crops = np.stack(kept_crops)
                    mean, std = self._encode(crops)
                    writer.write_batch({"image": crops, "latent_mean": mean, "latent_std": std, "label": kept_labels})
                    num_samples += len(kept_crops)
                    max_label = max(max_label, *kept_labels)
            writer.finalize()
        finally:
            writer.close()
        record = {"name": job.name, "file": f"{DATA_DIR}/{shard_file.name}", "num_samples": num_samples}
        record.update(max_label=max_label, skipped=skipped)
        # The record goes first: an existing .arrow file is what marks the shard finished.
        _atomic_write_text(self.output_dir / _BUILD_DIR / f"{job.name}.json", json.dumps(record) + "\n")
        os.replace(temp_file, shard_file)


def _shard_done(output_dir: Path, name: str) -> bool:
    return (output_dir / DATA_DIR / f"{name}.arrow").is_file()


def _map_style_shard_names(split: str, num_rows: int, shard_size: int) -> list[str]:
    num_shards = max(1, math.ceil(num_rows / shard_size))
    return [f"{split}-{index:05d}-of-{num_shards:05d}" for index in range(num_shards)]


def _stream_prefix(split: str, process_index: int, num_processes: int) -> str:
    return f"{split}-p{process_index:03d}of{num_processes:03d}"


def _map_style_jobs(
    dataset: datasets.Dataset, split: str, shard_size: int, output_dir: Path, state: PartialState
) -> tuple[Iterator[_ShardJob], int]:
    """This process's unfinished shards (``g % num_processes == process_index``) and their number of rows."""
    names = _map_style_shard_names(split, len(dataset), shard_size)
    todo = [
        index
        for index in range(state.process_index, len(names), state.num_processes)
        if not _shard_done(output_dir, names[index])
    ]
    total = sum(min(shard_size, len(dataset) - index * shard_size) for index in todo)
    jobs = (
        _ShardJob(names[index], index * shard_size, dataset[index * shard_size : (index + 1) * shard_size])
        for index in todo
    )
    return jobs, total


def _stream_jobs(
    dataset: datasets.IterableDataset,
    split: str,
    shard_size: int,
    output_dir: Path,
    state: PartialState,
    max_samples: int | None,
) -> tuple[Iterator[_ShardJob], int | None]:
    """Shards of this process's part of the stream, after the ones already finished; rows left if known.

    A marker file records that the part was read to its end (the number of shards is unknown before).
    """
    prefix = _stream_prefix(split, state.process_index, state.num_processes)
    done_marker = output_dir / _BUILD_DIR / f"{prefix}.done"
    finished = 0
    while _shard_done(output_dir, f"{prefix}-{finished:05d}"):
        finished += 1
    split_info = (dataset.info.splits or {}).get(split) if dataset.info is not None else None
    known_rows = max_samples or (split_info.num_examples if split_info is not None else None)
    total = None
    if known_rows and not done_marker.exists():
        total = max(0, math.ceil(known_rows / state.num_processes) - finished * shard_size)
    stream = dataset
    if state.num_processes > 1:
        stream = split_dataset_by_node(stream, state.process_index, state.num_processes)

    def jobs() -> Iterator[_ShardJob]:
        if done_marker.exists():
            return
        shard_index = finished
        for rows in stream.skip(finished * shard_size).iter(batch_size=shard_size):
            yield _ShardJob(f"{prefix}-{shard_index:05d}", shard_index * shard_size, rows)
            shard_index += 1
        _atomic_write_text(done_marker, json.dumps({"num_shards": shard_index}) + "\n")

    return jobs(), total


def _finished_stream_shard_names(output_dir: Path, split: str, num_processes: int) -> list[str]:
    prefixes = [_stream_prefix(split, rank, num_processes) for rank in range(num_processes)]
    unfinished = [prefix for prefix in prefixes if not (output_dir / _BUILD_DIR / f"{prefix}.done").exists()]
    if unfinished:
        raise RuntimeError(f"Streams {unfinished} did not finish; rerun with the same number of processes.")
    return sorted(path.stem for prefix in prefixes for path in (output_dir / DATA_DIR).glob(f"{prefix}-*.arrow"))


def _check_build_settings(output_dir: Path, settings: dict[str, Any], state: PartialState) -> None:
    """Records the settings on the first run; a resumed run must use the same ones."""
    settings_file = output_dir / _BUILD_DIR / _SETTINGS_FILE
    if state.is_main_process:
        (output_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
        (output_dir / _BUILD_DIR).mkdir(exist_ok=True)
        if not settings_file.exists():
            _atomic_write_text(settings_file, json.dumps(settings, indent=2) + "\n")
        # Leftovers of killed writers; nobody is writing yet.
        for stale in [*(output_dir / DATA_DIR).glob(".*.tmp"), *(output_dir / _BUILD_DIR).glob(".*.tmp")]:
            stale.unlink()
    state.wait_for_everyone()
    recorded = json.loads(settings_file.read_text())
    if recorded != settings:
        changed = {key: (recorded.get(key), settings.get(key)) for key in settings.keys() | recorded.keys()}
        changed = {key: values for key, values in changed.items() if values[0] != values[1]}
        raise ValueError(
            f"{output_dir} holds a latent cache built with other settings (recorded -> requested: {changed}). "
            "Resume with the same settings, or choose a new --output_dir."
        )


def _write_dataset_card(output_dir: Path, info: LatentCacheInfo) -> None:
    card_data = DatasetCardData(
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.arrow"}]}],
        tags=["repa", "latent-cache", "diffusers"],
    )
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# Latent cache for REPA / SiT training\n\n"
        f"{info.num_samples} images from `{info.source.get('dataset')}` (split `{info.source.get('split')}`), "
        f"ADM center crop at {info.resolution}x{info.resolution}, encoded with the VAE `{info.vae}` "
        f"(scaling factor {info.scaling_factor}). Each row holds the uint8 crop `image` (3, R, R), the VAE "
        "posterior `latent_mean` and `latent_std` (C, h, w) and the class `label`; "
        f"{info.num_skipped} unreadable source images are listed in `{SKIPPED_REPORT_FILE}`. "
        "Read it with `diffusers_repa.data.load_latent_cache`.\n"
    )
    _atomic_write_text(output_dir / "README.md", DatasetCard(content).content)


def _finalize(
    output_dir: Path,
    shard_names: list[str],
    vae_model: AutoencoderKL,
    base_info: dict[str, Any],
    class_names: list[str] | None,
) -> LatentCacheInfo:
    """Gathers the shard records into ``cache_info.json`` and the skip report (main process, all shards done)."""
    missing = [name for name in shard_names if not _shard_done(output_dir, name)]
    if missing:
        raise RuntimeError(f"{len(missing)} shards are not finished (first: {missing[0]}); rerun to resume the job.")
    records = [json.loads((output_dir / _BUILD_DIR / f"{name}.json").read_text()) for name in shard_names]
    skipped = [entry for record in records for entry in record["skipped"]]
    num_samples = sum(record["num_samples"] for record in records)
    if num_samples == 0:
        raise ValueError(f"No readable image in the source; see {output_dir / SKIPPED_REPORT_FILE}.")
    if class_names is not None:
        num_classes, id2label = len(class_names), dict(enumerate(class_names))
    else:
        num_classes, id2label = max(record["max_label"] for record in records) + 1, None
    config = vae_model.config
    info = LatentCacheInfo(
        **base_info,
        scaling_factor=float(config.scaling_factor),
        shift_factor=None if config.get("shift_factor") is None else float(config.shift_factor),
        latents_mean=None if config.get("latents_mean") is None else [float(v) for v in config.latents_mean],
        latents_std=None if config.get("latents_std") is None else [float(v) for v in config.latents_std],
        num_classes=num_classes,
        id2label=id2label,
        num_samples=num_samples,
        num_skipped=len(skipped),
        shards=[record["file"] for record in records],
    )
    _atomic_write_text(output_dir / SKIPPED_REPORT_FILE, json.dumps(skipped, indent=2) + "\n")
    _write_dataset_card(output_dir, info)
    _atomic_write_text(output_dir / CACHE_INFO_FILE, info.to_json())
    return info


def build_latent_cache(
    source: datasets.Dataset | datasets.IterableDataset | str | os.PathLike,
    output_dir: str | os.PathLike,
    vae: AutoencoderKL | str | os.PathLike,
    resolution: int,
    *,
    batch_size: int = 64,
    shard_size: int | None = None,
    num_shards: int | None = None,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    streaming: bool = False,
    max_samples: int | None = None,
    num_workers: int = 4,
    mixed_precision: str = "no",
    show_progress: bool = True,
) -> Path:
    """Center-crops every source image (ADM), encodes it once with the VAE and writes a sharded latent cache.

    Works the same in one process or under ``accelerate launch`` (each process encodes the shards
    ``g % num_processes == process_index`` on its own device). Resumable: finished shards are kept and skipped,
    so rerunning the same command after a crash continues the job. Unreadable or truncated images are skipped,
    logged and listed in ``skipped_images.json``. See the module docstring for the layout.

    Args:
        source: a dataset object or a name for :func:`~diffusers_repa.data.load_image_source`
            (``"imagenet-1k"``, a Hub id, a local image folder).
        output_dir: cache directory (created; reused to resume).
        vae: an ``AutoencoderKL`` or its Hub id / local path (e.g. ``stabilityai/sd-vae-ft-mse``, the default of
            the CLI and of the original). Moved to the process's device.
        resolution: crop side in pixels; a multiple of the VAE's downsampling factor (the CLI allows 256 and 512).
        batch_size: images per VAE forward pass.
        shard_size / num_shards: rows of the source per shard (default 1024), or the number of shards instead
            (map-style sources only). At most one of them.
        split, image_column, label_column, streaming, max_samples: see ``load_image_source``. With streaming,
            each process reads its part of the stream (``datasets.distributed.split_dataset_by_node``); resume
            then needs the same number of processes.
        num_workers: threads decoding and cropping images while the VAE runs (0: in the main thread).
        mixed_precision: ``"no"`` (float32, as the original), ``"fp16"`` or ``"bf16"`` autocast for the encoder.
        show_progress: tqdm bar with ETA on the local main process.

    Returns:
        ``output_dir`` as a ``Path``; read it with :func:`load_latent_cache` / :func:`read_cache_info`.
    """
    if mixed_precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"mixed_precision must be one of {sorted(_AUTOCAST_DTYPES)}, got {mixed_precision!r}.")
    if batch_size <= 0 or num_workers < 0:
        raise ValueError(f"batch_size must be positive and num_workers >= 0 (got {batch_size}, {num_workers}).")
    if shard_size is not None and num_shards is not None:
        raise ValueError("Pass either shard_size or num_shards, not both.")
    # Like Accelerator: `accelerate launch --cpu` (ACCELERATE_USE_CPU) makes several CPU processes one gloo group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    source_name = _describe_location(source) if isinstance(source, (str, os.PathLike)) else None
    dataset = load_image_source(source, split, image_column, label_column, streaming, max_samples=max_samples)
    is_map_style = isinstance(dataset, datasets.Dataset)
    if num_shards is not None:
        if not is_map_style or num_shards <= 0:
            raise ValueError("num_shards needs a positive value and a non-streaming source; use shard_size.")
        shard_size = max(1, math.ceil(len(dataset) / num_shards))
    shard_size = shard_size or 1024
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")

    vae_model, vae_id = _load_vae(vae)
    downsample = 2 ** (len(vae_model.config.block_out_channels) - 1)
    if not isinstance(resolution, int) or resolution <= 0 or resolution % downsample:
        raise ValueError(
            f"resolution must be a positive multiple of the VAE's downsampling factor {downsample}, got {resolution}."
        )
    vae_model = vae_model.to(state.device).eval().requires_grad_(False)
    features = dataset.features
    label_feature = features.get("label") if features is not None else None
    class_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    latent_size = resolution // downsample
    cache_features = _cache_features(resolution, vae_model.config.latent_channels, latent_size, label_feature)
    if features is not None and isinstance(features.get("image"), datasets.Image):
        # Decode ourselves: a corrupt file must be skipped, not raise inside datasets' iterator.
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    output_dir = Path(output_dir)
    source_info = {"dataset": source_name or "in-memory dataset", "split": split}
    settings = {
        "format_version": _FORMAT_VERSION,
        "source": source_info,
        "num_rows": len(dataset) if is_map_style else None,
        "streaming_processes": None if is_map_style else state.num_processes,
        "vae": vae_id,
        "resolution": resolution,
        "shard_size": shard_size,
        "mixed_precision": mixed_precision,
    }
    _check_build_settings(output_dir, settings, state)

    if is_map_style:
        jobs, total = _map_style_jobs(dataset, split, shard_size, output_dir, state)
    else:
        jobs, total = _stream_jobs(dataset, split, shard_size, output_dir, state, max_samples)
    progress = tqdm(
        total=total,
        unit="img",
        desc=f"Encoding {split} at {resolution}px",
        disable=not (show_progress and state.is_local_main_process),
    )
    executor = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        encoder = _ShardEncoder(
            vae_model,
            cache_features,
            output_dir,
            resolution,
            batch_size,
            state.device,
            _AUTOCAST_DTYPES[mixed_precision],
            executor,
            progress,
        )
        for job in jobs:
            encoder.encode_shard(job)
    finally:
        progress.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    state.wait_for_everyone()

    if state.is_main_process:
        if is_map_style:
            shard_names = _map_style_shard_names(split, len(dataset), shard_size)
        else:
            shard_names = _finished_stream_shard_names(output_dir, split, state.num_processes)
        base_info = {
            "vae": vae_id,
            "resolution": resolution,
            "latent_channels": int(vae_model.config.latent_channels),
            "latent_size": latent_size,
            "source": {**source_info, "image_column": image_column, "label_column": label_column},
        }
        _finalize(output_dir, shard_names, vae_model, base_info, class_names)
    state.wait_for_everyone()
    return output_dir
