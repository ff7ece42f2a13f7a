"""SiTPipeline's diffusers conventions (callbacks reading and changing guidance_scale, num_timesteps, interrupt) and
clear errors for bad inputs: in the pipeline, in check_pretrained_source, in evaluate_samples and in every script
under pipelines/ (one error line, exit status 2, before any model is loaded or sampled)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

from diffusers_repa.cli import run_cli
from diffusers_repa.models import SiTTransformer2DModel
from diffusers_repa.pipelines import SiTPipeline
from diffusers_repa.pretrained_paths import check_pretrained_source
from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

from .conftest import REPO_ROOT, load_script, tiny_sit_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe() -> SiTPipeline:
    """A 16 px pipeline on 8×8×4 latents, 10 classes, Euler ODE. The weights that adaLN-Zero starts at zero are drawn
    at random, so that the class (and hence guidance) changes the velocity."""
    pipeline = tiny_sit_pipeline(latent_size=8, depth=2, num_classes=10)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for parameter in pipeline.transformer.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    pipeline.scheduler = SiTODEScheduler()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    tiny_sit_pipeline(latent_size=8, depth=2, num_classes=10).save_pretrained(folder)
    return folder


def batch_sizes_of(pipeline: SiTPipeline, **kwargs) -> tuple[torch.Tensor, list[int]]:
    """The latent output of a call and the batch size of every transformer call in it."""
    sizes = []
    handle = pipeline.transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        return pipeline(**kwargs, output_type="latent").images, sizes
    finally:
        handle.remove()


class GuidanceCutoffCallback(PipelineCallback):
    """Turns guidance off after step ``int(num_timesteps · cutoff_step_ratio)``, as diffusers' CFG cut-off callbacks
    do for text pipelines."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        cutoff = self.config.cutoff_step_index
        if cutoff is None:
            cutoff = int(pipeline.num_timesteps * self.config.cutoff_step_ratio)
        if step_index == cutoff:
            pipeline._guidance_scale = 1.0
        return callback_kwargs


CALL = {"class_labels": [1, 2, 3], "num_inference_steps": 6, "latents": torch.randn(3, 4, 8, 8)}


def test_callback_turning_guidance_off_halfway_equals_a_shorter_guidance_interval(pipe):
    # Euler grid 1, 5/6, ..., 1/6: the cut-off after step int(6 · 0.5) = 3 leaves the steps at t ≥ 1/2 guided.
    seen = []

    def record(pipeline, step_index, timestep, callback_kwargs):
        seen.append((pipeline.num_timesteps, pipeline.guidance_scale, pipeline.do_classifier_free_guidance))
        return callback_kwargs

    callbacks = MultiPipelineCallbacks([GuidanceCutoffCallback(cutoff_step_ratio=0.5), PipelineRecorder(record)])
    cut, sizes = batch_sizes_of(pipe, **CALL, guidance_scale=3.0, callback_on_step_end=callbacks)
    assert sizes == [6, 6, 6, 6, 3, 3]
    assert seen == [(6, 3.0, True)] * 3 + [(6, 1.0, False)] * 3
    assert pipe.guidance_scale == 1.0 and not pipe.do_classifier_free_guidance

    interval, sizes = batch_sizes_of(pipe, **CALL, guidance_scale=3.0, guidance_interval=(0.4, 1.0))
    assert sizes == [6, 6, 6, 6, 3, 3]
    torch.testing.assert_close(cut, interval, rtol=0, atol=0)
    unguided = pipe(**CALL, output_type="latent").images
    assert not torch.allclose(cut, unguided)


class PipelineRecorder(PipelineCallback):
    """Calls a plain function, so that it can sit in `MultiPipelineCallbacks` next to a `PipelineCallback`."""

    tensor_inputs = ["latents"]

    def __init__(self, function):
        super().__init__()
        self.function = function

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return self.function(pipeline, step_index, timestep, callback_kwargs)


def test_callback_turning_guidance_on_equals_a_lower_guidance_interval(pipe):
    def guide_from_step_3(pipeline, step_index, timestep, callback_kwargs):
        if step_index == 2:
            pipeline._guidance_scale = 3.0
        return {}

    late, sizes = batch_sizes_of(pipe, **CALL, callback_on_step_end=guide_from_step_3)
    assert sizes == [3, 3, 3, 6, 6, 6]
    interval, _ = batch_sizes_of(pipe, **CALL, guidance_scale=3.0, guidance_interval=(0.0, 0.55))
    torch.testing.assert_close(late, interval, rtol=0, atol=0)


