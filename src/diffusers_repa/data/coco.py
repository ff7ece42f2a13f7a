"""MS-COCO captions as a local caption folder: the original text-to-image REPA's training data.

The original trains on COCO 2014 train (82,783 images, 414,113 captions: about five per image) with U-ViT's
preprocessing, which reads the images of ``train2014/`` and every caption of ``annotations/captions_train2014.json``.
:func:`write_coco_captions_metadata` turns that annotation file into the ``metadata.jsonl`` that ``datasets``'
imagefolder builder reads next to the images, so the folder becomes an image–caption source like any other::

    write_coco_captions_metadata("coco/annotations/captions_train2014.json", "coco/train2014")
    build_latent_cache("coco/train2014", "data/coco256", "stabilityai/sd-vae-ft-mse", 256,
                       caption_column="captions", text_encoder="openai/clip-vit-large-patch14")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic_files import write_text_atomically

__all__ = ["COCO_CAPTION_COLUMN", "write_coco_captions_metadata"]

COCO_CAPTION_COLUMN = "captions"
"""The column of :func:`write_coco_captions_metadata`'s metadata: the list of an image's captions."""


def write_coco_captions_metadata(annotations_file: str | os.PathLike, images_dir: str | os.PathLike) -> Path:
    """Writes ``images_dir/metadata.jsonl``: one line ``{"file_name": ..., "captions": [...]}`` per image of a COCO
    captions annotation file that has at least one caption, images in the file's order, captions in the order of
    their annotation ids, unchanged (as U-ViT's preprocessing reads them).

    Args:
        annotations_file: a COCO captions file, e.g. ``annotations/captions_train2014.json`` (``images`` with ``id``
            and ``file_name``, ``annotations`` with ``image_id``, ``id`` and ``caption``).
        images_dir: the folder of its images (``train2014/``); the metadata is written there, atomically.

    Returns:
        The path of the metadata file.

    Raises:
        FileNotFoundError: ``images_dir`` is not a folder, or an image the annotations list is missing from it.
        ValueError: the annotation file is not a COCO captions file.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} is not a folder; pass the folder of the COCO images (train2014/).")
    fix = "pass annotations/captions_<split>2014.json"
    try:
        payload = json.loads(Path(annotations_file).read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{annotations_file} is not a COCO captions file (not JSON: {error}); {fix}.") from error
    if not isinstance(payload, dict) or not {"images", "annotations"} <= payload.keys():
        raise ValueError(f"{annotations_file} is not a COCO captions file (no 'images' and 'annotations'); {fix}.")
    captions: dict[int, list[str]] = {}
    for annotation in sorted(payload["annotations"], key=lambda annotation: annotation["id"]):
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    lines = []
    for image in payload["images"]:
        if image["id"] not in captions:
            continue
        if not (images_dir / image["file_name"]).is_file():
            raise FileNotFoundError(
                f"{images_dir / image['file_name']}, listed in {annotations_file}, is missing: pass the images folder "
                "of the same split."
            )
        record = {"file_name": image["file_name"], COCO_CAPTION_COLUMN: captions[image["id"]]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return write_text_atomically(images_dir / "metadata.jsonl", "".join(lines))
