"""Model card of a trained SiT / LoRA export, and its upload to the Hub, which never publishes a local path.

A run's arguments and the configs that diffusers and transformers save (`_name_or_path`) can hold absolute paths of
the training machine (home folders, user names, mount points). The card names a local folder by its name only;
`remove_local_paths` rewrites the saved configs the same way; `push_export_to_hub` refuses to upload a folder in
which `find_local_paths` still finds one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, upload_folder

from ..data import DIGITS_DATASET, IMAGENET_1K_REPO_ID
from .arguments import REPATrainingArguments

# The Jinja template lives in the repository's model_cards/ folder; templates/sit_repa.md links to it so that it is
# also package data of installed (non-editable) copies.
DEFAULT_MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "sit_repa.md"

# Settings worth a row in the card's table (the full set is in training_args.json next to the checkpoints).
_CARD_SETTINGS = (
    "model", "depth", "hidden_size", "num_attention_heads", "encoder", "encoder_depth", "proj_coeff", "path_type",
    "time_sampling", "alignment_stop_step", "cfg_prob", "resolution", "vae", "dataset", "max_train_steps",
    "global_batch_size", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "max_grad_norm",
    "ema_decay", "mixed_precision", "seed", "pretrained_model", "lora_rank", "lora_alpha", "text_encoder",
    "caption_column",
)  # fmt: skip


# Files of an export that may carry text: configs, the card, notes.
TEXT_FILE_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml")
# An absolute path inside text: POSIX (at least two components, so that "/" or "1/2" are not taken for one; not the
# path of a URL), Windows (drive or UNC), home-relative, or a file:// URL.
_PATH_CHARS = r"[^\s\"'`<>|()\[\]{},;]"
_ABSOLUTE_PATH_IN_TEXT = re.compile(
    rf"(?<![\w.~:/\\-])/{_PATH_CHARS}+/{_PATH_CHARS}+"
    rf"|(?<![\w])[A-Za-z]:[\\/]{_PATH_CHARS}+"
    rf"|(?<![\w\\])\\\\{_PATH_CHARS}+"
    rf"|(?<![\w/])~/{_PATH_CHARS}+"
    rf"|\bfile://{_PATH_CHARS}+"
)


def _is_absolute(value: str) -> bool:
    """An absolute or home-relative path in POSIX or Windows form (whatever the system this runs on)."""
    value = value.strip()
    return value.startswith("~") or PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()


def is_local_path(value: str) -> bool:
    """Whether an argument value names something on this machine rather than a Hub id: an absolute or home-relative
    path, or a file or folder that exists (e.g. ``data/imgs``)."""
    return bool(value.strip()) and (_is_absolute(value) or Path(value).expanduser().exists())


def _local_name(value: str) -> str:
    """The last component of a local path, in either separator style (``/home/me/imgs/`` → ``imgs``)."""
    path = PureWindowsPath(value) if PureWindowsPath(value).drive else PurePosixPath(value.replace("\\", "/"))
    return path.name or str(path)


def _card_value(value: Any) -> Any:
    """How the card shows an argument: a local path as ``name (local folder)``, anything else as is. Comma-separated
    lists (``--encoder a,b``) are shown item by item."""
    if not isinstance(value, str):
        return value
    items = [item.strip() for item in value.split(",")]
    return ",".join(f"{_local_name(item)} (local folder)" if item and is_local_path(item) else item for item in items)


@dataclasses.dataclass
class SampleGridInfo:
    """What the card says about its sample grid (a PNG next to the card)."""

    filename: str
    conditions: list[int] | list[str]  # class labels, or prompts for a text-to-image model
    sampler: str
    num_inference_steps: int
    guidance_scale: float


# The Hub has no class-conditional task; class-conditional generators (DiT, SiT) are listed as unconditional.
PIPELINE_TAG = "unconditional-image-generation"
TEXT_TO_IMAGE_TAG = "text-to-image"
# The code's license (diffusers-repa, diffusers and the original REPA code are Apache-2.0); the card names the training
# data's own terms separately.
LICENSE = "apache-2.0"
# Terms of the datasets the card knows, by the name `--dataset` gives them.
_DATASET_TERMS = {
    "imagenet-1k": "ImageNet-1k is licensed for non-commercial research and educational use only (its terms of access "
    "on the Hub, https://huggingface.co/datasets/ILSVRC/imagenet-1k); weights trained on it may inherit these terms.",
    DIGITS_DATASET: "The digits are the UCI Optical Recognition of Handwritten Digits data set (CC BY 4.0), as "
    "shipped with scikit-learn.",
}
_DATASET_TERMS["imagenet"] = _DATASET_TERMS["imagenet-1k"]


def _hub_dataset_ids(dataset: str) -> list[str] | None:
    """The dataset as the card's metadata names it: a Hub id, or nothing for a local folder."""
    if dataset in ("imagenet-1k", "imagenet"):
        return [IMAGENET_1K_REPO_ID]
    return [dataset] if dataset.count("/") == 1 and not is_local_path(dataset) else None


