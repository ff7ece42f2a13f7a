"""One adapter per encoder family: which transformers class loads it, how images are normalised, how its
position table is fitted to the token grid once at load, and which output tokens are the patch tokens.

Everything here mirrors what the original REPA code (sihyun-yu/REPA, `utils.load_encoders` and
`train.preprocess_raw_image`) does with the original (timm / torch.hub / OpenAI CLIP) models.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    IJepaModel,
    PreTrainedModel,
    SiglipVisionModel,
    ViTMAEModel,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from transformers.utils import logging as transformers_logging


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings for a block: its load report lists every unused key (CLIP/SigLIP text towers,
    the MAE decoder), which is expected here; what matters (missing weights) is checked by the caller."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def resample_position_embeddings(table: torch.Tensor, grid_size: int, num_prefix_tokens: int) -> torch.Tensor:
    """Resample a learned absolute position table to a `grid_size`×`grid_size` patch grid.

    The original REPA does this once at load with timm's `resample_abs_pos_embed`: prefix (CLS) rows are kept,
    the square patch grid is resized with `F.interpolate(mode="bicubic", antialias=True)` in float32.

    Args:
        table: (1, P + g0², D) with P = `num_prefix_tokens` rows in front of the row-major g0×g0 grid.
        grid_size: new side g.
        num_prefix_tokens: P (1 for a CLS position, 0 when the table has patch positions only).

    Returns:
        (1, P + g², D) in the dtype of `table`; `table` itself when g0 == g.
    """
    prefix, patch_table = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    old_size = math.isqrt(patch_table.shape[1])
    if old_size * old_size != patch_table.shape[1]:
        raise ValueError(f"Position table has {patch_table.shape[1]} patch rows, not a square grid.")
    if old_size == grid_size:
        return table
    dim = table.shape[-1]
    grid = patch_table.float().reshape(1, old_size, old_size, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True)
    patch_table = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(table.dtype)
    return torch.cat([prefix, patch_table], dim=1)


def _set_parameter_position_table(model: PreTrainedModel, grid_size: int, num_prefix_tokens: int) -> None:
    """Fit a table stored as `embeddings.position_embeddings` (DINOv2, ViT-MAE, I-JEPA) to the grid.

    The image size recorded in the config and the embedding modules is updated too, so that the model's own forward
    accepts the new input size and uses the table as is (no per-forward interpolation).
    """
    embeddings = model.embeddings
    table = resample_position_embeddings(embeddings.position_embeddings.data, grid_size, num_prefix_tokens)
    if table is embeddings.position_embeddings.data:
        return
    embeddings.position_embeddings = nn.Parameter(table, requires_grad=False)
    side = grid_size * model.config.patch_size
    model.config.image_size = side
    embeddings.patch_embeddings.image_size = (side, side)
    embeddings.patch_embeddings.num_patches = grid_size * grid_size
    if hasattr(embeddings, "image_size"):  # ViT-MAE and I-JEPA check the input size against it
        embeddings.image_size = (side, side)


def _set_embedding_position_table(model: PreTrainedModel, grid_size: int, num_prefix_tokens: int) -> None:
    """Fit a table stored as `nn.Embedding` `embeddings.position_embedding` (CLIP, SigLIP) to the grid."""
    embeddings = model.embeddings
    weight = embeddings.position_embedding.weight.data
    table = resample_position_embeddings(weight.unsqueeze(0), grid_size, num_prefix_tokens)[0]
    if table.shape == weight.shape:
        return
    embeddings.position_embedding = nn.Embedding.from_pretrained(table, freeze=True)
    embeddings.position_ids = torch.arange(table.shape[0], device=table.device).expand(1, -1)
    embeddings.num_patches = grid_size * grid_size
    embeddings.num_positions = table.shape[0]
    side = grid_size * model.config.patch_size
    embeddings.image_size = side
    model.config.image_size = side


class EncoderFamily(ABC):
    """How one family of vision transformers is loaded and read as an alignment target.

    Class attributes:
        name: family key.
        model_class: transformers class loaded with `from_pretrained` (never with remote code).
        image_mean / image_std: per-channel normalisation of the [0, 1] images.
        normalize_before_resize: the original normalises before the bicubic resize for DINOv2 / I-JEPA and after it
            for CLIP; the order changes results by float rounding only, but we keep it to match exactly.
        config_overrides: config fields forced at load so that the model behaves like the original encoder.
    """

    name: str
    model_class: type[PreTrainedModel]
    image_mean: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    image_std: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    normalize_before_resize: bool = True
    config_overrides: Mapping[str, Any] = {}

    def load(self, source: str, revision: str | None = None, cache_dir: str | None = None) -> PreTrainedModel:
        """Load float32 weights from a Hub id (cache honoured, `HF_HUB_OFFLINE=1` works) or a local folder.

        Raises:
            ValueError: the checkpoint lacks weights the model needs (they would be random in a frozen target).
        """
        with quiet_transformers():
            model, info = self.model_class.from_pretrained(
                source,
                revision=revision,
                cache_dir=cache_dir,
                dtype=torch.float32,
                output_loading_info=True,
                **self.config_overrides,
            )
        missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        if missing:
            raise ValueError(
                f"Checkpoint {source!r} does not hold all weights of {self.model_class.__name__} "
                f"(missing or mismatched: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}). "
                f"Is it a {self.name} checkpoint?"
            )
        return model

    def pixel_values(self, images: torch.Tensor, input_size: int) -> torch.Tensor:
        """uint8 (N, 3, R, R) → normalised float32 pixels (N, 3, S, S), S = `input_size`, as the original REPA.

        ÷255, then the family's mean/std and a bicubic resize (no antialias) to S when S ≠ R: normalisation first for
        DINOv2/DINOv3/I-JEPA/MAE, resize first for CLIP/SigLIP. Computed in float32 with autocast disabled.
        """
        with torch.autocast(device_type=images.device.type, enabled=False):
            mean = torch.tensor(self.image_mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
            pixels = images.to(torch.float32) / 255.0
            if self.normalize_before_resize:
                pixels = (pixels - mean) / std
            if pixels.shape[-1] != input_size:
                pixels = F.interpolate(pixels, size=(input_size, input_size), mode="bicubic")
            if not self.normalize_before_resize:
                pixels = (pixels - mean) / std
        return pixels

    @abstractmethod
    def set_token_grid(self, model: PreTrainedModel, grid_size: int) -> None:
        """Fit the position encoding to a `grid_size`×`grid_size` patch grid, once, at load time."""

    @abstractmethod
    def patch_tokens(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, T, D) patch tokens, prefix (CLS / register) tokens dropped."""


