"""Training-step throughput of SiT + REPA with the alignment encoder in the loop: images/s, peak memory, MFU.

One step = the trainer's own `TrainingStep` (imported, not copied) on a batch in the latent cache's layout: sample
latents from the cached posterior, encode the uint8 crops with the frozen encoder (no grad), REPA loss (velocity MSE
+ λ·alignment), backward, clip the global grad norm to 1, the non-finite check, AdamW, EMA update. Inputs are random
tensors of the real shapes; the data loader is not timed.

MFU (model FLOP utilisation) = model FLOPs per image × images/s ÷ the device's dense peak. Model FLOPs per image are
counted analytically: SiT forward = 2·(per-token matmul weights)·T + 2·(per-sample matmul weights) + 4·T²·D per
block (QKᵀ and AV), counted ×3 for forward + backward; plus one forward of the encoder (same formula on its own
config, no backward). Recomputation under gradient checkpointing is not counted (MFU, not hardware FLOP
utilisation). Peak rates: `benchmarks.common.PEAK_DENSE_TFLOPS` (H100 SXM / H200 bf16 dense: 989 TFLOP/s).

Run from the repository root:

    python -m benchmarks.train_throughput --preset SiT-XL/2 --batch_size 32 --precision bf16 --compile
    python -m benchmarks.train_throughput --preset SiT-B/2 --batch_size 8 --ablate --output outputs/bench

`--ablate` measures a ladder of optimisations, each added on top of the previous ones, in one process and back to
back (the repeats of every rung are interleaved), and reports each as a speed-up over the fp32 eager baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import (
    PRECISIONS,
    add_model_arguments,
    add_run_arguments,
    check_finite_positive,
    environment,
    markdown_table,
    median,
    model_label,
    model_overrides,
    peak_memory,
    peak_tflops,
    reset_peak_memory,
    setup_run,
    synchronize,
    time_blocks,
    write_report,
)
from diffusers_repa.encoders import (
    ENCODER_ALIASES,
    FrozenVisionEncoder,
    check_token_grid,
    load_encoder,
    save_tiny_random_encoder,
)
from diffusers_repa.models.transformer_sit import SiTTransformer2DModel
from diffusers_repa.training.ema import create_ema
from diffusers_repa.training.objectives import REPAFlowObjective
from diffusers_repa.training.step import TrainingStep

logger = logging.getLogger(__name__)

VAE_DOWNSAMPLING = 8  # SD-VAE: 256 px → 32×32 latents
LATENT_CHANNELS = 4
SD_VAE_SCALING_FACTOR = 0.18215

SDPA_CHOICES = ("default", "math", "flash", "cudnn")
# Fused kernels, flash first; the memory-efficient kernel takes shapes flash does not (e.g. fp32 on CUDA).
_FUSED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
# Layer / head counts of the DINOv2 ViTs by width, for a same-shape random stand-in when the real one is not cached.
_DINOV2_SHAPES = {384: (12, 6), 768: (12, 12), 1024: (24, 16)}
_FAMILIES_WITHOUT_CLS = ("siglip", "jepa")


# --------------------------------------------------------------------------------------------------------------------
# FLOPs


def sit_forward_flops(config: Any, with_projections: bool = True) -> int:
    """Analytic FLOPs of one SiT forward on one image (multiply-add = 2 FLOPs; norms and activations ignored).

    Per token: patch embedding (C·p²·D), per block qkv + out (4D²) and MLP (2·r·D²), the output linear (D·p²·C), and
    the projector MLPs when `with_projections`. Per image: the adaLN linears (6D² per block, 2D² at the end) and the
    timestep MLP. Attention: 4·T²·D per block.
    """
    hidden, tokens = config.hidden_size, (config.sample_size // config.patch_size) ** 2
    patch_pixels = config.patch_size**2 * config.in_channels
    mlp = int(hidden * config.mlp_ratio)
    per_token = patch_pixels * hidden + config.depth * (4 * hidden * hidden + 2 * hidden * mlp) + hidden * patch_pixels
    if with_projections:
        width = config.projector_dim
        per_token += sum(hidden * width + width * width + width * dim for dim in config.projection_dims)
    timestep_mlp = 256 * hidden + hidden * hidden
    per_image = config.depth * 6 * hidden * hidden + 2 * hidden * hidden + timestep_mlp
    attention = config.depth * 4 * tokens * tokens * hidden
    return 2 * per_token * tokens + 2 * per_image + attention


def encoder_forward_flops(encoder: FrozenVisionEncoder) -> int:
    """Analytic FLOPs of one encoder forward on one image: 2·(linear weights)·S + 2·(patch conv)·T + 4·S²·D·L.

    S is the sequence length (patch tokens T plus CLS and register tokens); every linear layer of these ViTs acts
    on every token.
    """
    config = encoder.model.config
    prefix = 0 if encoder.family in _FAMILIES_WITHOUT_CLS else 1 + getattr(config, "num_register_tokens", 0)
    sequence = encoder.num_tokens + prefix
    linear = sum(m.weight.numel() for m in encoder.model.modules() if isinstance(m, nn.Linear))
    patch_conv = sum(m.weight.numel() for m in encoder.model.modules() if isinstance(m, nn.Conv2d))
    attention = 4 * sequence * sequence * config.hidden_size * config.num_hidden_layers
    return 2 * linear * sequence + 2 * patch_conv * encoder.num_tokens + attention


# --------------------------------------------------------------------------------------------------------------------
# Step configuration


@dataclass(frozen=True)
class StepOptions:
    """What one measured training step uses.

    Attributes:
        precision: autocast dtype of the SiT forward and loss (`fp32` = no autocast).
        sdpa: attention kernels: `default` (torch's choice), `math` (reference kernel), `flash` (flash, else
            memory-efficient), `cudnn` (cuDNN attention, CUDA only).
        compile: regional `torch.compile` of the transformer blocks (`compile_repeated_blocks`).
        fused_adamw: `AdamW(fused=True)` instead of torch's default implementation.
        foreach_ema: diffusers' `EMAModel` with `foreach=True` (one kernel for all tensors) instead of its loop.
        encoder_precision: dtype of the encoder's weights (under `precision` autocast either way).
        compile_encoder: `torch.compile` of the encoder (as the trainer's `--compile`).
        gradient_checkpointing: recompute each block in the backward pass.
    """

    precision: str = "bf16"
    sdpa: str = "default"
    compile: bool = False
    fused_adamw: bool = False
    foreach_ema: bool = True
    encoder_precision: str = "fp32"
    compile_encoder: bool = False
    gradient_checkpointing: bool = False


# The --ablate ladder: each rung adds one optimisation to the previous rung.
ABLATION_LADDER: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "baseline",
        "fp32 eager, math SDPA, default AdamW, per-tensor EMA loop",
        {"precision": "fp32", "sdpa": "math", "foreach_ema": False},
    ),
    ("bf16", "+ bf16 autocast", {"precision": "bf16"}),
    ("sdpa_flash", "+ fused SDPA kernels (flash) instead of math", {"sdpa": "flash"}),
    ("compile", "+ regional torch.compile of the blocks", {"compile": True}),
    ("fused_adamw", "+ AdamW(fused=True)", {"fused_adamw": True}),
    ("foreach_ema", "+ foreach EMA (one kernel for all tensors)", {"foreach_ema": True}),
    ("encoder_bf16", "+ encoder weights in bf16", {"encoder_precision": "bf16"}),
    ("encoder_compile", "+ torch.compile of the encoder", {"compile_encoder": True}),
)
# Rungs that compile: inductor builds C++ kernels on a CPU, minutes on a few cores, so a CPU ladder skips them unless
# asked to.
COMPILE_RUNGS = ("compile", "encoder_compile")


def ablation_steps(skip: tuple[str, ...] = ()) -> list[tuple[str, str, StepOptions]]:
    """The rungs of `ABLATION_LADDER` as cumulative `StepOptions`, leaving out the changes named in `skip`."""
    unknown = sorted(set(skip) - {name for name, _, _ in ABLATION_LADDER[1:]})
    if unknown:
        names = ", ".join(name for name, _, _ in ABLATION_LADDER[1:])
        raise ValueError(f"Unknown ablation step(s) to skip: {unknown}; choose from {names}.")
    options = StepOptions()
    rungs = []
    for name, description, change in ABLATION_LADDER:
        if name in skip:
            continue
        options = replace(options, **change)
        rungs.append((name, description, options))
    return rungs


def _sdpa_context(choice: str) -> contextlib.AbstractContextManager:
    if choice == "math":
        return sdpa_kernel(SDPBackend.MATH)
    if choice == "flash":
        return sdpa_kernel(_FUSED_SDPA_BACKENDS, set_priority=True)
    if choice == "cudnn":
        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    return contextlib.nullcontext()


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


# --------------------------------------------------------------------------------------------------------------------
# The measured setup


def load_benchmark_encoder(name: str, resolution: int, device: torch.device) -> tuple[FrozenVisionEncoder, str]:
    """`load_encoder(name)`; if that checkpoint is not available (offline, not cached) and `name` is a DINOv2 alias,
    a randomly initialised encoder of the same shape, loaded through the same wrapper. Returns it and a label."""
    try:
        return load_encoder(name, resolution, device=device), name
    except (OSError, ValueError) as error:
        spec = ENCODER_ALIASES.get(name.lower())
        if spec is None or spec.family != "dinov2" or spec.embed_dim not in _DINOV2_SHAPES:
            raise
        layers, heads = _DINOV2_SHAPES[spec.embed_dim]
        logger.warning("%s is not available (%s); using a random encoder of the same shape.", spec.hub_id, error)
        with tempfile.TemporaryDirectory() as folder:
            path = save_tiny_random_encoder(
                "dinov2", f"{folder}/encoder", hidden_size=spec.embed_dim, num_hidden_layers=layers,
                num_attention_heads=heads,
            )  # fmt: skip
            encoder = load_encoder(path, resolution, device=device)
        return encoder, f"random {name} (same shape as {spec.hub_id})"


class TrainingStepBenchmark:
    """A SiT model, its alignment encoder, optimiser, EMA and one batch, ready to time the trainer's training step.

    Every timed step is `diffusers_repa.training.TrainingStep` — the trainer's own step, not a copy — with the
    trainer's objective (`REPAFlowObjective`: a fresh posterior sample, the encoder's targets, velocity MSE +
    λ·alignment), clipping, non-finite guard, AdamW and EMA; only the components differ between options. The batch
    is one micro-batch as the trainer's loader yields it (`latent_mean`, `latent_std`: the cached VAE posterior
    (N, 4, h, w); `image`: uint8 crops (N, 3, R, R); `label`: (N,)); `with_random_inputs` makes one of the real
    shapes. The hyper-parameters are the trainer's defaults (lr 1e-4, no weight decay, clip 1, EMA 0.9999, λ 0.5).

    Optional pieces (fused optimiser, bf16 / compiled encoder copies, compiled blocks) are created on first use so that
    one instance can time several `StepOptions` back to back on the same weights.
    """

    def __init__(
        self,
        model: SiTTransformer2DModel,
        encoder: FrozenVisionEncoder,
        batch: dict[str, torch.Tensor],
        device: torch.device,
        seed: int = 0,
        mixed_precision: str = "no",
    ):
        self.device, self.batch_size = device, len(batch["label"])
        # The accelerator brings the trainer's backward (fp16 loss scaling on CUDA), clipping and reductions; its
        # state is process-wide, so one process benchmarks one `mixed_precision` (fp16 needs its grad scaler).
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
        self.model = model.to(device).train()
        check_token_grid(encoder, self.model.num_tokens)
        self.batch = {name: value.to(device) for name, value in batch.items()}
        self.encoders: dict[tuple[str, bool], Callable[[torch.Tensor], torch.Tensor]] = {("fp32", False): encoder}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizers: dict[bool, torch.optim.Optimizer] = {}
        self.ema = create_ema(self.params, decay=0.9999)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.compiled = False

    @classmethod
    def with_random_inputs(
        cls,
        preset: str,
        batch_size: int,
        resolution: int,
        device: torch.device,
        encoder: FrozenVisionEncoder,
        size_overrides: dict[str, int] | None = None,
        seed: int = 0,
        mixed_precision: str = "no",
    ) -> TrainingStepBenchmark:
        """A new `preset` model (seeded) and a random batch of the real shapes at `resolution` px."""
        if batch_size < 1:
            raise ValueError(f"--batch_size must be positive, got {batch_size}.")
        if resolution % (VAE_DOWNSAMPLING * 2) != 0:
            raise ValueError(f"--resolution must be a multiple of 16 (8x VAE, even latent side), got {resolution}.")
        torch.manual_seed(seed)
        latent_side = resolution // VAE_DOWNSAMPLING
        with device:  # initialise on the GPU directly: XL takes half a minute to initialise on a few CPU cores
            model = SiTTransformer2DModel.from_preset(
                preset, sample_size=latent_side, projection_dims=(encoder.embed_dim,), **(size_overrides or {})
            )
            shape = (batch_size, LATENT_CHANNELS, latent_side, latent_side)
            batch = {
                "latent_mean": torch.randn(shape),
                "latent_std": torch.rand(shape) * 0.1,
                "image": torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8),
                "label": torch.randint(0, model.config.num_classes, (batch_size,)),
            }
        return cls(model, encoder, batch, device, seed, mixed_precision)

    def encoder(self, precision: str, compiled: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        key = (precision, compiled)
        if key not in self.encoders:
            if compiled:  # a compiled wrapper, which leaves the eager copy as it is for the other rungs
                self.encoders[key] = torch.compile(self.encoder(precision), dynamic=False)
            else:
                self.encoders[key] = copy.deepcopy(self.encoders[("fp32", False)]).to(PRECISIONS[precision])
        return self.encoders[key]

    def optimizer(self, fused: bool) -> torch.optim.Optimizer:
        if fused not in self.optimizers:
            # REPA's settings: constant lr 1e-4, no weight decay. `fused=None` is torch's default choice (foreach
            # on CUDA, the per-tensor loop on the CPU). Prepared, so that the step's clipping unscales fp16 gradients.
            optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0, fused=fused or None)
            self.optimizers[fused] = self.accelerator.prepare_optimizer(optimizer)
        return self.optimizers[fused]

    def step_function(self, options: StepOptions) -> Callable[[], None]:
        """A closure running one full training step with `options` (it syncs with the device once, as the trainer)."""
        if options.precision not in PRECISIONS or options.encoder_precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {options}.")
        if (options.precision == "fp16") != (self.accelerator.mixed_precision == "fp16"):
            raise ValueError("fp16 steps need a benchmark built with mixed_precision='fp16' (and only they do).")
        if options.sdpa not in SDPA_CHOICES:
            raise ValueError(f"sdpa must be one of {SDPA_CHOICES}, got {options.sdpa!r}.")
        if options.compile and not self.compiled:
            # In place and for good: measure every eager variant before the first compiled one.
            self.model.compile_repeated_blocks(fullgraph=True)
            self.compiled = True
        if self.compiled and not options.compile:
            raise ValueError("The blocks are already compiled; time eager variants before compiled ones.")
        if options.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()
        autocast = functools.partial(_autocast, self.device, options.precision)
        objective = REPAFlowObjective(
            [self.encoder(options.encoder_precision, options.compile_encoder)],
            latent_scale=SD_VAE_SCALING_FACTOR,
            autocast=autocast,
        )
        training_step = TrainingStep(
            self.accelerator,
            self.model,
            objective,
            self.optimizer(options.fused_adamw),
            self.ema,
            self.generator,
            autocast=autocast,
        )
        micro_batches = itertools.repeat(self.batch)

        def step() -> None:
            self.ema.foreach = options.foreach_ema  # diffusers' EMAModel: one foreach kernel, or a per-tensor loop
            with _sdpa_context(options.sdpa):
                training_step(micro_batches, step=0)

        return step


# --------------------------------------------------------------------------------------------------------------------
# Measurements


def _throughput_record(
    bench: TrainingStepBenchmark, seconds: list[float], flops_per_image: int, precision: str
) -> dict[str, Any]:
    step_time = median(seconds)
    images_per_s = bench.batch_size / step_time
    peak, basis = peak_tflops(bench.device, precision)
    achieved = flops_per_image * images_per_s / 1e12
    return {
        "step_time_s": step_time,
        "step_time_s_all": seconds,
        "images_per_s": images_per_s,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_basis": basis,
        "mfu": achieved / peak if peak else None,
    }


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure what `args` asks for and return the JSON-able result (also written to `args.output`)."""
    device = setup_run(args)
    encoder, encoder_label = load_benchmark_encoder(args.encoder, args.resolution, device)
    overrides = model_overrides(args)
    bench = TrainingStepBenchmark.with_random_inputs(
        args.preset, args.batch_size, args.resolution, device, encoder, overrides, args.seed,
        mixed_precision="fp16" if args.precision == "fp16" and not args.ablate else "no",
    )  # fmt: skip
    sit_flops = sit_forward_flops(bench.model.config, with_projections=True)
    flops_per_image = 3 * sit_flops + encoder_forward_flops(encoder)
    timing = {"warmup": args.warmup, "iterations": args.iterations, "repeats": args.repeats}
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        **environment(device),
        "preset": args.preset,
        "model": model_label(args.preset, overrides),
        "model_overrides": overrides,
        "parameters": sum(p.numel() for p in bench.params),
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "encoder": encoder_label,
        "allow_tf32": args.tf32,
        "sit_forward_gflops_per_image": sit_flops / 1e9,
        "train_gflops_per_image": flops_per_image / 1e9,
        **timing,
    }
    with _tf32(args.tf32):
        if args.ablate:
            result["ablation"] = _ablate(bench, args, flops_per_image)
            markdown = _ablation_markdown(result)
        else:
            options = StepOptions(
                precision=args.precision,
                sdpa=args.sdpa,
                compile=args.compile,
                fused_adamw=args.fused_adamw,
                foreach_ema=args.foreach_ema,
                encoder_precision=args.encoder_precision,
                compile_encoder=args.compile,
                gradient_checkpointing=args.gradient_checkpointing,
            )
            step = bench.step_function(options)
            start = time.perf_counter()
            step()  # compile / autotune / optimiser-state allocation outside the peak-memory window
            synchronize(device)
            result["first_step_s"] = time.perf_counter() - start
            reset_peak_memory(device)
            seconds = time_blocks(step, device, **timing)
            memory, memory_kind = peak_memory(device)
            result.update(asdict(options))
            result.update(_throughput_record(bench, seconds, flops_per_image, args.precision))
            result.update({"peak_memory_gib": memory / 2**30, "memory_kind": memory_kind})
            check_finite_positive(result, ("step_time_s", "images_per_s", "peak_memory_gib", "achieved_tflops"))
            markdown = _markdown_row(result)
    write_report(result, markdown, args.output, "train_ablation" if args.ablate else "train_throughput")
    return result


