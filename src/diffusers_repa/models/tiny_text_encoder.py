"""A tiny randomly initialised CLIP text encoder and a tokenizer on single letters, built locally: the offline
text-to-image runs, tests and tiny SD3-family pipelines use them where CLIP ViT-L/14 would be downloaded.

The tokenizer knows the 26 lower-case letters (each alone or word-final) and no merges, so every caption is spelled
letter by letter; the random encoder still maps different captions to different token features, which is all a
text-conditioned model needs to learn to tell captions apart. `tiny-clip` names the built-in one
(`<HF_HOME>/diffusers_repa/text_encoders/tiny-clip`, made on first use).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..atomic_files import write_folder_atomically
from ..local_models import save_local_model
from ..text_encoding import CLIP_MAX_LENGTH, TINY_CLIP_NAME

TINY_CLIP_WIDTH = 64  # the built-in one's hidden size (an MMDiT's joint_attention_dim must equal it)
# The built-in one's tokens per caption: the digits' captions spell out in at most 25 letters, and the MMDiT attends
# jointly over image and text tokens, so 32 text tokens instead of CLIP's 77 make an offline step about twice as fast.
TINY_CLIP_MAX_LENGTH = 32

_LETTERS = [chr(code) for code in range(ord("a"), ord("z") + 1)]
_TOKENS = ["<|startoftext|>", "<|endoftext|>", *_LETTERS, *(letter + "</w>" for letter in _LETTERS)]


def save_letter_tokenizer(folder: str | os.PathLike, max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A `CLIPTokenizer` on single letters (no merges), `max_length` tokens per text (CLIP's 77), saved into
    `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({token: index for index, token in enumerate(_TOKENS)}))
    merges.write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_clip_text_encoder(
    hidden_size: int = TINY_CLIP_WIDTH, *, projection_dim: int | None = None, num_layers: int = 2, seed: int = 0
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A random CLIP text model for [`save_letter_tokenizer`]'s vocabulary, in eval mode; with `projection_dim`, a
    `CLIPTextModelWithProjection` (SD3's first two text encoders). The caller's RNG state is left as it was."""
    config = CLIPTextConfig(
        vocab_size=len(_TOKENS),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)
    return model.eval()


def save_tiny_clip(
    path: str | os.PathLike,
    hidden_size: int = TINY_CLIP_WIDTH,
    seed: int = 0,
    max_length: int = TINY_CLIP_MAX_LENGTH,
) -> Path:
    """A letter tokenizer (`path/tokenizer`, `max_length` tokens per text) and a [`tiny_clip_text_encoder`]
    (`path/text_encoder`), written atomically — the layout of a pipeline folder, which
    `from_pretrained(path, subfolder=...)` reads; reused when `path` already holds them."""
    path = Path(path)
    if (path / "text_encoder" / "config.json").is_file():
        return path
    with write_folder_atomically(path, replace=True) as staging:
        save_letter_tokenizer(Path(staging) / "tokenizer", max_length)
        save_local_model(tiny_clip_text_encoder(hidden_size, seed=seed), Path(staging) / "text_encoder")
    return path


def tiny_clip_path() -> Path:
    """Where the built-in `tiny-clip` lives: `<HF_HOME>/diffusers_repa/text_encoders/tiny-clip`."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "diffusers_repa" / "text_encoders" / TINY_CLIP_NAME
