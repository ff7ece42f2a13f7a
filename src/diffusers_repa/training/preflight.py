"""Fail fast: before any heavy work, check that the dataset and every model of a training run can be read."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from diffusers import AutoencoderKL
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session
from transformers import AutoConfig

from ..cli import UserError
from ..data import DIGITS_CAPTIONS_DATASET, DIGITS_DATASET, is_pixel_space_vae, load_image_source
from ..encoders import (
    DIGITS_ENCODER_NAME,
    ENCODER_ALIASES,
    TOKEN_STRIDE,
    TOKEN_STRIDE_CONFIG_KEY,
    builtin_encoder_folder,
)
from ..models.tiny_text_encoder import TINY_CLIP_NAME
from ..models.transformer_sit import SiTTransformer2DModel
from ..presets import parse_preset
from .arguments import REPATrainingArguments

logger = logging.getLogger(__name__)

QUICKSTART_HINT = "For an offline smoke run: python training/train_repa.py --config training/configs/quickstart.yaml"


class SourcesUnreachableError(UserError, RuntimeError):
    """The dataset or a model of a training run cannot be read (offline, gated, not found).

    The message's first line is a one-line summary; the next lines give each source's error and fix.
    """


def default_cache_dir(args: REPATrainingArguments) -> Path:
    """Where the latent cache goes when `--cache_dir` is not given: one folder per dataset, split, size and VAE."""
    parts = [args.dataset, args.dataset_split, f"{args.resolution}px", args.vae]
    if args.max_train_samples is not None:
        parts.append(f"first{args.max_train_samples}")
    if args.is_text_to_image:  # the captions (and an MMDiT's text features) are part of the cache
        parts += [args.caption_column] + ([args.text_encoder] if args.caches_text_features else [])
    name = "-".join(part.strip("/").replace("/", "--") for part in parts)
    return Path(hub_constants.HF_HOME) / "diffusers_repa" / "latents" / name


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _is_local(name: str) -> bool:
    """A local folder or file, or a built-in source (the digits, the digits encoder) that needs no Hub."""
    return name in (DIGITS_DATASET, DIGITS_CAPTIONS_DATASET, DIGITS_ENCODER_NAME, TINY_CLIP_NAME) or (
        Path(name).expanduser().exists()
    )


def _hub_unreachable_reason() -> str | None:
    """Why the Hub does not answer (one request, short timeout, no retry), or None if it does.

    Without this probe an unreachable Hub (no network, a firewall) costs each source about half a minute of
    huggingface_hub's retries before its error, and the retry warnings bury the message.
    """
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=hub_constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # DNS, connection, proxy, TLS, timeout: whatever it is, nothing can be fetched
        return f"{type(error).__name__}: {_first_line(error)}"
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode (cache only, no requests) for the duration of the checks; datasets keeps its own
    copy of the flag."""
    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


@dataclass
class _SourceReport:
    """What reading the sources' metadata found: the unreadable ones, and the configs the shape checks need."""

    problems: list[tuple[str, str]] = field(default_factory=list)  # (source, error and fix)
    vae_config: dict[str, Any] | None = None  # None in pixel space
    encoder_strides: dict[str, int] = field(default_factory=dict)  # pixels per alignment token, per encoder
    pretrained_config: dict[str, Any] | None = None


def _read_sources(args: REPATrainingArguments, need_dataset: bool) -> _SourceReport:
    report = _SourceReport()
    if need_dataset:
        try:
            load_image_source(args.dataset, args.dataset_split, args.image_column, args.label_column, streaming=True)
        except Exception as error:  # any failure here means "cannot train on it"; the message says which
            report.problems.append(
                (
                    f"the dataset '{args.dataset}'",
                    f"split '{args.dataset_split}': {_first_line(error)}\n    Fix: log in / accept the dataset's "
                    "terms, pass a local image folder, or point --cache_dir at a finished latent cache.",
                )
            )
    if not is_pixel_space_vae(args.vae):
        try:
            report.vae_config = AutoencoderKL.load_config(args.vae)
        except Exception as error:
            report.problems.append((f"the VAE '{args.vae}'", _first_line(error)))
    for name in args.encoder_names if args.proj_coeff > 0 else []:
        spec = ENCODER_ALIASES.get(name.lower())
        source = spec.hub_id if spec is not None else builtin_encoder_folder(name) or name
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as error:
            report.problems.append((f"the encoder '{name}'", f"{source}: {_first_line(error)}"))
            continue
        # As `load_encoder` reads it: REPA's stride for the named encoders, else what the checkpoint declares.
        stride = TOKEN_STRIDE if spec is not None else getattr(config, TOKEN_STRIDE_CONFIG_KEY, TOKEN_STRIDE)
        if isinstance(stride, int) and stride > 0:  # anything else is `load_encoder`'s error to report
            report.encoder_strides[name] = stride
    if args.caches_text_features and not _is_local(args.text_encoder):
        try:  # a CLIP repo (its config at the root) or a pipeline's (text_encoder/)
            try:
                AutoConfig.from_pretrained(args.text_encoder)
            except OSError:
                AutoConfig.from_pretrained(args.text_encoder, subfolder="text_encoder")
        except Exception as error:
            report.problems.append((f"the text encoder '{args.text_encoder}'", _first_line(error)))
    if args.pretrained_model is not None:
        try:
            report.pretrained_config = SiTTransformer2DModel.load_config(
                args.pretrained_model, subfolder="transformer"
            )
        except Exception as error:
            report.problems.append(
                (f"the pretrained model '{args.pretrained_model}'", f"subfolder 'transformer': {_first_line(error)}")
            )
    return report