def _ablate(bench: TrainingStepBenchmark, args: argparse.Namespace, flops_per_image: int) -> list[dict[str, Any]]:
    """Time every rung; eager rungs first, then compiled ones, each group with its repeats interleaved."""
    skip = tuple(args.ablate_skip)
    if bench.device.type == "cpu" and not args.ablate_compile_on_cpu:
        skip += tuple(name for name in COMPILE_RUNGS if name not in skip)
    rungs = ablation_steps(skip)
    groups = [[r for r in rungs if not r[2].compile], [r for r in rungs if r[2].compile]]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in rungs}
    warmup_seconds: dict[str, float] = {}
    for group in groups:
        steps = {}
        for name, _, options in group:
            steps[name] = bench.step_function(options)
            start = time.perf_counter()
            time_blocks(steps[name], bench.device, warmup=args.warmup, iterations=1, repeats=1)  # compile, state
            warmup_seconds[name] = time.perf_counter() - start
            logger.info("%s: warm-up (compilation included) took %.1f s", name, warmup_seconds[name])
        for repeat in range(args.repeats):
            for name, _, _ in group:
                seconds[name] += time_blocks(
                    steps[name], bench.device, warmup=1, iterations=args.iterations, repeats=1
                )  # one warm-up step: the previous rung may have used another optimiser / encoder copy
                logger.info("repeat %d/%d, %s: %.4g s/step", repeat + 1, args.repeats, name, seconds[name][-1])
    records, baseline, previous = [], None, None
    for name, description, options in rungs:
        record = {"step": name, "description": description, **asdict(options), "warmup_s": warmup_seconds[name]}
        record.update(_throughput_record(bench, seconds[name], flops_per_image, options.precision))
        baseline = baseline or record["step_time_s"]
        record["speedup_vs_baseline"] = baseline / record["step_time_s"]
        record["speedup_vs_previous"] = (previous or record["step_time_s"]) / record["step_time_s"]
        previous = record["step_time_s"]
        check_finite_positive(record, ("step_time_s", "images_per_s", "speedup_vs_baseline"))
        records.append(record)
    skipped = [{"step": name, "skipped": True} for name, _, _ in ABLATION_LADDER if name in skip]
    return records + skipped


