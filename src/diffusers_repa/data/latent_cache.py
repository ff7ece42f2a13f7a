"""VAE latent cache: ADM crops encoded once, stored as sharded Arrow files with the VAE posterior moments.

Layout of a cache directory::

    cache_info.json          LatentCacheInfo (VAE, resolution, scaling factor, classes, source, shard list, ...)
    skipped_images.json      unreadable / truncated source images: [{"shard", "index", "path", "error"}, ...];
                             index is the source row (when streaming: the row within the process's stream), path
                             relative to a local source folder (only the file name for other local files)
    README.md                dataset card, so the folder can be pushed to the Hub as a dataset
    data/<split>-*.arrow     shards; columns image uint8 (3,R,R), latent_mean / latent_std float32 (C,h,w), label;
                             captioned data: caption (list of strings), label only if the source has labels, and
                             with a text encoder text_features float16 (num captions, L, D)
    empty_text_features.safetensors   captioned data with a text encoder: the empty caption's features (1, L, D)
    .build/                  resume bookkeeping (build settings, one record per finished shard); not published

A pixel-space cache (``vae=None`` or ``"none"``) stores only ``image`` and ``label``: no VAE is loaded and the
model trains on the pixels themselves (see :attr:`LatentCacheInfo.pixel_space`). A caption cache
(``caption_column``) keeps every caption of an image, in order; with ``text_encoder`` it also stores the CLIP token
features of each (:func:`~diffusers_repa.text_encoding.encode_text`, float16) and of the empty caption, the
unconditional context (:func:`load_empty_text_features`). Nothing that is published (``cache_info.json``, the card,
the skip report) holds an absolute path of the machine: a local VAE, text encoder or source folder is recorded by
its folder name, plus a content hash (VAE, text encoder) or fingerprint (source).

A cache never mixes sources: the build settings record a fingerprint of the source (see
:func:`~diffusers_repa.data.describe_source`) and resuming against a changed source is refused;
:func:`check_cache_source` does the same check cheaply for a finished cache that is about to be reused.

Each shard covers a fixed range of source rows, so a killed job resumes by skipping the shards whose ``.arrow``
file exists (written to a temporary file, then renamed). With ``accelerate launch`` every process encodes its
own subset of shards (shard ``g`` goes to process ``g % num_processes``; any process count can resume). A streamed
source is split between processes with ``datasets.distributed.split_dataset_by_node`` and each process numbers its
own shards, so a streamed job resumes with the same number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ..atomic_files import write_file_atomically, write_text_atomically
from ..models.tiny_text_encoder import save_tiny_clip, tiny_clip_path
from ..precision import autocast_dtype
from ..text_encoding import TINY_CLIP_NAME, encode_text, load_text_encoder
from .preprocessing import center_crop_imagenet, decode_image
from .sources import describe_source, load_image_source

__all__ = [
    "CACHE_INFO_FILE",
    "DEFAULT_VAE",
    "EMPTY_TEXT_FEATURES_FILE",
    "SKIPPED_REPORT_FILE",
    "LatentCacheInfo",
    "build_latent_cache",
    "cache_text_encoder_matches",
    "cache_vae_matches",
    "check_cache_source",
    "is_pixel_space_vae",
    "load_empty_text_features",
    "load_latent_cache",
    "push_latent_cache_to_hub",
    "read_cache_info",
]

logger = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
CACHE_INFO_FILE = "cache_info.json"
SKIPPED_REPORT_FILE = "skipped_images.json"
EMPTY_TEXT_FEATURES_FILE = "empty_text_features.safetensors"
_TEXT_FEATURES_KEY = "text_features"
DATA_DIR = "data"
_BUILD_DIR = ".build"
_SETTINGS_FILE = "settings.json"
# 2: portable VAE / source names with a VAE hash and a source fingerprint, per-shard row counts, pixel space.
# Captions and text features are new optional fields and columns: class caches are unchanged, so still 2.
_FORMAT_VERSION = 2
_NO_VAE = "none"


@dataclass
class LatentCacheInfo:
    """Metadata of a latent cache (``cache_info.json``).

    Training latents are ``z = (latent_mean + latent_std * eps) * scaling_factor`` (minus ``shift_factor`` first
    when the VAE has one), re-sampled every step. A pixel-space cache (:attr:`pixel_space`) has ``vae=None``,
    ``latent_channels=3``, ``latent_size=resolution``, ``scaling_factor=1.0`` and no shift: its "latents" are the
    crops themselves, ``x = image / 127.5 - 1``.

    ``vae`` is a Hub id as given, or a local VAE folder's name (never its absolute path) with ``vae_hash``, a
    SHA-256 of its ``config.json`` and weight files, so :func:`cache_vae_matches` recognises the same weights in
    another place. ``source`` is :func:`~diffusers_repa.data.describe_source`'s record. ``shard_num_samples``
    holds the rows of each shard (in the order of ``shards``), to detect truncated files.

    A caption cache records its source ``caption_column`` and ``num_captions`` (all captions of all images); without
    labels ``num_classes`` is 0. With text features, ``text_encoder`` / ``text_encoder_hash`` are recorded like
    ``vae`` / ``vae_hash`` (``"tiny-clip"`` by name, with the hash of its weights) and ``text_features_shape`` is
    ``[L, D]`` (77 × 768 for CLIP ViT-L/14).
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
    vae_hash: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    shard_num_samples: list[int] | None = None
    caption_column: str | None = None
    num_captions: int | None = None
    text_encoder: str | None = None
    text_encoder_hash: str | None = None
    text_features_shape: list[int] | None = None
    format_version: int = _FORMAT_VERSION

    @property
    def pixel_space(self) -> bool:
        """Whether the cache holds pixels only (no VAE moments): the model trains on ``image / 127.5 - 1``."""
        return self.vae is None

    @property
    def has_captions(self) -> bool:
        """Whether the cache holds captions (text-to-image data)."""
        return self.caption_column is not None

    @property
    def has_text_features(self) -> bool:
        """Whether the cache holds the captions' text features and the empty caption's."""
        return self.text_encoder is not None

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


