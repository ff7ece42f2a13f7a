"""Sampling throughput of `SiTPipeline`: images/s for a sampler, step count, guidance scale and guidance interval.

Two calls are timed back to back, interleaved, in one process: guidance on the whole trajectory (interval (0, 1))
and guidance only inside `--guidance_interval` (REPA's (0, 0.7)); outside the interval the pipeline runs only the
conditional half of the batch, and the report gives the measured speed-up next to the one expected from the number
of images the transformer actually processed (counted by a forward hook).

Run from the repository root:

    python -m benchmarks.sampling_throughput --preset SiT-XL/2 --sampler sde --steps 250 --guidance_scale 1.8 \
        --guidance_interval 0 0.7 --batch_size 16 --precision bf16 --compile cuda_graphs

Without `--pipeline`, the transformer is a randomly initialised preset (speed does not depend on the weights). The
VAE is `--vae` (default SD-VAE ft-EMA) when it can be loaded, else a random VAE of SD-VAE's architecture (same decode
cost); `--vae none` skips decoding (latent output).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch
from diffusers import AutoencoderKL

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
    reset_peak_memory,
    setup_run,
    synchronize,
    time_blocks,
    write_report,
)
from diffusers_repa.models.transformer_sit import SiTTransformer2DModel
from diffusers_repa.pipelines.pipeline_sit import COMPILE_MODES, SiTPipeline
from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

logger = logging.getLogger(__name__)

SAMPLERS = ("sde", "ode-euler", "ode-heun")
FULL_INTERVAL = (0.0, 1.0)
# diffusers' AutoencoderKL config of stabilityai/sd-vae-ft-ema / -mse (the VAE REPA uses), for a random stand-in.
SD_VAE_CONFIG = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 256,
}


def make_scheduler(sampler: str) -> SiTODEScheduler | SiTSDEScheduler:
    if sampler == "sde":
        return SiTSDEScheduler()
    if sampler in ("ode-euler", "ode-heun"):
        return SiTODEScheduler(solver=sampler.split("-")[1])
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")


def load_vae(name: str, device: torch.device) -> tuple[AutoencoderKL | None, str]:
    """`AutoencoderKL.from_pretrained(name)`, else a random VAE with SD-VAE's architecture; None for `none`."""
    if name == "none":
        return None, "none (latent output)"
    try:
        return AutoencoderKL.from_pretrained(name).to(device), name
    except (OSError, ValueError) as error:
        logger.warning("VAE %s is not available (%s); using a random VAE with SD-VAE's architecture.", name, error)
        with device:
            return AutoencoderKL(**SD_VAE_CONFIG).to(device), "random (SD-VAE architecture)"


def build_pipeline(args: argparse.Namespace, device: torch.device) -> tuple[SiTPipeline, str]:
    """The pipeline to time and a label of what it holds."""
    scheduler = make_scheduler(args.sampler)
    if args.pipeline is not None:
        # A saved pipeline keeps its own VAE unless decoding is switched off.
        extra = {"vae": None} if args.vae == "none" else {}
        pipeline = SiTPipeline.from_pretrained(args.pipeline, scheduler=scheduler, **extra)
        label = f"{args.pipeline}{', no VAE decode' if args.vae == 'none' else ''}"
    else:
        vae, vae_label = load_vae(args.vae, device)
        torch.manual_seed(args.seed)
        with device:
            transformer = SiTTransformer2DModel.from_preset(
                args.preset, sample_size=args.resolution // 8, projection_dims=(), **model_overrides(args)
            )
        pipeline = SiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
        label = f"random {model_label(args.preset, model_overrides(args))}, VAE {vae_label}"
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, label


