"""Training checkpoints: atomic `checkpoint-<step>` folders, rotation, and finding the one to resume from.

A checkpoint is written into `checkpoint-<step>.tmp` and renamed to `checkpoint-<step>` only once every process has
finished writing, so a run killed mid-write never leaves a folder that looks complete; `latest` ignores `.tmp`
folders and an interrupted write is cleaned up by the next save of the same step. Old checkpoints are deleted only
after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file

CHECKPOINT_PREFIX = "checkpoint-"
# The trainer's own record in a checkpoint (step, layout, settings) and in an export (the step it was written at).
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (folders `checkpoint-<step>`; `.tmp` ones are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in output_dir.iterdir() if (m := _CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found) if path.is_dir()]


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str) -> Path | None:
    """The folder to resume from: `"latest"` → newest complete checkpoint in `output_dir` (None if there is none),
    otherwise the given path, which must be a complete checkpoint folder."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if path.name.endswith(".tmp"):
        raise ValueError(
            f"{path} is an unfinished checkpoint (the run stopped while writing it); resume from another."
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path}: no such checkpoint folder. Pass a `checkpoint-<step>` folder or "
            "'latest' (the newest one in --output_dir)."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    write_extra: Callable[[Path], None],
    total_limit: int | None = None,
) -> Path:
    """Save `accelerator.save_state` plus the trainer's own files atomically as `output_dir/checkpoint-<step>`.

    Call on every process. `write_extra(folder)` runs on every process after `save_state` and writes what accelerate
    does not know about (EMA weights, step, per-process generator state). With `total_limit`, only the newest
    `total_limit` checkpoints are kept.

    Returns:
        The final checkpoint folder.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over by a run killed while writing this step
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:  # one per machine: nodes may not share a filesystem
        staging.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    write_extra(staging)
    accelerator.wait_for_everyone()
    # The main process publishes the checkpoint; then, on machines that do not share its filesystem, the local main
    # process publishes the files written there (its processes' random states), so every node can resume.
    if accelerator.is_main_process:
        _publish(staging, final, output_dir, total_limit)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process and not accelerator.is_main_process and staging.exists():
        _publish(staging, final, output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def checkpoint_trained_weights_only(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Make `accelerator.save_state` / `load_state` keep only the trained parameters of the prepared `model`.

    With LoRA most of a model is frozen pretrained weights (several GB for SD3.5): a checkpoint of them would repeat
    the base model at every save. The frozen ones come back from `--pretrained_model` when the run is rebuilt, so a
    resume continues exactly; the checkpoint's `model.safetensors` holds the adapters (and the REPA head) only.
    """
    trained = {name for name, param in model.named_parameters() if param.requires_grad}

    def keep_trained(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        for index, saved in enumerate(models):
            if saved is model:
                weights[index] = {name: value for name, value in weights[index].items() if name in trained}

    def load_trained(models: list[torch.nn.Module], input_dir: str) -> None:
        if not any(loaded is model for loaded in models):
            return
        models[:] = [loaded for loaded in models if loaded is not model]  # accelerate loads the others
        path = Path(input_dir) / SAFE_WEIGHTS_NAME
        state = load_safetensors(path)
        unknown, missing = sorted(set(state) - set(model.state_dict())), sorted(trained - set(state))
        if unknown or missing:
            raise ValueError(
                f"{path} does not hold this run's trained parameters (missing {missing[:3]}, unknown {unknown[:3]}): "
                "resume with the --pretrained_model and LoRA settings it was saved with."
            )
        model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(keep_trained)
    accelerator.register_load_state_pre_hook(load_trained)


def _publish(staging: Path, final: Path, output_dir: Path, total_limit: int | None) -> None:
    """Rename the finished `staging` folder to `final`, then delete checkpoints beyond the newest `total_limit`."""
    if final.exists():  # the same step saved again after a resume from it
        shutil.rmtree(final)
    os.replace(staging, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` whose errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; resume from a complete checkpoint.")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); resume from another checkpoint."
        ) from error


def read_trainer_state(path: Path) -> dict:
    """The checkpoint's trainer_state.json, checked field by field (a hand-edited file fails here, not later)."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; resume from a complete checkpoint folder.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); resume from another checkpoint.") from None
    for key in ("global_step", "num_processes", "per_device_batch_size", "gradient_accumulation_steps"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            raise ValueError(f"{path}: {key!r} must be a non-negative integer, got {state.get(key)!r}.")
    return state
