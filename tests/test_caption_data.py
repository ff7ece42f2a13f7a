"""Image–caption data: text encoding, caption sources (digits-captions, datasets objects, a caption folder), caption
caches with text features, and the loader's seeded caption draw."""

import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import skip_first_batches

from diffusers_repa.data import (
    COCO_CAPTION_COLUMN,
    DIGITS_CAPTIONS_DATASET,
    LatentCacheBatches,
    LatentCacheInfo,
    build_latent_cache,
    cache_text_encoder_matches,
    check_cache_source,
    describe_source,
    digit_captions,
    load_digits_arrays,
    load_empty_text_features,
    load_image_source,
    load_latent_cache,
    make_train_dataloader,
    read_cache_info,
    write_coco_captions_metadata,
)
from diffusers_repa.models.tiny_text_encoder import TINY_CLIP_MAX_LENGTH, TINY_CLIP_WIDTH, save_tiny_clip
from diffusers_repa.text_encoding import encode_text, load_text_encoder

from .conftest import load_script

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_DIGITS = 48


@pytest.fixture(scope="module")
def tiny_clip():
    return load_text_encoder("tiny-clip")


@pytest.fixture(scope="module")
def digits_caption_cache(tmp_path_factory) -> Path:
    """48 digits at 8 px in pixel space with their captions and tiny-clip features, in three shards (20, 20, 8)."""
    output = tmp_path_factory.mktemp("captions") / "digits-captions8"
    return build_latent_cache(
        DIGITS_CAPTIONS_DATASET,
        output,
        "none",
        8,
        caption_column="caption",
        text_encoder="tiny-clip",
        max_samples=NUM_DIGITS,
        shard_size=20,
        num_workers=0,
        show_progress=False,
    )


def features_of(tiny_clip, captions: list[str]) -> torch.Tensor:
    """What the cache stores for ``captions``: encode_text rounded to float16, read back as float32."""
    return encode_text(*tiny_clip, captions).half().float()


def image_dataset(captions: list, **columns) -> datasets.Dataset:
    images = [PIL.Image.fromarray(np.full((8, 8, 3), 30 * index, np.uint8)) for index in range(len(captions))]
    return datasets.Dataset.from_dict({"img": images, "text": captions, **columns})


# --- text encoding -------------------------------------------------------------------------------------------------


def test_encode_text_is_clip_last_hidden_state_over_padded_tokens(tiny_clip):
    tokenizer, text_encoder = tiny_clip
    texts = ["a cat", "a dog on a mat", ""]
    features = encode_text(tokenizer, text_encoder, texts)
    assert features.shape == (3, TINY_CLIP_MAX_LENGTH, TINY_CLIP_WIDTH) and not features.requires_grad
    ids = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(features, text_encoder(ids).last_hidden_state, rtol=0, atol=0)
    # Truncated to max_length: the first 10 tokens are the same sequence's.
    torch.testing.assert_close(encode_text(tokenizer, text_encoder, ["a cat"], 10), features[:1, :10])
    assert text_encoder.training is False and not any(p.requires_grad for p in text_encoder.parameters())


def test_load_text_encoder_from_pipeline_and_root_layouts(tmp_path, tiny_clip):
    pipeline_layout = save_tiny_clip(tmp_path / "pipeline", seed=1)
    root_layout = tmp_path / "root"
    tokenizer, text_encoder = load_text_encoder(pipeline_layout)
    tokenizer.save_pretrained(root_layout)
    text_encoder.save_pretrained(root_layout)
    reloaded = load_text_encoder(root_layout, dtype=torch.float64)
    assert reloaded[1].dtype == torch.float64
    expected = encode_text(tokenizer, text_encoder, ["a cat"])
    torch.testing.assert_close(encode_text(*reloaded, ["a cat"]).float(), expected)
    # Another seed is another encoder than the built-in tiny-clip.
    assert (expected - encode_text(*tiny_clip, ["a cat"])).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("tiny_clip", r"Cannot load a CLIP text encoder from 'tiny_clip' \(did you mean 'tiny-clip'\?\)"),
        ("nobody/no-such-clip", r"Cannot load a CLIP text encoder from 'nobody/no-such-clip'.*openai/clip-vit"),
    ],
)
def test_load_text_encoder_names_the_fix_in_one_line(name, match):
    with pytest.raises(ValueError, match=match) as error:
        load_text_encoder(name)
    assert "\n" not in str(error.value)