def _resolve_cache_dir(path: str | os.PathLike, allow_patterns: list[str] | None = None, **hub_kwargs) -> Path:
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).count("/") != 1:
        raise FileNotFoundError(f"{path} is neither a latent-cache directory nor a Hub dataset id ('user/name').")
    return Path(snapshot_download(str(path), repo_type="dataset", allow_patterns=allow_patterns, **hub_kwargs))


def _repair_hint(cache_dir: Path, *broken: Path) -> str:
    """How to repair a cache whose ``broken`` files cannot be read."""
    if (cache_dir / _BUILD_DIR / _SETTINGS_FILE).is_file():
        # A locally built cache: the build resumes, re-encoding only shards whose .arrow file is missing, and the
        # trainer rebuilds only when cache_info.json is absent.
        to_delete = dict.fromkeys([*broken, cache_dir / CACHE_INFO_FILE])
        return (
            f"delete {' and '.join(map(str, to_delete))}, then rerun the build that made the cache "
            "(training/prepare_dataset.py or the training run, same settings): finished shards are kept, only what "
            f"is missing is redone; or delete {cache_dir} to rebuild it from scratch"
        )
    return (
        f"the copy in {cache_dir} is damaged: delete {cache_dir} and download or build it again "
        "(a Hub dataset: pass force_download=True)"
    )


def read_cache_info(path: str | os.PathLike, **hub_kwargs) -> LatentCacheInfo:
    """Reads ``cache_info.json`` of a finished cache (a local directory or a Hub dataset id).

    Raises:
        FileNotFoundError: the cache is not finished (no ``cache_info.json``).
        ValueError: ``cache_info.json`` is malformed; the message names it and says how to repair the cache.
    """
    cache_dir = _resolve_cache_dir(path, allow_patterns=[CACHE_INFO_FILE], **hub_kwargs)
    info_file = cache_dir / CACHE_INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(
            f"{info_file} is missing: {cache_dir} is not a finished latent cache. Run (or resume) "
            "`training/prepare_dataset.py --output_dir` on it until it completes."
        )
    try:
        return LatentCacheInfo.from_json(info_file.read_text())
    # Bad JSON (ValueError), missing or unknown fields (TypeError), a non-object payload (AttributeError), ...
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{info_file} is not a valid latent-cache info file ({type(error).__name__}: {error}); to repair it, "
            f"{_repair_hint(cache_dir, info_file)}."
        ) from error


def _read_shard(cache_dir: Path, shard: str, expected_rows: int | None) -> datasets.Dataset:
    """One memory-mapped shard; an unreadable or truncated file is an error that names it."""
    shard_file = cache_dir / shard
    if not shard_file.is_file():
        raise FileNotFoundError(
            f"Latent-cache shard {shard_file}, listed in {cache_dir / CACHE_INFO_FILE}, is missing; to repair the "
            f"cache, {_repair_hint(cache_dir, cache_dir / CACHE_INFO_FILE)}."
        )
    try:
        dataset = datasets.Dataset.from_file(str(shard_file))
    # pyarrow raises ArrowInvalid (a ValueError) or OSError on truncated or foreign data.
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Latent-cache shard {shard_file} is corrupt or truncated ({type(error).__name__}: {error}); to repair "
            f"it, {_repair_hint(cache_dir, shard_file)}."
        ) from error
    # An Arrow stream cut exactly between two record batches still reads, with fewer rows.
    if expected_rows is not None and len(dataset) != expected_rows:
        raise ValueError(
            f"Latent-cache shard {shard_file} holds {len(dataset)} rows, {cache_dir / CACHE_INFO_FILE} says "
            f"{expected_rows}: the file is truncated; to repair it, {_repair_hint(cache_dir, shard_file)}."
        )
    return dataset


