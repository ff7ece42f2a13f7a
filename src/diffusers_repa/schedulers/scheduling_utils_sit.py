"""Helpers shared by the SiT samplers (time grids, the precision of the sampling state, diffusers' scheduler API)."""

from __future__ import annotations

import importlib

import torch

from ..pretrained_paths import JSONObjectConfigMixin


def sampling_dtype(device: torch.device | str | None) -> torch.dtype:
    """Precision of the sampler state and time grid on ``device``.

    The original REPA samplers integrate in float64 (the model still runs in its own dtype); Apple's MPS backend has
    no float64, so float32 is used there.
    """
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


def check_num_inference_steps(num_inference_steps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")


class SiTSchedulerMixin(JSONObjectConfigMixin):
    r"""diffusers' scheduler conventions shared by the continuous-time SiT schedulers (listed before diffusers'
    `SchedulerMixin` in their bases).

    - `begin_index` / `set_begin_index`: a run may start part way along `timesteps` (diffusers' img2img convention);
      `set_timesteps` resets it to None, which means 0.
    - ``len(scheduler)`` is diffusers' ``num_train_timesteps``: the factor between `timesteps` and the model's time
      t. Discrete schedulers count 1000 training steps (diffusers' [`FlowMatchEulerDiscreteScheduler`] has timesteps
      ``t · 1000``); these schedulers are continuous in time and their `timesteps` *are* t ∈ [0, 1], so it is 1.
    - `load_config` refuses a config file that is not a JSON object (diffusers would take a JSON list for a Hub id and
      report a connection problem).
    - `compatibles`: the SiT schedulers and diffusers' [`FlowMatchEulerDiscreteScheduler`] (same time convention,
      t = 1 noise, and velocity prediction; for the linear path only), so ``X.from_config(pipe.scheduler.config)``
      swaps between them.

    Subclasses keep `timesteps`, ``_step_index`` (the next entry `step` takes) and ``_begin_index``, and reset them in
    `set_timesteps`.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "SiTODEScheduler", "SiTSDEScheduler"]

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """diffusers resolves the names in `_compatibles` in its own namespace only; these also find the SiT
        schedulers (the subclasses of this mixin)."""
        classes = {subclass.__name__: subclass for subclass in SiTSchedulerMixin.__subclasses__()}
        diffusers = importlib.import_module("diffusers")
        names = dict.fromkeys([cls.__name__, *cls._compatibles])
        found = [classes.get(name) or getattr(diffusers, name, None) for name in names]
        return [scheduler for scheduler in found if scheduler is not None]

    def __len__(self) -> int:
        """1: `timesteps` are the model's continuous time t itself (see the class docstring)."""
        return 1

    @property
    def begin_index(self) -> int | None:
        """Index into `timesteps` where the run starts, as set by `set_begin_index`; None (from 0) otherwise."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]``: the next `step` takes that entry.

        Call after `set_timesteps` (which resets it), before the first `step`, as diffusers' pipelines do.

        Args:
            begin_index: an index into `timesteps` where a solver step starts (for Heun, not a corrector entry).
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `set_begin_index`.")
        if isinstance(begin_index, bool) or not isinstance(begin_index, int):
            raise ValueError(f"begin_index must be an integer, got {begin_index!r}.")
        if not 0 <= begin_index < len(self.timesteps):
            raise ValueError(
                f"begin_index must be in [0, {len(self.timesteps) - 1}] (an index into the {len(self.timesteps)} "
                f"timesteps), got {begin_index}."
            )
        self._begin_index = begin_index
        self._step_index = begin_index
