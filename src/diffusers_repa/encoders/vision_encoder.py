"""Frozen pretrained vision encoders as REPA alignment targets: uint8 images → patch tokens (N, T, D)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .families import FAMILIES, MODEL_TYPE_TO_FAMILY, EncoderFamily
from .registry import (
    DIGITS_ENCODER_NAME,
    ENCODER_ALIASES,
    TOKEN_STRIDE,
    TOKEN_STRIDE_CONFIG_KEY,
    supported_encoders_text,
)

logger = logging.getLogger(__name__)

# Set on the configs written by `save_tiny_random_encoder`, so that loading one says what it is.
RANDOM_SMOKE_ENCODER_FLAG = "diffusers_repa_random_smoke_encoder"


class FrozenVisionEncoder(nn.Module):
    """A frozen vision transformer that maps uint8 images to the patch tokens REPA aligns to.

    Call it on uint8 images (N, 3, R, R), R = `resolution`; it returns float32 patch tokens (N, T, D) with
    T = (R / s)², s = `token_stride` (16: 256 tokens at 256 px, 1024 at 512 px) and D = `embed_dim`, CLS and register
    tokens removed. Preprocessing follows the original REPA for each family (see `preprocess`). It runs without
    gradients and under whatever autocast is active; parameters never require grad and the module stays in eval mode
    even if `.train()` is called on it or a parent module.

    Attributes:
        name: the name it was loaded by (REPA alias in lower case, Hub id or folder).
        family: family key (`dinov2`, `dinov2reg`, `dinov3`, `clip`, `siglip`, `mae`, `jepa`).
        resolution: side R of the images it accepts.
        token_stride: image pixels per token along each side, s (16, REPA's; a checkpoint may declare another in its
            config field `repa_token_stride`).
        input_size: side of the images fed to the ViT (patch size × R / s, e.g. 224 for DINOv2 at 256 px).
        grid_size: patch tokens per side (R / s).
        num_tokens: T = grid_size².
        embed_dim: D.
        model: the underlying transformers model (its position table already fitted to `grid_size`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        family: EncoderFamily,
        name: str,
        resolution: int,
        token_stride: int = TOKEN_STRIDE,
    ) -> None:
        super().__init__()
        self.model = model
        self._family = family
        self.family = family.name
        self.name = name
        self.resolution = resolution
        self.token_stride = token_stride
        self.grid_size = resolution // token_stride
        self.num_tokens = self.grid_size**2
        self.input_size = self.grid_size * model.config.patch_size
        self.embed_dim = model.config.hidden_size
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenVisionEncoder:
        """Ignore `mode`: an alignment target is never trained (no dropout, no DINOv3 RoPE jitter)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, R, R) → normalised float32 pixels (N, 3, S, S), S = `input_size`, as the original REPA (see
        `EncoderFamily.pixel_values`), after checking the dtype and the shape."""
        if images.dtype != torch.uint8:
            raise TypeError(f"{self.name} expects uint8 images in [0, 255], got dtype {images.dtype}.")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"{self.name} was loaded for images (N, 3, {self.resolution}, {self.resolution}), got "
                f"{tuple(images.shape)}. Load it with resolution={images.shape[-1]} for other image sizes."
            )
        return self._family.pixel_values(images, self.input_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, R, R) → float32 patch tokens (N, T, D), row-major over the token grid."""
        pixel_values = self.preprocess(images).to(self.model.dtype)
        return self._family.patch_tokens(self.model, pixel_values).float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, family={self.family}, resolution={self.resolution}, tokens={self.num_tokens}"


@dataclass(frozen=True)
class _ResolvedEncoder:
    name: str  # the alias in its canonical (lower-case) spelling, else the Hub id / folder as given
    source: str  # what `from_pretrained` loads
    family: EncoderFamily
    token_stride: int  # TOKEN_STRIDE unless the checkpoint's config declares its own


def _declared_token_stride(config, name: str) -> int:
    stride = getattr(config, TOKEN_STRIDE_CONFIG_KEY, TOKEN_STRIDE)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"Encoder {name!r} declares {TOKEN_STRIDE_CONFIG_KEY}={stride!r}; it must be a positive int.")
    return stride


def _unknown_name_error(name: str, reason: str) -> ValueError:
    return ValueError(
        f"Unknown encoder {name!r}: {reason}. Use one of the supported names (or its Hub id, or a local folder "
        f"with a transformers checkpoint of the same families):\n{supported_encoders_text()}"
    )


def builtin_encoder_folder(name: str) -> str | None:
    """The local folder of a built-in encoder name (`digits-vit`: pretrained on scikit-learn's digits in seconds the
    first time, reused after), or None for any other name."""
    if name.strip().lower() != DIGITS_ENCODER_NAME:
        return None
    from .digits import default_digits_encoder_dir, pretrain_digits_encoder  # scikit-learn, only when asked for

    return str(pretrain_digits_encoder(default_digits_encoder_dir()))


def _resolve(name_or_path: str, revision: str | None, cache_dir: str | None) -> _ResolvedEncoder:
    spec = ENCODER_ALIASES.get(name_or_path.lower())
    if spec is not None:
        return _ResolvedEncoder(name_or_path.lower(), spec.hub_id, FAMILIES[spec.family], TOKEN_STRIDE)
    builtin = builtin_encoder_folder(name_or_path)
    if builtin is not None:
        resolved = _resolve(builtin, revision, cache_dir)
        return _ResolvedEncoder(name_or_path.lower(), resolved.source, resolved.family, resolved.token_stride)
    if "/" not in name_or_path and not os.path.isdir(name_or_path):
        raise _unknown_name_error(name_or_path, "not a supported name, Hub id or local folder")
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError, KeyError) as error:
        raise _unknown_name_error(
            name_or_path,
            f"no loadable config in a local folder or the Hub cache ({error}); with HF_HUB_OFFLINE=1, download it "
            f"first (`hf download {name_or_path}`)",
        ) from error
    family = MODEL_TYPE_TO_FAMILY.get(config.model_type)
    if family is None:
        raise _unknown_name_error(
            name_or_path,
            f"model_type {config.model_type!r} is not a supported family ({', '.join(sorted(MODEL_TYPE_TO_FAMILY))})",
        )
    return _ResolvedEncoder(name_or_path, name_or_path, FAMILIES[family], _declared_token_stride(config, name_or_path))


def load_encoder(
    name_or_path: str | os.PathLike,
    resolution: int = 256,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> FrozenVisionEncoder:
    """Load a frozen alignment-target encoder.

    Args:
        name_or_path: a REPA-style name (`dinov2-vit-b`, `dinov2reg-vit-l`, `clip-vit-L`, `mae-vit-l`, `jepa-vit-h`,
            `dinov3-vit-b`, `siglip2-vit-b`, …; see `ENCODER_ALIASES`), `digits-vit` (built in: pretrained on the
            digits on first use, 16 tokens at 16 px), a Hub id, or a local folder holding a transformers checkpoint
            of a supported family. Hub ids load from the cache when `HF_HUB_OFFLINE=1`.
            Remote code is never run.
        resolution: side R of the (square, uint8) training images; a multiple of the token stride s (16, or what
            the checkpoint declares in its config field `repa_token_stride`). The encoder yields (R/s)² tokens: its
            position table is resampled once here (bicubic, antialias, as the original REPA). The original
            supports 512 px only with DINOv2; other families follow the same rule there as an extension.
        dtype: dtype of the weights (default float32). The output is float32 regardless.
        device: where to put the weights.
        revision: Hub revision.
        cache_dir: Hub cache folder (default: the huggingface_hub cache).

    Returns:
        A `FrozenVisionEncoder`.

    Raises:
        ValueError: unknown name (the message lists the supported ones), unsupported family, bad resolution, or a
            checkpoint missing weights.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int (e.g. 256 or 512), got {resolution!r}.")
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    resolved = _resolve(os.fspath(name_or_path).strip(), revision, cache_dir)
    if resolution % resolved.token_stride:
        raise ValueError(
            f"resolution must be a multiple of {resolved.token_stride}, the token stride of {resolved.name!r} "
            f"(pixels per token), got {resolution}."
        )
    model = resolved.family.load(resolved.source, revision=revision, cache_dir=cache_dir)
    if getattr(model.config, RANDOM_SMOKE_ENCODER_FLAG, False):
        logger.warning(
            "Encoder %r is a tiny RANDOMLY INITIALISED smoke-test model, not a pretrained encoder: "
            "its features are meaningless for representation alignment.",
            resolved.name,
        )
    resolved.family.set_token_grid(model, resolution // resolved.token_stride)
    model.to(device=device, dtype=dtype)
    return FrozenVisionEncoder(model, resolved.family, resolved.name, resolution, resolved.token_stride)


def load_encoders(
    names: str | list[str],
    resolution: int = 256,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[FrozenVisionEncoder]:
    """Several alignment targets, in order (one projector each): `"dinov2-vit-b,clip-vit-l"` or a list of names.

    Each name is loaded with `load_encoder` and the same arguments (latest revision of each Hub repo).
    """
    if isinstance(names, str):
        names = names.split(",")
    names = [name.strip() for name in names]
    if not names or any(not name for name in names):
        raise ValueError(
            f"Empty encoder name in {names!r}; give comma-separated names such as 'dinov2-vit-b,clip-vit-l'."
        )
    return [load_encoder(name, resolution, dtype, device, cache_dir=cache_dir) for name in names]
