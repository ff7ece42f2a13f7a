"""Sample generation for FID: ADM-layout npz, per-index reproducibility, resumption, balanced labels, CLI."""

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusers_repa.evaluation.generate import GENERATION_CONFIG_NAME, generate_samples, sample_labels
from diffusers_repa.evaluation.image_io import read_image_file
from diffusers_repa.pipelines.pipeline_sit import SiTPipeline
from diffusers_repa.schedulers.scheduling_sit_ode import SiTODEScheduler

from .conftest import load_script, tiny_sit_pipeline

SETTINGS = {"num_inference_steps": 3, "guidance_scale": 1.5, "guidance_interval": (0.0, 0.7), "show_progress": False}


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A saved 16 px pipeline: 2-block SiT on 8×8×4 latents, 10 classes, a two-level VAE."""
    path = tmp_path_factory.mktemp("tiny_pipeline")
    tiny_sit_pipeline(latent_size=8, depth=2, num_classes=10).save_pretrained(path)
    return path


def load_pngs(folder, count):
    return np.stack([read_image_file(Path(folder) / f"{i:06d}.png") for i in range(count)])


def test_generate_writes_adm_npz_and_pngs(tiny_pipeline_dir, tmp_path):
    npz_path = generate_samples(
        tiny_pipeline_dir, tmp_path / "samples", num_samples=6, batch_size=4, seed=3, **SETTINGS
    )
    assert npz_path == tmp_path / "samples.npz"
    with np.load(npz_path) as stored:
        images, labels = stored["arr_0"], stored["arr_1"]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, load_pngs(tmp_path / "samples", 6))
    np.testing.assert_array_equal(labels, sample_labels(6, 10, seed=3))
    assert images.std() > 0 and not np.array_equal(images[0], images[1])
    assert (tmp_path / "samples" / GENERATION_CONFIG_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir() if p.name.startswith(".")) == []


def test_samples_depend_only_on_seed_and_index(tiny_pipeline_dir, tmp_path):
    reference = generate_samples(tiny_pipeline_dir, tmp_path / "a", num_samples=5, batch_size=5, **SETTINGS)
    # One process of two writes the odd indices, then a single process fills in the rest.
    second_of_two = SimpleNamespace(
        device=torch.device("cpu"),
        process_index=1,
        num_processes=2,
        is_main_process=False,
        autocast=contextlib.nullcontext,
        wait_for_everyone=lambda: None,
    )
    assert (
        generate_samples(tiny_pipeline_dir, tmp_path / "b", num_samples=5, accelerator=second_of_two, **SETTINGS)
        is None
    )
    assert sorted(p.name for p in (tmp_path / "b").glob("*.png")) == ["000001.png", "000003.png"]
    resumed = generate_samples(tiny_pipeline_dir, tmp_path / "b", num_samples=5, batch_size=1, **SETTINGS)
    with np.load(reference) as expected, np.load(resumed) as actual:
        np.testing.assert_array_equal(actual["arr_0"], expected["arr_0"])
        np.testing.assert_array_equal(actual["arr_1"], expected["arr_1"])
    # The first samples of a longer run are the same samples.
    longer = generate_samples(tiny_pipeline_dir, tmp_path / "c", num_samples=7, batch_size=3, **SETTINGS)
    with np.load(reference) as expected, np.load(longer) as actual:
        np.testing.assert_array_equal(actual["arr_0"][:5], expected["arr_0"])


def test_killed_run_resumes_without_duplicates_or_gaps(tiny_pipeline_dir, tmp_path, monkeypatch):
    uninterrupted = generate_samples(tiny_pipeline_dir, tmp_path / "full", num_samples=7, batch_size=3, **SETTINGS)
    original_call = SiTPipeline.__call__
    calls = []

    def dies_on_second_batch(self, *args, **kwargs):
        calls.append(list(kwargs["class_labels"]))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(SiTPipeline, "__call__", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_samples(tiny_pipeline_dir, tmp_path / "run", num_samples=7, batch_size=3, **SETTINGS)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert not (tmp_path / "run.npz").exists()

    calls.clear()

    def records_batches(self, *args, **kwargs):
        calls.append(list(kwargs["class_labels"]))
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(SiTPipeline, "__call__", records_batches)
    resumed = generate_samples(tiny_pipeline_dir, tmp_path / "run", num_samples=7, batch_size=3, **SETTINGS)
    labels = sample_labels(7, 10, seed=0)
    assert calls == [labels[3:6].tolist(), labels[6:7].tolist()]  # only indices 3..6, once each
    with np.load(uninterrupted) as expected, np.load(resumed) as actual:
        np.testing.assert_array_equal(actual["arr_0"], expected["arr_0"])
    with pytest.raises(ValueError, match="guidance_scale"):
        generate_samples(tiny_pipeline_dir, tmp_path / "run", num_samples=7, **{**SETTINGS, "guidance_scale": 4.0})


def test_label_sampling():
    balanced = sample_labels(50, 10, seed=1, label_sampling="equal")
    np.testing.assert_array_equal(np.bincount(balanced, minlength=10), np.full(10, 5))
    assert not np.array_equal(balanced, np.sort(balanced))
    np.testing.assert_array_equal(np.bincount(sample_labels(23, 10, 0, "equal"), minlength=10), [3, 3, 3] + [2] * 7)
    uniform = sample_labels(2000, 10, seed=1)
    assert set(np.unique(uniform)) == set(range(10)) and np.bincount(uniform).min() > 150
    np.testing.assert_array_equal(sample_labels(30, 10, seed=1)[:12], sample_labels(12, 10, seed=1))
    assert not np.array_equal(sample_labels(30, 10, seed=1), sample_labels(30, 10, seed=2))
    with pytest.raises(ValueError, match="label_sampling"):
        sample_labels(10, 10, 0, "balanced")


def test_balanced_generation_and_ode_sampler(tiny_pipeline_dir, tmp_path):
    pipeline = SiTPipeline.from_pretrained(tiny_pipeline_dir)
    npz_path = generate_samples(
        pipeline,
        tmp_path / "ode",
        num_samples=20,
        batch_size=20,
        sampler="ode",
        heun=True,
        label_sampling="equal",
        **SETTINGS,
    )
    assert isinstance(pipeline.scheduler, SiTODEScheduler) and pipeline.scheduler.config.solver == "heun"
    with np.load(npz_path) as stored:
        np.testing.assert_array_equal(np.bincount(stored["arr_1"], minlength=10), np.full(10, 2))
    with pytest.raises(ValueError, match="ODE solver option"):
        generate_samples(pipeline, tmp_path / "bad", num_samples=2, sampler="sde", heun=True, **SETTINGS)


def test_generate_cli(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    script = load_script("pipelines/generate.py")
    compile_modes = []
    compile_transformer = SiTPipeline.compile_transformer

    def recording_compile(pipeline, mode):
        compile_modes.append(mode)
        compile_transformer(pipeline, mode)

    monkeypatch.setattr(SiTPipeline, "compile_transformer", recording_compile)
    script.main(
        [
            "--pipeline",
            str(tiny_pipeline_dir),
            "--output_dir",
            str(tmp_path / "out"),
            "--num_samples",
            "3",
            "--steps",
            "2",
            "--guidance_scale",
            "1.8",
            "--guidance_interval",
            "0",
            "0.7",
            "--npz",
            str(tmp_path / "s.npz"),
            "--compile",
            "blocks",
        ]
    )
    assert "Wrote 3 samples" in capsys.readouterr().out
    assert compile_modes == ["blocks"]
    eager = generate_samples(
        tiny_pipeline_dir,
        tmp_path / "eager",
        num_samples=3,
        num_inference_steps=2,
        guidance_scale=1.8,
        guidance_interval=(0.0, 0.7),
        show_progress=False,
    )
    with np.load(tmp_path / "s.npz") as stored, np.load(eager) as expected:
        assert stored["arr_0"].shape == (3, 16, 16, 3)
        # The compiled blocks may round differently: at most one step of uint8 apart.
        difference = np.abs(stored["arr_0"].astype(np.int16) - expected["arr_0"].astype(np.int16))
        assert difference.max() <= 1
        np.testing.assert_array_equal(stored["arr_1"], expected["arr_1"])
