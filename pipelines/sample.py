"""Sample class-conditional images from a SiT/REPA pipeline, or images of captions from a text-to-image MMDiT/REPA
pipeline (local folder or Hub repo id), into a PNG grid.

The paper's setting (SiT-XL/2 + REPA, FID 1.42): SDE sampler, 250 steps, guidance 1.8 on t ∈ [0, 0.7]:

    python pipelines/sample.py --model org/sit-xl-repa --class_labels 207 "golden retriever" 88 \
        --sampler sde --steps 250 --guidance_scale 1.8 --guidance_interval 0 0.7 --seed 0 --output grid.png

Text-to-image (an MMDiTPipeline; the original's generate_t2i.py defaults: ODE, 50 steps, guidance 1.5):

    python pipelines/sample.py --model mmdit-repa --prompt "a red bus on a street" "a bowl of fruit" \
        --sampler ode --steps 50 --guidance_scale 1.5 --output grid.png

A mistake (a bad value, a missing folder, an output format PIL cannot write) ends with one
``sample.py: error: ...`` line (exit status 2) before any model is loaded or sampled; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from PIL import Image

from diffusers_repa.cli import run_cli
from diffusers_repa.pretrained_paths import check_pretrained_source

DTYPES = ("fp32", "fp16", "bf16")


def check_image_output(path: Path, flag: str) -> None:
    """Refuse an image path PIL cannot write (by its extension) or that is a folder."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give the image file to write.")
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format not in Image.SAVE:
        raise ValueError(f"{flag} {path}: cannot write '{path.suffix}' images; use .png (or .jpg, .webp).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags (a ValueError names the flag); nothing heavy is imported yet."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline folder or Hub repo id.")
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument(
        "--class_labels", nargs="+", help="Class ids and/or names (quote names with spaces); SiT pipelines."
    )
    condition.add_argument("--prompt", nargs="+", help="Captions, one image each (quoted); MMDiT pipelines.")
    parser.add_argument("--sampler", choices=["sde", "ode"], default="sde")
    parser.add_argument("--heun", action="store_true", help="Heun instead of Euler for the ODE sampler.")
    parser.add_argument(
        "--path_type",
        choices=["linear", "cosine"],
        default=None,
        help="Interpolant of the model, for the SDE sampler (default: the saved scheduler's, else linear).",
    )
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("grid.png"), help="Image grid to write (.png, .jpg...).")
    parser.add_argument("--cols", type=int, default=None, help="Grid columns (default: about square).")
    parser.add_argument("--save_individual", type=Path, default=None, metavar="DIR", help="Also write one PNG each.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="Model dtype (the sampler stays fp64).")
    args = parser.parse_args(argv)
    if args.heun and args.sampler != "ode":
        raise ValueError("--heun is an ODE solver option; add --sampler ode.")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}.")
    if args.cols is not None and args.cols < 1:
        raise ValueError(f"--cols must be at least 1, got {args.cols}.")
    check_image_output(args.output, "--output")
    if args.save_individual is not None and args.save_individual.exists() and not args.save_individual.is_dir():
        raise NotADirectoryError(f"--save_individual {args.save_individual} is a file; give a folder.")
    check_pretrained_source(args.model)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from diffusers.utils import make_image_grid

    from diffusers_repa.evaluation.generate import load_generation_pipeline
    from diffusers_repa.evaluation.image_io import enlarge_small_images
    from diffusers_repa.pipelines.pipeline_mmdit import MMDiTPipeline
    from diffusers_repa.precision import DTYPES
    from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    pipe = load_generation_pipeline(str(args.model), dtype=dtype).to(device)
    if isinstance(pipe, MMDiTPipeline) != (args.prompt is not None):
        raise ValueError(
            f"{args.model} is a text-to-image MMDiTPipeline: give --prompt instead of --class_labels."
            if args.prompt is None
            else f"{args.model} is a class-conditional {type(pipe).__name__}: give --class_labels instead of --prompt."
        )
    if args.sampler == "ode":
        pipe.scheduler = SiTODEScheduler(solver="heun" if args.heun else "euler")
    else:
        path_type = args.path_type or pipe.scheduler.config.get("path_type", "linear")
        pipe.scheduler = SiTSDEScheduler(path_type=path_type)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = pipe(
        args.prompt or args.class_labels,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval),
        generator=generator,
    ).images

    shown = enlarge_small_images(images)  # e.g. the 16-px digits of the quickstart; individual files stay as drawn
    cols = min(args.cols or math.ceil(math.sqrt(len(shown))), len(shown))
    rows = math.ceil(len(shown) / cols)
    blanks = [Image.new("RGB", shown[0].size)] * (rows * cols - len(shown))
    make_image_grid(shown + blanks, rows=rows, cols=cols).save(args.output)
    print(f"Wrote a {rows}x{cols} grid of {len(images)} images to {args.output}")
    if args.save_individual is not None:
        args.save_individual.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(args.save_individual / f"{index:04d}.png")
        print(f"Wrote {len(images)} images to {args.save_individual}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
