"""REPATrainer: trains a SiT with REPA on a VAE latent cache, with accelerate.

One optimizer step (the original REPA's, `train` below):

    for each of the gradient_accumulation_steps micro-batches (uint8 crop, posterior mean/std, label):
        z       = (mean + std·ε − shift) · scale                      fresh posterior sample (scale 0.18215, SD-VAE)
        targets = [encoder(crop) for each encoder]                    frozen, no grad, under autocast
        loss    = mean‖v_θ(x_t, t, y) − v_t‖² + λ · mean(−cos(targets, projections))     (`repa_loss`)
        backward
    clip the global grad norm → AdamW step (skipped if the loss was NaN/Inf) → EMA update

Labels are dropped (→ null class) inside the model, which stays in train mode. t, the noise ε' of x_t and ε come
from `self.generator` (seeded per process, saved in checkpoints); label dropout uses the global torch RNG, which
accelerate saves and restores; the loader's order depends only on (seed, epoch). A resumed run therefore continues
exactly like an uninterrupted one.

Device→host syncs: one per step, the check that the loss is finite (a NaN/Inf loss skips the update; too many in a
row stop the run; fp16 adds the grad scaler's own). Logged values stay on the device until every `--logging_steps`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
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
from diffusers import AutoencoderKL
from diffusers.utils import make_image_grid
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import CACHE_INFO_FILE, build_latent_cache, load_latent_cache, make_train_dataloader, read_cache_info
from ..encoders import check_token_grid, interpolate_tokens, load_encoders
from ..latents import latent_shift_and_scale
from ..losses import REPALossOutput, repa_loss
from ..models.transformer_sit import SiTTransformer2DModel
from ..pipelines.pipeline_sit import SiTPipeline
from ..schedulers import SiTODEScheduler, SiTSDEScheduler
from .arguments import REPATrainingArguments
from .checkpointing import resolve_checkpoint, save_checkpoint
from .ema import EMA
from .hub import SampleGridInfo, push_export_to_hub, render_model_card
from .preflight import check_sources_reachable, default_cache_dir
from .quickstart import QUICKSTART_NOTICE, build_quickstart_assets

logger = get_logger(__name__)

# LoRA goes on the attention and MLP linears of every block (names relative to a SiTBlock).
LORA_TARGET_MODULES = ["attn.to_qkv", "attn.to_out", "ff.net.0.proj", "ff.net.2"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
SAMPLE_GRID_NAME = "samples.png"
ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for `--max_nonfinite_steps` optimizer steps in a row."""


