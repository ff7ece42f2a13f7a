"""Assets of the offline quickstart: a synthetic class-conditional dataset, a tiny random VAE and a tiny random
DINOv2, all built locally so that the real training code path runs end to end on a CPU in a few minutes.

Nothing here is pretrained: the samples of a quickstart run only show that the pipeline works.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from diffusers import AutoencoderKL

from ..data import synthetic_class_dataset
from ..encoders import save_tiny_random_encoder

QUICKSTART_NOTICE = (
    "QUICKSTART smoke configuration: a synthetic shapes dataset, a tiny RANDOMLY initialised VAE and a tiny RANDOMLY "
    "initialised DINOv2 encoder, all built locally. Nothing is pretrained; the run only shows that training, "
    "checkpointing, sampling and export work end to end."
)


@dataclass
class QuickstartAssets:
    dataset: datasets.Dataset
    vae: Path
    encoder: Path


def save_tiny_random_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised `AutoencoderKL` with 8× downsampling and 4 latent channels (like SD-VAE, but with
    8–16 channels per block), saved with `save_pretrained`; reused when `path` already holds one."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        vae.save_pretrained(staging)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def build_quickstart_assets(
    folder: str | os.PathLike, resolution: int, num_classes: int = 10, samples_per_class: int = 32, seed: int = 0
) -> QuickstartAssets:
    """Synthetic dataset (in memory), tiny VAE and tiny DINOv2 under `folder` (reused on later runs)."""
    folder = Path(folder)
    return QuickstartAssets(
        dataset=synthetic_class_dataset(num_classes, samples_per_class, resolution, seed=seed),
        vae=save_tiny_random_vae(folder / "tiny-random-vae", seed=seed),
        encoder=save_tiny_random_encoder("dinov2", folder / "tiny-random-dinov2", seed=seed, exist_ok=True),
    )
