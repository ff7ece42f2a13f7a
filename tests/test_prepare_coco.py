"""training/prepare_coco.py: COCO 2014 captions → an imagefolder `metadata.jsonl` that `datasets` reads with a caption
list column."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "prepare_coco.py"


def make_coco(root: Path, num_images: int = 2) -> None:
    """A COCO-2014-shaped folder: val2014/ images and annotations/captions_val2014.json (captions of images 0, 1)."""
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for index in range(num_images):
        name = f"COCO_val2014_{index:012d}.jpg"
        PIL.Image.fromarray(np.full((8, 8, 3), 40 * index, dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": 100 + index, "file_name": name})
    for index, caption in [(0, "A cat. "), (1, "a dog"), (0, "a cat on a mat"), (1, "two dogs")]:
        annotations.append({"id": len(annotations), "image_id": 100 + index, "caption": caption})
    (root / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_metadata_lists_every_caption_and_loads_as_an_imagefolder(tmp_path):
    make_coco(tmp_path)
    result = run("--coco_dir", str(tmp_path), "--split", "val")
    assert result.returncode == 0, result.stderr
    assert "2 images, 4 captions" in result.stdout
    split_dir = tmp_path / "repa" / "validation"
    records = [json.loads(line) for line in (split_dir / "metadata.jsonl").read_text().splitlines()]
    assert records == [
        {"file_name": "COCO_val2014_000000000000.jpg", "caption": ["A cat.", "a cat on a mat"]},
        {"file_name": "COCO_val2014_000000000001.jpg", "caption": ["a dog", "two dogs"]},
    ]
    dataset = datasets.load_dataset(str(tmp_path / "repa"), split="validation")
    assert dataset["caption"] == [["A cat.", "a cat on a mat"], ["a dog", "two dogs"]]
    assert dataset[1]["image"].size == (8, 8)


def test_missing_files_are_one_error_line(tmp_path):
    result = run("--coco_dir", str(tmp_path), "--split", "val")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("prepare_coco.py: error: ")
    assert "captions_val2014.json not found" in result.stderr

    make_coco(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    result = run("--coco_dir", str(tmp_path), "--split", "val")
    assert result.returncode == 2 and "1 images of captions_val2014.json are not in" in result.stderr

    shutil.rmtree(tmp_path / "val2014"), shutil.rmtree(tmp_path / "annotations")
    make_coco(tmp_path, num_images=3)  # the third image has no caption
    result = run("--coco_dir", str(tmp_path), "--split", "val")
    assert result.returncode == 2 and "1 images have no caption (e.g. COCO_val2014_000000000002.jpg)" in result.stderr
