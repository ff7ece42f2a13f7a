"""Saving the transformers models this package builds locally (digits-vit, tiny-clip, tiny random encoders).

transformers' `save_pretrained` writes only on global rank 0 once `torch.distributed` is initialised, whatever
`is_main_process` says. A model built on first use by every process of a run (each into its own staging folder,
renamed into place atomically) would then reach the other ranks as a folder without weights — and on nodes without
a shared filesystem never at all. These models are small and have no tied or sharded weights, so each process
writes its own copy: the config with `save_pretrained` (no rank check) and the weights with safetensors, which
`from_pretrained` reads as it reads its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from transformers import PreTrainedModel

WEIGHTS_NAME = "model.safetensors"  # transformers' single-file weights name


def save_local_model(model: PreTrainedModel, folder: str | os.PathLike) -> Path:
    """Write `model` (config.json + model.safetensors) into `folder` on this process, distributed or not."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return folder
