"""Stochastic SiT sampler: Euler–Maruyama on the reverse SDE from t = 1 (noise) to t = 0 (data).

Numerically the same as ``euler_maruyama_sampler`` of the original REPA code (``samplers.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..interpolants import PATH_TYPES, PathType, velocity_to_score
from .scheduling_utils_sit import SiTSchedulerMixin, check_num_inference_steps, sampling_dtype


@dataclass
class SiTSDESchedulerOutput(BaseOutput):
    """Output of [`SiTSDEScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(N, C, H, W)`): the state at the next time (noise added).
        prev_sample_mean (`torch.Tensor` of shape `(N, C, H, W)`): the same step without the noise term.
    """

    prev_sample: torch.Tensor
    prev_sample_mean: torch.Tensor


class SiTSDEScheduler(SiTSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""Euler–Maruyama sampler of the reverse SDE of a SiT velocity model (t = 1 noise, t = 0 data).

    With diffusion coefficient ``w(t) = 2t`` the reverse SDE is ``dx = [v − ½·w(t)·score] dt + √w(t) dW̄``, where the
    score follows from the velocity through the interpolant path (see
    [`~diffusers_repa.interpolants.velocity_to_score`]). `timesteps` is ``linspace(1, last_step_size, N)``: the first
    ``N − 1`` steps are stochastic, the last one goes deterministically from ``last_step_size`` to 0 (no noise at the
    end). ``N`` steps are ``N`` model calls; `num_stochastic_steps` noises are drawn.

    Keep the sample in float64 between steps (as the original does); `step` computes in the dtype of `sample`.

    Args:
        path_type (`str`, defaults to `"linear"`): the interpolant the model was trained with, `"linear"` or
            `"cosine"`.
        last_step_size (`float`, defaults to 0.04): time of the last (deterministic) step, in (0, 1).
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, path_type: PathType = "linear", last_step_size: float = 0.04):
        if path_type not in PATH_TYPES:
            raise ValueError(f"Unknown path_type {path_type!r}; choose one of {PATH_TYPES}.")
        if (
            isinstance(last_step_size, bool)
            or not isinstance(last_step_size, (int, float))
            or not 0 < last_step_size < 1
        ):
            raise ValueError(f"last_step_size must be a number in (0, 1), got {last_step_size!r}.")
        self.num_inference_steps: int | None = None
        self.time_grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index into `timesteps` of the next `step` call; None before `set_timesteps`."""
        return self._step_index

    @property
    def num_stochastic_steps(self) -> int:
        """How many steps draw noise (all but the last); each takes one `noise` tensor when noise is injected."""
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` first.")
        return self.num_inference_steps - 1

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build `timesteps` = ``linspace(1, last_step_size, num_inference_steps)`` (then a last step to 0).

        Args:
            num_inference_steps: number of steps N = number of model calls.
            device: where `timesteps` lives (float64, float32 on MPS).
        """
        check_num_inference_steps(num_inference_steps)
        # The grid stays on the CPU in float64: `step` reads Python floats from it without device syncs.
        self.time_grid = torch.cat(
            [
                torch.linspace(1.0, self.config.last_step_size, num_inference_steps, dtype=torch.float64),
                torch.zeros(1, dtype=torch.float64),
            ]
        )
        self.timesteps = self.time_grid[:-1].to(device=device, dtype=sampling_dtype(device))
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: flow models take the state unscaled (kept for interchangeability with other schedulers)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SiTSDESchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Advance the state by one entry of `timesteps`.

        Call once per entry of `timesteps`, in order.

        Args:
            model_output: the velocity ``v(sample, timestep)`` (N, C, H, W), guidance already applied (guidance on
                the velocity equals guidance on the drift, which is affine in it); cast to the dtype of `sample`.
            timestep: the current entry of `timesteps` (the scheduler tracks its position itself).
            sample: the state x_t (N, C, H, W) at `timestep`.
            generator: random generator(s) for the Gaussian noise, when `noise` is not given.
            noise: standard Gaussian noise (N, C, H, W) to use instead of a fresh draw (like DDIM's
                `variance_noise`), e.g. to reproduce a recorded run. Not allowed on the last, deterministic step.
            return_dict: return a [`SiTSDESchedulerOutput`] instead of a tuple.

        Returns:
            [`SiTSDESchedulerOutput`] or ``(prev_sample, prev_sample_mean)``.
        """
        if self._step_index is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"All {len(self.timesteps)} steps are done; call `set_timesteps` again to start a new sampling run."
            )
        is_last_step = self._step_index == self.num_inference_steps - 1
        if noise is not None and is_last_step:
            raise ValueError("The last step is deterministic and takes no noise.")
        if noise is not None and noise.shape != sample.shape:
            raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got {tuple(noise.shape)}.")

        t = float(self.time_grid[self._step_index])
        dt = float(self.time_grid[self._step_index + 1]) - t
        diffusion = 2.0 * t
        velocity = model_output.to(sample.dtype)
        time = torch.tensor(t, dtype=sample.dtype, device=sample.device)
        score = velocity_to_score(velocity, sample, time, self.config.path_type)
        drift = velocity - 0.5 * diffusion * score
        prev_sample_mean = sample + drift * dt
        if is_last_step:
            prev_sample = prev_sample_mean
        else:
            if noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample_mean + math.sqrt(diffusion) * (noise.to(sample) * math.sqrt(abs(dt)))
        self._step_index += 1

        if not return_dict:
            return (prev_sample, prev_sample_mean)
        return SiTSDESchedulerOutput(prev_sample=prev_sample, prev_sample_mean=prev_sample_mean)