class REPATrainer:
    """Trains a [`SiTTransformer2DModel`] with the REPA objective; `train()` runs it and exports the result.

    Everything is built in the constructor, in this order: accelerator and seeds; a check that the dataset and models
    can be read (before anything heavy); the latent cache (built once into `--cache_dir`, reused after); encoders,
    VAE and model; optimizer and loader (prepared by accelerate); EMA; and, with `--resume_from_checkpoint`, the
    saved state.

    Args:
        args: the run's settings.
        image_source: a `datasets.Dataset` of images and labels to train on instead of `args.dataset` (its latent
            cache is still built into `--cache_dir`).

    Attributes:
        model: the prepared (possibly DDP-wrapped) transformer; `unwrapped_model` is the module itself.
        ema: the EMA of its weights ([`EMA`]); `ema.model` is what gets sampled and exported.
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
            # Batches come from pinned memory on CUDA (see `_latent_cache_loader`): copy them without blocking the host.
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
            # Once alignment stops, the projectors get no gradient, which DDP must be told about.
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=args.alignment_stop_step is not None)
            ],
        )
        set_seed(args.seed)  # the same initial weights on every process
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.smoke_notice = None
        if args.quickstart:
            args, image_source = self._use_quickstart_assets(args)
        self.args = args
        self.per_device_batch_size = self._per_device_batch_size()
        self.global_batch_size = (
            self.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        )

        # Data (after checking that every source can be read): the latent cache and its loader.
        train_dataloader = self._latent_cache_loader(image_source)
        info = self.cache_info
        self.latent_shift, self.latent_scale = self._latent_normalisation()

        # Models: frozen encoders (none when λ = 0), the VAE (for samples and the export), the transformer.
        device = accelerator.device
        encoder_dtype = ENCODER_DTYPES[args.encoder_precision]
        self.encoders = (
            load_encoders(args.encoder_names, args.resolution, dtype=encoder_dtype, device=device)
            if args.proj_coeff > 0
            else []
        )
        self.vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval().requires_grad_(False)
        model = self._build_model(projection_dims=tuple(encoder.embed_dim for encoder in self.encoders))
        self.args = args = dataclasses.replace(args, encoder_depth=model.config.encoder_depth)  # the preset's if unset
        if not args.interpolate_targets:
            for encoder in self.encoders:
                check_token_grid(encoder, model.num_tokens)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.to(device).train()  # label dropout (classifier-free guidance) happens inside the model in train mode
        # The EMA copy is made before `prepare`, which patches the instance's `forward` with autocast (a patch a copy
        # would inherit), and before compiling (a copy of a compiled module would run the original's blocks).
        self.ema = EMA(model, args.ema_decay)
        optimizer = torch.optim.AdamW(
            [param for param in model.parameters() if param.requires_grad],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            fused=device.type == "cuda",  # one kernel for the whole update instead of one per tensor and operation
        )
        self.model, self.optimizer, self.train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
        self.unwrapped_model: SiTTransformer2DModel = accelerator.unwrap_model(self.model)
        self.trainable_params = [param for param in self.unwrapped_model.parameters() if param.requires_grad]
        if args.compile:
            self.unwrapped_model.compile_repeated_blocks(fullgraph=True)  # a graph break is a bug: fail loudly
            for encoder in self.encoders:
                encoder.compile(dynamic=False)  # transformers' code: graph breaks are theirs to have

        # From here on every process draws its own random numbers: label dropout from the global RNG; t, the noise
        # of x_t and the posterior noise from `self.generator`.
        set_seed(args.seed, device_specific=True)
        noise_seed = int(np.random.SeedSequence([args.seed, accelerator.process_index]).generate_state(1)[0])
        self.generator = torch.Generator(device).manual_seed(noise_seed)
        # Fixed inputs of every validation grid: classes spread over the label range, noise from the seed.
        num_images = args.num_validation_images
        self.validation_labels = [i * info.num_classes // num_images for i in range(num_images)]
        self.validation_noise = torch.randn(
            (num_images, info.latent_channels, info.latent_size, info.latent_size),
            generator=torch.Generator().manual_seed(args.seed),
        )

        self.global_step = 0
        self.nonfinite_streak = 0
        self.num_nonfinite_steps = 0
        self._reset_metrics()
        if args.resume_from_checkpoint is not None:
            checkpoint = resolve_checkpoint(self.output_dir, args.resume_from_checkpoint)
            if checkpoint is None:
                logger.info(f"No checkpoint in {self.output_dir} yet: starting from step 0.", main_process_only=True)
            else:
                self.load_checkpoint(checkpoint)
        self._start_run_records()

    # ------------------------------------------------------------------------------------------------ training loop

    def train(self) -> Path:
        """Run from `global_step` to `--max_train_steps`, then export; returns the export folder."""
        args, accelerator = self.args, self.accelerator
        batches = self._micro_batches(start_step=self.global_step)
        progress = tqdm(
            total=args.max_train_steps,
            initial=self.global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        for step in range(self.global_step, args.max_train_steps):
            align = bool(self.encoders) and (args.alignment_stop_step is None or step < args.alignment_stop_step)
            step_losses = torch.zeros(3, device=accelerator.device)  # loss, denoising, projection: mean of micro-steps
            for _ in range(args.gradient_accumulation_steps):
                with accelerator.accumulate(self.model):
                    losses = self.compute_loss(next(batches), align=align)
                    accelerator.backward(losses.loss)
                terms = [losses.loss, losses.denoising_loss.mean(), losses.projection_loss]
                step_losses += torch.stack(terms).detach() / args.gradient_accumulation_steps
            grad_norm = accelerator.clip_grad_norm_(self.trainable_params, args.max_grad_norm)
            if self._all_processes_finite(step_losses[0]):
                self.optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16: the grad scaler skips overflowing steps
                    self.ema.update(self.unwrapped_model)
                self._add_metrics(step_losses, grad_norm)
                self.nonfinite_streak = 0
            else:
                self._skip_nonfinite_step(step)
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step = step + 1
            progress.update()

            if self.global_step % args.logging_steps == 0:
                progress.set_postfix(self.log_metrics())
            if self.global_step % args.checkpointing_steps == 0:
                self.save_checkpoint()
            if self.global_step % args.validation_steps == 0:
                self.log_validation()
        progress.close()
        export_dir = self.save_export()
        accelerator.end_training()
        return export_dir

    def compute_loss(self, batch: dict[str, torch.Tensor], align: bool = True) -> REPALossOutput:
        """The REPA objective on one micro-batch from the loader (`image`, `latent_mean`, `latent_std`, `label`)."""
        latents = self.sample_latents(batch["latent_mean"], batch["latent_std"])
        targets = self.encode_targets(batch["image"]) if align else []
        return repa_loss(
            self.model,
            latents,
            batch["label"],
            targets,
            proj_coeff=self.args.proj_coeff,
            path_type=self.args.path_type,
            time_sampling=self.args.time_sampling,
            generator=self.generator,
        )

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """A fresh draw from the cached VAE posterior, normalised: z = (mean + std·ε − shift)·scale, (N, C, h, w)."""
        noise = torch.randn(mean.shape, generator=self.generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise - self.latent_shift) * self.latent_scale

    def encode_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features (N, T, D_k) of uint8 crops (N, 3, R, R), one per encoder; frozen, no grad, autocast."""
        with self.accelerator.autocast():
            targets = [encoder(images) for encoder in self.encoders]
        if self.args.interpolate_targets:
            targets = [interpolate_tokens(features, self.unwrapped_model.num_tokens) for features in targets]
        return targets

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

    # ------------------------------------------------------------------------------------------- non-finite guard

    def _all_processes_finite(self, loss: torch.Tensor) -> bool:
        """Whether the step's loss is finite on every process.

        This is the one device→host sync of a step. It comes after backward and clipping have been queued, so the
        device still has work while the host waits. Every process takes the same decision, which keeps DDP replicas
        identical (a NaN on one process reached all gradients through the all-reduce anyway).
        """
        nonfinite = (~torch.isfinite(loss)).float()
        return self.accelerator.reduce(nonfinite, reduction="sum").item() == 0

    def _skip_nonfinite_step(self, step: int) -> None:
        """Leave weights, optimizer state and EMA untouched; stop after `--max_nonfinite_steps` such steps in a row."""
        self.nonfinite_streak += 1
        self.num_nonfinite_steps += 1
        logger.warning(
            f"Step {step + 1}: the loss is NaN or infinite; the update is skipped ({self.nonfinite_streak} in a row).",
            main_process_only=True,
        )
        if self.accelerator.scaler is not None:
            # clip_grad_norm_ unscaled the fp16 gradients; update() closes that step and lowers the loss scale.
            self.accelerator.scaler.update()
        if self.nonfinite_streak >= self.args.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"The loss was NaN or infinite for {self.nonfinite_streak} optimizer steps in a row (steps "
                f"{step + 2 - self.nonfinite_streak}–{step + 1}); stopping. The weights are those of step "
                f"{step + 1 - self.nonfinite_streak}. Try a lower --learning_rate, --mixed_precision bf16 or no, or "
                f"check the data; resume from the last checkpoint with --resume_from_checkpoint latest."
            )

    # ----------------------------------------------------------------------------------------------------- logging

    def _reset_metrics(self) -> None:
        self._metric_sums = torch.zeros(4, device=self.accelerator.device)  # loss, denoising, projection, grad norm
        self._metric_steps = 0
        self._window_start = (time.perf_counter(), self.global_step)

    def _add_metrics(self, step_losses: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self._metric_sums += torch.cat([step_losses, grad_norm.detach().float().reshape(1)])
        self._metric_steps += 1

    def log_metrics(self) -> dict[str, float]:
        """Average the values gathered since the last call over steps and processes, and log them (all processes
        must call it: it reduces across them). The only read of these values from the device."""
        seconds, first_step = time.perf_counter() - self._window_start[0], self._window_start[1]
        means = self.accelerator.reduce(self._metric_sums, reduction="mean") / max(self._metric_steps, 1)
        loss, denoising, projection, grad_norm = means.tolist()
        logs = {"loss": loss, "denoising_loss": denoising, "projection_loss": projection, "grad_norm": grad_norm}
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

    def sample_grid(self, pipeline: SiTPipeline | None = None) -> PIL.Image.Image:
        """Images of the EMA weights for the fixed validation labels and noise, as one grid."""
        args = self.args
        pipeline = pipeline or self.make_pipeline(
            SiTODEScheduler() if args.validation_sampler == "ode" else SiTSDEScheduler(path_type=args.path_type)
        )
        pipeline.set_progress_bar_config(disable=True)
        with self.accelerator.autocast():
            images = pipeline(
                class_labels=self.validation_labels,
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                latents=self.validation_noise,
                generator=torch.Generator(self.accelerator.device).manual_seed(args.seed),
            ).images
        rows = max(d for d in range(1, math.isqrt(len(images)) + 1) if len(images) % d == 0)
        return make_image_grid(images, rows=rows, cols=len(images) // rows)

    def log_validation(self) -> Path | None:
        """Sample the validation grid from the EMA weights, save it as samples/step-<step>.png and log it
        (main process only; returns the PNG path there)."""
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
        if self.accelerator.is_main_process:
            save_file(self.ema.state_dict(), folder / EMA_WEIGHTS_NAME)
            (folder / TRAINER_STATE_NAME).write_text(json.dumps(self._run_layout(), indent=2))
        generator_state = {"state": self.generator.get_state()}
        save_file(generator_state, folder / f"generator_{self.accelerator.process_index}.safetensors")

    def _run_layout(self) -> dict[str, int]:
        """What a resumed run must share with the saved one to continue at the same data position."""
        return {
            "global_step": self.global_step,
            "num_processes": self.accelerator.num_processes,
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
        }

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore model, optimizer, grad scaler, RNG states, EMA, noise generator and step from a checkpoint."""
        folder = Path(folder)
        saved = json.loads((folder / TRAINER_STATE_NAME).read_text())
        current = self._run_layout()
        mismatched = {
            key: (saved[key], current[key]) for key in current if key != "global_step" and saved[key] != current[key]
        }
        if mismatched:
            raise ValueError(
                f"{folder} was saved by a run with another layout (saved, now): {mismatched}. Resume with the same "
                "number of processes, per-device batch and accumulation steps, so the data position carries over."
            )
        self.accelerator.load_state(str(folder))
        self.ema.load_state_dict(load_file(folder / EMA_WEIGHTS_NAME))
        self.generator.set_state(
            load_file(folder / f"generator_{self.accelerator.process_index}.safetensors")["state"]
        )
        self.global_step = saved["global_step"]
        self._reset_metrics()
        logger.info(f"Resumed from {folder} at step {self.global_step}.", main_process_only=True)

    # ------------------------------------------------------------------------------------------------------ export

    def make_pipeline(self, scheduler: SiTODEScheduler | SiTSDEScheduler) -> SiTPipeline:
        """A `SiTPipeline` around the EMA transformer, the VAE and the dataset's class names."""
        return SiTPipeline(
            transformer=self.ema.model, vae=self.vae, scheduler=scheduler, id2label=self.cache_info.id2label
        )

    @property
    def export_dir(self) -> Path:
        """`output_dir/pipeline` (a full SiTPipeline) or, with LoRA, `output_dir/lora` (the adapter only)."""
        return self.output_dir / ("lora" if self.args.use_lora else "pipeline")

    def save_export(self, metrics: dict[str, float] | None = None) -> Path:
        """Write the EMA weights for inference, a sample grid and a model card to `export_dir` (atomically), and
        upload them with `--push_to_hub`.

        Full training writes a `SiTPipeline` (EMA transformer, VAE, SDE scheduler, id2label) loadable with
        `SiTPipeline.from_pretrained`. LoRA writes only the adapter weights (`pytorch_lora_weights.safetensors`) for
        `pipe.load_lora_weights` on the base pipeline. The projectors are a training-only head and are not exported
        (they are in the checkpoints).
        """
        args, export_dir = self.args, self.export_dir
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            staging = export_dir.with_name(export_dir.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            pipeline = self.make_pipeline(SiTSDEScheduler(path_type=args.path_type))
            if args.use_lora:
                self.ema.model.save_lora_adapter(staging, weight_name=LORA_WEIGHT_NAME)
            else:
                pipeline.save_pretrained(staging)
            self.sample_grid(pipeline).save(staging / SAMPLE_GRID_NAME)
            grid_info = SampleGridInfo(
                SAMPLE_GRID_NAME, self.validation_labels, "sde", args.validation_inference_steps,
                args.validation_guidance_scale,
            )  # fmt: skip
            repo_id = args.hub_model_id or self.output_dir.resolve().name
            card = render_model_card(args, repo_id, self.global_step, grid_info, metrics, self.smoke_notice)
            card.save(staging / "README.md")
            shutil.rmtree(export_dir, ignore_errors=True)
            staging.replace(export_dir)
            logger.info(f"Saved the final EMA weights to {export_dir}.")
            if args.push_to_hub:
                url = push_export_to_hub(export_dir, repo_id, private=args.hub_private_repo)
                logger.info(f"Uploaded {export_dir} to {url}.")
        self.accelerator.wait_for_everyone()
        return export_dir

    # ----------------------------------------------------------------------------------------------- construction

    def _use_quickstart_assets(self, args: REPATrainingArguments) -> tuple[REPATrainingArguments, datasets.Dataset]:
        """Swap dataset, VAE and encoder for the locally built smoke-test ones (see `quickstart.py`)."""
        assets_dir = Path(args.output_dir) / "quickstart_assets"
        with self.accelerator.main_process_first():
            assets = build_quickstart_assets(assets_dir, args.resolution, seed=args.seed)
        self.smoke_notice = QUICKSTART_NOTICE
        logger.warning(QUICKSTART_NOTICE, main_process_only=True)
        if self.accelerator.device.type == "cpu":
            # Its ops are tiny: a second CPU thread buys nothing and stalls (10× slower) when the cores are busy.
            torch.set_num_threads(1)
        args = dataclasses.replace(
            args,
            dataset="synthetic-shapes",
            vae=str(assets.vae),
            encoder=str(assets.encoder),
            cache_dir=args.cache_dir or str(assets_dir / "latent_cache"),
        )
        return args, assets.dataset

    def _latent_cache_loader(self, image_source: datasets.Dataset | None) -> torch.utils.data.DataLoader:
        """Fail fast if a source cannot be read, build the latent cache once (every process shares the work; later
        runs reuse it), and return its loader (sample order fixed by the seed and the epoch)."""
        args = self.args
        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args)
        have_cache = (cache_dir / CACHE_INFO_FILE).is_file()
        check_sources_reachable(args, need_dataset=not have_cache and image_source is None)
        if not have_cache:
            logger.info(f"Building the latent cache in {cache_dir} (once).", main_process_only=True)
            build_latent_cache(
                args.dataset if image_source is None else image_source,
                cache_dir,
                args.vae,
                args.resolution,
                split=args.dataset_split,
                image_column=args.image_column,
                label_column=args.label_column,
                max_samples=args.max_train_samples,
            )
        self.cache_info = info = read_cache_info(cache_dir)
        vae_config = AutoencoderKL.load_config(args.vae)
        latent_size = args.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
        cached = (info.resolution, info.latent_channels, info.latent_size, info.scaling_factor)
        if cached != (args.resolution, vae_config["latent_channels"], latent_size, vae_config["scaling_factor"]):
            raise ValueError(
                f"The latent cache {cache_dir} holds {info.resolution}-px images as {info.latent_channels}×"
                f"{info.latent_size}² latents (VAE {info.vae!r}, scaling {info.scaling_factor}), which --resolution "
                f"{args.resolution} with --vae {args.vae!r} does not give; pass matching flags or another --cache_dir."
            )
        same_local_folder = Path(args.vae).exists() and Path(info.vae).resolve() == Path(args.vae).resolve()
        if info.vae != args.vae and not same_local_folder:  # e.g. the same local VAE folder, moved
            logger.warning(f"The latent cache was encoded with VAE {info.vae!r}; this run decodes with {args.vae!r}.")
        return make_train_dataloader(
            load_latent_cache(cache_dir),
            self.per_device_batch_size,
            shuffle=True,
            seed=args.seed,
            num_workers=args.dataloader_num_workers,
            hflip=args.hflip,
            drop_last=True,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def _latent_normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) of z = (x − shift)·scale, exactly as SiTPipeline inverts it."""
        info = self.cache_info
        shift, scale = latent_shift_and_scale(
            info.scaling_factor, info.shift_factor, info.latents_mean, info.latents_std
        )
        return shift.to(self.accelerator.device), scale.to(self.accelerator.device)

    def _start_run_records(self) -> None:
        """Write training_args.json, start the trackers, and log what is being trained on what."""
        args, accelerator, info = self.args, self.accelerator, self.cache_info
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "training_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
            flat = {name: v if isinstance(v, (int, float, str, bool)) else str(v) for name, v in vars(args).items()}
            accelerator.init_trackers(args.tracker_project_name, config=flat)
        total = sum(param.numel() for param in self.unwrapped_model.parameters())
        trained = sum(param.numel() for param in self.trainable_params)
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

    def _build_model(self, projection_dims: tuple[int, ...]) -> SiTTransformer2DModel:
        """A new SiT of the preset size, or the `--pretrained_model` transformer (with LoRA adapters if asked)."""
        args, info = self.args, self.cache_info
        if args.pretrained_model is None:
            sizes = {
                "depth": args.depth,
                "hidden_size": args.hidden_size,
                "num_attention_heads": args.num_attention_heads,
            }
            sizes["encoder_depth"] = args.encoder_depth
            return SiTTransformer2DModel.from_preset(
                args.model,
                sample_size=info.latent_size,
                in_channels=info.latent_channels,
                num_classes=info.num_classes,
                class_dropout_prob=args.cfg_prob,
                projector_dim=args.projector_dim,
                projection_dims=projection_dims,
                qk_norm=args.qk_norm,
                **{name: value for name, value in sizes.items() if value is not None},
            )

        config = SiTTransformer2DModel.load_config(args.pretrained_model, subfolder="transformer")
        if (config["sample_size"], config["in_channels"]) != (info.latent_size, info.latent_channels):
            raise ValueError(
                f"{args.pretrained_model} works on {config['in_channels']}×{config['sample_size']}² latents, the cache "
                f"holds {info.latent_channels}×{info.latent_size}²: use the same VAE and resolution as its training."
            )
        if info.num_classes > config["num_classes"]:
            raise ValueError(
                f"The dataset has {info.num_classes} classes but {args.pretrained_model} only {config['num_classes']}; "
                "fine-tuning reuses the model's class embeddings, so the dataset's labels must fit in them."
            )
        if args.cfg_prob > 0 and config["class_dropout_prob"] == 0:
            raise ValueError(f"{args.pretrained_model} has no null class for label dropout; pass --cfg_prob 0.")
        model = SiTTransformer2DModel.from_pretrained(args.pretrained_model, subfolder="transformer")
        if tuple(model.config.projection_dims) != projection_dims:
            # No projectors, or other widths than the encoders': new ones (initialised as in a new model), trained.
            pretrained = {
                name: value for name, value in model.state_dict().items() if not name.startswith("projectors.")
            }
            model = SiTTransformer2DModel.from_config(model.config, projection_dims=projection_dims)
            model.load_state_dict(pretrained, strict=False)
        model.class_embed.dropout_prob = args.cfg_prob
        if args.use_lora:
            model.requires_grad_(False)
            model.add_adapter(
                LoraConfig(
                    r=args.lora_rank,
                    lora_alpha=args.lora_alpha or args.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=LORA_TARGET_MODULES,
                )
            )
            model.projectors.requires_grad_(True)
        return model
