"""ADM preprocessing, image sources, the VAE latent cache (build, resume, multi-process, streaming, push, source
fingerprints, portable metadata, load errors) and loader."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from diffusers import AutoencoderKL
from huggingface_hub import DatasetCard
from huggingface_hub.errors import GatedRepoError
from safetensors.numpy import load_file

from diffusers_repa.data import (
    CACHE_INFO_FILE,
    SKIPPED_REPORT_FILE,
    cache_vae_matches,
    center_crop_imagenet,
    check_cache_source,
    describe_source,
    load_image_source,
    load_latent_cache,
    make_train_dataloader,
    push_latent_cache_to_hub,
    read_cache_info,
    synthetic_class_dataset,
)
from diffusers_repa.data import latent_cache as latent_cache_module
from diffusers_repa.data import sources as sources_module
from diffusers_repa.data.latent_cache import build_latent_cache
from diffusers_repa.models.tiny_vae import save_tiny_random_vae, tiny_random_vae

from .conftest import REPA_REFERENCE, REPO_ROOT, load_script


@pytest.fixture(scope="module")
def adm_reference() -> dict[str, np.ndarray]:
    return load_file(str(REPA_REFERENCE / "adm_center_crop.safetensors"))


def _noise_image(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, adm_reference) -> Path:
    """Two classes of odd-sized images in every mode the cache must handle, the ADM fixture inputs as PNG, and one
    truncated JPEG."""
    root = tmp_path_factory.mktemp("imagefolder")
    alpha, beta = root / "alpha", root / "beta"
    alpha.mkdir()
    beta.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        folder = alpha if index < 2 else beta
        PIL.Image.fromarray(adm_reference[f"input_{index}"]).save(folder / f"adm_{index}.png")
    PIL.Image.fromarray(_noise_image(rng, 301, 227)).save(alpha / "rgb.jpg", quality=90)
    PIL.Image.fromarray(_noise_image(rng, 93, 181, channels=1)).save(alpha / "gray.png")
    PIL.Image.fromarray(_noise_image(rng, 271, 263, channels=4)).save(beta / "rgba.png")
    palette = PIL.Image.fromarray(_noise_image(rng, 199, 317)).convert("P")
    palette.info["transparency"] = 0
    palette.save(beta / "palette.png", transparency=0)
    PIL.Image.fromarray(_noise_image(rng, 333, 241)).convert("CMYK").save(beta / "cmyk.jpg")
    PIL.Image.fromarray(_noise_image(rng, 280, 300)).save(beta / "truncated.jpg")
    data = (beta / "truncated.jpg").read_bytes()
    (beta / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    save_tiny_random_vae(path)
    return path


def _source_paths(folder: Path) -> list[str]:
    """Paths of the imagefolder rows, in source order."""
    source = load_image_source(folder).cast_column("image", datasets.Image(decode=False))
    return [value["path"] for value in source["image"]]


@pytest.fixture(scope="module")
def cache_256(tmp_path_factory, image_folder, vae_dir) -> Path:
    output = tmp_path_factory.mktemp("cache") / "cache_256"
    build_latent_cache(image_folder, output, vae_dir, 256, batch_size=3, shard_size=4, num_workers=2)
    return output


_SMALL_BUILD = {"batch_size": 2, "shard_size": 2, "num_workers": 0, "show_progress": False}


@pytest.fixture(scope="module")
def cache_32(tmp_path_factory, image_folder, vae_dir) -> Path:
    """The uninterrupted single-process reference at 32 px, 5 shards of 2 source rows."""
    return build_latent_cache(image_folder, tmp_path_factory.mktemp("cache") / "cache_32", vae_dir, 32, **_SMALL_BUILD)


def _cache_arrays(path: Path) -> dict[str, np.ndarray]:
    return {name: column.numpy() for name, column in load_latent_cache(path)[:].items()}


def _assert_same_cache(path_a: Path, path_b: Path) -> None:
    arrays_a, arrays_b = _cache_arrays(path_a), _cache_arrays(path_b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    # Everything but the shards' names and sizes (a streamed cache has its own shards per process).
    assert dataclasses.replace(read_cache_info(path_a), shards=[], shard_num_samples=None) == dataclasses.replace(
        read_cache_info(path_b), shards=[], shard_num_samples=None
    )
    skipped_a = json.loads((path_a / SKIPPED_REPORT_FILE).read_text())
    skipped_b = json.loads((path_b / SKIPPED_REPORT_FILE).read_text())
    assert [entry["path"] for entry in skipped_a] == [entry["path"] for entry in skipped_b]


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("as_pil", [False, True])
def test_center_crop_matches_adm_fixture_exactly(adm_reference, as_pil):
    for index in range(4):
        image = adm_reference[f"input_{index}"]
        crop = center_crop_imagenet(PIL.Image.fromarray(image) if as_pil else image, 256)
        assert crop.dtype == np.uint8 and crop.shape == (256, 256, 3)
        np.testing.assert_array_equal(crop, adm_reference[f"output_{index}_256"])
    np.testing.assert_array_equal(center_crop_imagenet(adm_reference["input_3"], 512), adm_reference["output_3_512"])


def test_center_crop_converts_every_mode_to_rgb():
    rng = np.random.default_rng(1)
    rgb = _noise_image(rng, 70, 90)
    gray = _noise_image(rng, 70, 90, channels=1)
    gray_crop = center_crop_imagenet(gray, 32)
    assert gray_crop.shape == (32, 32, 3)
    np.testing.assert_array_equal(gray_crop, center_crop_imagenet(np.repeat(gray[:, :, None], 3, axis=2), 32))
    np.testing.assert_array_equal(center_crop_imagenet(gray[:, :, None], 32), gray_crop)
    rgba = np.concatenate([rgb, _noise_image(rng, 70, 90, channels=1)[:, :, None]], axis=2)
    np.testing.assert_array_equal(center_crop_imagenet(rgba, 32), center_crop_imagenet(rgb, 32))
    for mode in ("CMYK", "P", "LA"):
        image = PIL.Image.fromarray(rgb).convert(mode)
        np.testing.assert_array_equal(center_crop_imagenet(image, 32), center_crop_imagenet(image.convert("RGB"), 32))


def test_center_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        center_crop_imagenet(np.zeros((40, 40, 3), dtype=np.float32), 32)
    with pytest.raises(ValueError, match="channels"):
        center_crop_imagenet(np.zeros((40, 40, 2), dtype=np.uint8), 32)
    with pytest.raises(ValueError, match="positive integer"):
        center_crop_imagenet(np.zeros((40, 40, 3), dtype=np.uint8), 0)


# ---------------------------------------------------------------- sources


def test_load_image_source_renames_columns_and_limits_rows():
    source = datasets.Dataset.from_dict(
        {"img": [PIL.Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)], "cls": [4, 3, 2, 1, 0], "extra": [0] * 5}
    )
    loaded = load_image_source(source, image_column="img", label_column="cls", max_samples=3)
    assert loaded.column_names == ["image", "label"] and loaded["label"] == [4, 3, 2]
    streamed = load_image_source(source, image_column="img", label_column="cls", streaming=True, max_samples=2)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["label"] for row in streamed] == [4, 3]
    with pytest.raises(ValueError, match="no label column 'label'.*--label_column"):
        load_image_source(source, image_column="img")


def test_load_image_source_imagenet_alias_and_gated_error(monkeypatch):
    requested = []

    def refuse(path, **kwargs):
        requested.append(path)
        response = SimpleNamespace(status_code=401, headers={}, request=None)
        raise GatedRepoError("Access to dataset ILSVRC/imagenet-1k is restricted.", response=response)

    monkeypatch.setattr(sources_module.datasets, "load_dataset", refuse)
    with pytest.raises(PermissionError, match=r"accept its terms.*hf auth login.*huggingface-cli login"):
        load_image_source("imagenet-1k")
    assert requested == ["ILSVRC/imagenet-1k"]

    def refuse_through_datasets(path, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' is a gated dataset on the Hub.")

    monkeypatch.setattr(sources_module.datasets, "load_dataset", refuse_through_datasets)
    with pytest.raises(PermissionError, match="huggingface.co/datasets/user/gated"):
        load_image_source("user/gated")


# ---------------------------------------------------------------- latent cache


def test_cache_crops_match_fixture_and_latents_match_vae(cache_256, image_folder, vae_dir, adm_reference):
    paths = _source_paths(image_folder)
    readable = [path for path in paths if not path.endswith("truncated.jpg")]
    arrays = _cache_arrays(cache_256)
    assert len(arrays["image"]) == len(readable) == len(paths) - 1
    assert arrays["image"].shape[1:] == (3, 256, 256)

    expected_crops = []
    for path in readable:
        name = Path(path).stem
        if name.startswith("adm_"):
            expected_crops.append(adm_reference[f"output_{name[4:]}_256"])
        else:
            expected_crops.append(center_crop_imagenet(PIL.Image.open(path), 256))
    np.testing.assert_array_equal(arrays["image"], np.stack(expected_crops).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(arrays["label"], [0 if "/alpha/" in path else 1 for path in readable])

    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(arrays["image"]).float() / 127.5 - 1).latent_dist
    # Only float32 summation order differs (the cache encoded other batch compositions): about 1e-5 at most.
    np.testing.assert_allclose(arrays["latent_mean"], posterior.mean.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(arrays["latent_std"], posterior.std.numpy(), rtol=1e-4, atol=1e-4)
    assert arrays["latent_mean"].shape[1:] == (4, 32, 32)


def test_cache_info_and_skip_report(cache_256, image_folder, vae_dir):
    info = read_cache_info(cache_256)
    assert info.vae == "tiny-vae" and len(info.vae_hash) == 64 and not info.pixel_space
    assert info.source == describe_source(image_folder)
    assert info.source["dataset"] == image_folder.name and info.source["kind"] == "local folder"
    assert (info.resolution, info.latent_channels, info.latent_size) == (256, 4, 32)
    assert info.scaling_factor == pytest.approx(0.18215) and info.shift_factor is None
    assert info.num_classes == 2 and info.id2label == {0: "alpha", 1: "beta"}
    assert info.num_samples == len(load_latent_cache(cache_256)) and info.num_skipped == 1
    assert all((cache_256 / shard).is_file() for shard in info.shards) and len(info.shards) == 3
    skipped = json.loads((cache_256 / SKIPPED_REPORT_FILE).read_text())
    rows_per_shard = [4, 4, 2]  # 10 source rows, shard_size 4; the truncated image is missing from its shard
    rows_per_shard[skipped[0]["index"] // 4] -= 1
    assert info.shard_num_samples == rows_per_shard
    assert len(skipped) == 1 and skipped[0]["path"] == "beta/truncated.jpg"  # relative to the source folder
    assert "truncated" in skipped[0]["error"]
    assert Path(_source_paths(image_folder)[skipped[0]["index"]]) == image_folder / skipped[0]["path"]
    features = load_latent_cache(cache_256).features
    assert features["label"].names == ["alpha", "beta"]


def _string_values(value) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _string_values(item)]
    if isinstance(value, list):
        return [text for item in value for text in _string_values(item)]
    return [value] if isinstance(value, str) else []


def test_published_files_hold_no_absolute_path(cache_256, tmp_path_factory):
    machine_root = str(tmp_path_factory.getbasetemp())  # every local path of these tests lies under it
    for name in (CACHE_INFO_FILE, SKIPPED_REPORT_FILE):
        text = (cache_256 / name).read_text()
        assert machine_root not in text, name
        assert not [value for value in _string_values(json.loads(text)) if os.path.isabs(value)], name
    card = (cache_256 / "README.md").read_text()
    assert machine_root not in card and "`tiny-vae`" in card


def test_cache_vae_matches_by_content_not_location(cache_256, vae_dir, tmp_path):
    info = read_cache_info(cache_256)
    assert cache_vae_matches(info, vae_dir) and cache_vae_matches(info, str(vae_dir))
    moved = shutil.copytree(vae_dir, tmp_path / "renamed-vae")  # same weights elsewhere, under another name
    assert cache_vae_matches(info, moved)
    torch.manual_seed(1)
    other = tmp_path / "tiny-vae"  # same folder name, other weights
    AutoencoderKL(**AutoencoderKL.load_config(vae_dir)).save_pretrained(other)
    assert not cache_vae_matches(info, other)
    assert not cache_vae_matches(info, "stabilityai/sd-vae-ft-mse")
    assert not cache_vae_matches(info, None) and not cache_vae_matches(info, "none")

    hub = dataclasses.replace(info, vae="stabilityai/sd-vae-ft-mse", vae_hash=None)
    assert cache_vae_matches(hub, "stabilityai/sd-vae-ft-mse") and not cache_vae_matches(
        hub, "stabilityai/sd-vae-ft-ema"
    )
    assert not cache_vae_matches(hub, vae_dir)
    legacy = dataclasses.replace(info, vae=str(vae_dir.resolve()), vae_hash=None)  # format 1: absolute path, no hash
    assert cache_vae_matches(legacy, vae_dir) and not cache_vae_matches(legacy, moved)
    pixels = dataclasses.replace(info, vae=None, vae_hash=None)
    assert pixels.pixel_space and cache_vae_matches(pixels, None) and cache_vae_matches(pixels, "NONE")
    assert not cache_vae_matches(pixels, vae_dir)


def test_vae_objects_are_recorded_by_the_folder_they_came_from(tmp_path, vae_dir):
    source = synthetic_class_dataset(num_classes=2, samples_per_class=1, resolution=32)
    settings = {"num_workers": 0, "show_progress": False}
    loaded = build_latent_cache(source, tmp_path / "loaded", AutoencoderKL.from_pretrained(vae_dir), 32, **settings)
    info = read_cache_info(loaded)
    assert info.vae == "tiny-vae" and cache_vae_matches(info, vae_dir)
    in_memory = build_latent_cache(source, tmp_path / "in_memory", tiny_random_vae(), 32, **settings)
    info = read_cache_info(in_memory)
    assert (info.vae, info.vae_hash) == ("in-memory AutoencoderKL", None) and not cache_vae_matches(info, vae_dir)
    moved_away = AutoencoderKL.from_pretrained(shutil.copytree(vae_dir, tmp_path / "gone-vae"))
    shutil.rmtree(tmp_path / "gone-vae")
    info = read_cache_info(build_latent_cache(source, tmp_path / "gone", moved_away, 32, **settings))
    assert (info.vae, info.vae_hash) == ("gone-vae", None)  # the folder's name only, never its absolute path


def _small_folder(root: Path) -> Path:
    """Two classes of three images each."""
    rng = np.random.default_rng(2)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for index in range(3):
            PIL.Image.fromarray(_noise_image(rng, 20, 24)).save(root / name / f"{index}.png")
    return root


def _crash_after_first_shard(monkeypatch) -> None:
    encode_shard = latent_cache_module._ShardEncoder.encode_shard
    calls = []

    def crash(self, job):
        calls.append(job.name)
        if len(calls) == 2:
            raise RuntimeError("simulated kill")
        encode_shard(self, job)

    monkeypatch.setattr(latent_cache_module._ShardEncoder, "encode_shard", crash)


def test_resume_refuses_an_edited_local_folder(tmp_path, monkeypatch):
    """One image deleted and another added (same count) between a killed build and its resume: refused."""
    folder = _small_folder(tmp_path / "pets")
    output = tmp_path / "cache"
    _crash_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated kill"):
        build_latent_cache(folder, output, None, 16, **_SMALL_BUILD)
    monkeypatch.undo()
    assert len(list((output / "data").glob("*.arrow"))) == 1 and not (output / CACHE_INFO_FILE).exists()

    (folder / "dogs" / "2.png").unlink()
    shutil.copy(folder / "cats" / "0.png", folder / "dogs" / "new.png")
    assert len(list(folder.rglob("*.png"))) == 6
    message = (
        rf"^{re.escape(str(output))} holds a latent cache started from another source: the local folder source "
        r"'pets' changed since the cache was started \(files added, removed or modified; fingerprint \w+ -> \w+\)\. "
        rf"Use a new cache folder \(--output_dir / --cache_dir\), or delete {re.escape(str(output))} to rebuild it\.$"
    )
    with pytest.raises(ValueError, match=message):
        build_latent_cache(folder, output, None, 16, **_SMALL_BUILD)

    # The fix the message names: a new folder builds from the edited source, and a finished cache is checked too.
    fresh = build_latent_cache(folder, tmp_path / "fresh", None, 16, **_SMALL_BUILD)
    check_cache_source(fresh, folder)
    moved = shutil.copytree(folder, tmp_path / "moved")  # copy2 keeps modification times: the same files
    check_cache_source(fresh, moved)
    build_latent_cache(moved, fresh, None, 16, **_SMALL_BUILD)  # and a rerun from the moved folder is accepted
    (moved / "cats" / "0.png").write_bytes((moved / "cats" / "1.png").read_bytes())
    with pytest.raises(ValueError, match=rf"^The latent cache {re.escape(str(fresh))} was built from another source"):
        check_cache_source(fresh, moved)
    with pytest.raises(ValueError, match="split 'train' -> 'validation'"):
        check_cache_source(fresh, folder, split="validation")


def test_resume_refuses_another_in_memory_dataset(tmp_path, monkeypatch):
    output = tmp_path / "cache"
    _crash_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated kill"):
        build_latent_cache(synthetic_class_dataset(2, 3, 16, seed=0), output, None, 16, **_SMALL_BUILD)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="in-memory source 'in-memory dataset' changed.*other content"):
        build_latent_cache(synthetic_class_dataset(2, 3, 16, seed=1), output, None, 16, **_SMALL_BUILD)
    # The same dataset made again (its fingerprint comes from its content) resumes.
    build_latent_cache(synthetic_class_dataset(2, 3, 16, seed=0), output, None, 16, **_SMALL_BUILD)
    check_cache_source(output, synthetic_class_dataset(2, 3, 16, seed=0))
    assert read_cache_info(output).num_samples == 6


def _copy_cache(cache: Path, destination: Path, keep_build: bool = True) -> Path:
    ignore = None if keep_build else shutil.ignore_patterns(".build")
    return Path(shutil.copytree(cache, destination, ignore=ignore))


def test_truncated_shard_error_names_the_file_and_the_fix(tmp_path, cache_32, image_folder, vae_dir):
    cache = _copy_cache(cache_32, tmp_path / "cache")
    shard = cache / read_cache_info(cache).shards[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"shard {re.escape(str(shard))} is corrupt or truncated.*delete.*rerun"):
        load_latent_cache(cache)

    # A stream cut exactly between record batches still parses, with fewer rows: caught by the recorded counts.
    table = pa.ipc.open_stream(data).read_all()
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(0, 1))
    with pytest.raises(ValueError, match=rf"shard {re.escape(str(shard))} holds 1 rows.*says 2.*truncated"):
        load_latent_cache(cache)

    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard {re.escape(str(shard))}.*is missing"):
        load_latent_cache(cache)
    # The fix the messages name: without the shard and cache_info.json the same build re-encodes only that shard.
    (cache / CACHE_INFO_FILE).unlink()
    build_latent_cache(image_folder, cache, vae_dir, 32, **_SMALL_BUILD)
    _assert_same_cache(cache_32, cache)

    downloaded = _copy_cache(cache_32, tmp_path / "downloaded", keep_build=False)  # like a Hub snapshot
    shard = downloaded / read_cache_info(downloaded).shards[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}.*damaged.*download or build it again"):
        load_latent_cache(downloaded)


def test_malformed_cache_info_error_names_the_file(tmp_path, cache_32, image_folder, vae_dir):
    cache = _copy_cache(cache_32, tmp_path / "cache")
    info_file = cache / CACHE_INFO_FILE
    text = info_file.read_text()
    info_file.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(info_file))} is not a valid latent-cache info file"):
        read_cache_info(cache)
    payload = json.loads(text)
    del payload["resolution"]
    info_file.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=rf"{re.escape(str(info_file))} .*resolution.*rerun the build"):
        load_latent_cache(cache)
    settings_file = cache / ".build" / "settings.json"
    settings_file.write_text("{")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(settings_file))} is not valid JSON"):
        build_latent_cache(image_folder, cache, vae_dir, 32, **_SMALL_BUILD)


def test_killed_build_resumes_to_the_same_cache(tmp_path, image_folder, vae_dir, cache_32, monkeypatch):
    settings = _SMALL_BUILD

    encode_shard = latent_cache_module._ShardEncoder.encode_shard
    calls = []

    def crash_on_third_shard(self, job):
        calls.append(job.name)
        if len(calls) == 3:
            raise RuntimeError("simulated kill")
        encode_shard(self, job)

    monkeypatch.setattr(latent_cache_module._ShardEncoder, "encode_shard", crash_on_third_shard)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated kill"):
        build_latent_cache(image_folder, resumed, vae_dir, 32, **settings)
    finished = sorted((resumed / "data").glob("*.arrow"))
    assert len(finished) == 2 and not (resumed / CACHE_INFO_FILE).exists()
    with pytest.raises(FileNotFoundError, match="not a finished latent cache"):
        load_latent_cache(resumed)
    stamps = {path.name: path.stat().st_mtime_ns for path in finished}

    monkeypatch.setattr(latent_cache_module._ShardEncoder, "encode_shard", encode_shard)
    build_latent_cache(image_folder, resumed, vae_dir, 32, **settings)
    assert {path.name: path.stat().st_mtime_ns for path in finished} == stamps  # finished shards were kept
    assert not list(resumed.rglob("*.tmp"))
    _assert_same_cache(cache_32, resumed)

    with pytest.raises(ValueError, match="other settings.*resolution"):
        build_latent_cache(image_folder, resumed, vae_dir, 64, **settings)


class _FakeProcessState:
    """PartialState of one process out of `num_processes`; the others run before or after it, sequentially."""

    def __init__(self, process_index: int, num_processes: int):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = self.is_local_main_process = process_index == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def _build_as_process(monkeypatch, rank: int, *args, **kwargs) -> Path:
    monkeypatch.setattr(latent_cache_module, "PartialState", lambda cpu: _FakeProcessState(rank, 2))
    return build_latent_cache(*args, **kwargs)


def test_processes_encode_disjoint_shards(tmp_path, image_folder, vae_dir, cache_32, monkeypatch):
    build = (image_folder, tmp_path / "two_processes", vae_dir, 32)
    written = []
    encode_shard = latent_cache_module._ShardEncoder.encode_shard

    def record(self, job):
        written.append(job.name)
        encode_shard(self, job)

    monkeypatch.setattr(latent_cache_module._ShardEncoder, "encode_shard", record)
    with pytest.raises(RuntimeError, match="not finished"):  # process 1 has not written its shards yet
        _build_as_process(monkeypatch, 0, *build, **_SMALL_BUILD)
    assert written == ["train-00000-of-00005", "train-00002-of-00005", "train-00004-of-00005"]
    _build_as_process(monkeypatch, 1, *build, **_SMALL_BUILD)
    assert written[3:] == ["train-00001-of-00005", "train-00003-of-00005"]
    assert not (build[1] / CACHE_INFO_FILE).exists()  # only the main process finalizes
    _build_as_process(monkeypatch, 0, *build, **_SMALL_BUILD)
    assert len(written) == 5  # nothing re-encoded
    _assert_same_cache(cache_32, build[1])


def test_streaming_processes_split_the_stream(tmp_path, image_folder, vae_dir, cache_32, monkeypatch):
    build = (image_folder, tmp_path / "stream_two_processes", vae_dir, 32)
    with pytest.raises(RuntimeError, match="did not finish"):  # process 1 has not read its part of the stream
        _build_as_process(monkeypatch, 0, *build, streaming=True, **_SMALL_BUILD)
    _build_as_process(monkeypatch, 1, *build, streaming=True, **_SMALL_BUILD)
    _build_as_process(monkeypatch, 0, *build, streaming=True, **_SMALL_BUILD)
    shards = read_cache_info(build[1]).shards
    assert {Path(shard).name[:15] for shard in shards} == {"train-p000of002", "train-p001of002"}
    # Same rows, grouped by process: match them to the single-process cache through the images.
    streamed, reference = _cache_arrays(build[1]), _cache_arrays(cache_32)
    order = [
        next(i for i, image in enumerate(reference["image"]) if np.array_equal(image, row))
        for row in streamed["image"]
    ]
    assert sorted(order) == list(range(len(reference["image"])))
    for name in reference:
        np.testing.assert_array_equal(streamed[name], reference[name][order], err_msg=name)
    monkeypatch.undo()  # back to one real process: resuming a stream needs the same process count
    with pytest.raises(ValueError, match="other settings.*streaming_processes"):
        build_latent_cache(*build, streaming=True, **_SMALL_BUILD)


@pytest.mark.slow
def test_prepare_dataset_cli_with_two_real_processes(tmp_path, image_folder, vae_dir):
    """torchrun with two CPU processes (a gloo group, as `accelerate launch --cpu` makes) writes the same cache."""
    output = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    command += [
        str(REPO_ROOT / "training" / "prepare_dataset.py"),
        "--dataset",
        str(image_folder),
        "--vae",
        str(vae_dir),
    ]
    command += ["--output_dir", str(output), "--shard_size", "2", "--batch_size", "2", "--num_workers", "0"]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment, cwd=REPO_ROOT, capture_output=True)
    single = build_latent_cache(image_folder, tmp_path / "single", vae_dir, 256, **_SMALL_BUILD)
    shards = read_cache_info(output).shards
    assert len(shards) == 5 and read_cache_info(output) == read_cache_info(single)
    got, expected = _cache_arrays(output), _cache_arrays(single)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
    # One thread per process changes float32 summation order in the VAE.
    np.testing.assert_allclose(got["latent_mean"], expected["latent_mean"], rtol=1e-4, atol=1e-4)


def test_streaming_build_matches_map_style(tmp_path, image_folder, vae_dir, cache_32):
    settings = {**_SMALL_BUILD, "shard_size": 4, "num_workers": 2}
    streamed = build_latent_cache(image_folder, tmp_path / "stream", vae_dir, 32, streaming=True, **settings)
    _assert_same_cache(cache_32, streamed)
    assert read_cache_info(streamed).shards[0] == "data/train-p000of001-00000.arrow"


def test_cache_from_in_memory_dataset_and_push_to_hub(tmp_path, vae_dir, monkeypatch):
    source = synthetic_class_dataset(num_classes=3, samples_per_class=3, resolution=40)
    cache = build_latent_cache(source, tmp_path / "cache", vae_dir, 32, max_samples=7, show_progress=False)
    dataset = load_latent_cache(cache)
    assert dataset[:]["label"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    first = np.asarray(source[0]["image"])
    np.testing.assert_array_equal(dataset[0]["image"].numpy().transpose(1, 2, 0), center_crop_imagenet(first, 32))
    info = read_cache_info(cache)
    assert info.source["dataset"] == "in-memory dataset" and info.id2label[1] == "square-hue120"

    calls = {}
    monkeypatch.setattr(
        latent_cache_module, "create_repo", lambda repo_id, **kw: calls.setdefault("repo", (repo_id, kw))
    )
    monkeypatch.setattr(latent_cache_module, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    push_latent_cache_to_hub(cache, "user/latents", private=True)
    assert calls["repo"] == (
        "user/latents",
        {"repo_type": "dataset", "private": True, "token": None, "exist_ok": True},
    )
    upload = calls["upload"]
    assert upload["repo_id"] == "user/latents" and upload["repo_type"] == "dataset"
    assert Path(upload["folder_path"]) == cache and "data/*.arrow" in upload["allow_patterns"]
    assert {CACHE_INFO_FILE, SKIPPED_REPORT_FILE, "README.md"} <= set(upload["allow_patterns"])
    card = DatasetCard.load(cache / "README.md")  # the card tells the Hub (and load_dataset) where the shards are
    assert card.data.configs == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.arrow"}]}
    ]

    with pytest.raises(FileNotFoundError, match="not a finished latent cache"):
        push_latent_cache_to_hub(tmp_path, "user/latents")


def test_load_latent_cache_from_hub_snapshot(tmp_path, cache_32):
    """A pushed cache read back by its Hub id, served offline from a Hub cache layout."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--user--latents"
    shutil.copytree(cache_32, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(".build"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    info = read_cache_info("user/latents", cache_dir=tmp_path / "hub")
    assert info == read_cache_info(cache_32)
    _assert_same_batches(
        [load_latent_cache("user/latents", cache_dir=tmp_path / "hub")[:]], [load_latent_cache(cache_32)[:]]
    )
    with pytest.raises(FileNotFoundError, match="neither a latent-cache directory nor a Hub dataset id"):
        load_latent_cache(tmp_path / "missing" / "cache")


def test_mixed_precision_encoding_stays_close_to_float32(tmp_path, vae_dir):
    source = synthetic_class_dataset(num_classes=2, samples_per_class=2, resolution=32)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        build_latent_cache(source, tmp_path / "fp8", vae_dir, 32, mixed_precision="fp8")
    cache = build_latent_cache(source, tmp_path / "bf16", vae_dir, 32, mixed_precision="bf16", show_progress=False)
    arrays = _cache_arrays(cache)
    assert arrays["latent_mean"].dtype == np.float32
    with torch.no_grad():
        posterior = AutoencoderKL.from_pretrained(vae_dir).encode(torch.from_numpy(arrays["image"]) / 127.5 - 1)
    float32_mean = posterior.latent_dist.mean.numpy()
    assert not np.array_equal(arrays["latent_mean"], float32_mean)  # the encoder did run in bfloat16
    np.testing.assert_allclose(arrays["latent_mean"], float32_mean, atol=0.2)  # bfloat16 keeps ~3 digits


def test_prepare_dataset_cli(tmp_path, image_folder, vae_dir, monkeypatch, capsys):
    cli = load_script("training/prepare_dataset.py")
    pushed = []
    monkeypatch.setattr(cli, "push_latent_cache_to_hub", lambda path, repo_id, **kw: pushed.append(repo_id) or "url")
    output = tmp_path / "cli"
    argv = ["--dataset", str(image_folder), "--vae", str(vae_dir), "--output_dir", str(output), "--max_samples", "3"]
    cli.main([*argv, "--num_shards", "2", "--push_to_hub", "--hub_dataset_id", "user/cache"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 3 and summary["num_shards"] == 2 and summary["latent_shape"] == [4, 32, 32]
    assert pushed == ["user/cache"] and summary["hub_url"] == "url"
    with pytest.raises(
        ValueError, match="multiple of the VAE.s downsampling factor 8, got 36"
    ):  # any size it can take
        cli.main([*argv, "--resolution", "36", "--output_dir", str(tmp_path / "odd")])
    with pytest.raises(SystemExit):
        cli.parse_args([*argv, "--push_to_hub"])


def test_prepare_dataset_cli_builds_a_pixel_space_digits_cache(tmp_path, capsys):
    """`--dataset digits --vae none`: the script passes both through and the library needs nothing else."""
    cli = load_script("training/prepare_dataset.py")
    argv = ["--dataset", "digits", "--vae", "none", "--output_dir", str(tmp_path / "digits"), "--max_samples", "12"]
    cli.main([*argv, "--num_workers", "0"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["vae"] is None and summary["latent_shape"] == [3, 256, 256] and summary["num_classes"] == 10
    assert load_latent_cache(tmp_path / "digits").column_names == ["image", "label"]


# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory, vae_dir) -> Path:
    source = synthetic_class_dataset(num_classes=4, samples_per_class=5, resolution=32, seed=1)
    output = tmp_path_factory.mktemp("synthetic") / "cache"
    return build_latent_cache(source, output, vae_dir, 32, shard_size=8, show_progress=False)


def _batches(loader) -> list[dict[str, torch.Tensor]]:
    return [{name: value.clone() for name, value in batch.items()} for batch in loader]


def _rows(batches, name: str) -> torch.Tensor:
    return torch.cat([batch[name] for batch in batches])


def test_loader_batches_hold_cache_rows(synthetic_cache):
    dataset = load_latent_cache(synthetic_cache)
    loader = make_train_dataloader(dataset, batch_size=6, shuffle=False)
    batches = _batches(loader)
    assert len(batches) == len(loader) == 3  # 20 samples, last partial batch dropped
    batch = batches[0]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (6, 3, 32, 32)
    assert batch["latent_mean"].dtype == torch.float32 and batch["latent_std"].shape == (6, 4, 4, 4)
    assert batch["label"].dtype == torch.int64
    reference = dataset[:18]
    for name in ("image", "latent_mean", "latent_std", "label"):
        torch.testing.assert_close(_rows(batches, name), reference[name].to(batch[name].dtype), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_train_dataloader(dataset, batch_size=64)


def test_loader_order_depends_only_on_seed_and_epoch(synthetic_cache):
    dataset = load_latent_cache(synthetic_cache)
    row_of_image = {tuple(row.flatten()[:64].tolist()): i for i, row in enumerate(dataset[:]["image"])}

    def order(loader):
        return [row_of_image[tuple(row.flatten()[:64].tolist())] for row in _rows(_batches(loader), "image")]

    loader = make_train_dataloader(dataset, batch_size=4, seed=3)
    epoch_0, epoch_1 = order(loader), order(loader)  # the epoch advances after a full pass
    assert sorted(epoch_0) == list(range(20)) and epoch_0 != epoch_1
    again = make_train_dataloader(dataset, batch_size=4, seed=3)
    assert order(again) == epoch_0
    again.batch_sampler.set_epoch(1)
    assert order(again) == epoch_1
    assert order(make_train_dataloader(dataset, batch_size=4, seed=4)) != epoch_0
    workers = make_train_dataloader(dataset, batch_size=4, seed=3, num_workers=2)
    assert order(workers) == epoch_0


def test_hflip_mirrors_image_and_latents_together(synthetic_cache):
    dataset = load_latent_cache(synthetic_cache)
    plain = _batches(make_train_dataloader(dataset, batch_size=5, seed=7))
    flipped = _batches(make_train_dataloader(dataset, batch_size=5, seed=7, hflip=True))
    flips = []
    for batch_plain, batch_flipped in zip(plain, flipped):
        torch.testing.assert_close(batch_flipped["label"], batch_plain["label"])
        for i in range(5):
            is_flipped = not torch.equal(batch_flipped["image"][i], batch_plain["image"][i])
            for name in ("image", "latent_mean", "latent_std"):
                expected = batch_plain[name][i].flip(-1) if is_flipped else batch_plain[name][i]
                torch.testing.assert_close(batch_flipped[name][i], expected, rtol=0, atol=0)
            flips.append(is_flipped)
    assert any(flips) and not all(flips)
    assert _batches(make_train_dataloader(dataset, batch_size=5, seed=7, hflip=True))[0]["image"].equal(
        flipped[0]["image"]
    )


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for batch_got, batch_expected in zip(got, expected):
        for name in batch_expected:
            assert batch_got[name].equal(batch_expected[name]), name


def test_loader_shards_across_processes_and_resumes_with_accelerate(synthetic_cache):
    dataset = load_latent_cache(synthetic_cache)
    reference = make_train_dataloader(dataset, batch_size=4, seed=5)
    epoch_0, epoch_1 = _batches(reference), _batches(reference)  # 5 batches each
    # What accelerator.prepare does on each of 2 processes (device placement aside).
    processes = [
        prepare_data_loader(make_train_dataloader(dataset, batch_size=4, seed=5), num_processes=2, process_index=rank)
        for rank in range(2)
    ]
    for rank, loader in enumerate(processes):
        loader.set_epoch(0)
        _assert_same_batches(_batches(loader), epoch_0[rank:4:2])  # the incomplete last round is dropped
        loader.set_epoch(1)
        _assert_same_batches(_batches(loader), epoch_1[rank:4:2])
    for loader in processes:  # resume epoch 0 after one batch per process
        loader.set_epoch(0)
    _assert_same_batches(_batches(skip_first_batches(processes[0], 1)), epoch_0[2:3])
    _assert_same_batches(_batches(skip_first_batches(processes[1], 1)), epoch_0[3:4])


# ---------------------------------------------------------------- synthetic data


def test_synthetic_class_dataset_is_deterministic_and_class_dependent():
    dataset = synthetic_class_dataset(num_classes=4, samples_per_class=3, resolution=32, seed=0)
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset.features["label"].names == ["circle-hue000", "square-hue090", "triangle-hue180", "cross-hue270"]
    rows = dataset[:]
    assert rows["label"] == [0, 1, 2, 3] * 3
    images = np.stack([np.asarray(image) for image in rows["image"]]).astype(np.float64)
    assert images.shape == (12, 32, 32, 3)
    again = synthetic_class_dataset(num_classes=4, samples_per_class=3, resolution=32, seed=0)
    np.testing.assert_array_equal(np.asarray(again[5]["image"]), images[5])
    # The brightest pixels carry the class colour: same class close, different classes far apart.
    colours = np.stack([image.reshape(-1, 3)[image.reshape(-1, 3).sum(1).argsort()[-50:]].mean(0) for image in images])
    by_class = colours.reshape(3, 4, 3)
    within = np.abs(by_class - by_class.mean(0)).max()
    between = min(
        np.abs(by_class.mean(0)[a] - by_class.mean(0)[b]).max() for a in range(4) for b in range(4) if a != b
    )
    assert between > 4 * within
    with pytest.raises(ValueError, match="positive"):
        synthetic_class_dataset(num_classes=0, samples_per_class=1, resolution=32)