def test_diffusers_pipeline_tester_callback_checks(pipe):
    """What diffusers' PipelineTesterMixin.test_callback_cfg and test_callback_inputs ask of a pipeline."""

    def increase_guidance(pipeline, step_index, timestep, callback_kwargs):
        pipeline._guidance_scale += 1.0
        return callback_kwargs

    pipe([1], 3, guidance_scale=2.0, callback_on_step_end=increase_guidance, output_type="latent")
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps

    def zero_at_the_last_step(pipeline, step_index, timestep, callback_kwargs):
        assert set(callback_kwargs) == set(pipeline._callback_tensor_inputs)
        if step_index == pipeline.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    output = pipe(
        [1],
        3,
        callback_on_step_end=zero_at_the_last_step,
        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
        output_type="latent",
    )[0]
    assert output.abs().sum() == 0


def test_num_timesteps_counts_heun_calls_and_each_call_starts_afresh(pipe):
    steps = []

    def record(pipeline, step_index, timestep, callback_kwargs):
        steps.append((step_index, pipeline.num_timesteps, pipeline.interrupt))
        return {}

    pipe.scheduler = SiTODEScheduler(solver="heun")
    try:
        pipe([1], 3, callback_on_step_end=record, output_type="latent")
    finally:
        pipe.scheduler = SiTODEScheduler()
    assert steps == [(i, 5, False) for i in range(5)]


def test_interrupt_returns_the_state_of_the_last_step(pipe):
    states = []

    def stop_after_step_1(pipeline, step_index, timestep, callback_kwargs):
        states.append(callback_kwargs["latents"].clone())
        if step_index == 1:
            pipeline._interrupt = True
        return {}

    out, sizes = batch_sizes_of(pipe, class_labels=[4], num_inference_steps=4, callback_on_step_end=stop_after_step_1)
    assert sizes == [1, 1] and len(states) == 2 and pipe.interrupt
    torch.testing.assert_close(out, states[1], rtol=0, atol=0)
    _, sizes = batch_sizes_of(pipe, class_labels=[4], num_inference_steps=4)
    assert sizes == [1] * 4 and not pipe.interrupt


def test_callback_that_breaks_guidance_scale_is_named(pipe):
    def nan_guidance(pipeline, step_index, timestep, callback_kwargs):
        pipeline._guidance_scale = float("nan")
        return {}

    with pytest.raises(ValueError, match="guidance_scale set by callback_on_step_end must be a finite number"):
        pipe([1], 2, callback_on_step_end=nan_guidance, output_type="latent")
    with pytest.raises(
        ValueError, match=r"callback_on_step_end_tensor_inputs \['prompt_embeds'\] not in \['latents'\]"
    ):
        pipe([1], 2, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), output_type="latent")


def test_integer_arrays_and_one_generator_per_image(pipe):
    pipe.scheduler = SiTSDEScheduler()
    try:
        both = pipe(np.array([1, 2]), 3, generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
        second = pipe(np.array([2]), 3, generator=[torch.Generator().manual_seed(1)], output_type="np").images
    finally:
        pipe.scheduler = SiTODEScheduler()
    np.testing.assert_allclose(np.asarray(both[1]) / 255, second[0], atol=1 / 255 + 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
        ({"guidance_scale": "2"}, "guidance_scale must be a number, got str"),
        ({"guidance_interval": (float("nan"), 1.0)}, "guidance_interval must satisfy"),
        ({"guidance_interval": 0.5}, r"guidance_interval must be a pair"),
        ({"num_inference_steps": 2.0}, "num_inference_steps must be a positive integer"),
        ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, "latents contain NaN or infinite values"),
        ({"latents": torch.full((1, 4, 8, 8), float("inf"))}, "latents contain NaN or infinite values"),
        ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.int64)}, r"floating-point tensor .*got torch.int64"),
        ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.bool)}, "floating-point tensor"),
        ({"latents": np.zeros((1, 4, 8, 8))}, "latents must be a torch.Tensor"),
        ({"latents": torch.randn(1, 4, 4, 4)}, r"latents must have shape \(1, 4, 8, 8\)"),
        ({"generator": [torch.Generator()] * 3}, "generator is a list of 3 generators for 1 images"),
        ({"class_labels": {1: 2}}, "class_labels must be a class id, a class name, or a list or tensor"),
        ({"class_labels": {1, 2}}, "class_labels must be a class id"),
        ({"class_labels": None}, "class_labels is required"),
        ({"class_labels": torch.tensor([10])}, "10 is out of range: class ids go from 0 to 9"),
        ({"class_labels": np.array([2.5])}, "not an integer class id"),
        ({"class_labels": True}, "not an integer class id"),
    ],
)
def test_bad_input_is_named(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**{"class_labels": [3], "num_inference_steps": 2, "output_type": "latent", **kwargs})