def load_latent_cache(path: str | os.PathLike, **hub_kwargs) -> datasets.Dataset:
    """Opens a finished cache (local directory or Hub dataset id) as one memory-mapped ``datasets.Dataset``.

    Columns: ``image`` (3, R, R), ``latent_mean`` and ``latent_std`` (C, h, w) float32 (absent in a pixel-space
    cache), ``label`` int64. The dataset is in torch format; note that ``datasets`` widens integer arrays to int64
    there, while :func:`~diffusers_repa.data.make_train_dataloader` reads the Arrow buffers directly and keeps
    images uint8.

    Raises:
        FileNotFoundError, ValueError: the cache is unfinished, or a file of it is missing, malformed or
            truncated; the message names the file and says how to repair the cache.
    """
    cache_dir = _resolve_cache_dir(path, **hub_kwargs)
    info = read_cache_info(cache_dir)
    if not info.shards:
        raise ValueError(f"The latent cache at {cache_dir} lists no shards in {CACHE_INFO_FILE}.")
    expected_rows = info.shard_num_samples or [None] * len(info.shards)
    shards = [_read_shard(cache_dir, shard, rows) for shard, rows in zip(info.shards, expected_rows)]
    dataset = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    return dataset.with_format("torch")


def load_empty_text_features(path: str | os.PathLike, **hub_kwargs) -> torch.Tensor:
    """The empty caption's text features (1, L, D) float32 of a caption cache with text features: the unconditional
    context of caption dropout and guidance, encoded like every caption (and rounded to float16 like them).

    Raises:
        ValueError: the cache holds no text features (built without ``text_encoder``) or the file is unreadable.
        FileNotFoundError: the file is missing (the message says how to repair the cache).
    """
    cache_dir = _resolve_cache_dir(path, allow_patterns=[CACHE_INFO_FILE, EMPTY_TEXT_FEATURES_FILE], **hub_kwargs)
    info = read_cache_info(cache_dir)
    if not info.has_text_features:
        raise ValueError(
            f"The latent cache {cache_dir} holds no text features (it was built without a text encoder); rebuild it "
            "with text_encoder= / --text_encoder, or encode the empty caption with diffusers_repa.text_encoding."
        )
    features_file = cache_dir / EMPTY_TEXT_FEATURES_FILE
    if not features_file.is_file():
        raise FileNotFoundError(
            f"{features_file}, which {cache_dir / CACHE_INFO_FILE} implies, is missing; to repair the cache, "
            f"{_repair_hint(cache_dir, cache_dir / CACHE_INFO_FILE)}."
        )
    try:
        features = load_file(str(features_file))[_TEXT_FEATURES_KEY]
    except Exception as error:  # safetensors raises its own error type on damaged files
        raise ValueError(
            f"{features_file} is unreadable ({type(error).__name__}: {error}); to repair it, "
            f"{_repair_hint(cache_dir, features_file)}."
        ) from error
    return features.float()


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
        allow_patterns=[
            CACHE_INFO_FILE,
            SKIPPED_REPORT_FILE,
            EMPTY_TEXT_FEATURES_FILE,
            "README.md",
            f"{DATA_DIR}/*.arrow",
        ],
        commit_message=commit_message or f"Latent cache: {info.num_samples} samples at {info.resolution}px",
        token=token,
    )
    return str(repo_url)


def is_pixel_space_vae(vae: AutoencoderKL | str | os.PathLike | None) -> bool:
    """Whether a ``vae`` argument (``--vae``) asks for a pixel-space cache: ``None`` or the string ``"none"``.

    ``"none"`` is matched case-insensitively and always means no VAE; a local VAE folder named ``none`` is passed
    as ``./none``.
    """
    return vae is None or (isinstance(vae, str) and vae.strip().lower() == _NO_VAE)


def _model_folder_hash(folder: Path) -> str:
    """SHA-256 over the names and bytes of a model folder's ``config.json`` and weight files (``*.safetensors``,
    ``*.bin``), so the same weights are recognised wherever the folder lives."""
    files = sorted(
        path for path in folder.iterdir() if path.name == "config.json" or path.suffix in (".safetensors", ".bin")
    )
    hasher = hashlib.sha256()
    for path in files:
        hasher.update(path.name.encode() + b"\0")
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()


def _vae_record(name_or_path: str | os.PathLike | None) -> tuple[str, str | None]:
    """What cache_info.json records of a VAE: a Hub id as given (no hash), a local folder as (folder name, hash)."""
    if name_or_path is None:
        return "in-memory AutoencoderKL", None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve().name, _model_folder_hash(path)
    # The folder an AutoencoderKL object was loaded from may be gone; its absolute path must not be published.
    return (path.name, None) if path.is_absolute() else (str(name_or_path), None)


def _load_vae(vae: AutoencoderKL | str | os.PathLike) -> tuple[AutoencoderKL, str, str | None]:
    """The VAE model, its recorded name and content hash (see :func:`_vae_record`)."""
    if isinstance(vae, AutoencoderKL):
        return vae, *_vae_record(vae.config.get("_name_or_path"))
    return AutoencoderKL.from_pretrained(str(vae)), *_vae_record(vae)


