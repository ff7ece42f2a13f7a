"""Prepare a REPA training set: ADM center crops encoded once with a VAE into a sharded latent cache.

Single process:
    python training/prepare_dataset.py --dataset imagenet-1k --resolution 256 --output_dir data/imagenet256

Several GPUs (each process encodes its own shards; rerun the same command to resume a killed job):
    accelerate launch --num_processes 8 training/prepare_dataset.py --dataset imagenet-1k --output_dir ...

Sources: "imagenet-1k" (gated Hub dataset ILSVRC/imagenet-1k: accept its terms on the dataset page and run
`hf auth login`), any Hub image-classification dataset, or a local folder with one sub-folder per class.

Text-to-image data: name the caption column (a string or a list of captions per image); with --text_encoder the
CLIP features of every caption (and of the empty caption) are stored too, so training needs no text encoder pass:
    python training/prepare_dataset.py --dataset digits-captions --caption_column caption --text_encoder tiny-clip \
        --vae none --resolution 8 --output_dir data/digits-captions8
A local folder of images with a metadata.jsonl / metadata.csv (file_name + caption column) is such a source, and so
is any Hub dataset with an image column and a caption (list) column. MS-COCO 2014 train as the original (its images
and annotations/captions_train2014.json; diffusers_repa.data.write_coco_captions_metadata writes the metadata):
    python -c "from diffusers_repa.data import write_coco_captions_metadata as w; \
        w('coco/annotations/captions_train2014.json', 'coco/train2014')"
    python training/prepare_dataset.py --dataset coco/train2014 --caption_column captions \
        --text_encoder openai/clip-vit-large-patch14 --resolution 256 --output_dir data/coco256

A mistake (a missing folder, an unreadable source, a bad value) ends with one `prepare_dataset.py: error: ...` line
(exit status 2); add `--debug` for the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from accelerate import PartialState

from diffusers_repa.cli import run_cli
from diffusers_repa.data import (
    DEFAULT_VAE,
    SKIPPED_REPORT_FILE,
    build_latent_cache,
    push_latent_cache_to_hub,
    read_cache_info,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="'imagenet-1k', a Hub dataset id, or a local image folder.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_column", default="image")
    parser.add_argument(
        "--label_column",
        default="label",
        help="Class label column; with --caption_column optional (a source without a 'label' column has no labels).",
    )
    parser.add_argument(
        "--caption_column", default=None, help="Caption column (a string or a list of strings per image)."
    )
    parser.add_argument(
        "--text_encoder",
        default=None,
        help="With --caption_column: store the captions' CLIP features, e.g. openai/clip-vit-large-patch14 "
        "(the original's) or tiny-clip (built-in, offline).",
    )
    parser.add_argument("--streaming", action="store_true", help="Read the source lazily instead of downloading it.")
    parser.add_argument("--resolution", type=int, default=256, help="Image side in pixels (256 and 512 as REPA).")
    parser.add_argument(
        "--vae", default=DEFAULT_VAE, help="AutoencoderKL Hub id or local path, or 'none' for a pixel-space cache."
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=64, help="Images per VAE forward pass and process.")
    shards = parser.add_mutually_exclusive_group()
    shards.add_argument("--shard_size", type=int, default=None, help="Source rows per shard (default 1024).")
    shards.add_argument("--num_shards", type=int, default=None, help="Number of shards instead of --shard_size.")
    parser.add_argument("--num_workers", type=int, default=4, help="Threads decoding and cropping images.")
    parser.add_argument("--max_samples", type=int, default=None, help="Use only the first N source rows.")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the finished cache as a Hub dataset.")
    parser.add_argument("--hub_dataset_id", default=None, help="Target 'user/name' for --push_to_hub.")
    parser.add_argument("--hub_private", action="store_true", help="Create the Hub dataset as private.")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_dataset_id:
        parser.error("--push_to_hub needs --hub_dataset_id user/name.")
    if args.text_encoder is not None and args.caption_column is None:
        parser.error("--text_encoder encodes captions: pass --caption_column too.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cache_dir = build_latent_cache(
        args.dataset,
        args.output_dir,
        args.vae,
        args.resolution,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_shards=args.num_shards,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
        text_encoder=args.text_encoder,
        streaming=args.streaming,
        max_samples=args.max_samples,
        num_workers=args.num_workers,
        mixed_precision=args.mixed_precision,
    )
    if not PartialState().is_main_process:
        return
    info = read_cache_info(cache_dir)
    summary = {
        "output_dir": str(cache_dir),
        "num_samples": info.num_samples,
        "num_skipped": info.num_skipped,
        "num_shards": len(info.shards),
        "num_classes": info.num_classes,
        "resolution": info.resolution,
        "latent_shape": [info.latent_channels, info.latent_size, info.latent_size],
        "vae": info.vae,
        "scaling_factor": info.scaling_factor,
    }
    if info.has_captions:
        summary.update(caption_column=info.caption_column, num_captions=info.num_captions)
    if info.has_text_features:
        summary.update(text_encoder=info.text_encoder, text_features_shape=info.text_features_shape)
    if info.num_skipped:
        summary["skipped_report"] = str(cache_dir / SKIPPED_REPORT_FILE)
    if args.push_to_hub:
        summary["hub_url"] = push_latent_cache_to_hub(cache_dir, args.hub_dataset_id, private=args.hub_private or None)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(run_cli(main))
