"""Sample class-conditional images from a SiT/REPA pipeline (local folder or Hub repo id) into a PNG grid.

The paper's setting (SiT-XL/2 + REPA, FID 1.42): SDE sampler, 250 steps, guidance 1.8 on t ∈ [0, 0.7]:

    python pipelines/sample.py --model org/sit-xl-repa --class_labels 207 "golden retriever" 88 \
        --sampler sde --steps 250 --guidance_scale 1.8 --guidance_interval 0 0.7 --seed 0 --output grid.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from diffusers_repa.pipelines import SiTPipeline
from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline folder or Hub repo id.")
    parser.add_argument(
        "--class_labels", nargs="+", required=True, help="Class ids and/or names (quote names with spaces)."
    )
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
    parser.add_argument("--output", type=Path, default=Path("grid.png"), help="PNG grid to write.")
    parser.add_argument("--cols", type=int, default=None, help="Grid columns (default: about square).")
    parser.add_argument("--save_individual", type=Path, default=None, metavar="DIR", help="Also write one PNG each.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="Model dtype (the sampler stays fp64)."
    )
    args = parser.parse_args(argv)
    if args.heun and args.sampler != "ode":
        parser.error("--heun needs --sampler ode")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = SiTPipeline.from_pretrained(str(args.model), dtype=DTYPES[args.dtype]).to(args.device)
    if args.sampler == "ode":
        pipe.scheduler = SiTODEScheduler(solver="heun" if args.heun else "euler")
    else:
        path_type = args.path_type or pipe.scheduler.config.get("path_type", "linear")
        pipe.scheduler = SiTSDEScheduler(path_type=path_type)

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    images = pipe(
        args.class_labels,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval),
        generator=generator,
    ).images

    cols = args.cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blanks = [Image.new("RGB", images[0].size)] * (rows * cols - len(images))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images + blanks, rows=rows, cols=cols).save(args.output)
    print(f"Wrote a {rows}x{cols} grid of {len(images)} images to {args.output}")
    if args.save_individual is not None:
        args.save_individual.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(args.save_individual / f"{index:04d}.png")
        print(f"Wrote {len(images)} images to {args.save_individual}")


if __name__ == "__main__":
    main()
