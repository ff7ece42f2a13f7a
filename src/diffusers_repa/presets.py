"""Model presets by name, for the trainer and the scripts: the family a name asks for and its sizes.

Importing this module loads no torch (the models' modules are imported when a preset is parsed), so that argument
checks can ask for a name's family and `--help` stays fast.

- ``SiT-{S,B,L,XL}/{2,4,8}``: the original SiT family (flow matching), `SiTTransformer2DModel`.
- ``DiT-{S,B,L,XL}/{2,4,8}``: the same sizes as diffusers' `DiTTransformer2DModel` (improved DDPM).
- ``MMDiT-<depth>/<patch>``: REPA's text-to-image `MMDiTTransformer2DModel` with the original's sizing (width
  32·depth, depth heads); ``MMDiT-24/2`` is the original's model, aligned after block 8.
- ``SD3``: the transformer of a pretrained SD3-family pipeline (`--pretrained_model`), fine-tuned with its own flow
  matching (`training/pipeline_finetune.py`); its size is the pipeline's, so the name has none.
"""

from __future__ import annotations

import re
from typing import Literal

ModelFamily = Literal["SiT", "DiT", "MMDiT", "SD3"]

MMDIT_ENCODER_DEPTH = 8  # the original aligns after block 8 (of 24)
_MMDIT_PATTERN = re.compile(r"^mmdit-(\d+)/(\d+)$", re.IGNORECASE)


def preset_family(name: str) -> ModelFamily:
    """``"SiT"``, ``"DiT"``, ``"MMDiT"`` or ``"SD3"``: the model family a preset name (``"DiT-XL/2"``) asks for."""
    prefix = name.strip().lower().split("-", 1)[0]
    return {"dit": "DiT", "mmdit": "MMDiT", "sd3": "SD3"}.get(prefix, "SiT")


def parse_preset(name: str) -> dict[str, int]:
    """Config values of a preset name (case-insensitive): ``depth``, ``hidden_size``, ``num_attention_heads``,
    ``patch_size`` and ``encoder_depth`` (the aligned block, 1-based)."""
    from .models.transformer_mmdit import MMDIT_HEAD_DIM
    from .models.transformer_sit import DIT_PRESETS, SIT_PRESETS, parse_sit_preset

    family = preset_family(name)
    if family == "SD3":
        raise ValueError(f"{name} names a pretrained pipeline's transformer: pass it with --pretrained_model.")
    if family != "MMDiT":
        return parse_sit_preset(name)
    match = _MMDIT_PATTERN.match(name.strip())
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(
            f"Unknown MMDiT preset {name!r}: name it MMDiT-<depth>/<patch size>, e.g. MMDiT-24/2 (the original's). "
            f"Other presets: {', '.join(SIT_PRESETS + DIT_PRESETS)}."
        )
    depth, patch_size = int(match.group(1)), int(match.group(2))
    return {
        "depth": depth,
        "hidden_size": MMDIT_HEAD_DIM * depth,
        "num_attention_heads": depth,
        "patch_size": patch_size,
        "encoder_depth": min(MMDIT_ENCODER_DEPTH, depth),
    }
