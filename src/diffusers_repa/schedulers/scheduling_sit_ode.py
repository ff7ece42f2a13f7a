"""Deterministic SiT sampler: the probability-flow ODE dx/dt = v(x, t) integrated from t = 1 (noise) to t = 0 (data).

Numerically the same as ``euler_sampler`` of the original REPA code (``samplers.py``), including its Heun variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .scheduling_utils_sit import SiTSchedulerMixin, check_num_inference_steps, sampling_dtype

ODE_SOLVERS = ("euler", "heun")


@dataclass
class SiTODESchedulerOutput(BaseOutput):
    """Output of [`SiTODEScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(N, C, H, W)`): the state at the next entry of `timesteps` (for the
            Heun predictor: the Euler estimate at the end of the interval, which the model evaluates next).
    """

    prev_sample: torch.Tensor


class SiTODEScheduler(SiTSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""Euler or Heun integration of the velocity ODE on the grid ``t_i = 1 − i/N``, i = 0..N (t = 1 noise, t = 0 data).

    The model predicts the velocity ``v(x_t, t)``; `timesteps` holds the times at which to evaluate it, and they are
    the model's own time input (no rescaling).

    With ``solver="heun"`` the scheduler follows diffusers' [`HeunDiscreteScheduler`] interface: `timesteps` repeats
    every interior grid point, ``[t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]``. At the first occurrence the step is an Euler
    predictor (``state_in_first_order`` is True); at the second it is the trapezoidal corrector, which needs the
    model evaluated at the predicted state. The last interval is a plain Euler step, as in the original, so ``N``
    intervals take ``2N − 1`` model calls and a plain ``for t in scheduler.timesteps`` loop drives both solvers.

    Keep the sample in float64 between steps (as the original does) and cast it to the model's dtype only for the
    model call; `step` computes in the dtype of `sample`.

    Args:
        solver (`str`, defaults to `"euler"`): `"euler"` (N model calls) or `"heun"` (2N − 1 model calls).
    """

    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, solver: Literal["euler", "heun"] = "euler"):
        if solver not in ODE_SOLVERS:
            raise ValueError(f"Unknown solver {solver!r}; choose one of {ODE_SOLVERS}.")
        self.num_inference_steps: int | None = None
        self.time_grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        # Heun: (sample, velocity, dt) of the predictor, kept until the corrector step.
        self._predictor: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def order(self) -> int:
        """Model calls per grid interval: 2 for Heun, 1 for Euler."""
        return 2 if self.config.solver == "heun" else 1

    @property
    def step_index(self) -> int | None:
        """Index into `timesteps` of the next `step` call; None before `set_timesteps`."""
        return self._step_index

    @property
    def state_in_first_order(self) -> bool:
        """True when the next `step` is an Euler (predictor) step, False when it is a Heun corrector."""
        return self._predictor is None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the grid ``linspace(1, 0, num_inference_steps + 1)`` and the evaluation times `timesteps`.

        Args:
            num_inference_steps: number of grid intervals N (N model calls for Euler, 2N − 1 for Heun).
            device: where `timesteps` lives (float64, float32 on MPS).
        """
        check_num_inference_steps(num_inference_steps)
        # The grid stays on the CPU in float64: `step` reads Python floats from it without device syncs.
        self.time_grid = torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float64)
        points = self.time_grid[:-1]
        if self.config.solver == "heun":
            points = torch.cat([points[:1], points[1:].repeat_interleave(2)])
        self.timesteps = points.to(device=device, dtype=sampling_dtype(device))
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._begin_index = None
        self._predictor = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]`` (see [`SiTSchedulerMixin.set_begin_index`]); with Heun it
        must be a predictor entry, i.e. even (entry ``2k`` starts interval k)."""
        if self.config.solver == "heun" and isinstance(begin_index, int) and begin_index % 2:
            raise ValueError(
                f"begin_index {begin_index} is a Heun corrector entry; a run starts at a predictor entry (an even "
                "index: 2k starts grid interval k)."
            )
        super().set_begin_index(begin_index)
        self._predictor = None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: flow models take the state unscaled (kept for interchangeability with other schedulers)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SiTODESchedulerOutput | tuple[torch.Tensor]:
        """Advance the state by one entry of `timesteps`.

        Call once per entry of `timesteps`, in order.

        Args:
            model_output: the velocity ``v(sample, timestep)`` (N, C, H, W), guidance already applied; it is cast to
                the dtype of `sample`.
            timestep: the current entry of `timesteps` (the scheduler tracks its position itself).
            sample: the state x_t (N, C, H, W) at `timestep`.
            return_dict: return a [`SiTODESchedulerOutput`] instead of a tuple.

        Returns:
            [`SiTODESchedulerOutput`] or ``(prev_sample,)``.
        """
        if self._step_index is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"All {len(self.timesteps)} steps are done; call `set_timesteps` again to start a new sampling run."
            )
        velocity = model_output.to(sample.dtype)
        grid = self.time_grid
        if self.config.solver == "euler":
            interval = self._step_index
            prev_sample = sample + float(grid[interval + 1] - grid[interval]) * velocity
        elif self.state_in_first_order:
            interval = self._step_index // 2
            dt = float(grid[interval + 1] - grid[interval])
            prev_sample = sample + dt * velocity
            if interval < self.num_inference_steps - 1:
                self._predictor = (sample, velocity, dt)
        else:
            start, start_velocity, dt = self._predictor
            prev_sample = start + dt * (0.5 * start_velocity + 0.5 * velocity)
            self._predictor = None
        self._step_index += 1

        if not return_dict:
            return (prev_sample,)
        return SiTODESchedulerOutput(prev_sample=prev_sample)