_ROW_COLUMNS = (
    ("device", "device"),
    ("model", "model"),
    ("batch_size", "batch"),
    ("precision", "precision"),
    ("compile", "compile"),
    ("compile_encoder", "compiled encoder"),
    ("gradient_checkpointing", "grad ckpt"),
    ("fused_adamw", "fused AdamW"),
    ("foreach_ema", "foreach EMA"),
    ("encoder_precision", "encoder"),
    ("step_time_s", "step (s)"),
    ("images_per_s", "images/s"),
    ("peak_memory_gib", "peak mem (GiB)"),
    ("mfu", "MFU"),
)


def _markdown_row(result: dict[str, Any]) -> str:
    return markdown_table([result], _ROW_COLUMNS)


def _ablation_markdown(result: dict[str, Any]) -> str:
    columns = (
        ("step", "step"),
        ("description", "what changes"),
        ("step_time_s", "step (s)"),
        ("images_per_s", "images/s"),
        ("speedup_vs_baseline", "× baseline"),
        ("speedup_vs_previous", "× previous"),
        ("mfu", "MFU"),
    )
    measured = [r for r in result["ablation"] if not r.get("skipped")]
    header = (
        f"{result['model']} batch {result['batch_size']} on {result['device']} "
        f"(encoder {result['encoder']}, median of {result['repeats']}×{result['iterations']} steps)"
    )
    skipped = [r["step"] for r in result["ablation"] if r.get("skipped")]
    footer = f"\nSkipped: {', '.join(skipped)}." if skipped else ""
    return f"{header}\n\n{markdown_table(measured, columns)}{footer}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=32, help="Images per step (per device).")
    parser.add_argument(
        "--encoder",
        default="dinov2-vit-b",
        help="Alignment encoder (name, Hub id or folder); a DINOv2 alias that is not cached falls back to a random "
        "encoder of the same shape.",
    )
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16", help="Autocast dtype of SiT.")
    parser.add_argument("--sdpa", choices=SDPA_CHOICES, default="default", help="Attention kernels.")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Regional torch.compile of the blocks, and the encoder (as the trainer).",
    )
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute blocks in backward.")
    parser.add_argument("--fused_adamw", action="store_true", help="AdamW(fused=True).")
    parser.add_argument(
        "--foreach_ema", action=argparse.BooleanOptionalAction, default=True, help="foreach EMA (vs a loop)."
    )
    parser.add_argument("--encoder_precision", choices=sorted(PRECISIONS), default="fp32", help="Encoder weights.")
    parser.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 fp32 matmuls (as REPA's trainer)."
    )
    parser.add_argument("--ablate", action="store_true", help="Measure the optimisation ladder instead.")
    parser.add_argument(
        "--ablate_skip", nargs="*", default=[], help="Ladder steps to leave out (e.g. compile encoder_bf16)."
    )
    parser.add_argument(
        "--ablate_compile_on_cpu", action="store_true", help="Include the compile steps on a CPU (slow to compile)."
    )
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--iterations", type=int, default=5, help="Steps per timed block.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed blocks (the median is reported).")
    add_run_arguments(parser, "train_throughput.json/.md (or train_ablation.json/.md)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
