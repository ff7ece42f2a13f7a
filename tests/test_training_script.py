"""training/train_repa.py: config files and flags, the quickstart command, failing fast, and a 2-process run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_repa.pipelines.pipeline_sit import SiTPipeline
from diffusers_repa.training import REPATrainingArguments, load_config_file, parse_training_args

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
    for name in ("quickstart.yaml", "sit-b-2.yaml", "sit-l-2.yaml", "sit-xl-2.yaml"):
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


def test_quickstart_command_trains_checkpoints_and_exports_a_loadable_pipeline(tmp_path):
    output_dir = tmp_path / "quickstart"
    result = run_script(
        "--config", "training/configs/quickstart.yaml", "--output_dir", str(output_dir), "--max_train_steps", "10",
        "--checkpointing_steps", "5", "--validation_steps", "10",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QUICKSTART smoke configuration" in result.stderr and "RANDOMLY" in result.stderr
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert (output_dir / "samples" / "step-0000010.png").is_file()
    assert "Smoke test, not a usable model" in (output_dir / "pipeline" / "README.md").read_text()

    pipe = SiTPipeline.from_pretrained(output_dir / "pipeline")
    images = pipe(class_labels=[0, 9], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(64, 64), (64, 64)]


def test_imagenet_run_fails_fast_when_nothing_can_be_reached(tmp_path):
    hf_home = tmp_path / "hf_home"
    result = run_script(
        "--dataset", "imagenet-1k", "--output_dir", str(tmp_path / "run"), "--mixed_precision", "no",
        env={"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")},
    )  # fmt: skip
    assert result.returncode == 1
    message = result.stderr
    assert "Cannot start training: these sources cannot be read." in message
    assert "dataset 'imagenet-1k'" in message and "VAE 'stabilityai/sd-vae-ft-mse'" in message
    assert "encoder 'dinov2-vit-b' (facebook/dinov2-base)" in message and "HF_HUB_OFFLINE is set" in message
    assert "Traceback" not in message
    assert not (hf_home / "diffusers_repa").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_full_quickstart_from_the_readme(tmp_path):
    output_dir = tmp_path / "sit-repa-quickstart"
    result = run_script("--config", "training/configs/quickstart.yaml", "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-150", "checkpoint-300"]
    pipe = SiTPipeline.from_pretrained(output_dir / "pipeline")
    assert len(pipe(class_labels=[1], num_inference_steps=5).images) == 1


def test_two_process_run_resumes_like_an_uninterrupted_one(tmp_path):
    """DDP over gloo on CPU (torchrun; accelerate picks MULTI_CPU with ACCELERATE_USE_CPU)."""
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2")
    env = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    common = [
        "--config",
        "training/configs/quickstart.yaml",
        "--checkpointing_steps",
        "4",
        "--validation_steps",
        "100",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_script(*common, "--output_dir", str(straight), "--max_train_steps", "8", env=env, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 per device × 2 processes" in result.stderr

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    shutil.copytree(straight / "quickstart_assets", resumed / "quickstart_assets")
    result = run_script(
        *common, "--output_dir", str(resumed), "--max_train_steps", "8", "--resume_from_checkpoint", "latest",
        env=env, launcher=launcher,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(straight / "checkpoint-8" / name)
        torch.testing.assert_close(load_file(resumed / "checkpoint-8" / name), expected, rtol=0, atol=0)
