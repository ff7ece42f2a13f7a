"""Names of the supported alignment targets: REPA-style aliases → Hub checkpoints, family, token grid, width."""

from __future__ import annotations

from dataclasses import dataclass

# Pixels per alignment token along each side: the SiT token grid with an 8x VAE and patch size 2
# (256 px → 32×32 latent → 16×16 tokens). Every encoder is fed images sized so that its patch grid is
# `resolution // TOKEN_STRIDE` per side, which is what the original REPA does (224 px for patch 14 at 256 px).
TOKEN_STRIDE = 16
# Config field by which a checkpoint declares another stride (e.g. 4: a 4×4 grid for the 16-px pixel-space SiT of
# patch 4); `load_encoder` reads it, and checkpoints without it (every Hub encoder) use TOKEN_STRIDE.
TOKEN_STRIDE_CONFIG_KEY = "repa_token_stride"


@dataclass(frozen=True)
class EncoderSpec:
    """One supported encoder checkpoint.

    Attributes:
        hub_id: Hugging Face Hub repository holding the transformers checkpoint.
        family: key of the adapter that loads and reads it (see `diffusers_repa.encoders.families.FAMILIES`).
        embed_dim: width D of the returned patch tokens.
        patch_size: the ViT's patch size in pixels (the encoder input side is `patch_size * resolution // 16`).
    """

    hub_id: str
    family: str
    embed_dim: int
    patch_size: int

    def num_tokens(self, resolution: int) -> int:
        """Number of patch tokens T returned for `resolution`-px images (256 → 256, 512 → 1024)."""
        return (resolution // TOKEN_STRIDE) ** 2


def _dinov2(size: str, registers: bool, dim: int) -> EncoderSpec:
    repo = f"facebook/dinov2-with-registers-{size}" if registers else f"facebook/dinov2-{size}"
    return EncoderSpec(repo, "dinov2reg" if registers else "dinov2", dim, 14)


# Keys are lower case; lookups are case-insensitive so the original's `clip-vit-L` works too.
ENCODER_ALIASES: dict[str, EncoderSpec] = {
    "dinov2-vit-s": _dinov2("small", False, 384),
    "dinov2-vit-b": _dinov2("base", False, 768),
    "dinov2-vit-l": _dinov2("large", False, 1024),
    "dinov2-vit-g": _dinov2("giant", False, 1536),
    "dinov2reg-vit-s": _dinov2("small", True, 384),
    "dinov2reg-vit-b": _dinov2("base", True, 768),
    "dinov2reg-vit-l": _dinov2("large", True, 1024),
    "dinov2reg-vit-g": _dinov2("giant", True, 1536),
    "dinov3-vit-s": EncoderSpec("facebook/dinov3-vits16-pretrain-lvd1689m", "dinov3", 384, 16),
    "dinov3-vit-b": EncoderSpec("facebook/dinov3-vitb16-pretrain-lvd1689m", "dinov3", 768, 16),
    "dinov3-vit-l": EncoderSpec("facebook/dinov3-vitl16-pretrain-lvd1689m", "dinov3", 1024, 16),
    "clip-vit-l": EncoderSpec("openai/clip-vit-large-patch14", "clip", 1024, 14),
    "siglip-vit-b": EncoderSpec("google/siglip-base-patch16-256", "siglip", 768, 16),
    "siglip-vit-l": EncoderSpec("google/siglip-large-patch16-256", "siglip", 1024, 16),
    "siglip2-vit-b": EncoderSpec("google/siglip2-base-patch16-256", "siglip", 768, 16),
    "siglip2-vit-l": EncoderSpec("google/siglip2-large-patch16-256", "siglip", 1024, 16),
    "siglip2-vit-so400m": EncoderSpec("google/siglip2-so400m-patch16-256", "siglip", 1152, 16),
    "mae-vit-l": EncoderSpec("facebook/vit-mae-large", "mae", 1024, 16),
    "jepa-vit-h": EncoderSpec("facebook/ijepa_vith14_1k", "jepa", 1280, 14),
}


# A built-in encoder: `load_encoder("digits-vit")` pretrains it on scikit-learn's digits on first use (seconds, offline)
# and reuses the folder after; see `diffusers_repa.encoders.digits`.
DIGITS_ENCODER_NAME = "digits-vit"


def supported_encoders_text() -> str:
    """One line per alias (`name → hub id, D=…`), for error messages."""
    lines = [f"  {name} → {spec.hub_id} (D={spec.embed_dim})" for name, spec in ENCODER_ALIASES.items()]
    return "\n".join([*lines, f"  {DIGITS_ENCODER_NAME} → built in, pretrained on scikit-learn's digits (D=64)"])
