"""Tiny randomly initialised diffusers text-to-image pipelines, built and saved locally: offline tests and smoke runs
of fine-tuning (`training/pipeline_finetune.py`) load them with the real `from_pretrained` code, where a real run
would download e.g. `stabilityai/stable-diffusion-3.5-medium`. Their images mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from ..atomic_files import write_folder_atomically
from .tiny_text_encoder import save_letter_tokenizer, tiny_clip_text_encoder
from .tiny_vae import tiny_random_vae

# SD3's VAE latent layout (16 channels, z = (x − 0.0609) · 1.5305) and its scheduler's timestep shift.
SD3_LATENT_CHANNELS = 16
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
SD3_SCHEDULER_SHIFT = 3.0

_LETTERS = [chr(code) for code in range(ord("a"), ord("z") + 1)]


def _letter_t5(width: int, seed: int) -> tuple[T5Tokenizer, T5EncoderModel]:
    """A T5 tokenizer on single letters (a unigram vocabulary: each letter alone or word-initial) and a random
    one-layer `T5EncoderModel` of width `width` for it, in eval mode."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(letter, -2.0) for letter in _LETTERS] + [("▁" + letter, -2.0) for letter in _LETTERS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(
        vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2, pad_token_id=0
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    return tokenizer, encoder.eval()


def build_tiny_sd3_pipeline(
    folder: str | os.PathLike,
    *,
    num_layers: int = 2,
    sample_size: int = 8,
    patch_size: int = 2,
    clip_width: int = 32,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny random `StableDiffusion3Pipeline` into `folder` (written atomically) and return its path.

    Its parts have SD3's layout at toy sizes: an `SD3Transformer2DModel` of `num_layers` blocks (2 heads × 8) on
    `sample_size`² latents of 16 channels, the tiny random VAE with SD3's latent channels, shift and scaling factors
    (8× downsampling: the default draws 64 px images), two `CLIPTextModelWithProjection` of width `clip_width` with
    letter tokenizers (`text_encoder`, `text_encoder_2`), a one-layer T5 encoder with a letter tokenizer
    (`text_encoder_3`) and `FlowMatchEulerDiscreteScheduler(shift=3.0)`. As in SD3, the text tokens are the two
    CLIPs' penultimate features side by side, then T5's (``joint_attention_dim = 2 · clip_width``, T5's width), and
    the pooled vector the two CLIP projections (``pooled_projection_dim = 2 · clip_width``). The T5 is there because
    `StableDiffusion3Pipeline.from_pretrained` requires all three encoders in the folder (pass
    ``text_encoder_3=None, tokenizer_3=None`` to load without it: the pipeline then uses zeros for T5's tokens).

    Args:
        folder: the folder to create; it must be absent or empty.
        num_layers / sample_size / patch_size: the transformer's blocks, latent side and patch (image tokens:
            ``(sample_size / patch_size)²``).
        clip_width: hidden size and projection width of each CLIP text encoder.
        dual_attention_layers / qk_norm: SD3.5's additions, as in its transformer config (SD3.5 medium: a second
            image attention in its first blocks, ``qk_norm="rms_norm"``).
        seed: seed of all random weights (the caller's RNG state is left as it was).

    Raises:
        FileExistsError: `folder` is a non-empty folder.
    """
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=SD3_LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=2 * clip_width,
            caption_projection_dim=16,
            pooled_projection_dim=2 * clip_width,
            out_channels=SD3_LATENT_CHANNELS,
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
            # Room for images up to 4× the default side.
            pos_embed_max_size=4 * sample_size // patch_size,
        )
    vae = tiny_random_vae(
        seed,
        latent_channels=SD3_LATENT_CHANNELS,
        scaling_factor=SD3_VAE_SCALING_FACTOR,
        shift_factor=SD3_VAE_SHIFT_FACTOR,
    )
    t5_tokenizer, t5_encoder = _letter_t5(2 * clip_width, seed + 2)
    with write_folder_atomically(folder) as staging:
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SCHEDULER_SHIFT),
            vae=vae,
            text_encoder=tiny_clip_text_encoder(clip_width, projection_dim=clip_width, seed=seed),
            tokenizer=save_letter_tokenizer(staging / "tokenizer"),
            text_encoder_2=tiny_clip_text_encoder(clip_width, projection_dim=clip_width, seed=seed + 1),
            tokenizer_2=save_letter_tokenizer(staging / "tokenizer_2"),
            text_encoder_3=t5_encoder,
            tokenizer_3=t5_tokenizer,
        )
        pipeline.save_pretrained(staging)
    return folder
