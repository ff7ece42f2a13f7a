"""DiT's improved-DDPM training loss: ε-MSE plus the variational bound that learns the variance (Nichol & Dhariwal).

This is the objective of DiT (facebookresearch/DiT, ``diffusion/gaussian_diffusion.py: training_losses``) as
``create_diffusion(timestep_respacing="")`` configures it: 1000 discrete steps, the linear β schedule
β_t = linspace(1e-4, 0.02, 1000), ε prediction, learned-range variance (``learn_sigma=True``) and ``LossType.MSE``.

Conventions (DDPM's, not the flow-matching ones of `interpolants.py`): t is an **integer step in [0, T)**, t = 0 the
first noising step (almost clean) and t = T − 1 almost pure noise; x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε. The model sees x_t
and the integer t and outputs 2C channels: ε̂ (the first C) and v ∈ [−1, 1] (the last C, not clamped), which
interpolates the log-variance of p(x_{t−1} | x_t) between the posterior's clipped log-variance (v = −1) and log β_t
(v = 1). Per sample:

    mse  = mean over C·H·W of (ε − ε̂)²
    vb   = KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)) in bits per dimension, or at t = 0 the discretised Gaussian
           decoder NLL of x_0 (bits per dimension), computed with ε̂ **detached**: the bound trains only the variance
    loss = mse + vb

As in DiT, the schedule is held in float64 and each gathered coefficient is cast to float32 before it meets the
model output, so the loss is computed in float32 whatever the autocast dtype of the model was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .losses import REPALossOutput, projection_loss

DDPM_NUM_TIMESTEPS = 1000


@dataclass(frozen=True)
class DDPMSchedule:
    """Coefficients of a discrete Gaussian diffusion, float64 tensors of shape (T,), indexed by the step t.

    Attributes:
        betas: β_t. alphas_cumprod: ᾱ_t = Π_{s ≤ t} (1 − β_s).
        posterior_log_variance_clipped: log of the variance of q(x_{t−1} | x_t, x_0); at t = 0, where that variance
            is 0, the value of t = 1 (DiT's clipping).
        posterior_mean_coef1, posterior_mean_coef2: the posterior mean is coef1·x_0 + coef2·x_t.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> DDPMSchedule:
        """The schedule of the given β_t (T ≥ 2), computed in float64."""
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1].")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        )

    @classmethod
    def linear(cls, num_timesteps: int = DDPM_NUM_TIMESTEPS) -> DDPMSchedule:
        """DDPM's linear schedule, β from 1e-4 to 0.02 scaled by 1000 / T (DiT's ``get_named_beta_schedule``)."""
        scale = 1000 / num_timesteps
        return cls.from_betas(torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64))

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def to(self, device: torch.device | str) -> DDPMSchedule:
        """The same schedule (still float64) on `device`, so that no step copies it there again."""
        return DDPMSchedule(**{field.name: getattr(self, field.name).to(device) for field in fields(self)})


