"""FID, sFID, Inception Score, precision and recall of a sample batch, as ADM's evaluator computes them.

Examples:
    # the paper's protocol: 50,000 samples against ADM's ImageNet 256 reference batch
    python pipelines/evaluate.py --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception_weights pt_inception-2015-12-05-6726825d.pth --output metrics.json
    # also FD-DINOv2
    python pipelines/evaluate.py --samples samples.npz --reference ref.npz --dinov2 facebook/dinov2-large
    # reference batch (ADM layout) from a folder of center-cropped real images
    python pipelines/evaluate.py --make_reference imagenet_val_256/ --reference my_ref.npz
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

from diffusers_repa.evaluation import compute_reference_batch, evaluate_samples, format_metrics_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", help="generated images: .npz (arr_0, uint8 NHWC) or a folder of images")
    parser.add_argument(
        "--reference", required=True, help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)"
    )
    parser.add_argument(
        "--make_reference",
        default=None,
        help="instead of evaluating, write --reference from this folder/.npz of real images",
    )
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="pt_inception-2015-12-05-6726825d.pth (or $DIFFUSERS_REPA_INCEPTION_WEIGHTS)",
    )
    parser.add_argument("--dinov2", default=None, help="DINOv2 checkpoint for FD-DINOv2, e.g. facebook/dinov2-large")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    if args.samples is None and args.make_reference is None:
        parser.error("give --samples to evaluate, or --make_reference to build a reference batch")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    common = {
        "inception_weights": args.inception_weights,
        "batch_size": args.batch_size,
        "device": args.device,
        "dinov2": args.dinov2,
    }
    if args.make_reference is not None:
        path = compute_reference_batch(args.make_reference, args.reference, **common)
        print(f"Wrote reference batch {path}")
        return
    metrics = evaluate_samples(args.samples, args.reference, **common)
    print(format_metrics_table(metrics))
    if args.output is not None:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=output.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump({"samples": str(args.samples), "reference": str(args.reference), **metrics}, file, indent=2)
        os.replace(temporary, output)


if __name__ == "__main__":
    main()