class _ImageCounter:
    """Counts the images (batch rows) that go through the transformer: a doubled CFG batch counts twice.

    Only for an eager transformer: a compiled forward would bake the hook's Python side effect into its graph.
    """

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.count += args[0].shape[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure what `args` asks for and return the JSON-able result (also written to `args.output`)."""
    device = setup_run(args)
    low, high = args.guidance_interval
    if args.guidance_scale <= 1:
        raise ValueError("--guidance_scale must be > 1: the benchmark compares guidance intervals.")
    pipeline, label = build_pipeline(args, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    labels = torch.randint(0, pipeline.transformer.config.num_classes, (args.batch_size,), generator=generator,
                           device=device).tolist()  # fmt: skip
    output_type = "latent" if pipeline.vae is None else "pt"

    def sample(interval: tuple[float, float]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32"):
            images = pipeline(
                labels,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                guidance_interval=interval,
                generator=generator,
                output_type=output_type,
            ).images
        if not torch.isfinite(images).all():
            raise RuntimeError(f"Sampling with guidance interval {interval} produced non-finite values.")
        return images

    def time_calls(repeats: int) -> dict[str, list[float]]:
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):  # the two variants interleaved
            for name, interval in variants.items():
                seconds[name] += time_blocks(lambda i=interval: sample(i), device, warmup=0, iterations=1, repeats=1)
        return seconds

    variants = {"everywhere": FULL_INTERVAL, "interval": (low, high)}
    # Eager first: a warm-up call per variant that also counts the images through the model, then (when a compiled
    # run follows) one timed eager call each, the reference for the compile speed-up.
    counter = _ImageCounter(pipeline.transformer)
    images_through_model = {}
    for name, interval in variants.items():
        counter.count = 0
        sample(interval)
        images_through_model[name] = counter.count / args.batch_size
    counter.handle.remove()
    eager_seconds = compile_seconds = None
    if args.compile != "none":
        eager_seconds = time_calls(1)
        start = time.perf_counter()
        pipeline.compile_transformer(args.compile)
        for interval in variants.values():  # compiles a graph for both batch shapes (guided 2N and plain N)
            sample(interval)
        synchronize(device)
        compile_seconds = time.perf_counter() - start
    synchronize(device)
    reset_peak_memory(device)
    seconds = time_calls(args.repeats)
    memory, memory_kind = peak_memory(device)

    per_call = {name: median(values) for name, values in seconds.items()}
    result: dict[str, Any] = {
        "benchmark": "sampling_throughput",
        **environment(device),
        "model": label,
        "preset": args.preset if args.pipeline is None else None,
        "resolution": args.resolution,
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": [low, high],
        "batch_size": args.batch_size,
        "precision": args.precision,
        "compile": args.compile,
        "decode": pipeline.vae is not None,
        "first_compiled_calls_s": compile_seconds,
        "eager_seconds_per_call": median(eager_seconds["interval"]) if eager_seconds else None,
        "compile_speedup": median(eager_seconds["interval"]) / per_call["interval"] if eager_seconds else None,
        "repeats": args.repeats,
        "seconds_per_call": per_call["interval"],
        "seconds_per_call_all": seconds["interval"],
        "images_per_s": args.batch_size / per_call["interval"],
        "seconds_per_call_cfg_everywhere": per_call["everywhere"],
        "seconds_per_call_cfg_everywhere_all": seconds["everywhere"],
        "images_per_s_cfg_everywhere": args.batch_size / per_call["everywhere"],
        "interval_speedup": per_call["everywhere"] / per_call["interval"],
        "model_evaluations_per_image": images_through_model["interval"],
        "model_evaluations_per_image_cfg_everywhere": images_through_model["everywhere"],
        "expected_interval_speedup": images_through_model["everywhere"] / images_through_model["interval"],
        "peak_memory_gib": memory / 2**30,
        "memory_kind": memory_kind,
    }
    check_finite_positive(
        result, ("seconds_per_call", "images_per_s", "images_per_s_cfg_everywhere", "interval_speedup")
    )
    write_report(result, _markdown(result), args.output, "sampling_throughput")
    return result


def _markdown(result: dict[str, Any]) -> str:
    columns = (
        ("device", "device"),
        ("model", "model"),
        ("sampler", "sampler"),
        ("steps", "steps"),
        ("guidance_scale", "CFG"),
        ("interval", "CFG interval"),
        ("batch_size", "batch"),
        ("precision", "precision"),
        ("compile", "compile"),
        ("decode", "VAE decode"),
        ("images_per_s", "images/s"),
        ("images_per_s_cfg_everywhere", "images/s, CFG on [0,1]"),
        ("interval_speedup", "interval speed-up"),
        ("expected_interval_speedup", "expected (model images)"),
        ("compile_speedup", "× eager"),
    )
    low, high = result["guidance_interval"]
    return markdown_table([{**result, "interval": f"[{low:g}, {high:g}]"}], columns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="A saved SiTPipeline (folder or Hub id) instead of a random preset.")
    add_model_arguments(parser)
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL id/folder, or 'none'.")
    parser.add_argument("--sampler", choices=SAMPLERS, default="sde")
    parser.add_argument("--steps", type=int, default=250, help="Scheduler steps.")
    parser.add_argument("--guidance_scale", type=float, default=1.8)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=(0.0, 0.7), metavar=("LOW", "HIGH"))
    parser.add_argument("--batch_size", type=int, default=16, help="Images per pipeline call.")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16", help="Autocast dtype.")
    parser.add_argument(
        "--compile",
        choices=("none", *COMPILE_MODES),
        default="none",
        help="SiTPipeline.compile_transformer mode: blocks (regional), graph (whole forward), cuda_graphs.",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per guidance interval (median).")
    add_run_arguments(parser, "sampling_throughput.json/.md")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
