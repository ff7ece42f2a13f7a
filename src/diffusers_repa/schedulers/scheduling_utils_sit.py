"""Helpers shared by the SiT samplers (time grids and the precision of the sampling state)."""

from __future__ import annotations

import torch


def sampling_dtype(device: torch.device | str | None) -> torch.dtype:
    """Precision of the sampler state and time grid on ``device``.

    The original REPA samplers integrate in float64 (the model still runs in its own dtype); Apple's MPS backend has
    no float64, so float32 is used there.
    """
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


def check_num_inference_steps(num_inference_steps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