def test_load_text_encoder_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="has neither config.json nor text_encoder/config.json"):
        load_text_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such CLIP text encoder folder"):
        load_text_encoder(tmp_path / "missing" / "clip")


# --- sources -------------------------------------------------------------------------------------------------------


def test_digits_captions_source_keeps_images_and_labels():
    images, labels = load_digits_arrays()
    source = load_image_source(DIGITS_CAPTIONS_DATASET, caption_column="caption", max_samples=12)
    assert source.column_names == ["image", "label", "caption"]
    assert source["label"] == labels[:12].tolist()
    assert source["caption"] == [digit_captions(label) for label in labels[:12]]
    np.testing.assert_array_equal(np.asarray(source[5]["image"].convert("L")), images[5])
    assert digit_captions(8) == ["a handwritten digit eight", "the number eight", "a drawing of an eight"]
    # Every digit's captions differ from every other's (words, since tiny-clip's tokenizer knows no numerals).
    assert len({caption for digit in range(10) for caption in digit_captions(digit)}) == 30

    record = describe_source(DIGITS_CAPTIONS_DATASET, caption_column="caption")
    plain = describe_source("digits")
    assert record["dataset"] == DIGITS_CAPTIONS_DATASET and record["caption_column"] == "caption"
    assert record["fingerprint"].startswith(plain["fingerprint"]) and record["fingerprint"] != plain["fingerprint"]
    assert describe_source(DIGITS_CAPTIONS_DATASET, caption_column="caption") == record


def test_bad_caption_column_names_the_available_columns():
    source = image_dataset(["a", "b"])
    with pytest.raises(ValueError, match=r"no caption column 'caption' \(columns: \['img', 'text'\]\).*--caption_col"):
        load_image_source(source, image_column="img", caption_column="caption")
    # Captioned data needs no label; a label column named otherwise than the default must exist.
    assert load_image_source(source, image_column="img", caption_column="text").column_names == ["image", "caption"]
    with pytest.raises(ValueError, match=r"no label column 'cls' \(columns: \['img', 'text'\]\)"):
        load_image_source(source, image_column="img", label_column="cls", caption_column="text")
    with pytest.raises(ValueError, match="needs a label column .* or a caption column"):
        load_image_source(source, image_column="img", label_column=None)


def test_caption_folder_with_metadata_jsonl(tmp_path):
    """A local folder of images and a metadata.jsonl with a caption list column (datasets' imagefolder)."""
    folder = tmp_path / "pets"
    folder.mkdir()
    rows = [("cat.png", ["a cat", "a pet"]), ("dog.png", ["a dog"]), ("fox.png", ["a fox", "red", "wild"])]
    for index, (name, _) in enumerate(rows):
        PIL.Image.fromarray(np.full((12, 10, 3), 40 * index, np.uint8)).save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, c in rows))
    source = load_image_source(folder, caption_column="text")
    assert source.column_names == ["image", "caption"]
    assert sorted(map(tuple, source["caption"])) == sorted(tuple(captions) for _, captions in rows)

    cache = build_latent_cache(
        folder, tmp_path / "cache", None, 8, caption_column="text", num_workers=0, show_progress=False
    )
    info = read_cache_info(cache)
    assert (info.num_samples, info.num_captions, info.num_classes, info.text_encoder) == (3, 6, 0, None)
    assert info.source["kind"] == "local folder" and str(tmp_path) not in (cache / "cache_info.json").read_text()
    batch = next(iter(make_train_dataloader(load_latent_cache(cache), 3)))
    assert set(batch) == {"image", "caption"} and all(isinstance(caption, str) for caption in batch["caption"])
    with pytest.raises(ValueError, match="holds no text features"):
        load_empty_text_features(cache)