def _eval_results(args: REPATrainingArguments, metrics: dict[str, float]) -> list[EvalResult] | None:
    """The card's ``model-index`` entries: one per metric, measured on EMA samples against the training split."""
    if not metrics:
        return None
    dataset_ids = _hub_dataset_ids(args.dataset)
    dataset = dataset_ids[0] if dataset_ids else _card_value(args.dataset)
    text_to_image = args.is_text_to_image
    return [
        EvalResult(
            task_type=TEXT_TO_IMAGE_TAG if text_to_image else PIPELINE_TAG,
            task_name="Text-to-image generation" if text_to_image else "Class-conditional image generation",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=args.dataset_split,
            metric_type=name.lower(),
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in metrics.items()
    ]


def render_model_card(
    args: REPATrainingArguments,
    repo_id: str,
    num_steps: int,
    sample_grid: SampleGridInfo | None = None,
    metrics: dict[str, float] | None = None,
    eval_curves: str | None = None,
    template_path: str | os.PathLike = DEFAULT_MODEL_CARD_TEMPLATE,
) -> ModelCard:
    """Fill `model_cards/sit_repa.md` for a finished run.

    Arguments that are local paths (`--dataset`, `--vae`, `--encoder`, `--pretrained_model`) appear as the folder's
    name, ``name (local folder)``, never as the path; Hub ids appear as they are. The metadata holds the license,
    ``library_name: diffusers``, the pipeline tag, the datasets on the Hub and, with `metrics`, a ``model-index``;
    the text shows how to load the model with this package or with plain diffusers (``trust_remote_code=True``: the
    export carries its code, see `SiTPipeline.save_pretrained`). Its title is the run's name (``--hub_model_id`` or
    the name of ``--output_dir``).

    Args:
        args: the run's arguments (dataset, encoder, sizes, optimiser settings).
        repo_id: what the card's loading snippets load: the Hub repo id, or the export folder as a user types it
            (``sit-repa-quickstart/pipeline``).
        num_steps: optimizer steps done.
        sample_grid: the grid saved next to the card, if any.
        metrics: evaluation results to list (e.g. ``{"FID-50K": 1.8}``), if any.
        eval_curves: file name of the evaluation curves saved next to the card (`--eval_steps`), if any.
    """
    template_path = Path(template_path)
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template {template_path} not found; pass template_path=.")
    is_lora = args.use_lora
    base_model_on_hub = args.pretrained_model is not None and not is_local_path(args.pretrained_model)
    family = args.family.lower()
    task = "text-to-image" if args.is_text_to_image else "class-conditional"
    tags = ["diffusers", family, "repa", task, "image-generation"] + (["lora"] if is_lora else [])
    model_name = (
        args.hub_model_id.rstrip("/").split("/")[-1] if args.hub_model_id else Path(args.output_dir).resolve().name
    )
    card_data = ModelCardData(
        license=LICENSE,
        library_name="diffusers",
        pipeline_tag=TEXT_TO_IMAGE_TAG if args.is_text_to_image else PIPELINE_TAG,
        tags=tags,
        datasets=_hub_dataset_ids(args.dataset),
        base_model=args.pretrained_model if is_lora and base_model_on_hub else None,
        model_name=model_name,
        eval_results=_eval_results(args, metrics or {}),
    )
    settings = dataclasses.asdict(args)
    # Settings that mean nothing for this run: LoRA's without LoRA, the MMDiT's text encoder for any other model.
    unused = () if is_lora else ("pretrained_model", "lora_rank", "lora_alpha")
    unused += () if args.caches_text_features else ("text_encoder",)
    training_config = {
        name: _card_value(settings[name])
        for name in _CARD_SETTINGS
        if settings[name] is not None and name not in unused
    }
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id,
        is_lora=is_lora,
        is_dit=family == "dit",
        is_sd3=family == "sd3",
        is_text_to_image=args.is_text_to_image,
        text_encoder=_card_value(args.text_encoder),
        caption_column=args.caption_column,
        lora_rank=args.lora_rank,
        base_model=_card_value(args.pretrained_model),
        base_model_url=f"https://huggingface.co/{args.pretrained_model}" if base_model_on_hub else None,
        dataset=_card_value(args.dataset),
        dataset_terms=_DATASET_TERMS.get(args.dataset),
        license=LICENSE,
        encoder=_card_value(args.encoder),
        model_size=args.model,
        resolution=args.resolution,
        encoder_depth=args.encoder_depth,
        proj_coeff=args.proj_coeff,
        ema_decay=args.ema_decay,
        num_steps=num_steps,
        sample_grid=sample_grid.filename if sample_grid else None,
        sample_conditions=sample_grid.conditions if sample_grid else None,
        sample_sampler=sample_grid.sampler.upper() if sample_grid else None,
        sample_steps=sample_grid.num_inference_steps if sample_grid else None,
        sample_guidance=sample_grid.guidance_scale if sample_grid else None,
        metrics={name: f"{value:.4g}" for name, value in (metrics or {}).items()},
        eval_curves=eval_curves,
        training_config=training_config,
    )


