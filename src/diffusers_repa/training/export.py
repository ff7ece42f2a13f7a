"""What a run leaves for inference: sample grids of the EMA weights and the final export (a `SiTPipeline`,
`DiTPipeline` or `MMDiTPipeline`, or a LoRA adapter, with a sample grid and a model card), written atomically."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from peft.utils import get_peft_model_state_dict

from ..evaluation.image_io import enlarge_small_images
from .checkpointing import TRAINER_STATE_NAME
from .hub import remove_local_paths

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAMPLE_GRID_NAME = "samples.png"


@torch.no_grad()
def sample_grid(
    pipeline: DiffusionPipeline,
    conditions: list[int] | list[str],
    noise: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PIL.Image.Image:
    """Images of `pipeline` for `conditions` — class labels, or prompts of a text-to-image pipeline — from the fixed
    initial `noise` (N, C, h, w), as one grid (rows × cols as square as the count allows; images under 64 px enlarged
    by an integer factor, nearest neighbour)."""
    pipeline.set_progress_bar_config(disable=True)
    # diffusers' DiTPipeline draws its initial noise from the generator alone (it takes no `latents`).
    takes_latents = "latents" in inspect.signature(pipeline.__call__).parameters
    with autocast():
        images = pipeline(
            **{"prompt" if isinstance(conditions[0], str) else "class_labels": conditions},
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator(pipeline.device).manual_seed(seed),
            **({"latents": noise} if takes_latents else {}),
        ).images
    images = enlarge_small_images(images)
    rows = max(d for d in range(1, math.isqrt(len(images)) + 1) if len(images) % d == 0)
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def export_step(export_dir: str | Path) -> int | None:
    """The training step an export folder was written at (None: no export there)."""
    path = Path(export_dir) / TRAINER_STATE_NAME
    return json.loads(path.read_text())["global_step"] if path.is_file() else None


def write_export(
    export_dir: str | Path,
    pipeline: DiffusionPipeline,
    *,
    lora: bool,
    grid: PIL.Image.Image,
    card,
    global_step: int,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write the export into `<export_dir>.tmp`, then swap it into place, so a crash never leaves half an export.

    Full training writes the whole pipeline (`SiTPipeline`, `MMDiTPipeline`, or diffusers' `DiTPipeline`); LoRA writes
    only the adapter through the pipeline class's `save_lora_weights` (`pytorch_lora_weights.safetensors`, with its
    rank and alpha, for `pipe.load_lora_weights` on the base pipeline: a `SiTPipeline` or diffusers'
    `StableDiffusion3Pipeline`). Next to it: the
    sample grid, the model card (a `huggingface_hub.ModelCard`), `trainer_state.json` (the step) and `extra_files`
    (name in the export → file to copy, e.g. training curves). Absolute local paths in its configs are reduced to
    their last component, so the folder is what `push_to_hub` publishes.
    """
    export_dir = Path(export_dir)
    staging = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if lora:
        transformer = pipeline.transformer
        type(pipeline).save_lora_weights(
            staging,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            weight_name=LORA_WEIGHT_NAME,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
    else:
        pipeline.save_pretrained(staging)
    grid.save(staging / SAMPLE_GRID_NAME)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, staging / name)
    card.save(staging / "README.md")
    remove_local_paths(staging)  # e.g. the VAE's `_name_or_path`: the export is what gets published
    (staging / TRAINER_STATE_NAME).write_text(json.dumps({"global_step": global_step}))
    shutil.rmtree(export_dir, ignore_errors=True)
    staging.replace(export_dir)
    return export_dir
