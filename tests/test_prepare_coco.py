"""training/prepare_coco.py: COCO 2014 captions → `metadata.jsonl` beside the images, read as an image–caption source
by the trainer's data layer and as evaluation captions by generate.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image

from diffusers_repa.data import COCO_CAPTION_COLUMN, load_image_source
from diffusers_repa.evaluation.prompts import load_dataset_captions

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "prepare_coco.py"


def make_coco(root: Path) -> None:
    """A COCO-2014-shaped folder: val2014/ (two images) and annotations/captions_val2014.json."""
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for index in range(2):
        name = f"COCO_val2014_{index:012d}.jpg"
        PIL.Image.fromarray(np.full((8, 8, 3), 40 * index, dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": 100 + index, "file_name": name})
    captions = [(0, "A cat."), (1, "a dog"), (0, "a cat on a mat"), (1, "two dogs")]
    annotations = [{"id": i, "image_id": 100 + index, "caption": text} for i, (index, text) in enumerate(captions)]
    (root / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_the_folder_trains_and_evaluates_with_every_caption(tmp_path):
    make_coco(tmp_path)
    result = run("--coco_dir", str(tmp_path), "--split", "val")
    assert result.returncode == 0, result.stderr
    assert "2 images, 4 captions" in result.stdout
    source = load_image_source(tmp_path / "val2014", caption_column=COCO_CAPTION_COLUMN)
    by_file = {Path(row["image"].filename).name: row["caption"] for row in source}
    assert by_file == {
        "COCO_val2014_000000000000.jpg": ["A cat.", "a cat on a mat"],
        "COCO_val2014_000000000001.jpg": ["a dog", "two dogs"],
    }
    # generate.py --captions_dataset: the first caption of every image, read without decoding the images.
    assert load_dataset_captions(tmp_path / "val2014", COCO_CAPTION_COLUMN) == ["A cat.", "a dog"]


def test_missing_files_are_one_error_line(tmp_path):
    result = run("--coco_dir", str(tmp_path), "--split", "val")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("prepare_coco.py: error: ")
    assert "captions_val2014.json not found" in result.stderr