def _text_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix in TEXT_FILE_SUFFIXES)


def _without_local_paths(value: Any) -> Any:
    """`value` (parsed JSON) with every string that is an absolute local path replaced by its last component."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    if isinstance(value, str) and _is_absolute(value):
        return _local_name(value)
    return value


def remove_local_paths(folder: str | os.PathLike) -> list[str]:
    """Rewrite the JSON files under `folder` so that no value is an absolute local path; returns the files changed.

    A string value that is an absolute (or home-relative) path becomes its last component: diffusers' and
    transformers' `_name_or_path` of a component loaded from `/home/me/runs/vae` becomes `vae`, which keeps the
    provenance without the machine's layout. Nothing reads `_name_or_path` back when loading. Paths inside longer
    strings are left for [`find_local_paths`] to report.
    """
    folder = Path(folder)
    changed = []
    for path in sorted(folder.rglob("*.json")):
        try:
            config = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a config this function can rewrite; find_local_paths still scans its text
        cleaned = _without_local_paths(config)
        if cleaned != config:
            path.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n")
            changed.append(str(path.relative_to(folder)))
    return changed


def find_local_paths(folder: str | os.PathLike) -> list[str]:
    """Absolute local paths in the text files (`TEXT_FILE_SUFFIXES`) under `folder`, as ``"file: path"`` entries.

    Empty when `folder` is safe to publish in this respect.
    """
    folder = Path(folder)
    found = []
    for path in _text_files(folder):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(folder)}: {match}" for match in _ABSOLUTE_PATH_IN_TEXT.findall(text)]
    return found


def push_export_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, **upload_kwargs: Any) -> str:
    """Create `repo_id` (if needed) and upload the export folder (weights, card, sample grid); returns the repo URL.

    First the folder's JSON configs are cleaned with [`remove_local_paths`]; an absolute local path that remains
    anywhere in its text files (e.g. in the card, or inside a longer string) stops the upload before anything is
    created on the Hub.

    Raises:
        ValueError: a text file under `folder` holds an absolute local path (the message names file and path).
    """
    remove_local_paths(folder)
    leaks = find_local_paths(folder)
    if leaks:
        raise ValueError(
            f"Not uploading {folder}: it would publish local paths of this machine ({'; '.join(leaks)}). Replace "
            "them (e.g. by the folder's name) and push again."
        )
    repo_url = create_repo(repo_id, private=private, exist_ok=True)
    upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=upload_kwargs.pop("commit_message", "Upload SiT trained with REPA"),
        **upload_kwargs,
    )
    return str(repo_url)
