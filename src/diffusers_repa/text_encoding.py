"""Caption → CLIP token features: the one place text is encoded (the latent cache, the loader benchmark and
[`MMDiTPipeline`] all call [`encode_text`]).

The original text-to-image REPA conditions on CLIP ViT-L/14's last hidden state over 77 tokens (U-ViT's MS-COCO
preprocessing): the caption truncated and padded to 77 tokens, no attention mask, no pooled vector. The empty
caption's features are the unconditional context (caption dropout in training, classifier-free guidance).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .pretrained_paths import check_pretrained_source

__all__ = ["CLIP_MAX_LENGTH", "TINY_CLIP_NAME", "encode_text", "load_text_encoder"]

CLIP_MAX_LENGTH = 77
"""CLIP's positions; the original's text features are 77 × 768 (CLIP ViT-L/14)."""

TINY_CLIP_NAME = "tiny-clip"
"""The built-in tiny random CLIP (see :mod:`~diffusers_repa.models.tiny_text_encoder`), made on first use."""

_SUBFOLDERS = ("tokenizer", "text_encoder")


def _bad_name(name: str) -> str:
    """One line saying what a text-encoder name may be, with the built-in name when ``name`` resembles it."""
    hint = f" (did you mean '{TINY_CLIP_NAME}'?)" if difflib.get_close_matches(name, [TINY_CLIP_NAME]) else ""
    return (
        f"Cannot load a CLIP text encoder from '{name}'{hint}: pass '{TINY_CLIP_NAME}' (the built-in tiny one), or a "
        "local folder or Hub repo holding a CLIP tokenizer and text model at its root (e.g. "
        "openai/clip-vit-large-patch14) or in tokenizer/ and text_encoder/ sub-folders (a pipeline)."
    )


def _load(root: str | Path, subfolders: bool, dtype: torch.dtype | None) -> tuple[CLIPTokenizer, CLIPTextModel]:
    tokenizer_folder, model_folder = _SUBFOLDERS if subfolders else ("", "")
    tokenizer = CLIPTokenizer.from_pretrained(str(root), subfolder=tokenizer_folder)
    # A full CLIPModel repo (vision + text) loads its text half; the vision weights are ignored.
    text_encoder = CLIPTextModel.from_pretrained(str(root), subfolder=model_folder, torch_dtype=dtype)
    return tokenizer, text_encoder


def load_text_encoder(
    name_or_path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A CLIP tokenizer and text model, the model frozen in eval mode on ``device`` in ``dtype``.

    Args:
        name_or_path: ``"tiny-clip"`` (the built-in tiny random CLIP, written to
            ``<HF_HOME>/diffusers_repa/text_encoders/tiny-clip`` on first use); a local folder or Hub repo with the
            tokenizer and text model at its root (a CLIP repo such as ``openai/clip-vit-large-patch14``, the
            original's); or one with ``tokenizer/`` and ``text_encoder/`` sub-folders (a saved pipeline).
        device: where the model goes (default: where it loads, the CPU).
        dtype: the model's parameter dtype (default: as saved).

    Returns:
        ``(tokenizer, text_encoder)``.

    Raises:
        ValueError: nothing loadable under that name; one line saying what to pass.
        FileNotFoundError: a local path that does not exist (with close names of its folder).
    """
    name = str(name_or_path)
    if name == TINY_CLIP_NAME:
        # Inside the function, because the tiny encoder's module imports CLIP_MAX_LENGTH from this one; absolute,
        # because a saved MMDiTPipeline inlines this module (hub_code.py), which follows top-level imports only.
        from diffusers_repa.models.tiny_text_encoder import save_tiny_clip, tiny_clip_path

        tokenizer, text_encoder = _load(save_tiny_clip(tiny_clip_path()), True, dtype)
    elif Path(name).expanduser().is_dir():
        root = Path(name).expanduser()
        if (root / "text_encoder" / "config.json").is_file():
            tokenizer, text_encoder = _load(root, True, dtype)
        elif (root / "config.json").is_file():
            tokenizer, text_encoder = _load(root, False, dtype)
        else:
            raise ValueError(_bad_name(name) + f" {root} has neither config.json nor text_encoder/config.json.")
    else:
        check_pretrained_source(name, "config.json", "CLIP text encoder")
        try:
            tokenizer, text_encoder = _load(name, False, dtype)
        except OSError:
            # Not at the root: a pipeline repo keeps them in sub-folders.
            try:
                tokenizer, text_encoder = _load(name, True, dtype)
            except OSError as error:
                raise ValueError(_bad_name(name)) from error
    return tokenizer, text_encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_text(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    texts: list[str],
    max_length: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """CLIP token features of ``texts`` as the original computes them: each text truncated and padded to
    ``max_length`` tokens, no attention mask, the text model's last hidden state.

    Args:
        tokenizer, text_encoder: from :func:`load_text_encoder` (or a pipeline).
        texts: N captions (``""`` gives the unconditional context).
        max_length: tokens per text, L (default: ``tokenizer.model_max_length``, 77 for CLIP).
        device: where the token ids go (default: the text encoder's device; a pipeline passes its execution device,
            which differs under CPU offload).

    Returns:
        ``(N, L, D)`` in the text encoder's dtype, D its hidden size (768 for CLIP ViT-L/14).
    """
    input_ids = tokenizer(
        list(texts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(input_ids.to(device or text_encoder.device)).last_hidden_state
