"""Generate N samples with a SiT pipeline (class-conditional, default 50,000) or an MMDiT pipeline (text-to-image,
default one per prompt) for FID evaluation: PNGs plus one ADM-layout .npz (text-to-image: plus the prompt of every
sample, in prompts.json and the .npz, for the CLIP score).

Every sample depends only on (--seed, its index), so the result does not depend on the number of processes; an
interrupted run resumes where it stopped (existing PNGs are kept).

Examples:
    # the paper's FID 1.42 setting (SiT-XL/2 + REPA, 4M iterations): SDE, 250 steps, CFG 1.8 on t in [0, 0.7]
    accelerate launch --num_processes 8 pipelines/generate.py --pipeline sit-xl-2-repa --output_dir samples \\
        --sampler sde --steps 250 --guidance_scale 1.8 --guidance_interval 0 0.7 --mixed_precision bf16 \\
        --compile cuda_graphs
    # ODE with Heun, balanced classes (50 per class)
    accelerate launch pipelines/generate.py --pipeline sit-xl-2-repa --output_dir samples_ode --sampler ode --heun \\
        --steps 50 --label_sampling equal
    # text-to-image, the original's COCO protocol (generate_t2i.py): val captions, ODE (Euler) 50 steps, CFG 1.5
    accelerate launch pipelines/generate.py --pipeline mmdit-repa --output_dir coco_samples \
        --captions_dataset <COCO val captions dataset or folder> --caption_column caption --num_samples 40192 \
        --sampler ode --steps 50 --guidance_scale 1.5
    # text-to-image from a text file, one prompt per line
    python pipelines/generate.py --pipeline mmdit-repa --output_dir samples_t2i --prompts_file prompts.txt

A mistake (a bad value, a missing pipeline folder, an output that is a file) ends with one
``generate.py: error: ...`` line (exit status 2) before any sample is drawn; ``--debug`` shows the traceback.
"""

import argparse
import sys
from pathlib import Path

from diffusers_repa.cli import run_cli
from diffusers_repa.pretrained_paths import check_pretrained_source

# diffusers_repa.pipelines.COMPILE_MODES, spelt out here so that the flags are checked before torch is imported.
COMPILE_MODES = ("blocks", "graph", "cuda_graphs")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="SiTPipeline or MMDiTPipeline folder, or Hub id")
    parser.add_argument("--output_dir", required=True, help="folder for the PNGs {i:06d}.png")
    parser.add_argument("--npz", default=None, help="the packed samples (default: <output_dir>.npz)")
    parser.add_argument(
        "--num_samples", type=int, default=None, help="default: 50,000 class-conditional, one per prompt text-to-image"
    )
    parser.add_argument("--batch_size", type=int, default=32, help="per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=["sde", "ode"], default="sde")
    parser.add_argument("--steps", type=int, default=250, help="number of sampler steps")
    parser.add_argument("--heun", action="store_true", help="Heun corrector (ODE only)")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="CFG weight; 1 disables guidance")
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=[0.0, 1.0],
        metavar=("LOW", "HIGH"),
        help="CFG on low<=t<=high",
    )
    parser.add_argument(
        "--label_sampling",
        choices=["random", "equal"],
        default=None,
        help="class labels: uniform at random (the original's, the default) or every class equally often",
    )
    prompts = parser.add_argument_group("text-to-image prompts (MMDiTPipeline); sample i gets prompt i mod P")
    prompts.add_argument("--prompts_file", default=None, help="a text file, one prompt per line (or a JSON list)")
    prompts.add_argument(
        "--captions_dataset", default=None, help="Hub dataset id or local folder of captions, e.g. COCO val"
    )
    prompts.add_argument("--caption_column", default="caption", help="its caption column (a list: the first)")
    prompts.add_argument("--captions_split", default=None, help="default: the only split, else 'validation'")
    parser.add_argument("--path_type", choices=["linear", "cosine"], default=None, help="SDE interpolant")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default=None,
        help="compile the transformer: blocks (regional), graph (whole forward) or cuda_graphs (graph + CUDA graphs)",
    )
    args = parser.parse_args(argv)
    if args.heun and args.sampler != "ode":
        raise ValueError("--heun is an ODE solver option; add --sampler ode.")
    if args.prompts_file is not None and args.captions_dataset is not None:
        raise ValueError("Give the prompts once: --prompts_file or --captions_dataset, not both.")
    if args.label_sampling is not None and (args.prompts_file or args.captions_dataset):
        raise ValueError("--label_sampling chooses class labels; text-to-image samples follow their prompts: drop it.")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise FileNotFoundError(f"--prompts_file {args.prompts_file} is not a file.")
    for flag in ("num_samples", "batch_size", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if Path(args.output_dir).is_file():
        raise NotADirectoryError(f"--output_dir {args.output_dir} is a file; give a folder for the PNGs.")
    if args.npz is not None and (Path(args.npz).suffix != ".npz" or Path(args.npz).is_dir()):
        raise ValueError(f"--npz {args.npz}: give a file name ending in .npz.")
    check_pretrained_source(args.pipeline)
    return args


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompts_file or --captions_dataset (None for class-conditional sampling)."""
    from diffusers_repa.evaluation.prompts import load_dataset_captions, read_prompts_file

    if args.prompts_file is not None:
        return read_prompts_file(args.prompts_file)
    if args.captions_dataset is not None:
        return load_dataset_captions(
            args.captions_dataset, args.caption_column, split=args.captions_split, max_rows=args.num_samples
        )
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    from diffusers_repa.evaluation.generate import generate_samples
    from diffusers_repa.evaluation.image_io import read_npz_shape

    npz_path = generate_samples(
        args.pipeline,
        args.output_dir,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        sampler=args.sampler,
        num_inference_steps=args.steps,
        heun=args.heun,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval),
        label_sampling=args.label_sampling or "random",
        path_type=args.path_type,
        npz_path=args.npz,
        mixed_precision=args.mixed_precision,
        compile_mode=args.compile,
        prompts=read_prompts(args),
    )
    if npz_path is not None:
        (num_samples, *_), _ = read_npz_shape(npz_path)
        print(f"Wrote {num_samples} samples to {args.output_dir} and {npz_path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
