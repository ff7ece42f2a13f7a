"""training/train_repa.py: config files and flags, the quickstart command, failing fast, and a 2-process run."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_repa.encoders import save_tiny_random_encoder
from diffusers_repa.models.tiny_pipelines import build_tiny_sd3_pipeline
from diffusers_repa.models.tiny_vae import save_tiny_random_vae
from diffusers_repa.pipelines.pipeline_sit import SiTPipeline
from diffusers_repa.training import (
    REPATrainingArguments,
    acquire_run_lock,
    check_sources_reachable,
    load_config_file,
    parse_training_args,
)

from .conftest import tiny_sit_pipeline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_repa.py"
CONFIGS = REPO / "training" / "configs"


def run_script(*args: str, env: dict | None = None, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, str(SCRIPT), *args]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)


def test_defaults_are_the_papers_sit_xl_setting():
    args = parse_training_args([])
    assert (args.model, args.encoder, args.encoder_depth, args.proj_coeff) == ("SiT-XL/2", "dinov2-vit-b", None, 0.5)
    assert (args.path_type, args.time_sampling, args.cfg_prob, args.resolution) == ("linear", "uniform", 0.1, 256)
    assert (args.global_batch_size, args.learning_rate, args.adam_beta1, args.adam_beta2) == (256, 1e-4, 0.9, 0.999)
    assert (args.adam_weight_decay, args.max_grad_norm, args.ema_decay) == (0.0, 1.0, 0.9999)
    assert (args.max_train_steps, args.mixed_precision, args.dataset) == (400000, "fp16", "imagenet-1k")
    assert args.vae == "stabilityai/sd-vae-ft-mse"
    # The SiT-XL/2 config spells out the same values.
    from_file = parse_training_args(["--config", str(CONFIGS / "sit-xl-2.yaml")])
    changed = {
        name for name, value in vars(from_file).items() if value != getattr(args, name) and name != "encoder_depth"
    }
    assert changed == {"config", "output_dir"} and from_file.encoder_depth == 8


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 2e-4\nmax_train_steps: 10\nallow_tf32: false\nhflip: true\ncache_dir: null\n")
    args = parse_training_args(["--config", str(config), "--max_train_steps", "20", "--encoder", "a,b"])
    assert (args.learning_rate, args.max_train_steps, args.allow_tf32, args.hflip) == (2e-4, 20, False, True)
    assert args.cache_dir is None and args.encoder_names == ["a", "b"]
    for name in ("quickstart.yaml", "sit-b-2.yaml", "sit-l-2.yaml", "sit-xl-2.yaml", "dit-xl-2.yaml"):
        assert isinstance(parse_training_args(["--config", str(CONFIGS / name)]), REPATrainingArguments)


def test_config_errors_are_clear(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 1e-4\nnum_epochs: 3\n")
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['num_epochs'\]"):
        load_config_file(config)
    with pytest.raises(ValueError, match="--lora_rank fine-tunes a trained model"):
        REPATrainingArguments(lora_rank=8)
    with pytest.raises(ValueError, match="--checkpointing_steps must be positive"):
        parse_training_args(["--checkpointing_steps", "0"])


def test_quickstart_command_trains_checkpoints_evaluates_and_exports_a_loadable_pipeline(tmp_path):
    output_dir = tmp_path / "quickstart"
    result = run_script(
        "--config", "training/configs/quickstart.yaml", "--output_dir", str(output_dir), "--max_train_steps", "10",
        "--checkpointing_steps", "5", "--validation_steps", "10", "--eval_steps", "5", "--eval_num_samples", "20",
        "--eval_inference_steps", "2", "--cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Encoders: digits-vit" in result.stderr  # the real (pretrained) digits encoder, not a random one
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert (output_dir / "samples" / "step-0000010.png").is_file()
    rows = (output_dir / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,fd_digits,class_accuracy" and [row.split(",")[0] for row in rows[1:]] == ["5", "10"]
    card = (output_dir / "pipeline" / "README.md").read_text()
    assert "| class_accuracy |" in card and "![Evaluation during training](eval.png)" in card
    assert (output_dir / "pipeline" / "eval.png").is_file()
    assert result.stdout.splitlines()[-1] == f"Done. Final weights: {output_dir / 'pipeline'}"
    assert "class_accuracy" in result.stdout.splitlines()[-2]

    pipe = SiTPipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.vae is None  # pixel space
    images = pipe(class_labels=["0", 9], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(16, 16), (16, 16)]


def test_model_flags_are_checked_before_any_data_or_model_is_loaded(tmp_path):
    with pytest.raises(ValueError, match=r"--model: Unknown SiT preset 'SiT-M/2'\. Choose one of: SiT-S/2"):
        parse_training_args(["--model", "SiT-M/2"])
    with pytest.raises(ValueError, match="--encoder_depth 13 is not a block of a 12-block model .* between 1 and 12"):
        parse_training_args(["--model", "SiT-B/2", "--encoder_depth", "13"])
    with pytest.raises(ValueError, match="SiT-XL/2's default encoder depth 8 is not a block of a 6-block model"):
        parse_training_args(["--depth", "6"])
    assert parse_training_args(["--depth", "6", "--proj_coeff", "0"]).depth == 6  # no alignment: no block needed
    with pytest.raises(ValueError, match="width 1000 .* attention heads 16"):
        parse_training_args(["--hidden_size", "1000"])
    with pytest.raises(ValueError, match="--lora_alpha scales LoRA adapters: also pass --lora_rank"):
        parse_training_args(["--lora_alpha", "8"])
    (tmp_path / "run").write_text("")
    with pytest.raises(NotADirectoryError, match="--output_dir .*run is a file"):
        parse_training_args(["--output_dir", str(tmp_path / "run")])


def test_a_mistake_is_one_error_line_without_traceback_unless_debug():
    result = run_script("--cfg_prob", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "train_repa.py: error: --cfg_prob must be in [0, 1), got 2.0."
    result = run_script("--cfg_prob", "2", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_help_does_not_import_torch():
    result = run_script("--help", launcher=("-X", "importtime"))
    assert result.returncode == 0 and "--encoder_depth" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "transformers" in imported and "torch" not in imported and "datasets" not in imported


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_imagenet_run_fails_fast_when_nothing_can_be_reached(tmp_path):
    hf_home = tmp_path / "hf_home"
    result = run_script(
        "--dataset", "imagenet-1k", "--output_dir", str(tmp_path / "run"), "--mixed_precision", "no",
        env={"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result) == (
        "train_repa.py: error: Cannot start training: the dataset 'imagenet-1k', the VAE 'stabilityai/sd-vae-ft-mse' "
        "and the encoder 'dinov2-vit-b' cannot be read (HF_HUB_OFFLINE is set: only local folders and files already "
        "in the Hub cache can be used)."
    )
    assert "  - the encoder 'dinov2-vit-b': facebook/dinov2-base: " in result.stderr
    assert "Fix: log in / accept the dataset's terms" in result.stderr and "quickstart.yaml" in result.stderr
    assert not (hf_home / "diffusers_repa").exists() and not (tmp_path / "run").exists()


def test_an_unreachable_hub_fails_fast_without_retries(tmp_path):
    """No HF_HUB_OFFLINE, but the Hub does not answer (here: a closed local port instead of huggingface.co): one
    probe, then the sources are looked up in the (empty) Hub cache only, instead of retrying each for half a minute."""
    hf_home = tmp_path / "hf_home"
    result = run_script(
        "--dataset", "imagenet-1k", "--output_dir", str(tmp_path / "run"), "--mixed_precision", "no",
        env={
            "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
        },
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Retrying" not in result.stderr
    assert last_line(result).startswith(
        "train_repa.py: error: Cannot start training: the dataset 'imagenet-1k', the VAE 'stabilityai/sd-vae-ft-mse' "
        "and the encoder 'dinov2-vit-b' cannot be read (the Hub, http://127.0.0.1:9, cannot be reached: "
    )
    assert last_line(result).endswith("; nor are they in the Hub cache).")


def test_a_second_run_on_a_busy_output_dir_refuses_in_one_line(tmp_path):
    output_dir = tmp_path / "run"
    with acquire_run_lock(output_dir):
        result = run_script("--dataset", "imagenet-1k", "--output_dir", str(output_dir), "--mixed_precision", "no")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result).startswith(
        f"train_repa.py: error: {output_dir} is in use by another training run (pid {os.getpid()} on host "
    )


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory) -> dict[str, str]:
    """A tiny local VAE (8x) and encoder (16 px per token): flags that pass the source checks offline."""
    folder = tmp_path_factory.mktemp("assets")
    vae = save_tiny_random_vae(folder / "tiny-random-vae")
    encoder = save_tiny_random_encoder("dinov2", folder / "tiny-random-dinov2")
    return {"vae": str(vae), "encoder": str(encoder), "resolution": 64}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"model": "SiT-S/4"},
            r"The encoder '.*tiny-random-dinov2' gives a 4×4 token grid at --resolution 64, but --model SiT-S/4 sees a "
            r"2×2 grid \(8² inputs, patch size 4\).* or pass --interpolate_targets",
        ),
        ({"model": "SiT-S/8", "resolution": 48}, r"--model SiT-S/8 has patch size 8, which does not divide the 6×6"),
        ({"vae": "none", "resolution": 36}, r"--resolution 36 is not a multiple of 16, the pixels per token of the"),
        ({"resolution": 36}, r"--resolution 36 is not a multiple of 8, the downsampling of --vae"),
    ],
)
def test_shapes_that_do_not_fit_fail_before_the_latent_cache(tiny_sources, flags, message):
    args = REPATrainingArguments(**{**tiny_sources, "model": "SiT-S/2", **flags})
    with pytest.raises(ValueError, match=message):
        check_sources_reachable(args, need_dataset=False)


def test_fitting_shapes_pass_and_interpolation_accepts_another_grid(tiny_sources):
    check_sources_reachable(REPATrainingArguments(**tiny_sources, model="SiT-S/2"), need_dataset=False)
    args = REPATrainingArguments(**tiny_sources, model="SiT-S/4", interpolate_targets=True)
    check_sources_reachable(args, need_dataset=False)
    check_sources_reachable(REPATrainingArguments(**tiny_sources, model="SiT-S/4", proj_coeff=0), need_dataset=False)


def test_a_pretrained_model_must_fit_the_latents_and_have_a_null_class(tiny_sources, tmp_path):
    pipe = tiny_sit_pipeline(latent_size=4, depth=1, num_classes=3)
    pipe.transformer.save_pretrained(tmp_path / "base" / "transformer")
    args = REPATrainingArguments(**tiny_sources, pretrained_model=str(tmp_path / "base"), proj_coeff=0)
    with pytest.raises(ValueError, match=r"works on 4×4² inputs, but --resolution 64 with --vae .* gives 4×8²"):
        check_sources_reachable(args, need_dataset=False)
    check_sources_reachable(dataclasses.replace(args, resolution=32), need_dataset=False)
    pipe.transformer.register_to_config(class_dropout_prob=0.0)
    pipe.transformer.save_pretrained(tmp_path / "base" / "transformer")
    with pytest.raises(ValueError, match="has no null class for label dropout; pass --cfg_prob 0"):
        check_sources_reachable(dataclasses.replace(args, resolution=32), need_dataset=False)


def test_a_misfit_quickstart_stops_before_building_its_latent_cache(tmp_path):
    output_dir, cache = tmp_path / "quickstart", tmp_path / "cache"
    result = run_script(
        "--config", "training/configs/quickstart.yaml", "--output_dir", str(output_dir), "--model", "SiT-S/2",
        "--cache_dir", str(cache),
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result).startswith("train_repa.py: error: The encoder 'digits-vit'")
    assert "4×4 token grid at --resolution 16, but --model SiT-S/2 sees a 8×8 grid" in last_line(result)
    assert not cache.exists()


@pytest.mark.slow
def test_full_quickstart_from_the_readme_draws_the_digits_it_is_asked_for(tmp_path):
    output_dir = tmp_path / "sit-repa-quickstart"
    result = run_script("--config", "training/configs/quickstart.yaml", "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-1500", "checkpoint-2000"]
    final = (output_dir / "eval.csv").read_text().splitlines()[-1].split(",")
    assert final[0] == "2000" and float(final[2]) >= 0.9  # 100 samples, 10 per digit, independent classifier
    assert f"class_accuracy {float(final[2]):.4g}" in result.stdout.splitlines()[-2]  # the run's last lines say it


TWO_PROCESSES = ("-m", "torch.distributed.run", "--nproc_per_node", "2")
TWO_CPU_PROCESSES_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # accelerate picks MULTI_CPU (gloo)


def assert_two_process_resume_is_exact(tmp_path: Path, common: list[str], port: str) -> None:
    """Run `common` for 8 steps on 2 processes straight, and again from a copy of its step-4 checkpoint: the step-8
    checkpoints' weights and EMA are identical."""
    launcher, env = (*TWO_PROCESSES, "--master_port", port), TWO_CPU_PROCESSES_ENV
    common = [*common, "--checkpointing_steps", "4", "--validation_steps", "100", "--max_train_steps", "8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_script(*common, "--output_dir", str(straight), env=env, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "32 per device × 2 processes" in result.stderr

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    result = run_script(
        *common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", env=env, launcher=launcher
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(straight / "checkpoint-8" / name)
        torch.testing.assert_close(load_file(resumed / "checkpoint-8" / name), expected, rtol=0, atol=0)


def test_two_process_run_resumes_like_an_uninterrupted_one(tmp_path):
    """DDP over gloo on CPU (torchrun; accelerate picks MULTI_CPU with ACCELERATE_USE_CPU)."""
    common = [
        "--config",
        "training/configs/quickstart.yaml",
        "--eval_num_samples",
        "20",
        "--eval_inference_steps",
        "2",
    ]
    assert_two_process_resume_is_exact(tmp_path, common, port="29531")


@pytest.mark.slow
def test_full_text_to_image_quickstart_draws_the_digits_its_captions_name(tmp_path):
    output_dir = tmp_path / "mmdit-repa-quickstart"
    result = run_script("--config", "training/configs/quickstart-t2i.yaml", "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    final = (output_dir / "eval.csv").read_text().splitlines()[-1].split(",")
    assert final[0] == "2000" and float(final[2]) >= 0.9  # 100 samples drawn for training captions of every digit
    assert (output_dir / "pipeline" / "text_encoder").is_dir()


def test_two_process_text_to_image_run_resumes_like_an_uninterrupted_one(tmp_path):
    """The quickstart MMDiT under DDP (gloo, CPU): cached caption features, captions drawn per (seed, epoch, index)
    and caption dropout from the step's generator continue exactly after a resume."""
    common = ["--config", "training/configs/quickstart-t2i.yaml", "--max_train_samples", "256", "--eval_steps", "100"]
    assert_two_process_resume_is_exact(tmp_path, common, port="29533")


def test_two_process_sd3_lora_fine_tune_from_the_command_line(tmp_path):
    """`--model SD3 --lora_rank` from the command line under DDP (gloo, CPU): a tiny random SD3 pipeline, its VAE and
    text encoders, trains, checkpoints and exports its adapter."""
    pipeline = build_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
    encoder = save_tiny_random_encoder("dinov2", tmp_path / "encoder", hidden_size=32, num_hidden_layers=1)
    result = run_script(
        "--model", "SD3", "--pretrained_model", str(pipeline), "--lora_rank", "4", "--dataset", "digits-captions",
        "--caption_column", "caption", "--max_train_samples", "16", "--resolution", "64", "--encoder", str(encoder),
        "--interpolate_targets", "--encoder_depth", "1", "--projector_dim", "16", "--max_train_steps", "2",
        "--global_batch_size", "4", "--mixed_precision", "no", "--report_to", "none", "--dataloader_num_workers", "0",
        "--num_validation_images", "2", "--validation_inference_steps", "2", "--output_dir", str(tmp_path / "run"),
        env=TWO_CPU_PROCESSES_ENV, launcher=(*TWO_PROCESSES, "--master_port", "29535"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
