"""Per-block representation alignment of a SiT with a vision encoder: CKNNA, CKA, linear probe → CSV + PNG.

Examples:
    # 10,000 ImageNet validation crops (ADM-layout npz with labels in arr_1), SiT at t = 0.5, DINOv2-B
    python pipelines/analyze_alignment.py --pipeline sit-xl-2-repa --encoder dinov2-vit-b \\
        --images imagenet_val_256.npz --t 0.5 --output_dir alignment/

A mistake (a bad value, a missing file or folder) ends with one ``analyze_alignment.py: error: ...`` line (exit
status 2) before any model is loaded; ``--debug`` shows the traceback.
"""

import argparse
import sys
from pathlib import Path

from diffusers_repa.cli import run_cli
from diffusers_repa.pretrained_paths import check_pretrained_source


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="SiTPipeline folder or Hub id (transformer + VAE)")
    parser.add_argument("--encoder", required=True, help="encoder name (dinov2-vit-b, ...), Hub id or folder")
    parser.add_argument("--images", required=True, help="uint8 images: .npz (arr_0, labels in arr_1) or a folder")
    parser.add_argument("--labels", default=None, help=".npy of class ids for the linear probe (default: arr_1)")
    parser.add_argument("--output_dir", required=True, help="where alignment.csv and alignment.png go")
    parser.add_argument("--t", type=float, default=0.5, help="noise level of the SiT input (t = 0 data, 1 noise)")
    parser.add_argument("--path_type", choices=["linear", "cosine"], default="linear")
    parser.add_argument("--k", type=int, default=10, help="CKNNA neighbourhood size")
    parser.add_argument("--pooling", choices=["mean", "tokens"], default="mean")
    parser.add_argument("--probe_epochs", type=int, default=100)
    parser.add_argument("--probe_lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    args = parser.parse_args(argv)
    if not 0 <= args.t <= 1:
        raise ValueError(f"--t must be a time in [0, 1] (0 data, 1 noise), got {args.t}.")
    for flag in ("k", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.probe_epochs < 0:
        raise ValueError(f"--probe_epochs must be at least 0, got {args.probe_epochs}.")
    images = Path(args.images)
    if not images.exists():
        raise FileNotFoundError(f"--images {args.images} does not exist.")
    if not images.is_dir() and images.suffix != ".npz":
        raise ValueError(f"--images {args.images}: give an .npz file (arr_0, ADM layout) or a folder of images.")
    if args.labels is not None and not Path(args.labels).is_file():
        raise FileNotFoundError(f"--labels {args.labels} is not a file.")
    if Path(args.output_dir).is_file():
        raise NotADirectoryError(f"--output_dir {args.output_dir} is a file; give a folder.")
    check_pretrained_source(args.pipeline)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import numpy as np
    import torch

    from diffusers_repa.encoders import load_encoder
    from diffusers_repa.evaluation.alignment_analysis import analyze_alignment
    from diffusers_repa.evaluation.image_io import npz_keys, open_image_set, read_npz_shape
    from diffusers_repa.pipelines.pipeline_sit import SiTPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = SiTPipeline.from_pretrained(args.pipeline)
    images = open_image_set(args.images)
    batches = images.iter_batches(1)
    resolution = next(batches).shape[1]
    batches.close()
    labels = None
    if args.labels is not None:
        labels = np.load(args.labels)
    elif (
        str(args.images).endswith(".npz")
        and "arr_1" in npz_keys(args.images)
        and read_npz_shape(args.images, "arr_1")[0] == (len(images),)
    ):
        with np.load(args.images) as stored:
            labels = stored["arr_1"]
    encoder = load_encoder(args.encoder, resolution=resolution, device=device)
    results = analyze_alignment(
        pipeline.transformer,
        pipeline.vae,
        encoder,
        images,
        args.output_dir,
        labels=labels,
        t=args.t,
        path_type=args.path_type,
        k=args.k,
        pooling=args.pooling,
        probe_epochs=args.probe_epochs,
        probe_lr=args.probe_lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
    )
    print(f"{'block':>5}  {'CKNNA':>7}  {'CKA':>7}  {'probe':>7}")
    for row in results:
        probe = f"{row.probe_accuracy:7.4f}" if row.probe_accuracy is not None else f"{'-':>7}"
        print(f"{row.block:>5}  {row.cknna:7.4f}  {row.cka:7.4f}  {probe}")
    print(f"Wrote {args.output_dir}/alignment.csv and alignment.png")


if __name__ == "__main__":
    sys.exit(run_cli(main))
