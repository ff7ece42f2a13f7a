"""Tiny randomly initialised encoders of every supported family, saved like their Hub checkpoints.

They exist for tests and for the offline quickstart: they run in milliseconds on a CPU and need no download, but
their features are RANDOM, so a model aligned to them learns nothing useful.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    IJepaConfig,
    IJepaModel,
    PreTrainedModel,
    SiglipConfig,
    SiglipModel,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from ..atomic_files import write_folder_atomically
from ..local_models import save_local_model
from .families import quiet_transformers
from .vision_encoder import RANDOM_SMOKE_ENCODER_FLAG

# The Hub checkpoints' native image size and patch size per family (DINOv2: 518 px / 14 → a 37×37 table).
_NATIVE_IMAGE_AND_PATCH = {
    "dinov2": (518, 14),
    "dinov2reg": (518, 14),
    "dinov3": (224, 16),
    "clip": (224, 14),
    "siglip": (256, 16),
    "mae": (224, 16),
    "jepa": (224, 14),
}

_LEARNED_TOKENS = ("position_embeddings", "cls_token", "register_tokens")

_MODEL_CARD = """# Tiny RANDOM {family} encoder (smoke tests only)

This model was written by `diffusers_repa.encoders.save_tiny_random_encoder`. Its weights are **randomly
initialised**: it is NOT a pretrained encoder, and REPA alignment to its features is meaningless. Use it only to
exercise code paths offline (tests, quickstart).
"""


def _tiny_text_config(hidden_size: int) -> dict:
    # The CLIP / SigLIP repos on the Hub hold the full two-tower model; a token-id range inside the tiny vocabulary
    # keeps the text config valid.
    return {
        "vocab_size": 64,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


def _build(family: str, vision: dict, flag: dict) -> PreTrainedModel:
    builders: dict[str, Callable[[], PreTrainedModel]] = {
        "dinov2": lambda: Dinov2Model(Dinov2Config(**vision, **flag)),
        "dinov2reg": lambda: Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**vision, num_register_tokens=4, **flag)
        ),
        "dinov3": lambda: DINOv3ViTModel(DINOv3ViTConfig(**vision, num_register_tokens=4, **flag)),
        "clip": lambda: CLIPModel(
            CLIPConfig(
                text_config=_tiny_text_config(vision["hidden_size"]),
                vision_config={**vision, **flag},
                projection_dim=vision["hidden_size"],
                **flag,
            )
        ),
        "siglip": lambda: SiglipModel(
            SiglipConfig(
                text_config=_tiny_text_config(vision["hidden_size"]), vision_config={**vision, **flag}, **flag
            )
        ),
        "mae": lambda: ViTMAEForPreTraining(
            ViTMAEConfig(
                **vision,
                decoder_hidden_size=vision["hidden_size"],
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=2 * vision["hidden_size"],
                **flag,
            )
        ),
        "jepa": lambda: IJepaModel(IJepaConfig(**vision, **flag)),
    }
    return builders[family]()


def save_tiny_random_encoder(
    family: str,
    path: str | os.PathLike,
    image_size: int | None = None,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    seed: int = 0,
    exist_ok: bool = False,
) -> Path:
    """Build a tiny RANDOMLY initialised model of `family`, save it with `save_pretrained`, and return `path`.

    The folder has the layout of the family's Hub checkpoint (full two-tower model for CLIP/SigLIP, the
    pre-training model for MAE), so `load_encoder(path)` exercises the real loading code. Its config carries a flag
    that makes `load_encoder` warn that it is a random smoke-test encoder, and a README says so too.

    Args:
        family: one of `dinov2`, `dinov2reg`, `dinov3`, `clip`, `siglip`, `mae`, `jepa`.
        path: folder to create (written to a temporary sibling, then renamed into place).
        image_size: native image size of the position table (default: the Hub checkpoint's, e.g. 518 for DINOv2).
        hidden_size / num_hidden_layers / num_attention_heads: size of the tiny ViT (MLP width 2 × hidden).
        seed: seed of the random weights (the caller's RNG state is left untouched).
        exist_ok: return `path` unchanged if it already holds a saved model, instead of raising.

    Raises:
        ValueError: unknown family. FileExistsError: `path` is a non-empty folder (and not `exist_ok` with a model).
    """
    if family not in _NATIVE_IMAGE_AND_PATCH:
        raise ValueError(f"Unknown encoder family {family!r}; choose one of {', '.join(_NATIVE_IMAGE_AND_PATCH)}.")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if exist_ok and (path / "config.json").is_file():
            return path
        raise FileExistsError(f"{path} exists and is not empty; pick a new folder or remove it first.")
    native_size, patch_size = _NATIVE_IMAGE_AND_PATCH[family]
    vision = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": 2 * hidden_size,
        "image_size": image_size or native_size,
        "patch_size": patch_size,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(family, vision, {RANDOM_SMOKE_ENCODER_FLAG: True})
        # transformers leaves some of these at zero (ViT-MAE's position table and CLS, DINOv2's registers); random
        # values make a dropped, misplaced or wrongly resampled one visible in the output.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(_LEARNED_TOKENS) and not parameter.any():
                    parameter.normal_(std=0.02)

    with write_folder_atomically(path) as staging:
        with quiet_transformers():  # it checks a default SigLIP text config whose token ids exceed its own vocabulary
            save_local_model(model, staging)
        (staging / "README.md").write_text(_MODEL_CARD.format(family=family))
    return path
