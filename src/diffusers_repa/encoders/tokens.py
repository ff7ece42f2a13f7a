"""Matching an encoder's token grid with the SiT token grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .vision_encoder import FrozenVisionEncoder


def _square_side(num_tokens: int) -> int | None:
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens else None


def _describe_grid(num_tokens: int) -> str:
    side = _square_side(num_tokens)
    return f"{side}×{side} grid ({num_tokens} tokens)" if side else f"{num_tokens} tokens (not a square grid)"


def check_token_grid(encoder: FrozenVisionEncoder, model_num_tokens: int) -> None:
    """Fail clearly unless `encoder` yields as many patch tokens as the SiT model (alignment is token by token).

    Raises:
        ValueError: naming both grids and the two fixes (a SiT patch size / resolution giving the encoder's grid,
            or `--interpolate_targets`).
    """
    if encoder.num_tokens == model_num_tokens:
        return
    raise ValueError(
        f"Alignment target {encoder.name!r} gives a {_describe_grid(encoder.num_tokens)} for {encoder.resolution}-px "
        f"images, but the SiT model has a {_describe_grid(model_num_tokens)}; REPA aligns them token by token. "
        f"Make the SiT grid {encoder.grid_size}×{encoder.grid_size} (latent side / patch size = {encoder.grid_size}: "
        f"patch size × VAE downsampling = {encoder.token_stride} px per token, e.g. patch size 2 with an 8x VAE for "
        f"16, or patch size 4 in pixel space for 4), or pass --interpolate_targets to resize the encoder tokens "
        f"bilinearly to the model's grid (`interpolate_tokens`)."
    )


def interpolate_tokens(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize patch tokens on their 2-D grid: (N, T, D) → (N, num_tokens, D), bilinear (align_corners=False).

    Both T and `num_tokens` must be square numbers; tokens are row-major over the grid. Returned as is when
    T == num_tokens. Computed in float32, returned in the dtype of `features`.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (N, T, D), got shape {tuple(features.shape)}.")
    batch_size, old_tokens, dim = features.shape
    old_side, new_side = _square_side(old_tokens), _square_side(num_tokens)
    if old_side is None or new_side is None:
        raise ValueError(
            f"interpolate_tokens resizes square token grids; got {old_tokens} → {num_tokens} tokens. "
            "Both must be square numbers (e.g. 1024 → 256)."
        )
    if old_tokens == num_tokens:
        return features
    grid = features.float().transpose(1, 2).reshape(batch_size, dim, old_side, old_side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bilinear", align_corners=False)
    return grid.reshape(batch_size, dim, num_tokens).transpose(1, 2).to(features.dtype)
