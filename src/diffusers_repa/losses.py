"""The REPA training loss: flow-matching velocity regression plus representation alignment.

loss = mean_n ‖v_θ(x_t, t, y) − v_t‖²  +  λ · mean_k mean_n mean_tokens (−cos(target_k, projection_k))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .interpolants import PathType, TimeSampling, interpolate, sample_timesteps


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dimensions: (N, ...) → (N,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def projection_loss(targets: Sequence[torch.Tensor], projections: Sequence[torch.Tensor]) -> torch.Tensor:
    """Negative cosine similarity between encoder features and projections, averaged over targets, samples, tokens.

    Args:
        targets: one (N, T, D_k) tensor of encoder features per alignment target.
        projections: the model's projector outputs, same shapes and order.

    Returns:
        A scalar in [−1, 1]. Normalisation runs in float32 even under fp16/bf16 autocast: in half precision the
        squared norms of 768-d features overflow and the original code produces NaNs.
    """
    if len(targets) != len(projections):
        raise ValueError(
            f"Got {len(targets)} alignment targets but the model has {len(projections)} projectors; "
            "use one encoder per projection dimension (config.projection_dims)."
        )
    if not targets:
        raise ValueError("projection_loss needs at least one alignment target.")
    losses = []
    for target, projection in zip(targets, projections, strict=True):
        if target.shape != projection.shape:
            raise ValueError(
                f"Encoder features {tuple(target.shape)} and projections {tuple(projection.shape)} differ in shape: "
                "the encoder's token grid and width must match the model's tokens and projection_dims."
            )
        target = F.normalize(target.float(), dim=-1)
        projection = F.normalize(projection.float(), dim=-1)
        losses.append(-(target * projection).sum(dim=-1).mean())
    return torch.stack(losses).mean()


@dataclass
class REPALossOutput:
    """Terms of the REPA loss for one batch.

    Attributes:
        loss: scalar to optimise, ``denoising_loss.mean() + proj_coeff · projection_loss``.
        denoising_loss: per-sample velocity MSE (N,).
        projection_loss: scalar alignment term (0 when no targets are given).
    """

    loss: torch.Tensor
    denoising_loss: torch.Tensor
    projection_loss: torch.Tensor


def repa_loss(
    model: torch.nn.Module,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    targets: Sequence[torch.Tensor] = (),
    *,
    proj_coeff: float = 0.5,
    path_type: PathType = "linear",
    time_sampling: TimeSampling = "uniform",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> REPALossOutput:
    """One evaluation of the REPA objective on a batch of clean latents.

    Args:
        model: a [`SiTTransformer2DModel`] (or anything with its call signature and output).
        latents: clean, scaled latents x_0 (N, C, H, W). class_labels: (N,) ids.
        targets: encoder features of the clean images, one (N, T, D_k) tensor per projector; empty (or
            ``proj_coeff == 0``) skips the alignment term and the projectors.
        t, noise: fixed times (N,) and noise (defaults: drawn with ``time_sampling`` and ``generator``).
    """
    if t is None:
        t = sample_timesteps(latents.shape[0], time_sampling, path_type, device=latents.device, generator=generator)
    if noise is None:
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    t = t.to(device=latents.device, dtype=latents.dtype)
    x_t, velocity_target = interpolate(latents, noise, t, path_type)
    align = bool(targets) and proj_coeff != 0
    # A tuple rather than the output dataclass: accelerate's mixed-precision wrapper rebuilds outputs by type and
    # would turn the dataclass into `sample={...}`.
    velocity, projections = model(x_t, t, class_labels, return_projections=align, return_dict=False)[:2]
    per_sample = denoising_loss(velocity, velocity_target)
    alignment = projection_loss(targets, projections) if align else per_sample.new_zeros(())
    return REPALossOutput(
        loss=per_sample.mean() + proj_coeff * alignment, denoising_loss=per_sample, projection_loss=alignment
    )
