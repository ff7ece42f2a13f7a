"""A tiny randomly initialised `AutoencoderKL` (SD-VAE's layout, a few channels): tests and benchmarks build latent
caches and pipelines with it offline. Its latents mean nothing; for a real offline run use pixel space (`--vae none`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..atomic_files import write_folder_atomically


def tiny_random_vae(
    seed: int = 0, *, latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None
) -> AutoencoderKL:
    """A randomly initialised `AutoencoderKL` with 8× downsampling, in eval mode; the caller's RNG state is left as
    it was.

    The defaults are SD-VAE's latent layout (4 channels, z = x · 0.18215) with 8–16 channels per block; SD3's is
    ``latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609`` (z = (x − shift) · scale).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        )
    return vae.eval()


def save_tiny_random_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """[`tiny_random_vae`] saved with `save_pretrained` (atomically); reused when `path` already holds one."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    with write_folder_atomically(path, replace=True) as staging:
        tiny_random_vae(seed).save_pretrained(staging)
    return path