def _check_shapes(args: REPATrainingArguments, report: _SourceReport) -> None:
    """What the trainer could otherwise only find out once the latent cache is built (hours for ImageNet) and the
    models are loaded: the latent grid, the model's patches and the alignment targets' token grids must fit."""
    vae = f"--vae {args.vae}"
    if report.vae_config is None:  # pixel space: the model sees the image itself
        downsampling, channels = 1, 3
    else:
        downsampling = 2 ** (len(report.vae_config["block_out_channels"]) - 1)
        channels = report.vae_config["latent_channels"]
        if args.resolution % downsampling:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of {downsampling}, the downsampling of {vae}: pass "
                "a multiple of it."
            )
    latent_size = args.resolution // downsampling
    pretrained = report.pretrained_config
    if pretrained is None:
        model, patch_size = f"--model {args.model}", parse_preset(args.model)["patch_size"]
    else:
        model, patch_size = f"--pretrained_model {args.pretrained_model}", pretrained["patch_size"]
        # SD3 crops its position table to any resolution's latents: only the channels must fit.
        size = latent_size if args.family == "SD3" else pretrained["sample_size"]
        if (size, pretrained["in_channels"]) != (latent_size, channels):
            raise ValueError(
                f"{model} works on {pretrained['in_channels']}×{pretrained['sample_size']}² inputs, but --resolution "
                f"{args.resolution} with {vae} gives {channels}×{latent_size}²: use the VAE and resolution of its "
                "training."
            )
        # A SiT records its label dropout; a diffusers DiT always has the null class (id 1000) of its label table.
        if args.cfg_prob > 0 and pretrained.get("class_dropout_prob", 0.1) == 0:
            raise ValueError(f"{model} has no null class for label dropout; pass --cfg_prob 0.")
    if latent_size % patch_size:
        raise ValueError(
            f"{model} has patch size {patch_size}, which does not divide the {latent_size}×{latent_size} inputs of "
            f"--resolution {args.resolution} with {vae}: change the resolution or the model's patch size."
        )
    grid = latent_size // patch_size
    for name, stride in report.encoder_strides.items():
        if args.resolution % stride:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of {stride}, the pixels per token of the encoder "
                f"'{name}': pass a multiple of {stride}."
            )
        encoder_grid = args.resolution // stride
        if encoder_grid != grid and not args.interpolate_targets:
            raise ValueError(
                f"The encoder '{name}' gives a {encoder_grid}×{encoder_grid} token grid at --resolution "
                f"{args.resolution}, but {model} sees a {grid}×{grid} grid ({latent_size}² inputs, patch size "
                f"{patch_size}); REPA aligns them token by token. Make patch size × downsampling = {stride} (e.g. "
                "patch size 2 with an 8x VAE), or pass --interpolate_targets to resize the encoder's tokens."
            )


def check_sources_reachable(args: REPATrainingArguments, *, need_dataset: bool) -> None:
    """Raise one clear error listing every source of `args` that cannot be read (offline, gated, not found), or
    one naming the flags whose shapes do not fit together.

    Reads only metadata: the dataset is opened in streaming mode (nothing downloaded) and models load their config
    files. `need_dataset=False` skips the dataset (a finished latent cache exists, or a dataset object is given).
    When a source lives on the Hub and offline mode is not set, one request checks first that the Hub answers; if it
    does not, the sources are looked up in the Hub cache only, so that the answer comes in seconds, not minutes.
    With the configs read, the shapes are checked: the VAE's latents must split into the model's patches, and each
    alignment target's token grid must equal the model's (unless `--interpolate_targets`); a pretrained model must
    fit the latents and, with label dropout, have a null class.

    Raises:
        SourcesUnreachableError: its first line names every unreadable source (the summary a script prints last);
            the next lines give each one's error and fix.
        ValueError: the shapes do not fit (the message names the flags and the fix).
    """
    names = [] if is_pixel_space_vae(args.vae) else [args.vae]
    names += args.encoder_names if args.proj_coeff > 0 else []
    names += [args.dataset] if need_dataset else []
    names += [args.text_encoder] if args.caches_text_features else []
    names += [args.pretrained_model] if args.pretrained_model is not None else []
    offline = hub_constants.HF_HUB_OFFLINE
    unreachable = None if offline or all(_is_local(name) for name in names) else _hub_unreachable_reason()
    with _hub_offline() if unreachable else contextlib.nullcontext():
        report = _read_sources(args, need_dataset)
    problems = report.problems
    if not problems:
        if unreachable:
            logger.warning(
                f"The Hub ({hub_constants.ENDPOINT}) cannot be reached ({unreachable}); the sources are in the Hub "
                "cache. Set HF_HUB_OFFLINE=1 so that loading them does not wait for network retries."
            )
        _check_shapes(args, report)
        return
    what = [source for source, _ in problems]
    what = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
    if offline:
        why = " (HF_HUB_OFFLINE is set: only local folders and files already in the Hub cache can be used)"
    elif unreachable:
        why = f" (the Hub, {hub_constants.ENDPOINT}, cannot be reached: {unreachable}; nor are they in the Hub cache)"
    else:
        why = ""
    lines = [f"Cannot start training: {what} cannot be read{why}."]
    lines += [f"  - {source}: {detail}" for source, detail in problems]
    lines.append(QUICKSTART_HINT)
    raise SourcesUnreachableError("\n".join(lines))
