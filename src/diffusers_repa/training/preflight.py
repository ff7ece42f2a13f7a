"""Fail fast: before any heavy work, check that the dataset and every model of a training run can be read."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL
from huggingface_hub.constants import HF_HOME
from transformers import AutoConfig

from ..data import load_image_source
from ..encoders import ENCODER_ALIASES
from ..models.transformer_sit import SiTTransformer2DModel
from .arguments import REPATrainingArguments


class SourcesUnreachableError(RuntimeError):
    """The dataset or a model of a training run cannot be read (offline, gated, not found)."""


def default_cache_dir(args: REPATrainingArguments) -> Path:
    """Where the latent cache goes when `--cache_dir` is not given: one folder per dataset, split, size and VAE."""
    parts = [args.dataset, args.dataset_split, f"{args.resolution}px", args.vae]
    if args.max_train_samples is not None:
        parts.append(f"first{args.max_train_samples}")
    name = "-".join(part.strip("/").replace("/", "--") for part in parts)
    return Path(HF_HOME) / "diffusers_repa" / "latents" / name


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def check_sources_reachable(args: REPATrainingArguments, *, need_dataset: bool) -> None:
    """Raise one clear error listing every source of `args` that cannot be read (offline, gated, not found).

    Reads only metadata: the dataset is opened in streaming mode (nothing downloaded) and models load their config
    files. `need_dataset=False` skips the dataset (a finished latent cache exists, or a dataset object is given).
    """
    problems = []
    if need_dataset:
        try:
            load_image_source(args.dataset, args.dataset_split, args.image_column, args.label_column, streaming=True)
        except Exception as error:  # any failure here means "cannot train on it"; the message says which
            problems.append(
                f"dataset '{args.dataset}' (split '{args.dataset_split}'): {_first_line(error)}\n"
                "    Fix: log in / accept the dataset's terms, pass a local image folder, or point --cache_dir at a "
                "finished latent cache."
            )
    try:
        AutoencoderKL.load_config(args.vae)
    except Exception as error:
        problems.append(f"VAE '{args.vae}': {_first_line(error)}")
    for name in args.encoder_names if args.proj_coeff > 0 else []:
        spec = ENCODER_ALIASES.get(name.lower())
        source = spec.hub_id if spec is not None else name
        try:
            AutoConfig.from_pretrained(source)
        except Exception as error:
            problems.append(f"encoder '{name}' ({source}): {_first_line(error)}")
    if args.pretrained_model is not None:
        try:
            SiTTransformer2DModel.load_config(args.pretrained_model, subfolder="transformer")
        except Exception as error:
            problems.append(
                f"pretrained model '{args.pretrained_model}' (subfolder 'transformer'): {_first_line(error)}"
            )
    if problems:
        lines = ["Cannot start training: these sources cannot be read.", *(f"  - {problem}" for problem in problems)]
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            lines.append("HF_HUB_OFFLINE is set: only local folders and files already in the Hub cache can be used.")
        lines.append(
            "For an offline smoke run: python training/train_repa.py --config training/configs/quickstart.yaml"
        )
        raise SourcesUnreachableError("\n".join(lines))
