"""The training data of a run: its latent (or pixel) cache, built once and checked against the run's settings, and
the loader over it."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from ..data import (
    CACHE_INFO_FILE,
    LatentCacheInfo,
    build_latent_cache,
    cache_text_encoder_matches,
    cache_vae_matches,
    check_cache_source,
    is_pixel_space_vae,
    load_latent_cache,
    make_train_dataloader,
    read_cache_info,
)
from .arguments import REPATrainingArguments
from .preflight import check_sources_reachable, default_cache_dir

logger = logging.getLogger(__name__)


def build_cache_loader(
    args: REPATrainingArguments,
    accelerator: Accelerator,
    per_device_batch_size: int,
    image_source: datasets.Dataset | None = None,
) -> tuple[torch.utils.data.DataLoader, LatentCacheInfo, Path]:
    """Fail fast if a source cannot be read, build the cache once (every process shares the work; later runs reuse
    it), check that it fits `--vae` and `--resolution`, and return its loader (sample order fixed by the seed and the
    epoch), its info and its folder.

    Args:
        image_source: a dataset to cache instead of `args.dataset`.
    """
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args)
    have_cache = (cache_dir / CACHE_INFO_FILE).is_file()
    check_sources_reachable(args, need_dataset=not have_cache and image_source is None)
    source = args.dataset if image_source is None else image_source
    if have_cache and args.cache_dir is None and image_source is None:
        # The default folder is named after --dataset: reuse it only if that source has not changed since. An
        # explicit --cache_dir is the user's choice of data (e.g. a shared cache), whatever --dataset says.
        check_cache_source(
            cache_dir, source, args.dataset_split, args.image_column, args.label_column, args.max_train_samples,
            caption_column=args.caption_column,
        )  # fmt: skip
    if not have_cache:
        if accelerator.is_main_process:
            logger.info(f"Building the latent cache in {cache_dir} (once).")
        build_latent_cache(
            source,
            cache_dir,
            args.vae,
            args.resolution,
            split=args.dataset_split,
            image_column=args.image_column,
            label_column=args.label_column,
            caption_column=args.caption_column,
            # Text-to-image: every caption's text features are computed once, into the cache (as the original).
            text_encoder=args.text_encoder if args.caches_text_features else None,
            max_samples=args.max_train_samples,
        )
    info = read_cache_info(cache_dir)
    check_cache_fits(args, info, cache_dir)
    loader = make_train_dataloader(
        load_latent_cache(cache_dir),
        per_device_batch_size,
        shuffle=True,
        seed=args.seed,
        num_workers=args.dataloader_num_workers,
        hflip=args.hflip,
        drop_last=True,
        pin_memory=accelerator.device.type == "cuda",
    )
    return loader, info, cache_dir


def check_cache_fits(args: REPATrainingArguments, info: LatentCacheInfo, cache_dir: Path) -> None:
    """The cache must hold what --vae and --resolution give (latents of that VAE, or pixels without one)."""
    if is_pixel_space_vae(args.vae):
        expected = (args.resolution, 3, args.resolution, 1.0)
    else:
        vae_config = AutoencoderKL.load_config(args.vae)
        latent_size = args.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
        expected = (args.resolution, vae_config["latent_channels"], latent_size, vae_config["scaling_factor"])
    cached = (info.resolution, info.latent_channels, info.latent_size, info.scaling_factor)
    if cached != expected or info.pixel_space != is_pixel_space_vae(args.vae):
        raise ValueError(
            f"The latent cache {cache_dir} holds {info.resolution}-px images as {info.latent_channels}×"
            f"{info.latent_size}² inputs (VAE {info.vae!r}, scaling {info.scaling_factor}), which --resolution "
            f"{args.resolution} with --vae {args.vae!r} does not give; pass matching flags or another --cache_dir."
        )
    if not cache_vae_matches(info, args.vae):  # same shapes, other weights: the latents decode wrongly
        logger.warning(f"The latent cache was encoded with VAE {info.vae!r}; this run decodes with {args.vae!r}.")
    if args.is_text_to_image and info.caption_column is None:
        raise ValueError(
            f"The latent cache {cache_dir} holds no captions: build one from a dataset with --caption_column (or "
            "pass another --cache_dir)."
        )
    if (
        args.caches_text_features
        and info.text_encoder is not None
        and not cache_text_encoder_matches(info, args.text_encoder)
    ):  # features of another text encoder would condition the model on what sampling never gives it
        raise ValueError(
            f"The latent cache {cache_dir} holds text features of {info.text_encoder!r}, not of --text_encoder "
            f"{args.text_encoder!r}: pass the same text encoder, or another --cache_dir."
        )
