"""Frozen pretrained vision encoders (DINOv2, DINOv3, CLIP, SigLIP, MAE, I-JEPA) as REPA alignment targets.

`diffusers_repa.encoders.digits` (imported on demand: it needs scikit-learn and the data stack) pretrains a tiny
encoder on scikit-learn's digits in seconds, a real target for offline pixel-space runs.
"""

from .families import FAMILIES, MODEL_TYPE_TO_FAMILY, EncoderFamily, resample_position_embeddings
from .registry import DIGITS_ENCODER_NAME, ENCODER_ALIASES, TOKEN_STRIDE, TOKEN_STRIDE_CONFIG_KEY, EncoderSpec
from .tiny import save_tiny_random_encoder
from .tokens import check_token_grid, interpolate_tokens
from .vision_encoder import FrozenVisionEncoder, builtin_encoder_folder, load_encoder, load_encoders

__all__ = [
    "DIGITS_ENCODER_NAME",
    "ENCODER_ALIASES",
    "FAMILIES",
    "MODEL_TYPE_TO_FAMILY",
    "TOKEN_STRIDE",
    "TOKEN_STRIDE_CONFIG_KEY",
    "EncoderFamily",
    "EncoderSpec",
    "FrozenVisionEncoder",
    "builtin_encoder_folder",
    "check_token_grid",
    "interpolate_tokens",
    "load_encoder",
    "load_encoders",
    "resample_position_embeddings",
    "save_tiny_random_encoder",
]
