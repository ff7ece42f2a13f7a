"""DINOv2 CLS features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics")."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

FD_DINOV2_DEFAULT_MODEL = "facebook/dinov2-large"


class DINOv2Features(nn.Module):
    """uint8 images (N, 3, H, W) → DINOv2 CLS token after the final LayerNorm (N, D), as dgm-eval's FD-DINOv2.

    Preprocessing: ``/255``, bicubic resize (antialiased) to ``resolution``², ImageNet mean/std normalisation.
    dgm-eval resizes PIL images with torchvision's bicubic ``Resize``; torch's antialiased bicubic on tensors used
    here differs from it by at most ~1 grey level (256 → 224). FD-DINOv2 in the literature uses ViT-L/14
    (``facebook/dinov2-large``) at 224 px.
    """

    def __init__(self, model: PreTrainedModel, resolution: int = 224) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike = FD_DINOV2_DEFAULT_MODEL, resolution: int = 224, **kwargs
    ) -> DINOv2Features:
        """Load a DINOv2 checkpoint (Hub id or local folder) with ``transformers.AutoModel.from_pretrained``."""
        return cls(AutoModel.from_pretrained(name_or_path, **kwargs), resolution=resolution)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DINOv2Features expects uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}."
            )
        x = images.to(self.mean.device, torch.float32) / 255.0
        x = F.interpolate(
            x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False, antialias=True
        )
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        return self.model(pixel_values=x).last_hidden_state[:, 0].float()