def cache_vae_matches(info: LatentCacheInfo, vae_name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``vae_name_or_path`` (e.g. ``--vae`` of a training run) is the VAE the cache was encoded with.

    A pixel-space cache matches only ``None`` / ``"none"`` and vice versa. A local folder matches by the content
    hash of its config and weights (moved or renamed copies match, retrained weights do not); caches written before
    the hash was recorded compare the folder's resolved path with the recorded one. A Hub id matches the same id
    (no revision is compared, and a local snapshot of a Hub VAE does not match its id).
    """
    if info.pixel_space or is_pixel_space_vae(vae_name_or_path):
        return info.pixel_space and is_pixel_space_vae(vae_name_or_path)
    path = Path(vae_name_or_path).expanduser()
    if path.is_dir():
        if info.vae_hash is not None:
            return _model_folder_hash(path) == info.vae_hash
        return Path(info.vae).expanduser().resolve() == path.resolve()
    return info.vae_hash is None and info.vae == str(vae_name_or_path)


def _text_encoder_record(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """What cache_info.json records of a text encoder (as of a VAE): a Hub id as given (no hash); ``"tiny-clip"`` or
    a local folder as (that name or the folder's name, hash of the text model's folder). Builds tiny-clip if needed.
    """
    if str(name_or_path) == TINY_CLIP_NAME:
        name, folder = TINY_CLIP_NAME, save_tiny_clip(tiny_clip_path())
    else:
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            return str(name_or_path), None
        name = folder.resolve().name
    model_folder = folder / "text_encoder"
    return name, _model_folder_hash(model_folder if (model_folder / "config.json").is_file() else folder)


def cache_text_encoder_matches(info: LatentCacheInfo, text_encoder: str | os.PathLike) -> bool:
    """Whether the cache's text features were computed by ``text_encoder`` (e.g. ``--text_encoder`` of a run).

    ``"tiny-clip"`` and local folders match by the content hash of the text model's config and weights, a Hub id by
    the same id. A cache without text features matches nothing.
    """
    if not info.has_text_features:
        return False
    return (info.text_encoder, info.text_encoder_hash) == _text_encoder_record(text_encoder)


def _vae_normalisation(vae: AutoencoderKL | None) -> dict[str, Any]:
    """The LatentCacheInfo fields that normalise latents: the VAE config's, or the identity in pixel space."""
    if vae is None:
        return {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": None, "latents_std": None}
    config = vae.config
    return {
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": None if config.get("shift_factor") is None else float(config.shift_factor),
        "latents_mean": None if config.get("latents_mean") is None else [float(v) for v in config.latents_mean],
        "latents_std": None if config.get("latents_std") is None else [float(v) for v in config.latents_std],
    }


def _cache_features(
    resolution: int,
    latent_channels: int | None,
    latent_size: int,
    label_feature: Any | None,
    *,
    has_labels: bool = True,
    has_captions: bool = False,
    text_features_shape: tuple[int, int] | None = None,
) -> datasets.Features:
    """Columns of a shard: ``image``, the latent moments unless ``latent_channels`` is None (pixel space), ``label``
    (``has_labels``), ``caption`` (``has_captions``) and ``text_features`` (with a ``(L, D)`` shape)."""
    features = {"image": datasets.Array3D((3, resolution, resolution), "uint8")}
    if latent_channels is not None:
        latent_shape = (latent_channels, latent_size, latent_size)
        features["latent_mean"] = datasets.Array3D(latent_shape, "float32")
        features["latent_std"] = datasets.Array3D(latent_shape, "float32")
    if has_labels:
        features["label"] = (
            label_feature if isinstance(label_feature, datasets.ClassLabel) else datasets.Value("int64")
        )
    if has_captions:
        features["caption"] = datasets.Sequence(datasets.Value("string"))  # a List in datasets >= 4; 3 has no List
    if text_features_shape is not None:
        # One (L, D) block per caption of the row: the first dimension varies from row to row.
        features["text_features"] = datasets.Array3D((None, *text_features_shape), "float16")
    return datasets.Features(features)


def _caption_list(value: Any, index: int) -> list[str]:
    """The captions of source row ``index``: a string, or a non-empty list of strings (kept in order)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(caption, str) for caption in value):
        return list(value)
    raise ValueError(
        f"Row {index} has caption {value!r}: the caption column must hold a string or a non-empty list of strings."
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


def _portable_path(path: str | None, source_root: Path | None) -> str | None:
    """An image path as the (published) skip report records it: relative to ``source_root`` (a local source
    folder) when inside it, only the file name for another absolute local path, URLs and names as they are."""
    if path is None or not os.path.isabs(path):
        return path
    resolved = Path(path).resolve()
    if source_root is not None and resolved.is_relative_to(source_root):
        return resolved.relative_to(source_root).as_posix()
    return resolved.name


@dataclass
class _ShardJob:
    """One output shard: ``rows`` of the source (dict of columns, raw image values) starting at ``first_index``."""

    name: str
    first_index: int
    rows: dict[str, list]


class _ShardEncoder:
    """Decodes, crops and VAE-encodes (unless ``vae`` is None: pixel space) one shard at a time, encoding the
    captions too when ``text`` (tokenizer, text encoder) is given, and writes it atomically."""

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text: tuple[CLIPTokenizer, CLIPTextModel] | None,
        features: datasets.Features,
        output_dir: Path,
        resolution: int,
        batch_size: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        executor: Executor | None,
        progress: tqdm,
        source_root: Path | None,
    ):
        self.vae = vae
        self.text = text
        self.features = features
        self.output_dir = output_dir
        self.resolution = resolution
        self.batch_size = batch_size
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.executor = executor
        self.progress = progress
        self.source_root = source_root

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

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Text features (len(texts), L, D) float16, ``batch_size`` texts per forward pass."""
        tokenizer, text_encoder = self.text
        parts = []
        for start in range(0, len(texts), self.batch_size):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                features = encode_text(tokenizer, text_encoder, texts[start : start + self.batch_size])
            parts.append(features.to(torch.float16).cpu().numpy())
        return np.concatenate(parts)

    def encode_shard(self, job: _ShardJob) -> None:
        shard_file = self.output_dir / DATA_DIR / f"{job.name}.arrow"
        temp_file = shard_file.with_name(f".{shard_file.name}.{os.getpid()}.tmp")
        images, labels, captions = job.rows["image"], job.rows.get("label"), job.rows.get("caption")
        skipped, num_samples, num_captions, max_label, position = [], 0, 0, -1, 0
        writer = ArrowWriter(features=self.features, path=str(temp_file))
        try:
            for results in self._crops(images):
                kept_crops, kept_labels, kept_captions = [], [], []
                for crop, error in results:
                    index = job.first_index + position
                    if crop is None:
                        path = _image_path(images[position])
                        logger.warning("Skipping unreadable image %d (%s): %s", index, path, error)
                        path = _portable_path(path, self.source_root)
                        skipped.append({"shard": job.name, "index": index, "path": path, "error": error})
                    else:
                        if labels is not None:
                            label = labels[position]
                            if label is None or int(label) < 0:
                                raise ValueError(
                                    f"Row {index} has label {label!r}: this split carries no class labels "
                                    "(e.g. the ImageNet test split); use a labelled split."
                                )
                            kept_labels.append(int(label))
                        if captions is not None:
                            kept_captions.append(_caption_list(captions[position], index))
                        kept_crops.append(crop)
                    position += 1
                    self.progress.update(1)
                if kept_crops:
                    crops = np.stack(kept_crops)
                    batch = {"image": crops}
                    if self.vae is not None:
                        batch["latent_mean"], batch["latent_std"] = self._encode(crops)
                    if labels is not None:
                        batch["label"] = kept_labels
                        max_label = max(max_label, *kept_labels)
                    if captions is not None:
                        batch["caption"] = kept_captions
                        counts = [len(row) for row in kept_captions]
                        num_captions += sum(counts)
                        if self.text is not None:
                            features = self.encode_texts([caption for row in kept_captions for caption in row])
                            batch["text_features"] = np.split(features, np.cumsum(counts)[:-1])
                    writer.write_batch(batch)
                    num_samples += len(kept_crops)
            writer.finalize()
        finally:
            writer.close()
        record = {"name": job.name, "file": f"{DATA_DIR}/{shard_file.name}", "num_samples": num_samples}
        record.update(max_label=max_label, num_captions=num_captions, skipped=skipped)
        # The record goes first: an existing .arrow file is what marks the shard finished.
        write_text_atomically(self.output_dir / _BUILD_DIR / f"{job.name}.json", json.dumps(record) + "\n")
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
        write_text_atomically(done_marker, json.dumps({"num_shards": shard_index}) + "\n")

    return jobs(), total


def _finished_stream_shard_names(output_dir: Path, split: str, num_processes: int) -> list[str]:
    prefixes = [_stream_prefix(split, rank, num_processes) for rank in range(num_processes)]
    unfinished = [prefix for prefix in prefixes if not (output_dir / _BUILD_DIR / f"{prefix}.done").exists()]
    if unfinished:
        raise RuntimeError(f"Streams {unfinished} did not finish; rerun with the same number of processes.")
    return sorted(path.stem for prefix in prefixes for path in (output_dir / DATA_DIR).glob(f"{prefix}-*.arrow"))


def _read_json(path: Path, fix: str) -> Any:
    """A JSON file of the cache; a malformed one is an error that names it and says how to fix it."""
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}.") from error


def _source_changes(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How ``current`` (a :func:`describe_source` record) differs from ``recorded``, in words; None if it does not.

    A local folder's name is not compared (a moved folder with the same files is the same source), and neither is
    a fingerprint the current description lacks (a Hub dataset not loaded, or streamed).
    """
    ignored = {"dataset"} if current.get("kind") == "local folder" == recorded.get("kind") else set()
    if current.get("fingerprint") is None:
        ignored.add("fingerprint")
    changed = sorted(
        key for key in recorded.keys() | current.keys() if key not in ignored and recorded.get(key) != current.get(key)
    )
    if not changed:
        return None
    if changed == ["fingerprint"]:
        how = "files added, removed or modified" if current["kind"] == "local folder" else "other content"
        old, new = str(recorded["fingerprint"])[:16], str(current["fingerprint"])[:16]
        return (
            f"the {current['kind']} source '{current['dataset']}' changed since the cache was started "
            f"({how}; fingerprint {old} -> {new})"
        )
    return "the source differs: " + ", ".join(
        f"{key} {recorded.get(key)!r} -> {current.get(key)!r}" for key in changed
    )


def _check_build_settings(output_dir: Path, settings: dict[str, Any], state: PartialState) -> None:
    """Records the settings on the first run; a resumed run must use the same ones and the same source."""
    settings_file = output_dir / _BUILD_DIR / _SETTINGS_FILE
    resuming = settings_file.exists()
    if state.is_main_process:
        (output_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
        (output_dir / _BUILD_DIR).mkdir(exist_ok=True)
        if not resuming:
            write_text_atomically(settings_file, json.dumps(settings, indent=2) + "\n")
        # Leftovers of killed writers; nobody is writing yet.
        for stale in [*(output_dir / DATA_DIR).glob(".*.tmp"), *(output_dir / _BUILD_DIR).glob(".*.tmp")]:
            stale.unlink()
    state.wait_for_everyone()
    recorded = _read_json(settings_file, f"delete {output_dir} and rebuild the cache")
    fix = f"Use a new cache folder (--output_dir / --cache_dir), or delete {output_dir} to rebuild it."
    if recorded.get("format_version") == settings["format_version"]:
        source_change = _source_changes(recorded["source"], settings["source"])
        if source_change is not None:
            raise ValueError(f"{output_dir} holds a latent cache started from another source: {source_change}. {fix}")
        # Checked just now (a moved local folder with the same files is the same source).
        recorded["source"] = settings["source"]
    if recorded != settings:
        changed = {key: (recorded.get(key), settings.get(key)) for key in settings.keys() | recorded.keys()}
        changed = {key: values for key, values in changed.items() if values[0] != values[1]}
        raise ValueError(
            f"{output_dir} holds a latent cache built with other settings (recorded -> requested: {changed}). "
            f"Resume with the same settings. {fix}"
        )
    if resuming and state.is_main_process and settings["source"]["fingerprint"] is None:
        logger.warning(
            "Resuming the latent cache in %s: nothing identifies the content of this source (a stream or an "
            "IterableDataset), so make sure it is the one the cache was started from.",
            output_dir,
        )


def check_cache_source(
    cache_dir: str | os.PathLike,
    source: str | os.PathLike | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = "label",
    max_samples: int | None = None,
    *,
    caption_column: str | None = None,
) -> None:
    """Checks that a finished cache was built from ``source`` before it is reused; cheap, nothing is loaded.

    A local folder is compared by its fingerprint (file names, sizes, modification times: a scan of the folder),
    ``"digits"`` (``"digits-captions"``) and in-memory datasets by theirs, a Hub dataset by its repository id only
    (checking its revision would mean loading it); split, columns (the caption column included) and ``max_samples``
    always. Caches written before sources were fingerprinted (``format_version`` 1) are not checked (a warning says
    so).

    Raises:
        ValueError: the cache was built from another source; one line naming the folder, what changed and the fix.
    """
    cache_dir = Path(cache_dir)
    info = read_cache_info(cache_dir)
    if info.format_version < 2:
        logger.warning("The latent cache %s predates source fingerprints; its source cannot be checked.", cache_dir)
        return
    current = describe_source(source, split, image_column, label_column, max_samples, caption_column=caption_column)
    change = _source_changes(info.source, current)
    if change is not None:
        raise ValueError(
            f"The latent cache {cache_dir} was built from another source: {change}. Use a new cache folder "
            f"(--cache_dir), or delete {cache_dir} to rebuild it from this source."
        )


def _write_dataset_card(output_dir: Path, info: LatentCacheInfo) -> None:
    card_data = DatasetCardData(
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.arrow"}]}],
        tags=["repa", "latent-cache", "diffusers"],
    )
    columns = ["the uint8 crop `image` (3, R, R)"]
    if info.pixel_space:
        encoding = "stored in pixel space (no VAE)"
    else:
        encoding = f"encoded with the VAE `{info.vae}` (scaling factor {info.scaling_factor})"
        columns.append("the VAE posterior `latent_mean` and `latent_std` (C, h, w)")
    if info.num_classes:
        columns.append("the class `label`")
    if info.has_captions:
        columns.append(f"every `caption` of the image ({info.num_captions} in all)")
    if info.has_text_features:
        length, width = info.text_features_shape
        columns.append(
            f"their `text_features` (captions, {length}, {width}) float16 from `{info.text_encoder}` (the empty "
            f"caption's in `{EMPTY_TEXT_FEATURES_FILE}`)"
        )
    encoding += ". Each row holds " + ", ".join(columns[:-1]) + " and " + columns[-1]
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# Latent cache for REPA / SiT training\n\n"
        f"{info.num_samples} images from `{info.source.get('dataset')}` (split `{info.source.get('split')}`), "
        f"ADM center crop at {info.resolution}x{info.resolution}, {encoding}; "
        f"{info.num_skipped} unreadable source images are listed in `{SKIPPED_REPORT_FILE}`. "
        "Read it with `diffusers_repa.data.load_latent_cache`.\n"
    )
    write_text_atomically(output_dir / "README.md", DatasetCard(content).content)


def _finalize(
    output_dir: Path,
    shard_names: list[str],
    base_info: dict[str, Any],
    class_names: list[str] | None,
    has_labels: bool,
    empty_text_features: np.ndarray | None,
) -> LatentCacheInfo:
    """Gathers the shard records into ``cache_info.json`` and the skip report, and writes the empty caption's
    features (1, L, D) when given (main process, all shards done)."""
    missing = [name for name in shard_names if not _shard_done(output_dir, name)]
    if missing:
        raise RuntimeError(f"{len(missing)} shards are not finished (first: {missing[0]}); rerun to resume the job.")
    records = []
    for name in shard_names:
        fix = f"delete it and {output_dir / DATA_DIR / name}.arrow, then rerun the build to re-encode that shard"
        records.append(_read_json(output_dir / _BUILD_DIR / f"{name}.json", fix))
    skipped = [entry for record in records for entry in record["skipped"]]
    num_samples = sum(record["num_samples"] for record in records)
    if num_samples == 0:
        raise ValueError(f"No readable image in the source; see {output_dir / SKIPPED_REPORT_FILE}.")
    if not has_labels:
        num_classes, id2label = 0, None
    elif class_names is not None:
        num_classes, id2label = len(class_names), dict(enumerate(class_names))
    else:
        num_classes, id2label = max(record["max_label"] for record in records) + 1, None
    info = LatentCacheInfo(
        **base_info,
        num_classes=num_classes,
        id2label=id2label,
        num_samples=num_samples,
        num_skipped=len(skipped),
        shards=[record["file"] for record in records],
        shard_num_samples=[record["num_samples"] for record in records],
    )
    if info.has_captions:
        info.num_captions = sum(record["num_captions"] for record in records)
    if empty_text_features is not None:
        tensors = {_TEXT_FEATURES_KEY: torch.from_numpy(empty_text_features)}
        write_file_atomically(output_dir / EMPTY_TEXT_FEATURES_FILE, lambda path: save_file(tensors, str(path)))
    write_text_atomically(output_dir / SKIPPED_REPORT_FILE, json.dumps(skipped, indent=2) + "\n")
    _write_dataset_card(output_dir, info)
    write_text_atomically(output_dir / CACHE_INFO_FILE, info.to_json())
    return info


def build_latent_cache(
    source: datasets.Dataset | datasets.IterableDataset | str | os.PathLike,
    output_dir: str | os.PathLike,
    vae: AutoencoderKL | str | os.PathLike | None,
    resolution: int,
    *,
    batch_size: int = 64,
    shard_size: int | None = None,
    num_shards: int | None = None,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = "label",
    caption_column: str | None = None,
    text_encoder: str | os.PathLike | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    num_workers: int = 4,
    mixed_precision: str = "no",
    show_progress: bool = True,
) -> Path:
    """Center-crops every source image (ADM), encodes it once with the VAE and writes a sharded latent cache.

    With ``vae=None`` (or ``"none"``) the cache is in pixel space: it stores only the crops and labels, and no VAE
    is loaded. Works the same in one process or under ``accelerate launch`` (each process encodes the shards
    ``g % num_processes == process_index`` on its own device). Resumable: finished shards are kept and skipped,
    so rerunning the same command after a crash continues the job. Unreadable or truncated images are skipped,
    logged and listed in ``skipped_images.json``. See the module docstring for the layout.

    Args:
        source: a dataset object or a name for :func:`~diffusers_repa.data.load_image_source`
            (``"imagenet-1k"``, a Hub id, a local image folder, ``"digits"``). Its fingerprint is recorded; resuming
            (or rerunning) against a changed source is refused.
        output_dir: cache directory (created; reused to resume).
        vae: an ``AutoencoderKL`` or its Hub id / local path (e.g. ``stabilityai/sd-vae-ft-mse``, the default of
            the CLI and of the original), moved to the process's device; or ``None`` / ``"none"`` for pixel space.
        resolution: crop side in pixels; a multiple of the VAE's downsampling factor (any positive size in pixel
            space).
        batch_size: images per VAE forward pass.
        shard_size / num_shards: rows of the source per shard (default 1024), or the number of shards instead
            (map-style sources only). At most one of them.
        split, image_column, label_column, caption_column, streaming, max_samples: see ``load_image_source``.
            With ``caption_column`` every caption of an image is stored, in order (labels only if the source has
            them; ``num_classes`` is 0 otherwise). With streaming, each process reads its part of the stream
            (``datasets.distributed.split_dataset_by_node``); resume then needs the same number of processes.
        text_encoder: with ``caption_column``, a CLIP text encoder for
            :func:`~diffusers_repa.text_encoding.load_text_encoder` (``"tiny-clip"``, ``openai/clip-vit-large-patch14``
            as the original, a local folder): the token features (L, D) of every caption are stored as float16, and
            the empty caption's in ``empty_text_features.safetensors``. MS-COCO with CLIP ViT-L/14 takes about
            82,783 × 5 × 77 × 768 × 2 bytes ≈ 49 GB.
        num_workers: threads decoding and cropping images while the VAE runs (0: in the main thread).
        mixed_precision: ``"no"`` (float32, as the original), ``"fp16"`` or ``"bf16"`` autocast for the encoders.
        show_progress: tqdm bar with ETA on the local main process.

    Returns:
        ``output_dir`` as a ``Path``; read it with :func:`load_latent_cache` / :func:`read_cache_info`.
    """
    encode_dtype = autocast_dtype(mixed_precision)  # checked before any work
    if batch_size <= 0 or num_workers < 0:
        raise ValueError(f"batch_size must be positive and num_workers >= 0 (got {batch_size}, {num_workers}).")
    if shard_size is not None and num_shards is not None:
        raise ValueError("Pass either shard_size or num_shards, not both.")
    if text_encoder is not None and caption_column is None:
        raise ValueError("text_encoder encodes captions: pass caption_column (the source's caption column) too.")
    # Like Accelerator: `accelerate launch --cpu` (ACCELERATE_USE_CPU) makes several CPU processes one gloo group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    dataset = load_image_source(
        source, split, image_column, label_column, streaming, caption_column=caption_column, max_samples=max_samples
    )
    source_info = describe_source(
        source, split, image_column, label_column, max_samples, caption_column=caption_column, loaded=dataset
    )
    # Skipped images of a local folder are reported relative to it.
    source_root = Path(source).expanduser().resolve() if source_info["kind"] == "local folder" else None
    is_map_style = isinstance(dataset, datasets.Dataset)
    if num_shards is not None:
        if not is_map_style or num_shards <= 0:
            raise ValueError("num_shards needs a positive value and a non-streaming source; use shard_size.")
        shard_size = max(1, math.ceil(len(dataset) / num_shards))
    shard_size = shard_size or 1024
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")

    if is_pixel_space_vae(vae):
        vae_model, vae_id, vae_hash, downsample, latent_channels = None, None, None, 1, None
    else:
        vae_model, vae_id, vae_hash = _load_vae(vae)
        downsample = 2 ** (len(vae_model.config.block_out_channels) - 1)
        latent_channels = int(vae_model.config.latent_channels)
    if not isinstance(resolution, int) or resolution <= 0 or resolution % downsample:
        what = "integer" if vae_model is None else f"multiple of the VAE's downsampling factor {downsample}"
        raise ValueError(f"resolution must be a positive {what}, got {resolution}.")
    if vae_model is not None:
        vae_model = vae_model.to(state.device).eval().requires_grad_(False)
    text, text_info = None, {}
    if caption_column is not None:
        text_info["caption_column"] = caption_column
    if text_encoder is not None:
        text = load_text_encoder(text_encoder, device=state.device)
        text_id, text_hash = _text_encoder_record(text_encoder)
        text_info.update(
            text_encoder=text_id,
            text_encoder_hash=text_hash,
            text_features_shape=[text[0].model_max_length, text[1].config.hidden_size],
        )
    features = dataset.features
    label_feature = features.get("label") if features is not None else None
    class_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    # A stream of unknown columns keeps the label column it was asked for (load_image_source could not check it).
    has_labels = "label" in dataset.column_names if dataset.column_names is not None else label_column is not None
    latent_size = resolution // downsample
    cache_features = _cache_features(
        resolution,
        latent_channels,
        latent_size,
        label_feature,
        has_labels=has_labels,
        has_captions=caption_column is not None,
        text_features_shape=tuple(text_info["text_features_shape"]) if text is not None else None,
    )
    if features is not None and isinstance(features.get("image"), datasets.Image):
        # Decode ourselves: a corrupt file must be skipped, not raise inside datasets' iterator.
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    output_dir = Path(output_dir)
    settings = {
        "format_version": _FORMAT_VERSION,
        "source": source_info,
        "num_rows": len(dataset) if is_map_style else None,
        "streaming_processes": None if is_map_style else state.num_processes,
        "vae": vae_id,
        "vae_hash": vae_hash,
        "resolution": resolution,
        "shard_size": shard_size,
        "mixed_precision": mixed_precision,
    }
    if text is not None:
        # Only caption builds record these (the caption column is in the source record), so class caches begun
        # before captions existed still resume.
        settings.update(text_encoder=text_info["text_encoder"], text_encoder_hash=text_info["text_encoder_hash"])
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
            text,
            cache_features,
            output_dir,
            resolution,
            batch_size,
            state.device,
            encode_dtype,
            executor,
            progress,
            source_root,
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
            "vae_hash": vae_hash,
            "resolution": resolution,
            # In pixel space the "latents" are the RGB crops themselves.
            "latent_channels": 3 if latent_channels is None else latent_channels,
            "latent_size": latent_size,
            "source": source_info,
            **_vae_normalisation(vae_model),
            **text_info,
        }
        empty_text_features = encoder.encode_texts([""]) if text is not None else None
        _finalize(output_dir, shard_names, base_info, class_names, has_labels, empty_text_features)
    state.wait_for_everyone()
    return output_dir