def test_coco_annotations_become_a_caption_folder(tmp_path):
    images = tmp_path / "train2014"
    images.mkdir()
    for name in ("COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg", "no_caption.jpg"):
        PIL.Image.fromarray(np.zeros((16, 12, 3), np.uint8)).save(images / name)
    annotations = {
        "images": [
            {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"},
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
            {"id": 7, "file_name": "no_caption.jpg"},
        ],
        "annotations": [
            {"image_id": 9, "id": 12, "caption": "A plate of food. "},
            {"image_id": 25, "id": 3, "caption": "A giraffe eating."},
            {"image_id": 9, "id": 5, "caption": "Broccoli on a plate"},
        ],
    }
    annotations_file = tmp_path / "captions_train2014.json"
    annotations_file.write_text(json.dumps(annotations))
    write_coco_captions_metadata(annotations_file, images)
    source = load_image_source(images, caption_column=COCO_CAPTION_COLUMN)
    by_file = {Path(row["image"].filename).name: row["caption"] for row in source}
    assert by_file == {
        "COCO_train2014_000000000025.jpg": ["A giraffe eating."],
        "COCO_train2014_000000000009.jpg": ["Broccoli on a plate", "A plate of food. "],  # annotation-id order
    }
    with pytest.raises(ValueError, match="not a COCO captions file"):
        write_coco_captions_metadata(tmp_path / "train2014" / "metadata.jsonl", images)


# --- caption caches ------------------------------------------------------------------------------------------------


def test_digits_caption_cache_stores_every_caption_and_its_features(digits_caption_cache, tiny_clip):
    info = read_cache_info(digits_caption_cache)
    assert info.has_captions and info.has_text_features and info.pixel_space
    assert (info.caption_column, info.num_captions, info.num_classes) == ("caption", 3 * NUM_DIGITS, 10)
    assert (info.text_encoder, info.text_features_shape) == ("tiny-clip", [TINY_CLIP_MAX_LENGTH, TINY_CLIP_WIDTH])
    assert info.shard_num_samples == [20, 20, 8] and info.source["caption_column"] == "caption"
    # The record holds no path of this machine, and reads back as it was written.
    text = (digits_caption_cache / "cache_info.json").read_text()
    assert str(digits_caption_cache.parent) not in text and "hf-home" not in text
    assert LatentCacheInfo.from_json(info.to_json()) == info
    assert cache_text_encoder_matches(info, "tiny-clip")

    cache = load_latent_cache(digits_caption_cache)
    assert cache.features["text_features"].dtype == "float16"
    _, labels = load_digits_arrays()
    for index in (0, 19, 20, 47):  # first and last rows of shards
        row = cache[index]
        assert row["caption"] == digit_captions(labels[index]) and int(row["label"]) == labels[index]
        expected = features_of(tiny_clip, row["caption"])
        torch.testing.assert_close(row["text_features"], expected, rtol=0, atol=0)

    empty = load_empty_text_features(digits_caption_cache)
    assert empty.shape == (1, TINY_CLIP_MAX_LENGTH, TINY_CLIP_WIDTH) and empty.dtype == torch.float32
    torch.testing.assert_close(empty, features_of(tiny_clip, [""]), rtol=0, atol=0)


def test_caption_cache_checks_its_source(digits_caption_cache):
    check_cache_source(digits_caption_cache, DIGITS_CAPTIONS_DATASET, max_samples=NUM_DIGITS, caption_column="caption")
    with pytest.raises(ValueError, match="caption_column 'caption' -> None"):
        check_cache_source(digits_caption_cache, DIGITS_CAPTIONS_DATASET, max_samples=NUM_DIGITS)
    with pytest.raises(ValueError, match="was built from another source: the source differs: dataset"):
        check_cache_source(digits_caption_cache, "digits", max_samples=NUM_DIGITS, caption_column="caption")


def test_loader_features_are_the_drawn_captions(digits_caption_cache, tiny_clip):
    loader = make_train_dataloader(load_latent_cache(digits_caption_cache), 16, seed=3)
    order = loader.batch_sampler.sampler.order()
    batches = list(loader)
    assert len(batches) == 3
    for start, batch in zip(range(0, NUM_DIGITS, 16), batches):
        assert set(batch) == {"image", "label", "caption", "text_features"}
        assert batch["text_features"].shape == (16, TINY_CLIP_MAX_LENGTH, TINY_CLIP_WIDTH)
        assert batch["text_features"].dtype == torch.float32
        _, labels = load_digits_arrays()
        assert batch["label"].tolist() == labels[order[start : start + 16]].tolist()
        assert all(caption in digit_captions(label) for caption, label in zip(batch["caption"], batch["label"]))
        torch.testing.assert_close(batch["text_features"], features_of(tiny_clip, batch["caption"]), rtol=0, atol=0)
    # All three templates are drawn.
    drawn = {caption.split()[1] for batch in batches for caption in batch["caption"]}
    assert drawn == {"handwritten", "number", "drawing"}


def test_loader_reads_selected_rows_and_works_in_worker_processes(digits_caption_cache):
    cache = load_latent_cache(digits_caption_cache)
    # A shuffled selection maps its rows to the shards' through an indices table; features follow the captions.
    subset = cache.shuffle(seed=0).select(range(10))
    batches = LatentCacheBatches(subset)
    batch = batches.__getitems__([(3, False, 0.99), (7, False, 0.0)])
    for position, (row, pick) in enumerate([(subset[3], 2), (subset[7], 0)]):
        assert batch["caption"][position] == row["caption"][pick]
        torch.testing.assert_close(batch["text_features"][position], row["text_features"][pick], rtol=0, atol=0)
    # Workers get a pickled copy, which rebuilds its memory-mapped views.
    in_process = list(make_train_dataloader(cache, 16, seed=4))
    in_workers = list(make_train_dataloader(cache, 16, seed=4, num_workers=1))
    for expected, actual in zip(in_process, in_workers, strict=True):
        assert actual["caption"] == expected["caption"]
        torch.testing.assert_close(actual["text_features"], expected["text_features"], rtol=0, atol=0)


def captions_by_index(loader, epoch: int) -> dict[int, str]:
    loader.batch_sampler.set_epoch(epoch)
    order = loader.batch_sampler.sampler.order().tolist()
    captions = [caption for batch in loader for caption in batch["caption"]]
    return dict(zip(order, captions))


def test_caption_draw_depends_only_on_seed_epoch_and_index(digits_caption_cache):
    cache = load_latent_cache(digits_caption_cache)
    loader = make_train_dataloader(cache, 8, seed=0)
    epoch_0, epoch_1 = captions_by_index(loader, 0), captions_by_index(loader, 1)
    assert epoch_0 == captions_by_index(make_train_dataloader(cache, 8, seed=0), 0)
    assert sum(epoch_0[index] != epoch_1[index] for index in epoch_0) > NUM_DIGITS // 3
    assert epoch_0 != captions_by_index(make_train_dataloader(cache, 8, seed=1), 0)
    # Neither the order nor the batch size changes which caption a sample gets.
    assert captions_by_index(make_train_dataloader(cache, 16, seed=0, shuffle=False), 0) == epoch_0


def test_resumed_loader_sees_the_same_captions(digits_caption_cache):
    cache = load_latent_cache(digits_caption_cache)
    uninterrupted = make_train_dataloader(cache, 8, seed=5)
    uninterrupted.batch_sampler.set_epoch(2)
    expected = list(uninterrupted)
    resumed = make_train_dataloader(cache, 8, seed=5)
    resumed.batch_sampler.set_epoch(2)
    got = list(skip_first_batches(resumed, 2))
    assert len(got) == len(expected) - 2
    for actual, reference in zip(got, expected[2:]):
        assert actual["caption"] == reference["caption"]
        torch.testing.assert_close(actual["text_features"], reference["text_features"], rtol=0, atol=0)
        torch.testing.assert_close(actual["image"], reference["image"], rtol=0, atol=0)


@pytest.mark.parametrize("as_list", [False, True])
def test_in_memory_caption_dataset(tmp_path, tiny_clip, as_list):
    """A caption column of strings (one per image) or of lists of strings (one to three per image), no labels."""
    captions = ["a red cat", "a blue dog", "a green fox", "a black owl", "a white hen", "a grey cow"]
    if as_list:
        captions = [
            [caption, caption.upper()][: 1 + index % 2] + ["x"] * (index % 3 == 2)
            for index, caption in enumerate(captions)
        ]
    source = image_dataset(captions)
    cache = build_latent_cache(
        source,
        tmp_path / "cache",
        None,
        8,
        image_column="img",
        caption_column="text",
        text_encoder="tiny-clip",
        shard_size=4,
        num_workers=0,
        show_progress=False,
    )
    info = read_cache_info(cache)
    expected_rows = [row if as_list else [row] for row in captions]
    assert info.num_classes == 0 and info.id2label is None
    assert info.num_captions == sum(map(len, expected_rows))
    assert info.source["kind"] == "in-memory" and info.source["fingerprint"] == source._fingerprint
    dataset = load_latent_cache(cache)
    assert "label" not in dataset.column_names and dataset["caption"] == expected_rows

    batch = next(iter(make_train_dataloader(dataset, 6, shuffle=False, seed=2)))
    assert set(batch) == {"image", "caption", "text_features"}
    assert all(caption in row for caption, row in zip(batch["caption"], expected_rows))
    torch.testing.assert_close(batch["text_features"], features_of(tiny_clip, batch["caption"]), rtol=0, atol=0)

    check_cache_source(cache, source, image_column="img", caption_column="text")
    changed = image_dataset(captions[::-1])
    with pytest.raises(ValueError, match="changed since the cache was started"):
        check_cache_source(cache, changed, image_column="img", caption_column="text")


def test_bad_captions_and_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Row 1 has caption \[\]: the caption column must hold a string or a"):
        build_latent_cache(
            image_dataset([["a cat"], [], ["a dog"]]),
            tmp_path / "empty",
            None,
            8,
            image_column="img",
            caption_column="text",
            num_workers=0,
            show_progress=False,
        )
    with pytest.raises(ValueError, match="text_encoder encodes captions: pass caption_column"):
        build_latent_cache("digits", tmp_path / "no-captions", None, 8, text_encoder="tiny-clip", show_progress=False)


def test_prepare_dataset_builds_a_caption_cache(tmp_path, capsys):
    script = load_script("training/prepare_dataset.py")
    output = tmp_path / "cache"
    script.main(
        [
            "--dataset", DIGITS_CAPTIONS_DATASET, "--caption_column", "caption", "--text_encoder", "tiny-clip",
            "--vae", "none", "--resolution", "8", "--max_samples", "10", "--num_workers", "0",
            "--output_dir", str(output),
        ]
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert (summary["num_samples"], summary["num_captions"], summary["num_classes"]) == (10, 30, 10)
    assert summary["text_encoder"] == "tiny-clip" and summary["text_features_shape"] == [
        TINY_CLIP_MAX_LENGTH,
        TINY_CLIP_WIDTH,
    ]
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "digits", "--output_dir", str(output), "--text_encoder", "tiny-clip"])
