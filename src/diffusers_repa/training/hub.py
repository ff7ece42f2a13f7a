"""Model card of a trained SiT / LoRA export, and its upload to the Hub."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from ..data import IMAGENET_1K_REPO_ID
from .arguments import REPATrainingArguments

# The Jinja template lives in the repository's model_cards/ folder; templates/sit_repa.md links to it so that it is
# also package data of installed (non-editable) copies.
DEFAULT_MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "sit_repa.md"

# Settings worth a row in the card's table (the full set is in training_args.json next to the checkpoints).
_CARD_SETTINGS = (
    "model", "depth", "hidden_size", "num_attention_heads", "encoder", "encoder_depth", "proj_coeff", "path_type",
    "time_sampling", "alignment_stop_step", "cfg_prob", "resolution", "vae", "dataset", "max_train_steps",
    "global_batch_size", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "max_grad_norm",
    "ema_decay", "mixed_precision", "seed", "pretrained_model", "lora_rank", "lora_alpha",
)  # fmt: skip


@dataclasses.dataclass
class SampleGridInfo:
    """What the card says about its sample grid (a PNG next to the card)."""

    filename: str
    labels: list[int]
    sampler: str
    num_inference_steps: int
    guidance_scale: float


def _hub_dataset_ids(dataset: str) -> list[str] | None:
    """The dataset as the card's metadata names it: a Hub id, or nothing for a local folder."""
    if dataset in ("imagenet-1k", "imagenet"):
        return [IMAGENET_1K_REPO_ID]
    return [dataset] if dataset.count("/") == 1 and not Path(dataset).exists() else None


def render_model_card(
    args: REPATrainingArguments,
    repo_id: str,
    num_steps: int,
    sample_grid: SampleGridInfo | None = None,
    metrics: dict[str, float] | None = None,
    smoke_notice: str | None = None,
    template_path: str | os.PathLike = DEFAULT_MODEL_CARD_TEMPLATE,
) -> ModelCard:
    """Fill `model_cards/sit_repa.md` for a finished run.

    Args:
        args: the run's arguments (dataset, encoder, sizes, optimiser settings).
        repo_id: Hub id the card's loading snippet uses (the local export folder works too).
        num_steps: optimizer steps done.
        sample_grid: the grid saved next to the card, if any.
        metrics: evaluation results to list (e.g. ``{"FID-50K": 1.8}``), if any.
        smoke_notice: a warning shown at the top (quickstart runs: random VAE/encoder, synthetic data).
    """
    template_path = Path(template_path)
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template {template_path} not found; pass template_path=.")
    is_lora = args.use_lora
    tags = ["diffusers", "sit", "repa", "class-conditional", "image-generation"] + (["lora"] if is_lora else [])
    card_data = ModelCardData(
        library_name="diffusers",
        tags=tags + (["smoke-test"] if smoke_notice else []),
        datasets=None if smoke_notice else _hub_dataset_ids(args.dataset),
        base_model=args.pretrained_model if is_lora else None,
    )
    settings = dataclasses.asdict(args)
    lora_only = () if is_lora else ("pretrained_model", "lora_rank", "lora_alpha")
    training_config = {
        name: settings[name] for name in _CARD_SETTINGS if settings[name] is not None and name not in lora_only
    }
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=repo_id.rstrip("/").split("/")[-1],
        repo_id=repo_id,
        smoke_notice=smoke_notice,
        is_lora=is_lora,
        lora_rank=args.lora_rank,
        base_model=args.pretrained_model,
        base_model_url=f"https://huggingface.co/{args.pretrained_model}",
        dataset=args.dataset,
        encoder=args.encoder,
        model_size=args.model,
        resolution=args.resolution,
        encoder_depth=args.encoder_depth,
        proj_coeff=args.proj_coeff,
        ema_decay=args.ema_decay,
        num_steps=num_steps,
        sample_grid=sample_grid.filename if sample_grid else None,
        sample_labels=sample_grid.labels if sample_grid else None,
        sample_sampler=sample_grid.sampler.upper() if sample_grid else None,
        sample_steps=sample_grid.num_inference_steps if sample_grid else None,
        sample_guidance=sample_grid.guidance_scale if sample_grid else None,
        metrics=metrics,
        training_config=training_config,
    )


def push_export_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, **upload_kwargs: Any) -> str:
    """Create `repo_id` (if needed) and upload the export folder (weights, card, sample grid); returns the repo URL."""
    repo_url = create_repo(repo_id, private=private, exist_ok=True)
    upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=upload_kwargs.pop("commit_message", "Upload SiT trained with REPA"),
        **upload_kwargs,
    )
    return str(repo_url)