def test_check_pretrained_source(tmp_path, monkeypatch, pipeline_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pipeline").mkdir(parents=True)
    (tmp_path / "weights.pt").touch()
    check_pretrained_source(pipeline_dir)
    check_pretrained_source("org/sit-xl-repa")  # a Hub id: left to the Hub
    check_pretrained_source("sit-xl-repa")
    with pytest.raises(
        FileNotFoundError, match=r"No such pipeline folder: \./typo \(a local path, not a Hub repo id\)"
    ):
        check_pretrained_source("./typo")
    with pytest.raises(FileNotFoundError, match=r"runs/pipline .*similar names in runs/: pipeline"):
        check_pretrained_source("runs/pipline")
    with pytest.raises(FileNotFoundError, match="without model_index.json"):
        check_pretrained_source("runs/pipeline")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_pretrained_source("weights.pt", config_name="config.json", what="model")
    check_pretrained_source(pipeline_dir / "transformer", config_name="config.json", what="model")


def test_evaluate_refuses_samples_and_reference_of_different_resolutions(monkeypatch):
    import diffusers_repa.evaluation.evaluator as evaluator

    def never_loaded(*args, **kwargs):
        raise AssertionError("Inception was loaded before the inputs were checked")

    monkeypatch.setattr(evaluator, "load_fid_inception", never_loaded)
    samples = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    reference = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="samples are 32x32 px but the reference images are 64x64 px"):
        evaluator.evaluate_samples(samples, reference, show_progress=False)