class Dinov2Family(EncoderFamily):
    """DINOv2: tokens after the final LayerNorm (the original's `x_norm_patchtokens`), CLS dropped."""

    name = "dinov2"
    model_class = Dinov2Model

    def set_token_grid(self, model: PreTrainedModel, grid_size: int) -> None:
        # Dinov2Embeddings.interpolate_pos_encoding returns the table unchanged when the token count matches it and
        # the input is square, so after this the forward uses exactly the resampled table.
        _set_parameter_position_table(model, grid_size, num_prefix_tokens=1)

    def patch_tokens(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        num_prefix = 1 + getattr(model.config, "num_register_tokens", 0)
        return model(pixel_values=pixel_values).last_hidden_state[:, num_prefix:]


class Dinov2WithRegistersFamily(Dinov2Family):
    """DINOv2 with registers: as DINOv2, and the register tokens (after CLS) are dropped too."""

    name = "dinov2reg"
    model_class = Dinov2WithRegistersModel


class Dinov3Family(EncoderFamily):
    """DINOv3 ViT (patch 16, RoPE): tokens after the final norm, CLS and register tokens dropped.

    RoPE positions follow the input grid, so nothing is resampled: a 256-px image is fed as is (16×16 patches).
    """

    name = "dinov3"
    model_class = DINOv3ViTModel

    def set_token_grid(self, model: PreTrainedModel, grid_size: int) -> None:
        """Nothing to fit: rotary positions are computed from the input's patch grid."""

    def patch_tokens(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        num_prefix = 1 + model.config.num_register_tokens
        return model(pixel_values=pixel_values).last_hidden_state[:, num_prefix:]


class ClipFamily(EncoderFamily):
    """CLIP vision tower: last encoder output before `post_layernorm` (which the original applies to CLS only)."""

    name = "clip"
    model_class = CLIPVisionModel
    image_mean = tuple(OPENAI_CLIP_MEAN)
    image_std = tuple(OPENAI_CLIP_STD)
    normalize_before_resize = False

    def set_token_grid(self, model: PreTrainedModel, grid_size: int) -> None:
        _set_embedding_position_table(model, grid_size, num_prefix_tokens=1)

    def patch_tokens(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).last_hidden_state[:, 1:]


class SiglipFamily(EncoderFamily):
    """SigLIP / SigLIP 2 (fixed resolution) vision tower: no CLS; tokens after `post_layernorm`, which normalises
    every token (the analogue of DINOv2's normed patch tokens). The attention-pooling head is not built."""

    name = "siglip"
    model_class = SiglipVisionModel
    image_mean = tuple(IMAGENET_STANDARD_MEAN)
    image_std = tuple(IMAGENET_STANDARD_STD)
    normalize_before_resize = False
    config_overrides = {"vision_use_head": False}

    def set_token_grid(self, model: PreTrainedModel, grid_size: int) -> None:
        _set_embedding_position_table(model, grid_size, num_prefix_tokens=0)

    def patch_tokens(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).last_hidden_state


class MaeFamily(EncoderFamily):
    """MAE encoder: output of the last block WITHOUT the final norm, CLS dropped, nothing masked or shuffled.

    As the original (a timm ViT built for 256 px), the 14×14 position table is resampled to 16×16 at 256 px and the
    image is fed without resizing. Its LayerNorm eps is 1e-6 (the Hub configs say 1e-12).
    """

    name = "mae"
    model_class = ViTMAEModel
    config_overrides = {"mask_ratio": 0.0, "layer_norm_eps": 1e-6}

    def set_token_grid(self, model: PreTrainedModel, grid_size: int) -> None:
        _set_parameter_position_table(model, grid_size, num_prefix_tokens=1)
        # The original reads the last block's output; the final norm belongs to the MAE pre-training path.
        model.layernorm = nn.Identity()

    def patch_tokens(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size, num_patches = pixel_values.shape[0], model.embeddings.patch_embeddings.num_patches
        # Increasing noise → argsort is the identity: tokens keep their order (with mask_ratio 0, none is dropped).
        noise = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32).expand(batch_size, -1)
        return model(pixel_values=pixel_values, noise=noise).last_hidden_state[:, 1:]


class JepaFamily(EncoderFamily):
    """I-JEPA target encoder: no CLS; tokens after the final norm, as the original `forward`. LayerNorm eps 1e-6."""

    name = "jepa"
    model_class = IJepaModel
    config_overrides = {"layer_norm_eps": 1e-6}

    def set_token_grid(self, model: PreTrainedModel, grid_size: int) -> None:
        _set_parameter_position_table(model, grid_size, num_prefix_tokens=0)

    def patch_tokens(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).last_hidden_state


FAMILIES: dict[str, EncoderFamily] = {
    family.name: family
    for family in (
        Dinov2Family(),
        Dinov2WithRegistersFamily(),
        Dinov3Family(),
        ClipFamily(),
        SiglipFamily(),
        MaeFamily(),
        JepaFamily(),
    )
}

# `config.model_type` of a Hub repo or local folder → family (composite CLIP/SigLIP configs load their vision tower).
MODEL_TYPE_TO_FAMILY: dict[str, str] = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2reg",
    "dinov3_vit": "dinov3",
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "vit_mae": "mae",
    "ijepa": "jepa",
}
