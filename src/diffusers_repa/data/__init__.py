"""ImageNet data for REPA: ADM preprocessing, image sources, the VAE latent cache and the training loader.

Flow: ``load_image_source`` -> ``build_latent_cache`` (ADM crop, VAE posterior mean/std, sharded Arrow files) ->
``load_latent_cache`` -> ``make_train_dataloader`` (uint8 crop, latent moments, label per sample).
"""

from .latent_cache import (
    CACHE_INFO_FILE,
    DEFAULT_VAE,
    SKIPPED_REPORT_FILE,
    LatentCacheInfo,
    build_latent_cache,
    load_latent_cache,
    push_latent_cache_to_hub,
    read_cache_info,
)
from .loader import EpochBatchSampler, LatentCacheBatches, SeededEpochSampler, make_train_dataloader
from .preprocessing import center_crop_imagenet, decode_image, to_rgb
from .sources import IMAGENET_1K_REPO_ID, load_image_source
from .synthetic import synthetic_class_dataset

__all__ = [
    "CACHE_INFO_FILE",
    "DEFAULT_VAE",
    "IMAGENET_1K_REPO_ID",
    "SKIPPED_REPORT_FILE",
    "EpochBatchSampler",
    "LatentCacheBatches",
    "LatentCacheInfo",
    "SeededEpochSampler",
    "build_latent_cache",
    "center_crop_imagenet",
    "decode_image",
    "load_image_source",
    "load_latent_cache",
    "make_train_dataloader",
    "push_latent_cache_to_hub",
    "read_cache_info",
    "synthetic_class_dataset",
    "to_rgb",
]