def run_script(script: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run pipelines/<script> as its `__main__` does; its exit status and its stderr lines."""
    module = load_script(f"pipelines/{script}")
    status = run_cli(module.main, argv, prog=script)
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a transformer runs or Inception loads: the scripts must stop before."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model ran before the mistake was reported")

    monkeypatch.setattr(SiTTransformer2DModel, "forward", forbidden)
    monkeypatch.setattr("diffusers_repa.evaluation.evaluator.load_fid_inception", forbidden)


def sample_cases(folder, tmp_path):
    base = ["--model", str(folder), "--class_labels", "1", "--steps", "2", "--output", str(tmp_path / "grid.png")]
    return [
        (base + ["--cols", "-1"], "--cols must be at least 1, got -1."),
        (base + ["--output", str(tmp_path / "grid.xyz")], "cannot write '.xyz' images"),
        (base + ["--output", str(tmp_path)], "is a folder"),
        (base + ["--steps", "0"], "--steps must be at least 1"),
        (base + ["--heun"], "--heun is an ODE solver option"),
        (base + ["--model", "./typo"], "No such pipeline folder: ./typo"),
        (base + ["--guidance_scale", "nan"], "guidance_scale must be a finite number"),
        (base + ["--class_labels", "10"], "10 is out of range"),
    ]


def generate_cases(folder, tmp_path):
    base = ["--pipeline", str(folder), "--output_dir", str(tmp_path / "samples"), "--num_samples", "2"]
    (tmp_path / "file").touch()
    return [
        (base + ["--batch_size", "0"], "--batch_size must be at least 1, got 0."),
        (base + ["--num_samples", "0"], "--num_samples must be at least 1"),
        (base + ["--npz", str(tmp_path / "s.zip")], "give a file name ending in .npz"),
        (base + ["--output_dir", str(tmp_path / "file")], "is a file"),
        (base + ["--pipeline", "./typo"], "No such pipeline folder: ./typo"),
        (base + ["--guidance_scale", "inf"], "guidance_scale must be a finite number"),
    ]


def evaluate_cases(tmp_path):
    np.savez(tmp_path / "s32.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "r64.npz", arr_0=np.zeros((4, 64, 64, 3), dtype=np.uint8))
    base = ["--samples", str(tmp_path / "s32.npz"), "--reference", str(tmp_path / "r64.npz"), "--device", "cpu"]
    return [
        (base, "samples are 32x32 px but the reference images are 64x64 px"),
        (base + ["--batch_size", "0"], "--batch_size must be at least 1"),
        (base + ["--samples", str(tmp_path / "missing.npz")], "does not exist"),
        (base + ["--output", str(tmp_path / "metrics.txt")], "give a file name ending in .json"),
        (base + ["--inception_weights", str(tmp_path / "w.pth")], "is not a file"),
    ]


def other_cases(folder, tmp_path):
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    align = ["--pipeline", str(folder), "--encoder", "x", "--images", str(tmp_path / "images.npz")]
    align += ["--output_dir", str(tmp_path / "out")]
    transformer = str(folder / "transformer")
    return [
        ("analyze_alignment.py", align + ["--t", "1.5"], "--t must be a time in [0, 1]"),
        ("analyze_alignment.py", align + ["--images", str(tmp_path / "none.npz")], "does not exist"),
        ("analyze_alignment.py", align + ["--pipeline", "./typo"], "No such pipeline folder"),
        ("convert_diffusers_to_repa.py", ["--model", transformer, "--output", "x.bin"], "ending in .pt, .pth"),
        ("convert_diffusers_to_repa.py", ["--model", "./typo", "--output", "x.pt"], "No such model folder"),
        ("convert_repa_to_diffusers.py", ["--checkpoint", "none.pt", "--output", "o"], "none.pt is not a file"),
        (
            "convert_repa_to_diffusers.py",
            ["--checkpoint", str(folder / "model_index.json"), "--output", "o", "--vae", "./typo"],
            "No such VAE folder",
        ),
    ]


def assert_one_error_line(status: int, lines: list[str], script: str, message: str) -> None:
    """Status 2 and one error line, the last (mistakes only the loaded pipeline can tell, such as a class id out of
    its range, come after diffusers' loading progress bar); no traceback."""
    assert status == 2
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == [lines[-1]] and lines[-1].startswith(f"{script}: error: "), lines
    assert message in lines[-1]


def test_script_mistakes_are_one_line_before_any_model_runs(pipeline_dir, tmp_path, capsys, nothing_runs):
    cases = [("sample.py", *case) for case in sample_cases(pipeline_dir, tmp_path)]
    cases += [("generate.py", *case) for case in generate_cases(pipeline_dir, tmp_path)]
    cases += [("evaluate.py", *case) for case in evaluate_cases(tmp_path)]
    cases += other_cases(pipeline_dir, tmp_path)
    for script, argv, message in cases:
        assert_one_error_line(*run_script(script, argv, capsys), script, message)
    assert not (tmp_path / "grid.png").exists()
    assert not (tmp_path / "samples" / "generation_config.json").exists()  # nothing recorded for a resume


def test_generate_script_compile_modes_are_the_library_modes():
    from diffusers_repa.pipelines import COMPILE_MODES

    assert load_script("pipelines/generate.py").COMPILE_MODES == COMPILE_MODES


def test_script_entry_point_exits_with_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "pipelines" / "sample.py"), "--model", "./typo", "--class_labels", "1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sample.py: error: No such pipeline folder: ./typo (a local path, not a Hub repo id)."
    ]
    debug = subprocess.run([*command, "--debug"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_a_mistyped_local_pipeline_path_says_so(tmp_path):
    (tmp_path / "pipeline").mkdir()
    with pytest.raises(FileNotFoundError, match=r"pipline"):
        SiTPipeline.from_pretrained(str(tmp_path / "pipline"))


def test_a_mistyped_folder_inside_a_path_is_the_one_suggested(tmp_path):
    (tmp_path / "model" / "pipeline").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"mdoel/pipeline .*similar names in .*: model\."):
        SiTPipeline.from_pretrained(str(tmp_path / "mdoel" / "pipeline"))