def _gather(coefficients: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """coefficients[t] as float32 (N, 1, ..., 1) with `ndim` dimensions, on t's device (DiT's float64 → float32)."""
    values = coefficients.to(t.device)[t].float()
    return values.view(-1, *([1] * (ndim - 1)))


def q_sample(x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: DDPMSchedule) -> torch.Tensor:
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε for (N, C, H, W) x_0 and noise and integer steps t (N,)."""
    alphas_cumprod = schedule.alphas_cumprod
    return (
        _gather(alphas_cumprod.sqrt(), t, x_start.ndim) * x_start
        + _gather((1.0 - alphas_cumprod).sqrt(), t, x_start.ndim) * noise
    )


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Φ that DiT (and ADM, IDDPM) use; the exact erf would change the loss values.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of data x ∈ [−1, 1] quantised to 256 bins, under N(means, e^(2·log_scales)).

    Bins are 2/255 wide; the outermost ones extend to ±∞ (x < −0.999 or x > 0.999), as in DiT.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class DDPMLossTerms:
    """Per-sample terms (N,) of the improved-DDPM loss, float32 (DiT's ``terms`` dict).

    Attributes:
        mse: mean squared ε error. vb: variational-bound term in bits per dimension (decoder NLL at t = 0), with
            the mean prediction detached. loss: mse + vb.
    """

    mse: torch.Tensor
    vb: torch.Tensor
    loss: torch.Tensor


def improved_ddpm_loss(
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    schedule: DDPMSchedule | None = None,
) -> DDPMLossTerms:
    """DiT's hybrid loss L_simple + L_vlb of a learned-variance ε model, per sample.

    Args:
        model_output: (N, 2C, H, W) model output at (x_t, t): ε̂ in the first C channels, the variance value v in
            the last C.
        x_start: clean x_0 (N, C, H, W), the x_0 from which x_t was drawn with `noise` (see `q_sample`).
        t: integer steps (N,) in [0, T).
        noise: ε (N, C, H, W).
        schedule: the diffusion (default: DiT's linear 1000-step schedule).

    Returns:
        [`DDPMLossTerms`] with (N,) float32 `mse`, `vb`, `loss`. DiT trains on ``loss.mean()``.
    """
    schedule = DDPMSchedule.linear() if schedule is None else schedule
    batch, channels = x_start.shape[:2]
    if model_output.shape != (batch, 2 * channels, *x_start.shape[2:]) or noise.shape != x_start.shape:
        raise ValueError(
            f"model_output must have shape {(batch, 2 * channels, *x_start.shape[2:])} (ε and the variance value "
            f"for each of the {channels} channels) and noise the shape of x_start {tuple(x_start.shape)}; got "
            f"{tuple(model_output.shape)} and {tuple(noise.shape)}."
        )
    if t.shape != (batch,) or t.dtype.is_floating_point:
        raise ValueError(
            f"t must hold {batch} integer steps in [0, {schedule.num_timesteps}), got {t.dtype} {tuple(t.shape)}."
        )
    model_output, x_start, noise = model_output.float(), x_start.float(), noise.float()
    ndim = x_start.ndim
    x_t = q_sample(x_start, t, noise, schedule)
    eps, var_values = model_output.split(channels, dim=1)

    # The bound learns only the variance: the mean enters it through the detached ε̂.
    min_log = _gather(schedule.posterior_log_variance_clipped, t, ndim)
    max_log = _gather(torch.log(schedule.betas), t, ndim)
    frac = (var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    sqrt_recip_alphas_cumprod = _gather(torch.sqrt(1.0 / schedule.alphas_cumprod), t, ndim)
    sqrt_recipm1_alphas_cumprod = _gather(torch.sqrt(1.0 / schedule.alphas_cumprod - 1), t, ndim)
    pred_xstart = sqrt_recip_alphas_cumprod * x_t - sqrt_recipm1_alphas_cumprod * eps.detach()
    coef1 = _gather(schedule.posterior_mean_coef1, t, ndim)
    coef2 = _gather(schedule.posterior_mean_coef2, t, ndim)
    model_mean = coef1 * pred_xstart + coef2 * x_t
    true_mean = coef1 * x_start + coef2 * x_t

    kl = normal_kl(true_mean, min_log, model_mean, model_log_variance).flatten(1).mean(dim=1) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
    decoder_nll = decoder_nll.flatten(1).mean(dim=1) / math.log(2.0)
    vb = torch.where(t == 0, decoder_nll, kl)
    mse = (noise - eps).pow(2).flatten(1).mean(dim=1)
    return DDPMLossTerms(mse=mse, vb=vb, loss=mse + vb)


def sample_ddpm_inputs(
    x_start: torch.Tensor,
    generator: torch.Generator | None = None,
    num_timesteps: int = DDPM_NUM_TIMESTEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT's draws for one batch: steps t (N,) int64 uniform in [0, T) and noise ε ~ N(0, I) like x_start.

    Both come from `generator` (t first, then ε), on x_start's device; ε has x_start's dtype.
    """
    t = torch.randint(0, num_timesteps, (x_start.shape[0],), device=x_start.device, generator=generator)
    noise = torch.randn(x_start.shape, device=x_start.device, dtype=x_start.dtype, generator=generator)
    return t, noise


@dataclass
class DDPMREPALossOutput(REPALossOutput):
    """[`REPALossOutput`] of the improved-DDPM objective: `denoising_loss` is the per-sample hybrid mse + vb (N,).

    Attributes:
        mse, vb: its two per-sample terms (N,) (see [`DDPMLossTerms`]).
    """

    mse: torch.Tensor
    vb: torch.Tensor


def improved_ddpm_repa_loss(
    model: torch.nn.Module,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    targets: Sequence[torch.Tensor] = (),
    *,
    proj_coeff: float = 0.5,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    schedule: DDPMSchedule | None = None,
) -> DDPMREPALossOutput:
    """One evaluation of DiT's objective plus λ · REPA alignment, on clean latents.

    loss = mean_n (mse + vb) + proj_coeff · projection_loss(targets, projections of the tokens after block k).

    Args:
        model: a class-conditional ε-and-variance transformer called as ``model(x_t, timestep=t,
            class_labels=class_labels, return_dict=False)`` whose first output is (N, 2C, H, W), e.g. diffusers'
            `DiTTransformer2DModel` with ``out_channels = 2 · in_channels`` (its timestep is the integer step). When
            aligning it is also passed ``return_projections=True`` and must return ``(sample, projections)``: wrap a
            plain transformer in [`TransformerWithREPAHead`].
        latents: clean, scaled latents x_0 (N, C, H, W). class_labels: (N,) ids.
        targets: encoder features of the clean images, one (N, T, D_k) tensor per projector; empty (or
            ``proj_coeff == 0``) skips the alignment term and the projectors.
        t, noise: fixed steps (N,) and noise (default: `sample_ddpm_inputs` with `generator`: t, then ε).
        schedule: the diffusion (default: DiT's linear 1000-step schedule).
    """
    schedule = DDPMSchedule.linear() if schedule is None else schedule
    if t is None or noise is None:
        drawn_t, drawn_noise = sample_ddpm_inputs(latents, generator, schedule.num_timesteps)
        t = drawn_t if t is None else t
        noise = drawn_noise if noise is None else noise
    t = t.to(latents.device)
    x_t = q_sample(latents.float(), t, noise.float(), schedule).to(latents.dtype)
    align = bool(targets) and proj_coeff != 0
    if align:
        output = model(x_t, timestep=t, class_labels=class_labels, return_projections=True, return_dict=False)
        model_output, projections = output[:2]
    else:  # a plain diffusers transformer knows no return_projections
        model_output = model(x_t, timestep=t, class_labels=class_labels, return_dict=False)[0]
    terms = improved_ddpm_loss(model_output, latents, t, noise, schedule)
    alignment = projection_loss(targets, projections) if align else terms.loss.new_zeros(())
    return DDPMREPALossOutput(
        loss=terms.loss.mean() + proj_coeff * alignment,
        denoising_loss=terms.loss,
        projection_loss=alignment,
        mse=terms.mse,
        vb=terms.vb,
    )
