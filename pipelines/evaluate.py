"""FID, sFID, Inception Score, precision and recall of a sample batch, as ADM's evaluator computes them; for
text-to-image samples also the CLIP score against their prompts.

Examples:
    # the paper's protocol: 50,000 samples against ADM's ImageNet 256 reference batch
    python pipelines/evaluate.py --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception_weights pt_inception-2015-12-05-6726825d.pth --output metrics.json
    # also FD-DINOv2
    python pipelines/evaluate.py --samples samples.npz --reference ref.npz --dinov2 facebook/dinov2-large
    # reference batch (ADM layout) from a folder of center-cropped real images
    python pipelines/evaluate.py --make_reference imagenet_val_256/ --reference my_ref.npz
    # text-to-image, the original's COCO protocol: FID against U-ViT's statistics of the val images (mu, sigma; made
    # with pytorch-fid, whose resize --inception_resize pytorch_fid repeats) and the CLIP score (ViT-L/14)
    python pipelines/evaluate.py --samples coco_samples.npz --reference fid_stats_mscoco256_val.npz \
        --inception_resize pytorch_fid --clip_score --output metrics.json
    # the CLIP score alone (the prompts come from the .npz, or prompts.json next to the samples, or --prompts)
    python pipelines/evaluate.py --samples coco_samples/ --clip_score --clip_model openai/clip-vit-large-patch14

Samples and reference images must have one resolution (ADM's reference batches: 256 or 512 px). A mistake (a
missing file, a resolution mismatch, a bad value, samples without prompts for --clip_score) ends with one
``evaluate.py: error: ...`` line (exit status 2) before Inception runs; ``--debug`` shows the traceback.
"""

import argparse
import json
import sys
from pathlib import Path

from diffusers_repa.cli import run_cli
from diffusers_repa.pretrained_paths import check_pretrained_source

# evaluation.clip_score.DEFAULT_CLIP_MODEL, spelt out here so that the flags are checked before torch is imported.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def check_image_source(path: str, flag: str) -> None:
    """Refuse a missing image set, or one that is neither an .npz file nor a folder."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist.")
    if not source.is_dir() and source.suffix != ".npz":
        raise ValueError(f"{flag} {path}: give an .npz file (ADM layout) or a folder of images.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", help="generated images: .npz (arr_0, uint8 NHWC) or a folder of images")
    parser.add_argument(
        "--reference",
        default=None,
        help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz), or statistics mu/sigma only (U-ViT's "
        "fid_stats_mscoco256_val.npz)",
    )
    parser.add_argument(
        "--make_reference",
        default=None,
        help="instead of evaluating, write --reference from this folder/.npz of real images",
    )
    parser.add_argument(
        "--center_crop",
        type=int,
        default=None,
        help="with --make_reference on a folder: read its images as ADM's center crop to this side (e.g. 256)",
    )
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="pt_inception-2015-12-05-6726825d.pth (or $DIFFUSERS_REPA_INCEPTION_WEIGHTS)",
    )
    parser.add_argument(
        "--inception_resize",
        choices=["tensorflow", "pytorch_fid"],
        default="tensorflow",
        help="resize to 299 px as ADM's evaluator (tensorflow) or as pytorch-fid (U-ViT's COCO statistics)",
    )
    parser.add_argument("--dinov2", default=None, help="DINOv2 checkpoint for FD-DINOv2, e.g. facebook/dinov2-large")
    parser.add_argument("--clip_score", action="store_true", help="also the CLIP score of the samples and prompts")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIPModel + processor, Hub id or folder")
    parser.add_argument(
        "--prompts",
        default=None,
        help="the samples' prompts in order (.txt one per line, or .json list); default: from the samples",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    if args.samples is None and args.make_reference is None:
        parser.error("give --samples to evaluate, or --make_reference to build a reference batch")
    if args.reference is None and (args.make_reference is not None or not args.clip_score):
        parser.error("give --reference (the reference batch to compare with, or to write with --make_reference)")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.center_crop is not None and (args.make_reference is None or args.center_crop < 1):
        raise ValueError("--center_crop is a positive side in pixels for the images of --make_reference.")
    if args.make_reference is not None:
        check_image_source(args.make_reference, "--make_reference")
        if Path(args.reference).suffix != ".npz" or Path(args.reference).is_dir():
            raise ValueError(f"--reference {args.reference}: the reference batch to write must be an .npz file.")
    else:
        check_image_source(args.samples, "--samples")
        if args.reference is not None:
            check_image_source(args.reference, "--reference")
    if args.output is not None and (Path(args.output).suffix != ".json" or Path(args.output).is_dir()):
        raise ValueError(f"--output {args.output}: the metrics are written as JSON; give a file name ending in .json.")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise FileNotFoundError(f"--inception_weights {args.inception_weights} is not a file.")
    if args.dinov2 is not None:
        check_pretrained_source(args.dinov2, config_name="config.json", what="DINOv2 model")
    if args.clip_score:
        if args.make_reference is not None:
            raise ValueError("--clip_score rates samples against their prompts; it does not go with --make_reference.")
        check_pretrained_source(args.clip_model, config_name="config.json", what="CLIP model")
    elif args.prompts is not None:
        raise ValueError("--prompts are read for the CLIP score only; add --clip_score.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from diffusers_repa.evaluation import compute_reference_batch, evaluate_samples, format_metrics_table

    common = {
        "inception_weights": args.inception_weights,
        "batch_size": args.batch_size,
        "device": args.device,
        "dinov2": args.dinov2,
        "inception_resize": args.inception_resize,
    }
    if args.make_reference is not None:
        path = compute_reference_batch(args.make_reference, args.reference, center_crop=args.center_crop, **common)
        print(f"Wrote reference batch {path}")
        return
    prompts = None
    if args.clip_score:
        from diffusers_repa.evaluation import open_image_set, read_sample_prompts

        # The prompts are matched with the samples before any network runs.
        prompts = read_sample_prompts(args.samples, args.prompts)
        if len(prompts) != len(open_image_set(args.samples)):
            raise ValueError(
                f"{len(open_image_set(args.samples))} samples but {len(prompts)} prompts: the CLIP score pairs "
                "every sample with its own prompt."
            )
    metrics = evaluate_samples(args.samples, args.reference, **common) if args.reference is not None else {}
    if prompts is not None:
        from diffusers_repa.evaluation import compute_clip_score

        metrics["clip_score"] = compute_clip_score(
            args.samples, prompts, args.clip_model, batch_size=args.batch_size, device=args.device
        )
        metrics.setdefault("num_samples", len(prompts))
    print(format_metrics_table(metrics))
    if args.output is not None:
        from diffusers_repa.atomic_files import write_text_atomically

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        record = {"samples": args.samples, "reference": args.reference, **metrics}
        write_text_atomically(args.output, json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(run_cli(main))
