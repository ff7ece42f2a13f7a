#!/usr/bin/env python
"""Make MS-COCO 2014 (the original REPA text-to-image data) an image–caption folder that `datasets` reads.

    # From the official files (https://cocodataset.org/#download): train2014.zip, val2014.zip and
    # annotations_trainval2014.zip, unzipped into one folder:
    python training/prepare_coco.py --coco_dir data/coco --split train   # 82,783 images, ~5 captions each
    python training/prepare_coco.py --coco_dir data/coco --split val     # 40,504 images (evaluation captions)

Writes `<output_dir>/train/` (or `validation/`; default output_dir `<coco_dir>/repa`): a link to every image and a
`metadata.jsonl` — one line per image, ``{"file_name": ..., "caption": [...]}`` with every caption of the image in
annotation order — so that the folder is an `imagefolder` dataset with splits "train" and "validation" and a caption
list column. (A `metadata.jsonl` inside `train2014/` itself would be ignored: `datasets` assigns COCO's files to
splits by their names, "COCO_train2014_…", and the metadata file matches none.) Then train on it:

    accelerate launch training/train_repa.py --config training/configs/mmdit-coco.yaml --dataset data/coco/repa

A mistake (missing files, an image without a caption) ends with one `prepare_coco.py: error: ...` line (exit status
2); add `--debug` for the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from diffusers_repa.cli import run_cli

METADATA_NAME = "metadata.jsonl"
SPLIT_FOLDERS = {"train": "train", "val": "validation"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco_dir", required=True, help="folder holding <split>2014/ and annotations/")
    parser.add_argument("--split", choices=tuple(SPLIT_FOLDERS), default="train")
    parser.add_argument("--output_dir", default=None, help="default: <coco_dir>/repa")
    return parser.parse_args(argv)


def coco_metadata(annotations: dict) -> list[dict]:
    """One record per image of a COCO captions file, ``{"file_name", "caption": [...]}``, in the file's image order
    with each image's captions in annotation order."""
    captions = defaultdict(list)
    for annotation in annotations["annotations"]:
        captions[annotation["image_id"]].append(annotation["caption"].strip())
    uncaptioned = [image["file_name"] for image in annotations["images"] if not captions[image["id"]]]
    if uncaptioned:
        raise ValueError(
            f"{len(uncaptioned)} images have no caption (e.g. {uncaptioned[0]}): pass COCO's own captions file, in "
            "which every image has about five."
        )
    return [{"file_name": image["file_name"], "caption": captions[image["id"]]} for image in annotations["images"]]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from diffusers_repa.atomic_files import write_folder_atomically

    coco_dir = Path(args.coco_dir)
    annotations_path = coco_dir / "annotations" / f"captions_{args.split}2014.json"
    image_dir = coco_dir / f"{args.split}2014"
    for path in (annotations_path, image_dir):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: unzip COCO 2014's {args.split}2014.zip and annotations_trainval2014.zip into "
                f"{coco_dir} (https://cocodataset.org/#download)."
            )
    records = coco_metadata(json.loads(annotations_path.read_text()))
    missing = [record["file_name"] for record in records if not (image_dir / record["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images of {annotations_path.name} are not in {image_dir} (e.g. {missing[0]}): "
            "unzip the whole image archive."
        )
    split_dir = Path(args.output_dir or coco_dir / "repa") / SPLIT_FOLDERS[args.split]
    with write_folder_atomically(split_dir, replace=True) as staging:
        for record in records:  # links, not copies: the folder costs no disk space
            (staging / record["file_name"]).symlink_to((image_dir / record["file_name"]).resolve())
        (staging / METADATA_NAME).write_text("".join(json.dumps(record) + "\n" for record in records))
    num_captions = sum(len(record["caption"]) for record in records)
    print(f"Wrote {split_dir}: {len(records)} images, {num_captions} captions.")


if __name__ == "__main__":
    sys.exit(run_cli(main))
