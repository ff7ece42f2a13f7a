"""CLIP score of generated images against the prompts they were drawn from (the text-to-image metric of REPA's
MMDiT on COCO, next to FID).

The definition is torchmetrics' ``CLIPScore`` (Hessel et al. 2021 without their 2.5 weight): for each image–prompt
pair the cosine of CLIP's projected image and text embeddings times 100; the score of a set is the mean over its
pairs, clipped at 0 (torchmetrics clips the mean, not each pair). The default model is CLIP ViT-L/14
(``openai/clip-vit-large-patch14``) with its own preprocessing: images resized (shortest side, bicubic) and
center-cropped to the model's input, scaled to [0, 1] and normalised; captions tokenized, padded to the longest in the
batch and truncated to the text model's positions (77), where torchmetrics cuts the token ids instead, which drops the
end token of a caption longer than 77 tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

from .image_io import ImageSet, open_image_set

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


class CLIPScorer:
    """A CLIP model and its processor, embedding images and texts as unit vectors in their joint space.

    Args:
        model: a `CLIPModel` (both towers and their projections); it is put in eval mode on `device`.
        processor: the model's `CLIPProcessor` (image processor + tokenizer).
        device: where the model runs (default: CUDA if available).
    """

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: str | torch.device | None = None) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike = DEFAULT_CLIP_MODEL, device: str | torch.device | None = None
    ) -> CLIPScorer:
        """Load a CLIP model and its processor from a Hub id or a folder holding both (safetensors weights)."""
        model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True)
        return cls(model, CLIPProcessor.from_pretrained(name_or_path), device)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """Unit-norm image embeddings (n, projection_dim), float32, of uint8 RGB images (n, H, W, 3)."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        hidden = self.model.vision_model(pixel_values=pixels.to(self.device, self.model.dtype)).pooler_output
        return _unit(self.model.visual_projection(hidden))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (n, projection_dim), float32, of captions."""
        tokens = self.processor.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return _unit(self.model.text_projection(hidden))

    def pair_scores(self, images: np.ndarray, texts: Sequence[str]) -> torch.Tensor:
        """100 · cos(image_i, text_i) (n,) of n uint8 images (n, H, W, 3) and their n captions, unclipped."""
        if len(images) != len(texts):
            raise ValueError(f"Got {len(images)} images but {len(texts)} captions; the CLIP score pairs them 1:1.")
        return 100.0 * (self.embed_images(images) * self.embed_texts(texts)).sum(dim=-1)


def _unit(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


def clip_pair_scores(
    images: str | os.PathLike | np.ndarray | ImageSet,
    prompts: Sequence[str],
    scorer: CLIPScorer,
    batch_size: int = 64,
    show_progress: bool = True,
) -> np.ndarray:
    """100 · cos (N,) of every image of a set (ADM ``.npz``, folder or uint8 array) with the prompt of the same index.

    Images are read and embedded ``batch_size`` at a time; the scores do not depend on the batch size beyond float
    round-off.
    """
    images = open_image_set(images)
    if len(images) != len(prompts):
        raise ValueError(
            f"{len(images)} images but {len(prompts)} prompts: the CLIP score needs the prompt of every sample "
            "(generate.py writes them as prompts.json and into the .npz)."
        )
    scores = []
    total = math.ceil(len(images) / batch_size)
    for index, batch in enumerate(
        tqdm(images.iter_batches(batch_size), total=total, desc="CLIP score", disable=not show_progress)
    ):
        texts = prompts[index * batch_size : index * batch_size + len(batch)]
        scores.append(scorer.pair_scores(batch, texts).double().cpu().numpy())
    return np.concatenate(scores)


def clip_score_of(pair_scores: np.ndarray | torch.Tensor) -> float:
    """The CLIP score of a set from its pair scores (N,): their mean, clipped at 0 (torchmetrics' ``CLIPScore``)."""
    return max(float(np.mean(np.asarray(pair_scores, dtype=np.float64))), 0.0)


def compute_clip_score(
    images: str | os.PathLike | np.ndarray | ImageSet,
    prompts: Sequence[str],
    clip_model: str | os.PathLike | CLIPScorer = DEFAULT_CLIP_MODEL,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> float:
    """The CLIP score (torchmetrics' definition, see the module docstring) of images against their prompts.

    Args:
        images: the samples: ADM ``.npz`` (``arr_0`` uint8 N×H×W×3), folder of images (sorted by name) or array.
        prompts: N captions, ``prompts[i]`` the one ``images[i]`` was generated from.
        clip_model: a Hub id or folder of a `CLIPModel` with its processor, or a [`CLIPScorer`].
        batch_size: pairs per CLIP forward.
        device: where CLIP runs when it is loaded here (default: CUDA if available).
    """
    scorer = clip_model if isinstance(clip_model, CLIPScorer) else CLIPScorer.from_pretrained(clip_model, device)
    return clip_score_of(clip_pair_scores(images, prompts, scorer, batch_size, show_progress))
