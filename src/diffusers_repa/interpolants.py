"""Interpolant paths of the flow objective: x_t = α_t·x_0 + σ_t·ε, with **t = 0 data and t = 1 noise**.

The model predicts the velocity dx_t/dt = α'_t·x_0 + σ'_t·ε. Two paths, as in REPA:

- ``linear``: α_t = 1 − t, σ_t = t (the default, SiT's "Linear" interpolant)
- ``cosine``: α_t = cos(πt/2), σ_t = sin(πt/2) (the "GVP" interpolant)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

PathType = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "logit_normal"]
PATH_TYPES = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "logit_normal")


def _check_path(path_type: str) -> None:
    if path_type not in PATH_TYPES:
        raise ValueError(f"Unknown path_type {path_type!r}; choose one of {PATH_TYPES}.")


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times (N,) to (N, 1, ..., 1) so they broadcast against x (N, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def path_coefficients(
    t: torch.Tensor, path_type: PathType = "linear"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α_t, σ_t, α'_t, σ'_t) at times ``t`` (any shape)."""
    _check_path(path_type)
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
    return cos, sin, -half_pi * sin, half_pi * cos


def interpolate(
    latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path_type: PathType = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input and velocity target.

    Args:
        latents: clean data x_0 (N, ...). noise: ε of the same shape. t: (N,) times in [0, 1].

    Returns:
        ``(x_t, v_t)`` with x_t = α_t·x_0 + σ_t·ε and v_t = α'_t·x_0 + σ'_t·ε.
    """
    alpha, sigma, d_alpha, d_sigma = path_coefficients(expand_like(t, latents), path_type)
    return alpha * latents + sigma * noise, d_alpha * latents + d_sigma * noise


def velocity_to_score(
    velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, path_type: PathType = "linear"
) -> torch.Tensor:
    """Score ∇log p_t(x_t) implied by a velocity prediction (the SDE sampler's drift needs it).

    Solves v = α'/α·x_t + (σ'σ − α'/α·σ²)·(−score) for the score; undefined at t = 1 for the linear path's last step
    only through α'/α, which stays finite because it is computed as α/α'.
    """
    alpha, sigma, d_alpha, d_sigma = path_coefficients(expand_like(t, x_t), path_type)
    alpha_ratio = alpha / d_alpha
    variance = sigma**2 - alpha_ratio * d_sigma * sigma
    return (alpha_ratio * velocity - x_t) / variance


def sample_timesteps(
    batch_size: int,
    time_sampling: TimeSampling = "uniform",
    path_type: PathType = "linear",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times t (N,) in [0, 1].

    ``uniform`` is REPA's default. ``logit_normal`` draws n ~ N(mean, std) and maps it so that the noise-to-signal
    ratio σ_t/α_t equals eᵑ on either path (for the linear path t = sigmoid(n)); with mean 0, std 1 this is the
    original's ``weighting="lognormal"``.
    """
    _check_path(path_type)
    if time_sampling == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if time_sampling == "logit_normal":
        normal = torch.randn(batch_size, device=device, generator=generator) * logit_std + logit_mean
        if path_type == "linear":
            return torch.sigmoid(normal)
        return (2 / math.pi) * torch.atan(normal.exp())
    raise ValueError(f"Unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}.")
