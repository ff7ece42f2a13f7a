"""The EMA of the trained weights: diffusers' `EMAModel`, set up as REPA's or with a warm-up for short runs.

REPA keeps a constant decay (0.9999) from the first step, the average starting as an exact copy of the model:
`EMAModel(decay=d, min_decay=d, update_after_step=-1)` gives exactly that (its default warm-up
(1 + s)/(10 + s) is then clamped to d). Short runs need a decay that grows with the step instead: with
`warmup_power=p` the decay is 1 − (1 + s)^−p, capped at d (diffusers' `use_ema_warmup`; p = 3/4 reaches 0.99 after
~460 steps and 0.999 after 10K). diffusers' `EMAModel` also works on sharded parameters (FSDP2 DTensors; it gathers
ZeRO-3 ones).

`EMAModel` keeps the averages as a flat list; the helpers here name them (checkpoints store them by parameter name in
safetensors) and copy them into a plain module for sampling and export, gathering shards where there are any.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.training_utils import EMAModel
from torch.distributed.tensor import DTensor, distribute_tensor


def create_ema(
    params: Sequence[torch.nn.Parameter], decay: float = 0.9999, warmup_power: float | None = None
) -> EMAModel:
    """An EMA of `params` (the trained parameters, as the optimizer sees them: sharded under FSDP2).

    Args:
        decay: the decay (warmup_power None: from the first step on, as the original REPA; else its cap).
        warmup_power: p of the warm-up schedule 1 − (1 + step)^−p; None keeps the decay constant.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1], got {decay}.")
    if warmup_power is not None and warmup_power <= 0:
        raise ValueError(f"--ema_warmup_power must be positive, got {warmup_power}.")
    return EMAModel(
        params,
        decay=decay,
        min_decay=decay if warmup_power is None else 0.0,
        update_after_step=-1,  # average from the first step on, starting as a copy of the weights
        use_ema_warmup=warmup_power is not None,
        power=warmup_power or 2 / 3,
        foreach=True,
    )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective under FSDP2: every process must call it), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def copy_ema_to(ema: EMAModel, params: Sequence[torch.nn.Parameter]) -> None:
    """Copy the averages into `params` of a plain (unsharded) module with the same parameter order. Call on every
    process under FSDP2 (gathering a shard is collective)."""
    for average, param in zip(ema.shadow_params, params, strict=True):
        param.copy_(_full(average))


def ema_state_dict(ema: EMAModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The averages as whole CPU tensors named by `names` (the trained parameters' names), for safetensors."""
    return {name: _full(average).detach().cpu().contiguous() for name, average in zip(names, ema.shadow_params)}


@torch.no_grad()
def load_ema_state_dict(ema: EMAModel, names: Sequence[str], state: dict[str, torch.Tensor], step: int) -> None:
    """Restore the averages written by [`ema_state_dict`] and the number of updates made (the warm-up's clock)."""
    missing = sorted(set(names) - set(state))
    if missing:
        raise KeyError(f"the EMA weights lack {len(missing)} trained parameter(s), e.g. {missing[0]}")
    for name, average in zip(names, ema.shadow_params):
        value = state[name].to(average.device, average.dtype)
        if isinstance(average, DTensor):  # keep only this process's shard of the whole tensor
            value = distribute_tensor(value, average.device_mesh, average.placements)
        average.copy_(value)
    ema.optimization_step = step
