"""Arguments of REPA training, and how a YAML config file and command-line flags combine into them.

The defaults are the paper's SiT-XL/2 run on ImageNet 256×256 (the original code's defaults): global batch 256,
AdamW 1e-4 constant, β 0.9/0.999, no weight decay, grad clip 1.0, EMA 0.9999, fp16, TF32, DINOv2-B aligned at
block 8 with λ = 0.5, linear path, uniform t, label dropout 0.1, 400k steps. Flag names follow diffusers' training
examples where one exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, get_args

import yaml
from transformers import HfArgumentParser

from ..presets import ModelFamily, preset_family


def _help(text: str) -> dict[str, str]:
    return {"help": text}


EncoderPrecision = Literal["fp32", "bf16", "fp16"]
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # the original's (as data.DEFAULT_VAE, not imported: --help stays fast)


@dataclass
class REPATrainingArguments:
    """Everything `REPATrainer` and `training/train_repa.py` need; each field is a `--flag` of the script."""

    # Run, logging, Hub
    output_dir: str = field(default="sit-repa", metadata=_help("Checkpoints, logs, samples and the final export."))
    config: str | None = field(
        default=None, metadata=_help("YAML file of argument values (training/configs/*.yaml); flags override it.")
    )
    seed: int = field(default=0, metadata=_help("Seed of weights, data order, noise and label dropout."))
    report_to: str = field(default="tensorboard", metadata=_help("'tensorboard', 'wandb', 'all' or 'none'."))
    tracker_project_name: str = field(default="repa", metadata=_help("Project name for the trackers."))
    logging_dir: str = field(default="logs", metadata=_help("Tracker folder, relative to --output_dir."))
    logging_steps: int = field(default=100, metadata=_help("Log losses, grad norm, lr and images/s every N steps."))
    validation_steps: int = field(default=10000, metadata=_help("Sample a grid from the EMA weights every N steps."))
    num_validation_images: int = field(default=16, metadata=_help("Images in the validation grid."))
    validation_sampler: Literal["ode", "sde"] = field(default="ode", metadata=_help("Sampler of the validation grid."))
    validation_inference_steps: int = field(default=50, metadata=_help("Sampling steps of the validation grid."))
    validation_guidance_scale: float = field(default=4.0, metadata=_help("CFG scale of the validation grid."))
    eval_steps: int | None = field(
        default=None,
        metadata=_help(
            "Every N steps (and at the last one), measure EMA samples against the training images: a Fréchet "
            "distance and, with a classifier, class accuracy, into eval.csv, eval.png, the trackers and the card."
        ),
    )
    eval_metric: str | None = field(
        default=None,
        metadata=_help(
            "Feature space of --eval_steps: 'digits' (an independent digit classifier; the default for --dataset "
            "digits), 'inception' (FID; the default otherwise) or 'encoder:<name or path>' (e.g. FD-DINOv2)."
        ),
    )
    eval_num_samples: int = field(default=1000, metadata=_help("EMA samples per evaluation (classes equally often)."))
    eval_num_reference: int = field(
        default=10000, metadata=_help("Training images (the first N of the cache) the samples are compared with.")
    )
    eval_inference_steps: int = field(default=50, metadata=_help("Sampling steps of the evaluation samples."))
    eval_guidance_scale: float = field(default=1.0, metadata=_help("CFG scale of the evaluation samples."))
    checkpointing_steps: int = field(default=50000, metadata=_help("Save a resumable checkpoint every N steps."))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help("Keep only the newest N checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("'latest' (newest checkpoint in --output_dir) or a checkpoint folder.")
    )
    resume_with_changes: str | None = field(
        default=None,
        metadata=_help(
            "Comma-separated settings a resumed run may change on purpose (e.g. 'learning_rate,ema_decay'); any "
            "other difference from the checkpoint's settings is refused."
        ),
    )
    push_to_hub: bool = field(default=False, metadata=_help("Upload the final export and its model card."))
    hub_model_id: str | None = field(default=None, metadata=_help("Hub repo id (default: name of --output_dir)."))
    hub_private_repo: bool = field(default=False, metadata=_help("Create the Hub repo as private."))

    # Model
    model: str = field(
        default="SiT-XL/2",
        metadata=_help(
            "Preset: SiT-{S,B,L,XL}/{2,4,8} (flow matching), DiT-{S,B,L,XL}/{2,4,8} (diffusers' DiT with learned "
            "variance, trained with DiT's improved-DDPM objective), MMDiT-<depth>/<patch> (text-to-image, the "
            "original's sizing: width 32·depth; MMDiT-24/2 is its model; needs --caption_column), or SD3 (fine-tune "
            "the --pretrained_model SD3/SD3.5 pipeline with its own flow matching, its text encoders and VAE)."
        ),
    )
    depth: int | None = field(default=None, metadata=_help("Override the preset's number of blocks."))
    hidden_size: int | None = field(default=None, metadata=_help("Override the preset's width."))
    num_attention_heads: int | None = field(default=None, metadata=_help("Override the preset's heads."))
    encoder_depth: int | None = field(
        default=None, metadata=_help("Block (1-based) whose output is aligned (default: the preset's, 8 for L/XL).")
    )
    projector_dim: int = field(default=2048, metadata=_help("Width of the projector MLPs."))
    qk_norm: bool = field(default=False, metadata=_help("LayerNorm on queries and keys."))
    cfg_prob: float = field(
        default=0.1,
        metadata=_help("Label dropout (inside the model), or for an MMDiT caption dropout (to the empty caption)."),
    )
    text_encoder: str = field(
        default="openai/clip-vit-large-patch14",
        metadata=_help(
            "MMDiT: the CLIP text encoder whose token features condition the model (a CLIP repo or folder, a "
            "pipeline folder with tokenizer/ and text_encoder/, or 'tiny-clip', a tiny random one built locally)."
        ),
    )
    pretrained_model: str | None = field(
        default=None,
        metadata=_help(
            "Fine-tune a trained model: a pipeline folder or Hub id (its `transformer` subfolder is used); with "
            "--model SD3 an SD3-family pipeline, whose VAE (default: its vae/ folder) and text encoders are used."
        ),
    )
    lora_rank: int = field(
        default=0, metadata=_help("With --pretrained_model: train rank-r LoRA adapters on the attention/MLP linears.")
    )
    lora_alpha: float | None = field(default=None, metadata=_help("LoRA scale numerator (default: --lora_rank)."))

    # REPA
    encoder: str = field(
        default="dinov2-vit-b", metadata=_help("Alignment target(s), comma-separated: 'dinov2-vit-b,clip-vit-l'.")
    )
    proj_coeff: float = field(default=0.5, metadata=_help("λ, weight of the projection (alignment) loss."))
    path_type: Literal["linear", "cosine"] = field(default="linear", metadata=_help("Interpolant path."))
    time_sampling: Literal["uniform", "logit_normal"] = field(default="uniform", metadata=_help("Training t law."))
    alignment_stop_step: int | None = field(
        default=None, metadata=_help("Stop the projection loss (and stop running the encoders) after N steps.")
    )
    interpolate_targets: bool = field(
        default=False, metadata=_help("Resize encoder tokens to the SiT token grid when they differ.")
    )

    # Data
    dataset: str = field(
        default="imagenet-1k", metadata=_help("'imagenet-1k', a Hub dataset id, or a local image folder.")
    )
    dataset_split: str = field(default="train", metadata=_help("Split of --dataset."))
    image_column: str = field(default="image", metadata=_help("Image column of --dataset."))
    label_column: str = field(default="label", metadata=_help("Label column of --dataset."))
    caption_column: str | None = field(
        default=None,
        metadata=_help(
            "Caption column of --dataset (a string or a list of strings per image; one is drawn per sample and "
            "epoch) for text-to-image training; e.g. 'caption' for 'digits-captions'."
        ),
    )
    validation_prompts: str | None = field(
        default=None,
        metadata=_help(
            "Text-to-image: the prompts of validation grids, separated by '|' (default: a caption of "
            "--num_validation_images training images, spread over the classes when the dataset has labels)."
        ),
    )
    max_train_samples: int | None = field(default=None, metadata=_help("Use only the first N images."))
    cache_dir: str | None = field(
        default=None,
        metadata=_help(
            "Latent cache folder (built there on first use, reused after). "
            "Default: <HF_HOME>/diffusers_repa/latents/<dataset>-<split>-<resolution>."
        ),
    )
    resolution: int = field(default=256, metadata=_help("Image side in pixels."))
    vae: str = field(default=DEFAULT_VAE, metadata=_help("AutoencoderKL: Hub id or folder."))
    hflip: bool = field(default=False, metadata=_help("Random horizontal flips (image and latents together)."))
    dataloader_num_workers: int = field(default=4, metadata=_help("Data loading worker processes."))

    # Optimisation
    max_train_steps: int = field(default=400000, metadata=_help("Optimizer steps."))
    global_batch_size: int = field(
        default=256, metadata=_help("Images per optimizer step over all processes and accumulation steps.")
    )
    train_batch_size: int | None = field(
        default=None,
        metadata=_help("Per-device batch; overrides --global_batch_size (default: global / (processes · accum))."),
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    learning_rate: float = field(default=1e-4, metadata=_help("Constant AdamW learning rate."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW β1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW β2."))
    adam_weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW ε."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the global gradient norm to this value."))
    ema_decay: float = field(default=0.9999, metadata=_help("EMA decay per optimizer step (0: EMA = model)."))
    ema_warmup_power: float | None = field(
        default=None,
        metadata=_help(
            "EMA warm-up for short runs: decay 1 − (1 + step)^−p, capped at --ema_decay (e.g. 0.75). Default: the "
            "constant decay of the original REPA."
        ),
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="fp16", metadata=_help("Autocast precision."))
    allow_tf32: bool = field(default=True, metadata=_help("TF32 matmuls on Ampere+ GPUs."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute blocks in backward."))
    compile: bool = field(
        default=False, metadata=_help("torch.compile the transformer blocks (regional) and the frozen encoders.")
    )
    encoder_precision: EncoderPrecision = field(
        default="fp32",
        metadata=_help(
            "dtype of the frozen encoders' weights: bf16/fp16 halve their memory and skip autocast's weight casts "
            "on every step; fp32 is the original's. They run under --mixed_precision's autocast either way."
        ),
    )
    max_nonfinite_steps: int = field(
        default=10, metadata=_help("Stop after this many optimizer steps in a row with a NaN/Inf loss (skipped).")
    )

    def __post_init__(self) -> None:
        must_be_positive = (
            "logging_steps", "validation_steps", "checkpointing_steps", "max_train_steps", "global_batch_size",
            "gradient_accumulation_steps", "resolution", "max_nonfinite_steps", "num_validation_images",
            "validation_inference_steps", "max_grad_norm", "train_batch_size", "checkpoints_total_limit",
            "max_train_samples", "depth", "hidden_size", "num_attention_heads", "projector_dim", "eval_steps",
            "eval_num_reference", "eval_inference_steps",
        )  # fmt: skip
        if self.eval_num_samples < 2:
            raise ValueError(
                f"--eval_num_samples must be at least 2 (a covariance needs two), got {self.eval_num_samples}."
            )
        if self.cfg_prob == 0 and self.eval_guidance_scale > 1:
            raise ValueError("--cfg_prob 0 trains no null class: pass --eval_guidance_scale 1.")
        for name in must_be_positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}.")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise NotADirectoryError(
                f"--output_dir {self.output_dir} is a file: pass a folder (a new one, or this run's to resume it)."
            )
        if not 0.0 <= self.cfg_prob < 1.0:
            raise ValueError(f"--cfg_prob must be in [0, 1), got {self.cfg_prob}.")
        if self.cfg_prob == 0 and self.validation_guidance_scale > 1:
            raise ValueError(
                "--cfg_prob 0 trains no null class, so guided sampling is impossible: "
                "pass --validation_guidance_scale 1."
            )
        if self.proj_coeff < 0:
            raise ValueError(f"--proj_coeff must be >= 0, got {self.proj_coeff}.")
        if self.encoder_precision not in get_args(EncoderPrecision):
            raise ValueError(f"--encoder_precision must be fp32, bf16 or fp16, got {self.encoder_precision!r}.")
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0, got {self.lora_rank}.")
        if self.lora_rank and self.pretrained_model is None:
            raise ValueError(
                "--lora_rank fine-tunes a trained model: also pass --pretrained_model (folder or Hub id)."
            )
        if self.lora_alpha is not None and not self.lora_rank:
            raise ValueError("--lora_alpha scales LoRA adapters: also pass --lora_rank, or drop --lora_alpha.")
        # The model's shape is checked here, not only when the model is built, which comes after the latent cache. A
        # pretrained model brings its own shape.
        if self.pretrained_model is None:
            # Imported after the cheap checks, which thus answer without loading torch.
            from ..presets import parse_preset

            try:
                preset = parse_preset(self.model)
            except ValueError as error:
                raise ValueError(f"--model: {error}") from None
            sizes = ("depth", "hidden_size", "num_attention_heads", "encoder_depth")
            depth, hidden_size, num_heads, encoder_depth = (
                preset[name] if getattr(self, name) is None else getattr(self, name) for name in sizes
            )
            if hidden_size % num_heads:
                raise ValueError(
                    f"The width {hidden_size} (--hidden_size, or {self.model}'s) must be divisible by the number of "
                    f"attention heads {num_heads} (--num_attention_heads, or {self.model}'s): change one of them."
                )
            if self.proj_coeff > 0 and not 1 <= encoder_depth <= depth:
                source = f"{self.model}'s default encoder depth" if self.encoder_depth is None else "--encoder_depth"
                raise ValueError(
                    f"{source} {encoder_depth} is not a block of a {depth}-block model (--depth, or {self.model}'s): "
                    f"pass --encoder_depth between 1 and {depth}."
                )
        family = self.family
        if family in ("MMDiT", "SD3") and self.caption_column is None:
            raise ValueError(
                f"--model {self.model} is text-to-image: pass --caption_column (e.g. 'caption' for --dataset "
                "digits-captions), the captions it learns from."
            )
        if family == "SD3":  # (without --pretrained_model, the preset check above said so)
            if self.vae == DEFAULT_VAE and os.path.isdir(os.path.join(self.pretrained_model, "vae")):
                self.vae = os.path.join(self.pretrained_model, "vae")  # the pipeline's own VAE
        elif family == "MMDiT":
            unsupported = {
                "--lora_rank": self.lora_rank,
                "--qk_norm": self.qk_norm,
                # The sizes follow from the name (width 32·depth, depth heads), as in the original.
                "--depth/--hidden_size/--num_attention_heads (name the depth: MMDiT-<depth>/<patch>)": (
                    self.depth or self.hidden_size or self.num_attention_heads
                ),
            }
            named = [flag for flag, given in unsupported.items() if given]
            if named:
                raise ValueError(f"--model {self.model} (an MMDiT) does not support {', '.join(named)} yet; drop it.")
        elif family != "SD3" and self.caption_column is not None:
            raise ValueError(
                f"--caption_column trains on captions, which --model {self.model} (class-conditional) cannot use: "
                "pass --model MMDiT-<depth>/<patch>, or drop --caption_column."
            )
        if family == "DiT":
            # What the DiT path (diffusers' DiTTransformer2DModel and DiTPipeline) does not do yet.
            unsupported = {
                "--lora_rank": self.lora_rank,
                "--compile": self.compile,
                "--vae none (DiTPipeline decodes latents)": self.vae.strip().lower() == "none",
                "--qk_norm": self.qk_norm,
            }
            named = [flag for flag, given in unsupported.items() if given]
            if named:
                raise ValueError(f"--model {self.model} (a DiT) does not support {', '.join(named)} yet; drop it.")

    @property
    def use_lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def settings_to_change(self) -> set[str]:
        return {name.strip() for name in (self.resume_with_changes or "").split(",") if name.strip()}

    @property
    def family(self) -> ModelFamily:
        """The model family `--model` names: "SiT", "DiT", "MMDiT" or "SD3" (see `presets.preset_family`)."""
        return preset_family(self.model)

    @property
    def is_text_to_image(self) -> bool:
        return self.caption_column is not None

    @property
    def caches_text_features(self) -> bool:
        """Whether the latent cache holds the captions' text features (an MMDiT's --text_encoder); a pretrained
        pipeline (SD3) encodes the drawn captions with its own text encoders at every step."""
        return self.is_text_to_image and self.family != "SD3"

    @property
    def validation_prompt_list(self) -> list[str] | None:
        if self.validation_prompts is None:
            return None
        return [prompt.strip() for prompt in self.validation_prompts.split("|")]

    @property
    def encoder_names(self) -> list[str]:
        return [name.strip() for name in self.encoder.split(",") if name.strip()]


def load_config_file(path: str | os.PathLike) -> dict:
    """Values of a YAML config file, checked against the fields of `REPATrainingArguments`."""
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(values).__name__}.")
    known = {f.name for f in dataclasses.fields(REPATrainingArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} in {path}; valid names are the script's flags without '--'.")
    return values


def parse_training_args(argv: list[str] | None = None) -> REPATrainingArguments:
    """Parse flags (and `--config file.yaml`, whose values the flags override) into `REPATrainingArguments`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    config_path = config_only.parse_known_args(argv)[0].config
    if config_path is not None:
        # The file's values go in front as flags, so that argparse converts them like typed flags (YAML reads
        # `1e-4` as a string) and later command-line flags win. `null` means "keep the default".
        from_file = [f"--{name}={value}" for name, value in load_config_file(config_path).items() if value is not None]
        argv = from_file + argv
    (args,) = HfArgumentParser(REPATrainingArguments).parse_args_into_dataclasses(args=argv)
    return args
