"""A tiny randomly initialised `AutoencoderKL` (SD-VAE's layout, a few channels): tests and benchmarks build latent
caches and pipelines with it offline. Its latents mean nothing; for a real offline run use pixel space (`--vae none`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL


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
