"""REPATrainer: trains a SiT (or a DiT, a text-to-image MMDiT, or a pretrained SD3 pipeline's transformer) with REPA
on a latent (or pixel) cache with accelerate — the loop around the step.

    for step in range(start, max_train_steps):
        training_step(micro_batches, step)     step.py: loss (objective) → backward → clip → finite? → AdamW → EMA
        log every --logging_steps; evaluate EMA samples every --eval_steps and at the last step; checkpoint every
        --checkpointing_steps and at the last step; sample a grid every --validation_steps; SIGTERM/SIGINT:
        checkpoint, then stop
    export the EMA weights (pipeline/ or lora/) with a sample grid and a model card

Pieces: `objectives.py` (what the loss is), `step.py` (the one optimizer step), `data_setup.py` (the cache and its
loader), `model_setup.py` (model and optimizer from the arguments), `periodic_eval.py` (evaluation during training),
`export.py` (grids and the export), `checkpointing.py` (atomic checkpoint folders and their files), `run_settings.py`
(what a resume may change), `stop_signals.py` (SIGTERM/SIGINT), `run_lock.py` (one run per folder).

Random streams: t, the noise of x_t and the posterior noise come from `self.generator` (seeded per process, saved in
checkpoints); label dropout uses the global torch RNG, which accelerate saves and restores; the loader's order depends
only on (seed, epoch). A resumed run therefore continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    set_seed,
)
from diffusers import AutoencoderKL, DiTPipeline, DPMSolverMultistepScheduler, SchedulerMixin
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from ..data import load_empty_text_features
from ..encoders import check_token_grid, load_encoders
from ..latents import latent_shift_and_scale
from ..pipelines.pipeline_mmdit import MMDiTPipeline
from ..pipelines.pipeline_sit import SiTPipeline
from ..precision import DTYPES
from ..schedulers import SiTODEScheduler, SiTSDEScheduler
from ..text_encoding import encode_text, load_text_encoder
from .arguments import REPATrainingArguments
from .checkpointing import (
    TRAINER_STATE_NAME,
    checkpoint_trained_weights_only,
    load_safetensors,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from .data_setup import build_cache_loader
from .ema import copy_ema_to, create_ema, ema_state_dict, load_ema_state_dict
from .export import export_step, sample_grid, write_export
from .hub import SampleGridInfo, push_export_to_hub, render_model_card
from .model_setup import build_model, build_optimizer, diffusion_transformer, resolve_encoder_depth, token_count
from .objectives import DDPMObjective, REPAFlowObjective, TextToImageObjective
from .periodic_eval import EVAL_PLOT_NAME, PeriodicEvaluation, evaluation_captions
from .pipeline_finetune import SD3FlowObjective, load_finetune_pipeline, prepare_transformer
from .run_lock import acquire_run_lock
from .run_settings import check_resume_settings, result_settings
from .step import TrainingStep
from .stop_signals import StopSignals

__all__ = ["REPATrainer"]

logger = get_logger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"
# Version of what a checkpoint holds. 2: SiT attention as to_q/to_k/to_v/to_out.0 (diffusers' names), EMA of
# diffusers' EMAModel, the run's settings recorded. Optimizer states follow the parameter order, so a checkpoint
# of another format cannot continue in this version.
CHECKPOINT_FORMAT = 2


class REPATrainer:
    """Trains a model of `--model`'s family with its objective plus REPA; `train()` runs it and exports the result.

    Everything is built in the constructor, in this order: accelerator and seeds; a check that the dataset and models
    can be read (before anything heavy); the latent cache (built once into `--cache_dir`, reused after); encoders,
    text encoder (an MMDiT's) or the pretrained pipeline (SD3), VAE (none for a pixel-space cache) and model; optimizer
    and loader (prepared by accelerate); EMA; the objective (`objectives.py`, or `SD3FlowObjective`) and the training
    step; and, with `--resume_from_checkpoint`, the saved state.

    Args:
        args: the run's settings.
        image_source: a `datasets.Dataset` of images and labels to train on instead of `args.dataset` (its latent
            cache is still built into `--cache_dir`).

    Attributes:
        model: the prepared (possibly DDP/FSDP-wrapped) transformer; `unwrapped_model` is the module itself.
        ema: diffusers' `EMAModel` of the trained parameters; `ema_model` is a plain copy of the model holding those
            averages, which is what gets sampled and exported (`sync_ema_model()` refreshes it where they differ).
        training_step: the [`TrainingStep`] (objective, optimizer, EMA); `objective` is its loss.
        global_step: optimizer steps done (including steps skipped for a non-finite loss).
    """

    def __init__(self, args: REPATrainingArguments, image_source: datasets.Dataset | None = None):
        self.output_dir = Path(args.output_dir)
        self.accelerator = accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)
            ),
            # Micro-steps are counted by the loop, not by epoch ends, so every step sees the same number of them.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            # Batches come from pinned memory on CUDA (see `build_cache_loader`): copy them without blocking the host.
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
            # Once alignment stops, the projectors get no gradient, which DDP must be told about.
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=args.alignment_stop_step is not None)
            ],
        )
        # One run per folder: a second run on it refuses instead of mixing its files with this one's.
        self._run_lock = acquire_run_lock(self.output_dir) if accelerator.is_main_process else None
        try:
            self._build(args, image_source)
        except BaseException:
            self.close()
            raise

    def _build(self, args: REPATrainingArguments, image_source: datasets.Dataset | None) -> None:
        accelerator = self.accelerator
        set_seed(args.seed)  # the same initial weights on every process
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.args = args = dataclasses.replace(args, encoder_depth=resolve_encoder_depth(args))
        self.per_device_batch_size = self._per_device_batch_size()
        self.global_batch_size = (
            self.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        )
        self.global_step = 0
        self.setting_changes: list[dict] = []
        # A checkpoint to resume from is checked before anything heavy: the same experiment, layout, steps left.
        checkpoint = checked = None
        if args.resume_from_checkpoint is not None:
            checkpoint = resolve_checkpoint(self.output_dir, args.resume_from_checkpoint)
            if checkpoint is None:
                logger.info(f"No checkpoint in {self.output_dir} yet: starting from step 0.", main_process_only=True)
            else:
                checked = self._check_checkpoint(checkpoint)

        # Data (after checking that every source can be read): the latent cache and its loader.
        train_dataloader, info, self.cache_dir = build_cache_loader(
            args, accelerator, self.per_device_batch_size, image_source
        )
        self.cache_info = info

        # Models: frozen encoders (none when λ = 0), the VAE (for samples and the export; none in pixel space), the
        # transformer, and a plain copy of it that holds the EMA weights for sampling.
        device = accelerator.device
        self.encoders = (
            load_encoders(args.encoder_names, args.resolution, dtype=DTYPES[args.encoder_precision], device=device)
            if args.proj_coeff > 0
            else []
        )
        projection_dims = tuple(encoder.embed_dim for encoder in self.encoders)
        # Text-to-image: an MMDiT's frozen text encoder (for the export, prompts and caches without text features).
        self.tokenizer = self.text_encoder = None
        if args.caches_text_features:
            self.tokenizer, self.text_encoder = load_text_encoder(args.text_encoder, device=device)
        # A pretrained SD3-family pipeline brings its transformer (made trainable: LoRA or full weights, plus a
        # REPA head), its frozen text encoders and its VAE.
        self.finetuned_pipeline = None
        if args.family == "SD3":
            self.finetuned_pipeline = load_finetune_pipeline(args.pretrained_model, device=device)
            self.vae = self.finetuned_pipeline.vae
            model = prepare_transformer(
                self.finetuned_pipeline,
                projection_dims=projection_dims,
                encoder_depth=args.encoder_depth,
                projector_dim=args.projector_dim,
                lora_rank=args.lora_rank if args.use_lora else None,
                lora_alpha=args.lora_alpha,
            )
        else:
            self.vae = None if info.pixel_space else AutoencoderKL.from_pretrained(args.vae).to(device).eval()
            text_dim = self.text_encoder.config.hidden_size if self.text_encoder is not None else None
            model = build_model(args, info, projection_dims, text_dim)
        num_tokens = token_count(model, info.latent_size)
        if not args.interpolate_targets:
            for encoder in self.encoders:
                check_token_grid(encoder, num_tokens)
        if args.gradient_checkpointing:
            diffusion_transformer(model).enable_gradient_checkpointing()
        model.to(device).train()  # label dropout (classifier-free guidance) happens inside the model in train mode
        # Copied before `prepare` (which patches the instance's `forward` with autocast, a patch a copy would inherit)
        # and before compiling (a copy of a compiled module would run the original's blocks). Frozen parameters (a
        # LoRA run's pretrained base) are shared, not copied: they never change, and the copy would double the memory.
        trainable = [param for param in model.parameters() if param.requires_grad]
        frozen = {id(param): param for param in model.parameters() if not param.requires_grad}
        self.ema_model = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)
        self.model, self.optimizer, self.train_dataloader = accelerator.prepare(
            model, build_optimizer(trainable, args), train_dataloader
        )
        self.unwrapped_model = accelerator.unwrap_model(self.model)
        if len(trainable) < sum(1 for _ in model.parameters()):  # LoRA: the frozen base stays out of checkpoints
            checkpoint_trained_weights_only(accelerator, self.model)
        self._setup_ema()
        if args.compile:
            self.unwrapped_model.compile_repeated_blocks(fullgraph=True)  # a graph break is a bug: fail loudly
            for encoder in self.encoders:
                encoder.compile(dynamic=False)  # transformers' code: graph breaks are theirs to have

        # From here on every process draws its own random numbers: label dropout from the global RNG; t, the noise
        # of x_t and the posterior noise from `self.generator`.
        set_seed(args.seed, device_specific=True)
        noise_seed = int(np.random.SeedSequence([args.seed, accelerator.process_index]).generate_state(1)[0])
        self.generator = torch.Generator(device).manual_seed(noise_seed)
        shift, scale = latent_shift_and_scale(
            info.scaling_factor, info.shift_factor, info.latents_mean, info.latents_std
        )
        # The objective of the model family: SiT's flow matching, DiT's improved DDPM (same inputs and targets), the
        # flow matching of a text-to-image MMDiT conditioned on caption features with caption dropout, or SD3's own
        # flow matching (diffusers' training examples) on the pipeline's text encoders' features.
        self.is_dit = args.family == "DiT"
        if self.is_dit:
            objective_class, objective_kwargs = DDPMObjective, {}
        elif args.family == "SD3":
            objective_class = SD3FlowObjective
            objective_kwargs = {"pipeline": self.finetuned_pipeline, "caption_dropout_prob": args.cfg_prob}
        elif args.family == "MMDiT":
            objective_class = TextToImageObjective
            objective_kwargs = {
                "path_type": args.path_type,
                "time_sampling": args.time_sampling,
                "null_context": self._empty_caption_features().to(device),
                "caption_dropout": args.cfg_prob,
                "encode_text": None if info.text_encoder is not None else self._encode_captions,
            }
        else:
            objective_class = REPAFlowObjective
            objective_kwargs = {"path_type": args.path_type, "time_sampling": args.time_sampling}
        self.objective = objective_class(
            encoders=self.encoders,
            proj_coeff=args.proj_coeff,
            latent_shift=shift.to(device),
            latent_scale=scale.to(device),
            target_num_tokens=num_tokens if args.interpolate_targets else None,
            alignment_stop_step=args.alignment_stop_step,
            autocast=accelerator.autocast,
            **objective_kwargs,
        )
        self.training_step = TrainingStep(
            accelerator,
            self.model,
            self.objective,
            self.optimizer,
            self.ema,
            self.generator,
            max_grad_norm=args.max_grad_norm,
            max_nonfinite_steps=args.max_nonfinite_steps,
        )
        # Fixed inputs of every validation grid: classes spread over the label range (text-to-image: --validation_prompts
        # or a caption of an image of each of those classes), noise from the seed.
        num_images = args.num_validation_images
        self.validation_labels = [i * info.num_classes // num_images for i in range(num_images)]
        self.validation_conditions = self.validation_labels
        if args.is_text_to_image:
            self.validation_conditions = args.validation_prompt_list or evaluation_captions(
                self.cache_dir, np.array(self.validation_labels) if info.num_classes else None, num_images
            )
            num_images = len(self.validation_conditions)
        self.validation_noise = torch.randn(
            (num_images, info.latent_channels, info.latent_size, info.latent_size),
            generator=torch.Generator().manual_seed(args.seed),
        )

        # Evaluation during training (main process: it samples and measures alone).
        self.eval_metrics: dict[str, float] = {}
        self.evaluation = None
        if args.eval_steps is not None and accelerator.is_main_process:
            self.evaluation = PeriodicEvaluation(args, self.cache_dir, info.num_classes, self.output_dir, device)
        self._reset_metrics()
        if checkpoint is not None:
            self._restore(checkpoint, *checked)
        self._start_run_records()

    def _setup_ema(self) -> None:
        """diffusers' `EMAModel` over the trained parameters (as prepared: sharded under FSDP2), named for checkpoints."""
        names_and_params = [(n, p) for n, p in self.unwrapped_model.named_parameters() if p.requires_grad]
        self.ema_names = [name for name, _ in names_and_params]
        self.ema = create_ema(
            [param for _, param in names_and_params], self.args.ema_decay, self.args.ema_warmup_power
        )
        averaged = dict(self.ema_model.named_parameters())
        self._ema_params = [averaged[name] for name in self.ema_names]
        if not any(isinstance(average, DTensor) for average in self.ema.shadow_params):
            # Unsharded: the averages live in the sampling copy itself, so there is no third copy of the weights.
            self.ema.shadow_params = self._ema_params

    def sync_ema_model(self) -> None:
        """Copy the EMA averages into `ema_model` where they are kept apart (sharded under FSDP2: all processes)."""
        if self.ema.shadow_params is not self._ema_params:
            copy_ema_to(self.ema, self._ema_params)

    # ------------------------------------------------------------------------------------------------ training loop

    def train(self) -> Path:
        """Run from `global_step` to `--max_train_steps`, checkpoint the last step, then export; returns the export
        folder. SIGTERM/SIGINT (e.g. a preempted job) checkpoint the step in progress and raise `TrainingInterrupted`."""
        args, accelerator = self.args, self.accelerator
        if self.global_step == args.max_train_steps and export_step(self.export_dir) == self.global_step:
            logger.info(f"Already trained to step {self.global_step}; the export is {self.export_dir}.")
            self.close()
            return self.export_dir
        batches = self._micro_batches(start_step=self.global_step)
        progress = tqdm(
            total=args.max_train_steps,
            initial=self.global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        with StopSignals() as stop_signals, contextlib.closing(self):
            for step in range(self.global_step, args.max_train_steps):
                output = self.training_step(batches, step)
                if output.updated:
                    self._add_metrics(output.losses, output.grad_norm)
                self.global_step = step + 1
                progress.update()

                stop = stop_signals.requested(accelerator)
                if self.global_step % args.logging_steps == 0:
                    progress.set_postfix(self.log_metrics())
                # Before the checkpoint: a run killed in between evaluates this step again after resuming.
                if args.eval_steps and (
                    self.global_step % args.eval_steps == 0 or self.global_step == args.max_train_steps
                ):
                    self.evaluate()
                if (
                    self.global_step % args.checkpointing_steps == 0
                    or self.global_step == args.max_train_steps
                    or stop
                ):
                    self.save_checkpoint()
                if stop:
                    stop_signals.exit(self.global_step)
                if self.global_step % args.validation_steps == 0:
                    self.log_validation()
            progress.close()
            return self.save_export()

    def close(self) -> None:
        """End the trackers and release the output folder (`train()` does it when it returns or fails)."""
        self.accelerator.end_training()
        if self._run_lock is not None:
            self._run_lock.release()

    def _micro_batches(self, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the data position of `start_step`, epoch after epoch, in the order of an uninterrupted run
        (the loader's order depends only on (seed, epoch))."""
        epoch, skip = divmod(start_step * self.args.gradient_accumulation_steps, len(self.train_dataloader))
        while True:
            self.train_dataloader.set_epoch(epoch)
            if skip:
                yield from self.accelerator.skip_first_batches(self.train_dataloader, skip)
            else:
                yield from self.train_dataloader
            epoch, skip = epoch + 1, 0

    def _empty_caption_features(self) -> torch.Tensor:
        """The empty caption's text features (1, L, D): the unconditional context of caption dropout (cached with
        the text features, else encoded now)."""
        if self.cache_info.text_encoder is not None:
            return load_empty_text_features(self.cache_dir).float()
        return self._encode_captions([""])

    def _encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Text features (N, L, D) of captions, with the run's frozen text encoder (caches without features)."""
        return encode_text(self.tokenizer, self.text_encoder, captions).float()

    @property
    def num_nonfinite_steps(self) -> int:
        return self.training_step.num_nonfinite_steps

    # ----------------------------------------------------------------------------------------------------- logging

    def _reset_metrics(self) -> None:
        self._metric_sums = torch.zeros(4, device=self.accelerator.device)  # loss, denoising, projection, grad norm
        self._metric_steps = 0
        self._window_start = (time.perf_counter(), self.global_step)

    def _add_metrics(self, step_losses: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        norm = torch.full((1,), float("nan"), device=step_losses.device) if grad_norm is None else grad_norm
        self._metric_sums += torch.cat([step_losses, norm.detach().float().reshape(1)])
        self._metric_steps += 1

    def log_metrics(self) -> dict[str, str]:
        """Average the values gathered since the last call over steps and processes, and log them (all processes
        must call it: it reduces across them). The only read of these values from the device."""
        seconds, first_step = time.perf_counter() - self._window_start[0], self._window_start[1]
        means = self.accelerator.reduce(self._metric_sums, reduction="mean") / max(self._metric_steps, 1)
        loss, denoising, projection, grad_norm = means.tolist()
        logs = {"loss": loss, "denoising_loss": denoising, "projection_loss": projection, "grad_norm": grad_norm}
        logs = {name: value for name, value in logs.items() if value == value}  # no grad norm under DeepSpeed
        if self._metric_steps == 0:  # every step of the window was skipped
            logs = {}
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        logs["images_per_sec"] = (self.global_step - first_step) * self.global_batch_size / seconds
        logs["nonfinite_steps"] = self.num_nonfinite_steps
        self.accelerator.log(logs, step=self.global_step)
        self._reset_metrics()
        return {
            name: f"{value:.4g}" for name, value in logs.items() if name in ("loss", "projection_loss", "grad_norm")
        }

    def make_pipeline(self, scheduler: SchedulerMixin) -> SiTPipeline | DiTPipeline | MMDiTPipeline:
        """The inference pipeline of the EMA weights: a `SiTPipeline` (with the VAE, none in pixel space), for a DiT
        diffusers' `DiTPipeline`, with the dataset's class names, or for text-to-image an `MMDiTPipeline` with the
        tokenizer and text encoder, or the fine-tuned SD3-family pipeline with the EMA transformer (call
        `sync_ema_model()` on every process first)."""
        if self.finetuned_pipeline is not None:
            components = self.finetuned_pipeline.components
            transformer = diffusion_transformer(self.ema_model)  # the REPA head is a training-only part
            return type(self.finetuned_pipeline)(**{**components, "transformer": transformer, "scheduler": scheduler})
        if self.args.is_text_to_image:
            return MMDiTPipeline(
                transformer=self.ema_model,
                vae=self.vae,
                scheduler=scheduler,
                tokenizer=self.tokenizer,
                text_encoder=self.text_encoder,
            )
        if self.is_dit:
            transformer = diffusion_transformer(self.ema_model)  # the REPA head is a training-only part
            return DiTPipeline(transformer, self.vae, scheduler, id2label=self.cache_info.id2label)
        return SiTPipeline(
            transformer=self.ema_model, vae=self.vae, scheduler=scheduler, id2label=self.cache_info.id2label
        )

    def sample_grid(self, pipeline: SiTPipeline | DiTPipeline | MMDiTPipeline | None = None) -> PIL.Image.Image:
        """Images of the EMA weights for the fixed validation labels (or prompts) and noise, as one grid."""
        args = self.args
        pipeline = pipeline or self.make_pipeline(self._sampling_scheduler())
        return sample_grid(
            pipeline,
            self.validation_conditions,
            self.validation_noise,
            args.validation_inference_steps,
            args.validation_guidance_scale,
            args.seed,
            autocast=self.accelerator.autocast,
        )

    def evaluate(self) -> dict[str, float]:
        """Measure EMA samples against the training images (`--eval_metric`), record them in eval.csv / eval.png and
        the trackers, and return the metrics (on the main process; call on every process)."""
        self.sync_ema_model()  # collective under FSDP2
        if self.evaluation is None:
            return {}
        pipeline = self.make_pipeline(self._sampling_scheduler())
        self.eval_metrics = self.evaluation(pipeline, self.global_step, autocast=self.accelerator.autocast)
        self.accelerator.log(
            {f"eval/{name}": value for name, value in self.eval_metrics.items()}, step=self.global_step
        )
        logger.info(
            f"Evaluation at step {self.global_step}: "
            + ", ".join(f"{name} {value:.4g}" for name, value in self.eval_metrics.items()),
            main_process_only=True,
        )
        return self.eval_metrics

    def _sampling_scheduler(self, export: bool = False) -> SchedulerMixin:
        """The scheduler of validation grids and evaluations (`--validation_sampler`) or, with `export`, of the
        exported pipeline (SiT: the SDE sampler of the paper's results). A DiT samples with DPM-Solver++ on DiT's
        1000-step linear β schedule (diffusers' defaults), without its learned variance."""
        if self.is_dit:
            return DPMSolverMultistepScheduler()
        if self.finetuned_pipeline is not None:  # the pipeline's own sampler (a fresh copy: sampling sets its steps)
            return type(self.finetuned_pipeline.scheduler).from_config(self.finetuned_pipeline.scheduler.config)
        if self.args.validation_sampler == "ode" and not export:
            return SiTODEScheduler()
        return SiTSDEScheduler(path_type=self.args.path_type)

    def _sampler_name(self) -> str:
        """The exported pipeline's sampler, as the card names it."""
        if self.finetuned_pipeline is not None:
            return type(self.finetuned_pipeline.scheduler).__name__
        return "dpm-solver++" if self.is_dit else "sde"

    def log_validation(self) -> Path | None:
        """Sample the validation grid from the EMA weights, save it as samples/step-<step>.png and log it
        (main process only; returns the PNG path there)."""
        self.sync_ema_model()  # collective under FSDP2
        if not self.accelerator.is_main_process:
            return None
        grid = self.sample_grid()
        path = self.output_dir / "samples" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        pixels = np.asarray(grid)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": pixels[None]}, step=self.global_step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [pixels]}, step=self.global_step)
        return path

    # ------------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Atomically save everything needed to resume as `output_dir/checkpoint-<step>` (call on all processes)."""
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.global_step,
            write_extra=self._write_trainer_state,
            total_limit=self.args.checkpoints_total_limit,
        )

    def _write_trainer_state(self, folder: Path) -> None:
        # accelerate wrote model, optimizer, grad scaler and RNG states; the rest is ours, in safetensors / JSON.
        ema_weights = ema_state_dict(self.ema, self.ema_names)  # collective under FSDP2
        if self.accelerator.is_main_process:
            save_file(ema_weights, folder / EMA_WEIGHTS_NAME)
            state = {
                "format": CHECKPOINT_FORMAT,
                **self._run_layout(),
                "ema_updates": self.ema.optimization_step,
                "settings": result_settings(self.args),
                "setting_changes": self.setting_changes,
            }
            (folder / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2))
        # The global RNG state too, to check after a resume that accelerate's random_states file was read.
        random_state = {"generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
        save_file(random_state, folder / f"generator_{self.accelerator.process_index}.safetensors")

    def _run_layout(self) -> dict[str, int]:
        """What a resumed run must share with the saved one to continue at the same data position."""
        return {
            "global_step": self.global_step,
            "num_processes": self.accelerator.num_processes,
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
        }

    def _check_checkpoint(self, folder: Path) -> tuple[dict, dict[str, tuple]]:
        """The checkpoint's trainer state and the setting changes to apply, once checked that it belongs to this
        experiment (layout and settings), that it can continue, and that this process's random state is there."""
        args = self.args
        saved = read_trainer_state(folder / TRAINER_STATE_NAME)
        if saved.get("format", 1) != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{folder} was written by another version of diffusers-repa (checkpoint format {saved.get('format', 1)}, "
                f"this one reads {CHECKPOINT_FORMAT}: parameter names and the optimizer's parameter order differ). "
                "Finish that run with the version that started it, or fine-tune its export in a new --output_dir "
                "(--pretrained_model)."
            )
        current = self._run_layout()
        mismatched = {
            key: (saved[key], current[key]) for key in current if key != "global_step" and saved[key] != current[key]
        }
        if mismatched:
            raise ValueError(
                f"{folder} was saved by a run with another layout (saved, now): {mismatched}. Resume with the same "
                "number of processes, per-device batch and accumulation steps, so the data position carries over."
            )
        if saved["global_step"] > args.max_train_steps:
            raise ValueError(
                f"{folder} is at step {saved['global_step']}, beyond --max_train_steps {args.max_train_steps}: "
                "nothing to train, and the export of a later step is kept. Pass a larger --max_train_steps to "
                "continue, or a new --output_dir."
            )
        changes = check_resume_settings(
            saved.get("settings", {}), result_settings(args), args.settings_to_change, str(folder)
        )
        for name in self._random_state_files():
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} is missing: without this process's random state the run would not continue "
                    "like an uninterrupted one. Resume from a complete checkpoint."
                )
        return saved, changes

    def _random_state_files(self) -> tuple[str, str]:
        index = self.accelerator.process_index
        return f"random_states_{index}.pkl", f"generator_{index}.safetensors"

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore model, optimizer, grad scaler, RNG states, EMA, noise generator and step from a checkpoint, after
        checking that it belongs to this experiment (layout and settings) and that it can continue."""
        folder = Path(folder)
        self._restore(folder, *self._check_checkpoint(folder))

    def _restore(self, folder: Path, saved: dict, changes: dict[str, tuple]) -> None:
        """`load_checkpoint` once `_check_checkpoint` has read and checked the checkpoint's trainer state."""
        random_states, generator_file = (folder / name for name in self._random_state_files())
        random_state = load_safetensors(generator_file)
        self.accelerator.load_state(str(folder))
        if not torch.equal(torch.get_rng_state(), random_state["torch_rng"]):
            # accelerate only logs when it cannot read its RNG file; a silent divergence is worse than stopping.
            raise ValueError(f"{random_states} could not be read; resume from another checkpoint.")
        load_ema_state_dict(
            self.ema, self.ema_names, load_safetensors(folder / EMA_WEIGHTS_NAME), saved.get("ema_updates", 0)
        )
        self.sync_ema_model()
        self.generator.set_state(random_state["generator"])
        self.global_step = saved["global_step"]
        self.setting_changes = list(saved.get("setting_changes", []))
        if changes:
            self._apply_setting_changes(changes)
        self._reset_metrics()
        logger.info(f"Resumed from {folder} at step {self.global_step}.", main_process_only=True)

    def _apply_setting_changes(self, changes: dict[str, tuple]) -> None:
        """Apply the changes named in --resume_with_changes (the optimizer's saved values would otherwise win) and
        record them in the run's history."""
        args = self.args
        for group in self.optimizer.param_groups:
            group.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
            group.update(weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        # The EMA, objective and step read the other applicable settings from `args` at construction.
        self.setting_changes.append({"step": self.global_step, "changes": {k: list(v) for k, v in changes.items()}})
        logger.warning(
            f"Resuming at step {self.global_step} with changed settings: "
            + ", ".join(f"{name} {old!r} → {new!r}" for name, (old, new) in changes.items()),
            main_process_only=True,
        )

    # ------------------------------------------------------------------------------------------------------ export

    @property
    def export_dir(self) -> Path:
        """`output_dir/pipeline` (the whole pipeline) or, with LoRA, `output_dir/lora` (the adapter only)."""
        return self.output_dir / ("lora" if self.args.use_lora else "pipeline")

    def save_export(self, metrics: dict[str, float] | None = None) -> Path:
        """Write the EMA weights for inference, a sample grid and a model card to `export_dir` (atomically, see
        `export.write_export`), and upload them with `--push_to_hub`. The projectors are a training-only head and
        are not exported (they are in the checkpoints)."""
        args, accelerator = self.args, self.accelerator
        accelerator.wait_for_everyone()
        self.sync_ema_model()  # collective under FSDP2
        if accelerator.is_main_process:
            pipeline = self.make_pipeline(self._sampling_scheduler(export=True))
            grid = self.sample_grid(pipeline)
            grid_info = SampleGridInfo(
                "samples.png", self.validation_conditions, self._sampler_name(),
                args.validation_inference_steps,
                args.validation_guidance_scale,
            )  # fmt: skip
            repo_id = args.hub_model_id or (  # what the card loads: the Hub repo, or the export folder as typed
                self.output_dir.resolve().name + ("" if args.push_to_hub else f"/{self.export_dir.name}")
            )
            metrics = {**self.eval_metrics, **(metrics or {})}
            curves = self.output_dir / EVAL_PLOT_NAME if self.evaluation is not None else None
            card = render_model_card(
                args, repo_id, self.global_step, grid_info, metrics, eval_curves=curves.name if curves else None
            )
            write_export(
                self.export_dir, pipeline, lora=args.use_lora, grid=grid, card=card, global_step=self.global_step,
                extra_files={curves.name: curves} if curves else None,
            )  # fmt: skip
            logger.info(f"Saved the final EMA weights to {self.export_dir}.")
            if args.push_to_hub:
                url = push_export_to_hub(self.export_dir, repo_id, private=args.hub_private_repo)
                logger.info(f"Uploaded {self.export_dir} to {url}.")
        accelerator.wait_for_everyone()
        return self.export_dir

    # ----------------------------------------------------------------------------------------------- construction

    def _start_run_records(self) -> None:
        """Write training_args.json, start the trackers, and log what is being trained on what."""
        args, accelerator, info = self.args, self.accelerator, self.cache_info
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "training_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
            flat = {name: v if isinstance(v, (int, float, str, bool)) else str(v) for name, v in vars(args).items()}
            accelerator.init_trackers(args.tracker_project_name, config=flat)
        total = sum(param.numel() for param in self.unwrapped_model.parameters())
        trained = sum(param.numel() for param in self.training_step.trainable_params)
        logger.info(
            f"{args.model}: {total / 1e6:.1f}M parameters, {trained / 1e6:.1f}M trained. Data: {info.num_samples} "
            f"images, {info.num_classes} classes. Batch {self.global_batch_size} = {self.per_device_batch_size} per "
            f"device × {accelerator.num_processes} processes × {args.gradient_accumulation_steps} accumulation "
            f"steps. Encoders: {', '.join(args.encoder_names) if self.encoders else 'none'}.",
            main_process_only=True,
        )

    def _per_device_batch_size(self) -> int:
        args, num_processes = self.args, self.accelerator.num_processes
        if args.train_batch_size is not None:
            return args.train_batch_size
        divisor = num_processes * args.gradient_accumulation_steps
        if args.global_batch_size % divisor:
            raise ValueError(
                f"--global_batch_size {args.global_batch_size} is not divisible by the number of processes "
                f"({num_processes}) × --gradient_accumulation_steps ({args.gradient_accumulation_steps}); use a "
                f"multiple of {divisor}, or set the per-device batch with --train_batch_size."
            )
        return args.global_batch_size // divisor
