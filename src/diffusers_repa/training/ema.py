"""Exponential moving average of a model's weights, as in the original REPA (constant decay, no warm-up).

diffusers' `EMAModel` ramps the decay up as (1 + step) / (10 + step); REPA uses a constant 0.9999 from the first
step, with the average starting as an exact copy of the model. This helper does only that.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An averaged copy of `model`: after every optimizer step, `ema = decay · ema + (1 − decay) · param`.

    Only the parameters that require grad are averaged (all of them in full training; the adapter and projector
    weights under LoRA); everything else in the copy stays as it was at construction.

    Args:
        model: the model being trained, as a plain module: copy it before `accelerator.prepare` (which patches the
            instance's `forward`) and before `compile_repeated_blocks` (a copy of a compiled module would call the
            original's blocks). `update` may then be given the prepared model's unwrapped module.
        decay: weight of the old average per step, in [0, 1]; 0 makes the EMA a plain copy of the model.

    Attributes:
        model: the averaged model, in eval mode, with no parameter requiring grad.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {decay}.")
        self.decay = decay
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        averaged = dict(self.model.named_parameters())
        self.averaged_params = [averaged[name] for name in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current weights (same architecture as at construction)."""
        params = dict(model.named_parameters())
        # lerp(ema, param, 1 − decay) = decay · ema + (1 − decay) · param, one fused kernel per dtype/device group.
        torch._foreach_lerp_(self.averaged_params, [params[name].detach() for name in self.names], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)
