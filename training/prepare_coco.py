#!/usr/bin/env python
"""Make MS-COCO 2014 (the original REPA text-to-image data) an image–caption folder for training and evaluation.

    # From the official files (https://cocodataset.org/#download): train2014.zip, val2014.zip and
    # annotations_trainval2014.zip, unzipped into one folder:
    python training/prepare_coco.py --coco_dir data/coco --split train   # 82,783 images, ~5 captions each
    python training/prepare_coco.py --coco_dir data/coco --split val     # 40,504 images (evaluation captions)

Writes `<coco_dir>/<split>2014/metadata.jsonl` — one line per captioned image, ``{"file_name": ..., "captions":
[...]}`` with every caption of the image (`data.write_coco_captions_metadata`) — so that the folder is an image–caption
source with a caption-list column. Then:

    accelerate launch training/train_repa.py --config training/configs/mmdit-coco.yaml      # data/coco/train2014
    accelerate launch pipelines/generate.py --pipeline mmdit-coco-repa/pipeline \\
        --captions_dataset data/coco/val2014 --caption_column captions ...

A mistake (missing files, not a COCO captions file) ends with one `prepare_coco.py: error: ...` line (exit status 2);
add `--debug` for the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusers_repa.cli import run_cli


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco_dir", required=True, help="folder holding <split>2014/ and annotations/")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    import json

    from diffusers_repa.data import write_coco_captions_metadata

    coco_dir = Path(args.coco_dir)
    annotations = coco_dir / "annotations" / f"captions_{args.split}2014.json"
    if not annotations.is_file():
        raise FileNotFoundError(
            f"{annotations} not found: unzip COCO 2014's {args.split}2014.zip and annotations_trainval2014.zip into "
            f"{coco_dir} (https://cocodataset.org/#download)."
        )
    metadata = write_coco_captions_metadata(annotations, coco_dir / f"{args.split}2014")
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    num_captions = sum(len(record["captions"]) for record in records)
    print(f"Wrote {metadata}: {len(records)} images, {num_captions} captions.")


if __name__ == "__main__":
    sys.exit(run_cli(main))
