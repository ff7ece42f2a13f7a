"""The one table of precision names used by the flags and configs (`--encoder_precision`, `--dtype`, and accelerate's
`--mixed_precision`, whose "no" means no autocast)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISIONS = ("no", "fp16", "bf16")


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of accelerate's `--mixed_precision` ("no": None, no autocast)."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mixed_precision!r}.")
    return None if mixed_precision == "no" else DTYPES[mixed_precision]
