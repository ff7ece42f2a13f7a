"""The latent normalisation convention shared by training, sampling and analysis: z = (x − shift) · scale.

x is the VAE latent, z what the SiT sees. SD-VAE: shift 0, scale 0.18215. VAEs whose config has per-channel
``latents_mean`` / ``latents_std``: shift = mean, scale = scaling_factor / std. Otherwise ``shift_factor`` is the shift.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def latent_shift_and_scale(
    scaling_factor: float,
    shift_factor: float | None = None,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` of z = (x − shift)·scale, float32, each of shape (1, C, 1, 1) or () for scalar ones."""
    if latents_mean is not None and latents_std is not None:
        shift = torch.tensor(latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        return shift, scaling_factor / torch.tensor(latents_std, dtype=torch.float32).view(1, -1, 1, 1)
    return torch.tensor(float(shift_factor or 0.0)), torch.tensor(float(scaling_factor))


def vae_latent_shift_and_scale(vae_config) -> tuple[torch.Tensor, torch.Tensor]:
    """[`latent_shift_and_scale`] from an `AutoencoderKL` config."""
    return latent_shift_and_scale(
        vae_config.scaling_factor,
        vae_config.get("shift_factor"),
        vae_config.get("latents_mean"),
        vae_config.get("latents_std"),
    )
