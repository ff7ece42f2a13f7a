"""Training objectives: what one micro-batch's loss is. The training step (`step.py`) is the same for all of them.

An objective turns a micro-batch from the loader into a [`REPALossOutput`] for a model; the step around it
(backward, clipping, the non-finite guard, the optimizer and the EMA) never changes. A new objective (text-to-image,
a successor's extra term) is a new class with the same `__call__` — or, sharing the inputs and targets, a new
`loss` as `DDPMObjective` does — never a copy of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from ..ddpm_losses import DDPMSchedule, improved_ddpm_repa_loss
from ..encoders import FrozenVisionEncoder, interpolate_tokens
from ..interpolants import PathType, TimeSampling
from ..losses import REPALossOutput, repa_loss


class Objective(Protocol):
    """The loss of one micro-batch.

    Args (of `__call__`):
        model: the (possibly wrapped) model being trained.
        batch: one micro-batch as the loader yields it.
        generator: the process's noise generator (saved in checkpoints), for every random draw of the loss.
        step: the optimizer step being computed (0-based), for schedules such as `alignment_stop_step`.
    """

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> REPALossOutput: ...


class REPAFlowObjective:
    """SiT's flow-matching velocity loss plus λ · REPA alignment (`losses.repa_loss`), on VAE latents or pixels.

    The clean input x_0 of a batch is, for a latent cache (`latent_mean`, `latent_std` in the batch), a fresh draw from
    the cached VAE posterior, normalised: x_0 = (mean + std·ε − shift)·scale; for a pixel-space cache (no VAE: only
    `image`), the crop itself in [−1, 1]: x_0 = image / 127.5 − 1. Alignment targets are the encoders' features of
    the uint8 crop (frozen, no grad, under `autocast`).

    Args:
        encoders: frozen alignment targets, one per projector of the model (empty for λ = 0 / vanilla SiT).
        proj_coeff: λ. path_type / time_sampling: the interpolant and the law of t.
        latent_shift, latent_scale: z = (x − shift)·scale of the VAE latents (ignored in pixel space).
        target_num_tokens: resample the encoders' tokens to this many (`--interpolate_targets`); None keeps them.
        alignment_stop_step: from this optimizer step on, no alignment term and no encoder call (None: never).
        autocast: context in which the encoders run (the trainer's mixed precision).
    """

    def __init__(
        self,
        encoders: Sequence[FrozenVisionEncoder] = (),
        *,
        proj_coeff: float = 0.5,
        path_type: PathType = "linear",
        time_sampling: TimeSampling = "uniform",
        latent_shift: torch.Tensor | float = 0.0,
        latent_scale: torch.Tensor | float = 1.0,
        target_num_tokens: int | None = None,
        alignment_stop_step: int | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.encoders = list(encoders)
        self.proj_coeff = proj_coeff
        self.path_type = path_type
        self.time_sampling = time_sampling
        self.latent_shift = latent_shift
        self.latent_scale = latent_scale
        self.target_num_tokens = target_num_tokens
        self.alignment_stop_step = alignment_stop_step
        self.autocast = autocast

    def aligns_at(self, step: int) -> bool:
        """Whether the alignment term (and the encoders) run at optimizer step `step` (0-based)."""
        return bool(self.encoders) and (self.alignment_stop_step is None or step < self.alignment_stop_step)

    def clean_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """x_0 (N, C, h, w): a normalised posterior sample of the cached VAE latents, or the pixels in [−1, 1]."""
        if "latent_mean" not in batch:  # pixel space: the model denoises the image itself
            return batch["image"].float() / 127.5 - 1.0
        mean, std = batch["latent_mean"], batch["latent_std"]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise - self.latent_shift) * self.latent_scale

    def encode_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features (N, T, D_k) of uint8 crops (N, 3, R, R), one per encoder; frozen, no grad, autocast."""
        with self.autocast():
            targets = [encoder(images) for encoder in self.encoders]
        if self.target_num_tokens is not None:
            targets = [interpolate_tokens(features, self.target_num_tokens) for features in targets]
        return targets

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> REPALossOutput:
        x_0 = self.clean_inputs(batch, generator)
        targets = self.encode_targets(batch["image"]) if self.aligns_at(step) else []
        return self.loss(model, x_0, batch["label"], targets, generator)

    def loss(
        self,
        model: nn.Module,
        x_0: torch.Tensor,
        labels: torch.Tensor,
        targets: list[torch.Tensor],
        generator: torch.Generator,
    ) -> REPALossOutput:
        """The diffusion loss on clean inputs x_0 (N, C, h, w) plus λ · alignment: SiT's velocity regression."""
        return repa_loss(
            model,
            x_0,
            labels,
            targets,
            proj_coeff=self.proj_coeff,
            path_type=self.path_type,
            time_sampling=self.time_sampling,
            generator=generator,
        )


class DDPMObjective(REPAFlowObjective):
    """DiT's improved-DDPM objective (ε MSE + the variational bound that trains the learned variance, on DiT's
    1000-step linear schedule; `ddpm_losses.improved_ddpm_loss`, equal to DiT's code) plus λ · REPA alignment — the
    paper's second objective. Same inputs and alignment targets as `REPAFlowObjective`; only the loss differs.

    The model is called as ``model(x_t, timestep=t, class_labels=y)`` with integer t in [0, 1000) and must return
    2C channels (ε and the variance interpolation): diffusers' `DiTTransformer2DModel` with ``out_channels = 2C``,
    wrapped in `TransformerWithREPAHead` when aligning.

    Args:
        schedule: the diffusion (default: DiT's `DDPMSchedule.linear()`), on the device of the inputs.
        other arguments: as `REPAFlowObjective` (`path_type`, `time_sampling` do not apply).
    """

    def __init__(
        self, encoders: Sequence[FrozenVisionEncoder] = (), *, schedule: DDPMSchedule | None = None, **kwargs
    ):
        super().__init__(encoders, **kwargs)
        self.schedule = DDPMSchedule.linear() if schedule is None else schedule

    def loss(
        self,
        model: nn.Module,
        x_0: torch.Tensor,
        labels: torch.Tensor,
        targets: list[torch.Tensor],
        generator: torch.Generator,
    ) -> REPALossOutput:
        """DiT's hybrid loss (mse + vb per sample, t and ε drawn from `generator` as DiT does) plus λ · alignment."""
        return improved_ddpm_repa_loss(
            model, x_0, labels, targets, proj_coeff=self.proj_coeff, generator=generator, schedule=self.schedule
        )
