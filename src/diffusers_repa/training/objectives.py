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
        return self.loss(model, x_0, self.condition(batch, generator), targets, generator)

    def condition(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """What the model is conditioned on: the class labels (N,) (their dropout happens inside the model)."""
        return batch["label"]

    def loss(
        self,
        model: nn.Module,
        x_0: torch.Tensor,
        condition: torch.Tensor,
        targets: list[torch.Tensor],
        generator: torch.Generator,
    ) -> REPALossOutput:
        """The diffusion loss on clean inputs x_0 (N, C, h, w) given `condition` (the model's third argument: class
        labels, or text token features) plus λ · alignment: SiT's velocity regression."""
        return repa_loss(
            model,
            x_0,
            condition,
            targets,
            proj_coeff=self.proj_coeff,
            path_type=self.path_type,
            time_sampling=self.time_sampling,
            generator=generator,
        )


class TextToImageObjective(REPAFlowObjective):
    """REPA's text-to-image objective (the original's `train_t2i.py`): `REPAFlowObjective`'s velocity loss and
    alignment, conditioned on text token features instead of class labels — an `MMDiTTransformer2DModel` called as
    ``model(x_t, t, context)``.

    The context of a sample is its drawn caption's features: ``batch["text_features"]`` (N, L, D) when the cache holds
    them, else `encode_text` of ``batch["caption"]`` (list of N strings) on the fly. With probability `caption_dropout`
    a sample gets `null_context` (the empty caption's features, (1, L, D)) instead, so that the model also learns the
    unconditional velocity that classifier-free guidance needs; the draw comes from `generator` (one uniform per
    sample, before the loss's own draws), so a resumed run drops the same captions as an uninterrupted one.

    Args:
        null_context: the empty caption's features (1, L, D), on the training device.
        caption_dropout: probability of training a sample unconditionally (the original's 0.1).
        encode_text: captions → features (N, L, D), for caches without features (None: the batch must hold them).
        other arguments: as `REPAFlowObjective`.
    """

    def __init__(
        self,
        encoders: Sequence[FrozenVisionEncoder] = (),
        *,
        null_context: torch.Tensor,
        caption_dropout: float = 0.1,
        encode_text: Callable[[list[str]], torch.Tensor] | None = None,
        **kwargs,
    ):
        super().__init__(encoders, **kwargs)
        self.null_context = null_context
        self.caption_dropout = caption_dropout
        self.encode_text = encode_text

    def condition(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The text context (N, L, D) of each sample: its caption's features, or the null context if dropped."""
        if "text_features" in batch:
            context = batch["text_features"]
        elif self.encode_text is not None:
            with torch.no_grad(), self.autocast():
                context = self.encode_text(list(batch["caption"])).float()
        else:
            raise ValueError(
                "The batch holds no `text_features` and the objective has no text encoder: build the cache with a "
                "text encoder, or pass encode_text."
            )
        null = self.null_context.to(device=context.device, dtype=context.dtype)
        keep = torch.rand(context.shape[0], generator=generator, device=generator.device) >= self.caption_dropout
        return torch.where(keep.to(context.device)[:, None, None], context, null)


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
        condition: torch.Tensor,
        targets: list[torch.Tensor],
        generator: torch.Generator,
    ) -> REPALossOutput:
        """DiT's hybrid loss (mse + vb per sample, t and ε drawn from `generator` as DiT does) plus λ · alignment."""
        return improved_ddpm_repa_loss(
            model, x_0, condition, targets, proj_coeff=self.proj_coeff, generator=generator, schedule=self.schedule
        )
