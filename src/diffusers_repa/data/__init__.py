"""Training data for REPA: ADM preprocessing, image sources (class-labelled or captioned), the VAE latent cache and
the training loader.

Flow: ``load_image_source`` -> ``build_latent_cache`` (ADM crop, VAE posterior mean/std or, in pixel space, the
crop only; every caption and, with a text encoder, their CLIP features; sharded Arrow files) -> ``load_latent_cache``
-> ``make_train_dataloader`` (uint8 crop, latent moments, label; or one drawn caption and its features per sample).
``"digits"`` (scikit-learn's 8×8 digits) and ``"digits-captions"`` (the same with captions) are built-in real
sources for small offline runs; ``write_coco_captions_metadata`` makes MS-COCO's images and captions a caption folder.
"""

from .coco import COCO_CAPTION_COLUMN, write_coco_captions_metadata
from .digits import (
    DIGITS_CAPTIONS_DATASET,
    DIGITS_CLASS_NAMES,
    DIGITS_DATASET,
    digit_captions,
    digits_captions_dataset,
    digits_dataset,
    load_digits_arrays,
    split_digits,
)
from .latent_cache import (
    CACHE_INFO_FILE,
    DEFAULT_VAE,
    EMPTY_TEXT_FEATURES_FILE,
    SKIPPED_REPORT_FILE,
    LatentCacheInfo,
    build_latent_cache,
    cache_text_encoder_matches,
    cache_vae_matches,
    check_cache_source,
    is_pixel_space_vae,
    load_empty_text_features,
    load_latent_cache,
    push_latent_cache_to_hub,
    read_cache_info,
)
from .loader import EpochBatchSampler, LatentCacheBatches, SeededEpochSampler, make_train_dataloader
from .preprocessing import center_crop_imagenet, decode_image, to_rgb
from .sources import IMAGENET_1K_REPO_ID, describe_source, load_image_source
from .synthetic import synthetic_class_dataset

__all__ = [
    "CACHE_INFO_FILE",
    "COCO_CAPTION_COLUMN",
    "DEFAULT_VAE",
    "DIGITS_CAPTIONS_DATASET",
    "DIGITS_CLASS_NAMES",
    "DIGITS_DATASET",
    "EMPTY_TEXT_FEATURES_FILE",
    "IMAGENET_1K_REPO_ID",
    "SKIPPED_REPORT_FILE",
    "EpochBatchSampler",
    "LatentCacheBatches",
    "LatentCacheInfo",
    "SeededEpochSampler",
    "build_latent_cache",
    "cache_text_encoder_matches",
    "cache_vae_matches",
    "center_crop_imagenet",
    "check_cache_source",
    "decode_image",
    "describe_source",
    "digit_captions",
    "digits_captions_dataset",
    "digits_dataset",
    "is_pixel_space_vae",
    "load_digits_arrays",
    "load_empty_text_features",
    "load_image_source",
    "load_latent_cache",
    "make_train_dataloader",
    "push_latent_cache_to_hub",
    "read_cache_info",
    "split_digits",
    "synthetic_class_dataset",
    "to_rgb",
    "write_coco_captions_metadata",
]
