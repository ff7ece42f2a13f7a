"""REPATrainer: the step against a hand computation, resume equivalence, crash-safe checkpoints, the non-finite
guard, fp16-safe alignment, LoRA fine-tuning and the export (pipeline, model card, Hub upload).

Everything runs on a tiny setup built once per module: 16 synthetic 32-px images of 4 classes, a tiny random VAE
(8× down, 4×4×4 latents), a tiny random DINOv2 (2×2 tokens, width 32) and a 2-block SiT of width 32.
"""

import copy
import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
from safetensors.torch import load_file

import diffusers_repa.training.hub as hub_module
from diffusers_repa.data import build_latent_cache, load_latent_cache, make_train_dataloader, synthetic_class_dataset
from diffusers_repa.encoders import load_encoder, save_tiny_random_encoder
from diffusers_repa.losses import REPALossOutput, projection_loss
from diffusers_repa.models.tiny_vae import save_tiny_random_vae
from diffusers_repa.models.transformer_sit import SiTTransformer2DModel
from diffusers_repa.pipelines.pipeline_sit import SiTPipeline
from diffusers_repa.repa_head import TransformerWithREPAHead
from diffusers_repa.schedulers import SiTSDEScheduler
from diffusers_repa.training import (
    DDPMObjective,
    NonFiniteLossError,
    OutputDirInUseError,
    REPATrainer,
    REPATrainingArguments,
    TrainingInterrupted,
    list_checkpoints,
    resolve_checkpoint,
)
from diffusers_repa.training.model_setup import init_dit_weights

from .conftest import reset_accelerate_state

RESOLUTION = 32


@dataclasses.dataclass
class TinyAssets:
    vae: Path
    encoder: Path
    cache: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> TinyAssets:
    root = tmp_path_factory.mktemp("tiny_assets")
    vae = save_tiny_random_vae(root / "vae")
    encoder = save_tiny_random_encoder("dinov2", root / "encoder", hidden_size=32, num_hidden_layers=1)
    images = synthetic_class_dataset(num_classes=4, samples_per_class=4, resolution=RESOLUTION)
    cache = build_latent_cache(images, root / "cache", str(vae), RESOLUTION, num_workers=0, show_progress=False)
    return TinyAssets(vae, encoder, cache)


def tiny_args(assets: TinyAssets, output_dir: Path, **overrides) -> REPATrainingArguments:
    values = {
        "output_dir": str(output_dir),
        "cache_dir": str(assets.cache),
        "vae": str(assets.vae),
        "encoder": str(assets.encoder),
        "resolution": RESOLUTION,
        "model": "SiT-S/2",
        "depth": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "encoder_depth": 1,
        "projector_dim": 16,
        "max_train_steps": 2,
        "global_batch_size": 4,
        "learning_rate": 1e-3,
        "ema_decay": 0.9,
        "mixed_precision": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "validation_steps": 1000,
        "checkpointing_steps": 1000,
        "num_validation_images": 2,
        "validation_inference_steps": 2,
    }
    return REPATrainingArguments(**{**values, **overrides})


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_same_tensors(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{n}: {m}", **tolerance)


def test_one_step_matches_a_hand_computed_step(assets, tmp_path):
    args = tiny_args(assets, tmp_path / "run", max_train_steps=1, max_grad_norm=0.05, ema_decay=0.75)
    trainer = REPATrainer(args)
    model_before = copy.deepcopy(trainer.unwrapped_model)
    noise_state, global_rng_state = trainer.generator.get_state(), torch.get_rng_state()
    logged = []
    trainer.accelerator.log = lambda values, step: logged.append((step, values))
    trainer.train()

    # The same step by hand: first batch of epoch 0, posterior sample, t, noise, label dropout, loss, clip, AdamW.
    loader = make_train_dataloader(load_latent_cache(assets.cache), 4, shuffle=True, seed=args.seed)
    loader.batch_sampler.set_epoch(0)
    batch = next(iter(loader))
    generator = torch.Generator().set_state(noise_state)
    scaling_factor = AutoencoderKL.load_config(assets.vae)["scaling_factor"]
    mean, std = batch["latent_mean"], batch["latent_std"]
    latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
    t = torch.rand(4, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    x_t = (1 - t).view(-1, 1, 1, 1) * latents + t.view(-1, 1, 1, 1) * noise
    velocity = noise - latents
    targets = load_encoder(assets.encoder, resolution=RESOLUTION)(batch["image"])

    model = copy.deepcopy(model_before).train()
    torch.set_rng_state(global_rng_state)  # label dropout draws from the global RNG
    output = model(x_t, t, batch["label"])
    denoising = (output.sample - velocity).pow(2).mean()
    alignment = -F.cosine_similarity(targets, output.projections[0], dim=-1).mean()
    loss = denoising + args.proj_coeff * alignment
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    assert grad_norm > args.max_grad_norm  # clipping is active in this test
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    optimizer.step()

    ((step, values),) = logged
    assert step == 1
    assert values["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert values["projection_loss"] == pytest.approx(alignment.item(), rel=1e-5)
    assert values["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)
    expected = parameters(model)
    assert_same_tensors(parameters(trainer.unwrapped_model), expected)
    decay = args.ema_decay
    expected_ema = {
        name: decay * before + (1 - decay) * expected[name] for name, before in parameters(model_before).items()
    }
    assert_same_tensors(parameters(trainer.ema_model), expected_ema)
    trained_state = trainer.optimizer.state_dict()["state"]
    reference_state = optimizer.state_dict()["state"]
    for index, state in reference_state.items():
        assert_same_tensors(trained_state[index], state)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(assets, tmp_path):
    # 16 images, 4 per micro-batch, 2 micro-batches per step: 2 steps per epoch; step 3 ends mid-epoch 1.
    settings = {"global_batch_size": 8, "gradient_accumulation_steps": 2, "hflip": True, "checkpointing_steps": 3}
    straight = REPATrainer(tiny_args(assets, tmp_path / "straight", max_train_steps=6, **settings))
    straight.train()

    REPATrainer(tiny_args(assets, tmp_path / "resumed", max_train_steps=3, **settings)).train()
    resumed = REPATrainer(
        tiny_args(assets, tmp_path / "resumed", max_train_steps=6, resume_from_checkpoint="latest", **settings)
    )
    assert resumed.global_step == 3
    resumed.train()

    torch.testing.assert_close(
        parameters(resumed.unwrapped_model), parameters(straight.unwrapped_model), rtol=0, atol=0
    )
    torch.testing.assert_close(parameters(resumed.ema_model), parameters(straight.ema_model), rtol=0, atol=0)
    torch.testing.assert_close(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), rtol=0, atol=0)
    assert [path.name for path in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-3", "checkpoint-6"]


def test_a_crash_while_writing_a_checkpoint_never_looks_complete(assets, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    trainer = REPATrainer(tiny_args(assets, output_dir, checkpoints_total_limit=2))
    trainer.global_step = 2
    trainer.save_checkpoint()
    saved_weights = load_file(output_dir / "checkpoint-2" / "model.safetensors")

    def killed_midway(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    # accelerate has written model and optimizer into checkpoint-4.tmp when the EMA write "dies".
    monkeypatch.setattr("diffusers_repa.training.trainer.save_file", killed_midway)
    trainer.global_step = 4
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert (output_dir / "checkpoint-4.tmp" / "model.safetensors").is_file()
    assert not (output_dir / "checkpoint-4").exists()
    assert list_checkpoints(output_dir) == [output_dir / "checkpoint-2"]
    assert resolve_checkpoint(output_dir, "latest") == output_dir / "checkpoint-2"
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        resolve_checkpoint(output_dir, str(output_dir / "checkpoint-4.tmp"))

    trainer.close()
    reset_accelerate_state()
    resumed = REPATrainer(tiny_args(assets, output_dir, resume_from_checkpoint="latest", checkpoints_total_limit=2))
    assert resumed.global_step == 2
    torch.testing.assert_close(dict(resumed.unwrapped_model.state_dict()), saved_weights, rtol=0, atol=0)

    # The next save of that step replaces the leftover; rotation keeps the newest two, only once the new one exists.
    monkeypatch.undo()
    for step in (4, 6):
        resumed.global_step = step
        resumed.save_checkpoint()
    assert not (output_dir / "checkpoint-4.tmp").exists()
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_resume_from_a_missing_checkpoint_is_a_clear_error(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        REPATrainer(tiny_args(assets, tmp_path / "run", resume_from_checkpoint=str(tmp_path / "checkpoint-9")))


def nan_loss_on(trainer: REPATrainer, calls: set[int]):
    """Wrap the training step's objective so that its loss is NaN on the given (1-based) calls."""
    original, counter = trainer.training_step.objective, {"calls": 0}

    def objective(model, batch, generator, step):
        counter["calls"] += 1
        losses = original(model, batch, generator, step)
        if counter["calls"] in calls:
            return REPALossOutput(losses.loss * float("nan"), losses.denoising_loss, losses.projection_loss)
        return losses

    trainer.training_step.objective = objective


def test_nonfinite_losses_skip_the_update_and_stop_the_run(assets, tmp_path):
    trainer = REPATrainer(tiny_args(assets, tmp_path / "run", max_train_steps=10, max_nonfinite_steps=3))
    weights, ema = parameters(trainer.unwrapped_model), parameters(trainer.ema_model)
    nan_loss_on(trainer, calls=set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite for 3 optimizer steps in a row \(steps 1–3\)"):
        trainer.train()
    assert trainer.optimizer.state_dict()["state"] == {}
    torch.testing.assert_close(parameters(trainer.unwrapped_model), weights, rtol=0, atol=0)
    torch.testing.assert_close(parameters(trainer.ema_model), ema, rtol=0, atol=0)


def test_one_nonfinite_step_is_skipped_and_training_goes_on(assets, tmp_path):
    trainer = REPATrainer(tiny_args(assets, tmp_path / "run", max_train_steps=4))
    nan_loss_on(trainer, calls={2})
    trainer.train()
    assert trainer.num_nonfinite_steps == 1
    adam_steps = {int(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {3}
    assert all(torch.isfinite(param).all() for param in trainer.unwrapped_model.parameters())


def test_projection_loss_stays_finite_in_fp16_where_naive_normalisation_overflows():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.randn(2, 16, 768, generator=generator) * 1000).half()  # |x|² ≈ 7.7e8 > fp16 max 65504
    projections = (targets.float() + 300 * torch.randn(2, 16, 768, generator=generator)).half()

    naive = -((targets * projections).sum(-1) / (targets.norm(dim=-1) * projections.norm(dim=-1))).mean()
    assert not torch.isfinite(naive)

    loss = projection_loss([targets], [projections])
    reference = -F.cosine_similarity(targets.double(), projections.double(), dim=-1).mean()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-4)


@pytest.fixture
def base_pipeline(assets, tmp_path) -> Path:
    """A 'pretrained' SiT pipeline without projectors and with 6 classes (the dataset has 4)."""
    torch.manual_seed(1)
    transformer = SiTTransformer2DModel(
        sample_size=4, hidden_size=32, depth=2, num_attention_heads=2, num_classes=6, encoder_depth=1,
        projector_dim=16, projection_dims=(),
    )  # fmt: skip
    for param in transformer.parameters():  # non-zero adaLN/output layers, so that LoRA deltas show
        torch.nn.init.normal_(param, std=0.05)
    vae = AutoencoderKL.from_pretrained(assets.vae)
    path = tmp_path / "base"
    SiTPipeline(transformer, vae, SiTSDEScheduler()).save_pretrained(path)
    return path


def test_lora_fine_tuning_saves_an_adapter_that_reproduces_the_trained_model(assets, base_pipeline, tmp_path):
    args = tiny_args(
        assets, tmp_path / "lora-run", pretrained_model=str(base_pipeline), lora_rank=4, ema_decay=0.0,
        learning_rate=1e-2, max_train_steps=3,
    )  # fmt: skip
    trainer = REPATrainer(args)
    trainable = [name for name, param in trainer.unwrapped_model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("projectors.") for name in trainable)
    assert any(name.startswith("projectors.") for name in trainable)  # created for the encoder's width 32
    export_dir = trainer.train()

    assert export_dir == tmp_path / "lora-run" / "lora"
    adapter = load_file(export_dir / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in key for key in adapter)
    assert "lora" in (export_dir / "README.md").read_text()

    sample = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 3, 6])
    trained = trainer.ema_model.eval()(sample, t, labels, return_projections=False).sample
    pipe = SiTPipeline.from_pretrained(base_pipeline)
    base = pipe.transformer.eval()(sample, t, labels, return_projections=False).sample
    pipe.load_lora_weights(export_dir)
    with_adapter = pipe.transformer(sample, t, labels, return_projections=False).sample
    assert (trained - base).abs().max() > 1e-4
    torch.testing.assert_close(with_adapter, trained, rtol=1e-5, atol=1e-6)


def test_export_is_a_loadable_pipeline_with_card_and_pushes_to_the_hub(assets, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        hub_module, "create_repo", lambda repo_id, **kwargs: calls.append(("create", repo_id)) or "url"
    )
    monkeypatch.setattr(hub_module, "upload_folder", lambda **kwargs: calls.append(("upload", kwargs)))
    args = tiny_args(
        assets, tmp_path / "run", push_to_hub=True, hub_model_id="me/sit-tiny", validation_steps=1,
        checkpointing_steps=1, checkpoints_total_limit=1,
    )  # fmt: skip
    export_dir = REPATrainer(args).train()

    assert export_dir == tmp_path / "run" / "pipeline"
    assert not (tmp_path / "run" / "pipeline.tmp").exists()
    assert sorted(path.name for path in (tmp_path / "run" / "samples").iterdir()) == [
        "step-0000001.png",
        "step-0000002.png",
    ]
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    pipe = SiTPipeline.from_pretrained(export_dir)
    assert isinstance(pipe.scheduler, SiTSDEScheduler)
    assert pipe.config.id2label["3"] == "cross-hue270"
    images = pipe(class_labels=[0, 3], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(RESOLUTION, RESOLUTION)] * 2

    card = (export_dir / "README.md").read_text()
    assert 'SiTPipeline.from_pretrained("me/sit-tiny")' in card
    assert "![Samples from the EMA weights](samples.png)" in card and (export_dir / "samples.png").is_file()
    assert "| `proj_coeff` | `0.5` |" in card and "for 2 steps" in card
    assert calls[0] == ("create", "me/sit-tiny")
    assert calls[1][1]["repo_id"] == "me/sit-tiny" and Path(calls[1][1]["folder_path"]) == export_dir
    saved_args = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert saved_args["hub_model_id"] == "me/sit-tiny"


def test_alignment_stops_after_the_given_step(assets, tmp_path):
    trainer = REPATrainer(tiny_args(assets, tmp_path / "run", max_train_steps=3, alignment_stop_step=1))
    encoder_calls = []
    original = trainer.objective.encode_targets
    trainer.objective.encode_targets = lambda images: encoder_calls.append(len(images)) or original(images)
    logged = []
    trainer.accelerator.log = lambda values, step: logged.append(values)
    trainer.train()
    assert encoder_calls == [4]  # step 1 only
    assert logged[0]["projection_loss"] < 0 and logged[1]["projection_loss"] == logged[2]["projection_loss"] == 0


def test_global_batch_must_split_over_processes_and_accumulation(assets, tmp_path):
    with pytest.raises(ValueError, match="--global_batch_size 6 is not divisible .* multiple of 4"):
        REPATrainer(tiny_args(assets, tmp_path / "run", global_batch_size=6, gradient_accumulation_steps=4))
    trainer = REPATrainer(tiny_args(assets, tmp_path / "run2", global_batch_size=8, gradient_accumulation_steps=2))
    assert (trainer.per_device_batch_size, trainer.global_batch_size) == (4, 8)


def test_latest_is_the_highest_complete_step(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    assert resolve_checkpoint(tmp_path, "latest") is None
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-11.tmp").mkdir()
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"


def trained(assets: TinyAssets, output_dir: Path, **overrides) -> REPATrainer:
    """A tiny run trained to its last step (accelerate's state reset afterwards, ready for another run)."""
    trainer = REPATrainer(tiny_args(assets, output_dir, **overrides))
    trainer.train()
    reset_accelerate_state()
    return trainer


def test_gradient_checkpointing_gives_the_same_step(assets, tmp_path):
    plain = trained(assets, tmp_path / "plain")
    checkpointed = trained(assets, tmp_path / "checkpointed", gradient_checkpointing=True)
    assert_same_tensors(
        parameters(checkpointed.unwrapped_model), parameters(plain.unwrapped_model), rtol=1e-5, atol=1e-6
    )


def test_two_encoders_logit_normal_times_and_bf16_autocast(assets, tmp_path):
    encoders = f"{assets.encoder},{assets.encoder}"
    args = tiny_args(
        assets, tmp_path / "run", encoder=encoders, time_sampling="logit_normal", mixed_precision="bf16",
        max_train_steps=3,
    )  # fmt: skip
    trainer = REPATrainer(args)
    assert tuple(trainer.unwrapped_model.config.projection_dims) == (32, 32) and len(trainer.encoders) == 2
    logged = []
    trainer.accelerator.log = lambda values, step: logged.append(values)
    trainer.train()
    assert len(logged) == 3 and trainer.num_nonfinite_steps == 0
    for values in logged:  # mean −cos over both targets; loss = denoising + λ · projection
        assert -1 <= values["projection_loss"] <= 1 and values["denoising_loss"] > 0
        assert values["loss"] == pytest.approx(values["denoising_loss"] + 0.5 * values["projection_loss"], rel=1e-5)


def test_encoders_in_bf16_give_float32_targets_close_to_fp32_ones(assets, tmp_path):
    trainer = REPATrainer(tiny_args(assets, tmp_path, encoder_precision="bf16", mixed_precision="bf16"))
    (encoder,) = trainer.encoders
    assert {param.dtype for param in encoder.parameters()} == {torch.bfloat16}
    images = torch.randint(0, 256, (4, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8)
    (targets,) = trainer.objective.encode_targets(images)
    expected = load_encoder(assets.encoder, RESOLUTION)(images)
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets, expected, rtol=0.05, atol=0.05)
    trainer.train()
    assert trainer.num_nonfinite_steps == 0


def test_encoder_precision_is_checked(assets, tmp_path):
    with pytest.raises(ValueError, match="--encoder_precision must be fp32, bf16 or fp16, got 'int8'"):
        tiny_args(assets, tmp_path, encoder_precision="int8")


def test_compiled_training_matches_eager(assets, tmp_path):
    eager = trained(assets, tmp_path / "eager")
    compiled = trained(assets, tmp_path / "compiled", compile=True)
    assert all(block._compiled_call_impl is not None for block in compiled.unwrapped_model.transformer_blocks)
    assert all(encoder._compiled_call_impl is not None for encoder in compiled.encoders)
    # Two AdamW steps of lr 1e-3 move a weight by up to 2e-3; dividing by √v turns rounding differences of tiny
    # gradients into differences of up to a few percent of that, far below what a wrong graph would cause.
    assert_same_tensors(parameters(compiled.unwrapped_model), parameters(eager.unwrapped_model), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- resume and stop


def test_a_second_run_on_the_same_output_dir_refuses(assets, tmp_path):
    first = REPATrainer(tiny_args(assets, tmp_path / "run"))
    with pytest.raises(OutputDirInUseError, match=rf"{tmp_path / 'run'}.*pid {os.getpid()}"):
        REPATrainer(tiny_args(assets, tmp_path / "run"))
    first.train()  # releases the folder when done
    assert not (tmp_path / "run" / ".run.lock").exists()
    trained(assets, tmp_path / "run", max_train_steps=3, resume_from_checkpoint="latest")


def test_the_last_step_is_always_checkpointed_and_a_finished_run_is_not_redone(assets, tmp_path):
    output_dir = tmp_path / "run"
    trainer = trained(assets, output_dir, max_train_steps=3, checkpointing_steps=2)
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((output_dir / "pipeline" / "trainer_state.json").read_text()) == {"global_step": 3}

    # The same command again: nothing to train, and the step-3 export stays as it is.
    export_mtime = (output_dir / "pipeline" / "model_index.json").stat().st_mtime_ns
    again = REPATrainer(tiny_args(assets, output_dir, max_train_steps=3, resume_from_checkpoint="latest"))
    assert again.train() == output_dir / "pipeline"
    assert (output_dir / "pipeline" / "model_index.json").stat().st_mtime_ns == export_mtime
    assert_same_tensors(parameters(again.ema_model), parameters(trainer.ema_model), rtol=0, atol=0)


def test_resuming_below_the_checkpoints_step_refuses_and_keeps_the_export(assets, tmp_path):
    output_dir = tmp_path / "run"
    trained(assets, output_dir, max_train_steps=3)
    weights = load_file(output_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-3 is at step 3, beyond --max_train_steps 2: nothing to train"):
        REPATrainer(tiny_args(assets, output_dir, max_train_steps=2, resume_from_checkpoint="latest"))
    after = load_file(output_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(after, weights, rtol=0, atol=0)


def test_sigterm_checkpoints_the_step_and_the_run_resumes_like_an_uninterrupted_one(assets, tmp_path):
    straight = trained(assets, tmp_path / "straight", max_train_steps=4)

    output_dir = tmp_path / "preempted"
    trainer = REPATrainer(tiny_args(assets, output_dir, max_train_steps=4))
    objective = trainer.training_step.objective

    def preempted_during_step_2(model, batch, generator, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, through the trainer's handler
        return objective(model, batch, generator, step)

    trainer.training_step.objective = preempted_during_step_2
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-2"]
    assert not (output_dir / "pipeline").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the loop
    reset_accelerate_state()

    resumed = REPATrainer(tiny_args(assets, output_dir, max_train_steps=4, resume_from_checkpoint="latest"))
    assert resumed.global_step == 2
    resumed.train()
    assert_same_tensors(parameters(resumed.unwrapped_model), parameters(straight.unwrapped_model), rtol=0, atol=0)
    assert_same_tensors(parameters(resumed.ema_model), parameters(straight.ema_model), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": 5e-4}, r"--learning_rate: 0\.001 in the checkpoint, 0\.0005 now.*--resume_with_changes"),
        ({"num_attention_heads": 4}, r"--num_attention_heads: 2 in the checkpoint, 4 now.*start a new --output_dir"),
        ({"path_type": "cosine"}, r"--path_type: 'linear' in the checkpoint, 'cosine' now"),
        ({"seed": 1}, r"--seed: 0 in the checkpoint, 1 now"),
        ({"learning_rate": 5e-4, "resume_with_changes": "path_type"}, r"--resume_with_changes names path_type"),
    ],
)
def test_resuming_with_changed_settings_is_refused(assets, tmp_path, change, message):
    trained(assets, tmp_path / "run", max_train_steps=1)
    with pytest.raises(ValueError, match=message):
        REPATrainer(tiny_args(assets, tmp_path / "run", resume_from_checkpoint="latest", **change))


def test_a_change_asked_for_is_applied_and_recorded(assets, tmp_path):
    trained(assets, tmp_path / "run", max_train_steps=1)
    args = tiny_args(
        assets, tmp_path / "run", resume_from_checkpoint="latest", learning_rate=5e-4, ema_decay=0.5,
        resume_with_changes="learning_rate,ema_decay",
    )  # fmt: skip
    trainer = REPATrainer(args)
    assert {group["lr"] for group in trainer.optimizer.param_groups} == {5e-4}  # not the checkpoint's 1e-3
    assert trainer.ema.decay == 0.5
    trainer.train()
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["settings"]["learning_rate"] == 5e-4
    assert state["setting_changes"] == [
        {"step": 1, "changes": {"learning_rate": [1e-3, 5e-4], "ema_decay": [0.9, 0.5]}}
    ]


def test_broken_checkpoint_files_are_errors_that_name_the_file(assets, tmp_path):
    output_dir = tmp_path / "run"
    trained(assets, output_dir, max_train_steps=1)
    checkpoint = output_dir / "checkpoint-1"

    def resume():
        reset_accelerate_state()
        return REPATrainer(tiny_args(assets, output_dir, resume_from_checkpoint="latest"))

    ema_file = checkpoint / "ema.safetensors"
    ema_bytes = ema_file.read_bytes()
    ema_file.write_bytes(ema_bytes[:100])
    with pytest.raises(ValueError, match=rf"{ema_file} is not a readable safetensors file"):
        resume()
    ema_file.write_bytes(ema_bytes)

    rng_file = checkpoint / "random_states_0.pkl"
    rng_bytes = rng_file.read_bytes()
    rng_file.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=rf"{rng_file} could not be read"):
        resume()
    rng_file.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{rng_file} is missing"):
        resume()
    rng_file.write_bytes(rng_bytes)

    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({key: value for key, value in state.items() if key != "format"}))
    with pytest.raises(ValueError, match=r"another version of diffusers-repa \(checkpoint format 1, this one reads 2"):
        resume()
    state_file.write_text(json.dumps({**state, "global_step": "1"}))
    with pytest.raises(ValueError, match=r"'global_step' must be a non-negative integer, got '1'"):
        resume()
    state_file.write_text(json.dumps(state))
    assert resume().global_step == 1


# ------------------------------------------------------------------------------------- pixel space and evaluation


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory) -> Path:
    """The synthetic images as a pixel-space cache (no VAE): crops and labels only."""
    images = synthetic_class_dataset(num_classes=4, samples_per_class=4, resolution=RESOLUTION)
    return build_latent_cache(images, tmp_path_factory.mktemp("pixels"), None, RESOLUTION, show_progress=False)


def pixel_settings(pixel_cache: Path, **overrides) -> dict:
    """`tiny_args` overrides for pixel space: 32-px RGB inputs with patch 8, a 4×4 token grid (the tiny encoder's
    2×2 grid is resampled to it)."""
    values = {"cache_dir": str(pixel_cache), "vae": "none", "model": "SiT-S/8", "interpolate_targets": True}
    return {**values, **overrides}


def test_pixel_space_trains_on_the_crops_and_resumes_exactly(assets, pixel_cache, tmp_path):
    straight = trained(assets, tmp_path / "straight", **pixel_settings(pixel_cache, max_train_steps=4))
    assert straight.vae is None and straight.unwrapped_model.config.in_channels == 3
    batch = next(iter(make_train_dataloader(load_latent_cache(pixel_cache), 4)))
    assert set(batch) == {"image", "label"}  # no VAE moments in a pixel cache
    torch.testing.assert_close(straight.objective.clean_inputs(batch, None), batch["image"].float() / 127.5 - 1)

    trained(assets, tmp_path / "resumed", **pixel_settings(pixel_cache, max_train_steps=2))
    resumed = trained(
        assets, tmp_path / "resumed",
        **pixel_settings(pixel_cache, max_train_steps=4, resume_from_checkpoint="latest"),
    )  # fmt: skip
    assert_same_tensors(parameters(resumed.unwrapped_model), parameters(straight.unwrapped_model), rtol=0, atol=0)
    assert_same_tensors(parameters(resumed.ema_model), parameters(straight.ema_model), rtol=0, atol=0)
    pipe = SiTPipeline.from_pretrained(tmp_path / "resumed" / "pipeline")
    images = pipe(class_labels=[0, 3], num_inference_steps=2, output_type="np").images
    assert (
        pipe.vae is None and images.shape == (2, RESOLUTION, RESOLUTION, 3) and 0 <= images.min() <= images.max() <= 1
    )


def test_evaluation_during_training_is_deterministic_and_resumes_without_repeating_or_skipping(
    assets, pixel_cache, tmp_path
):
    settings = {"max_train_steps": 4, "eval_steps": 2, "eval_metric": "digits", "eval_num_samples": 8}
    settings |= {"eval_inference_steps": 2, "checkpointing_steps": 2, "eval_num_reference": 12}
    straight = trained(assets, tmp_path / "straight", **pixel_settings(pixel_cache, **settings))
    expected = (tmp_path / "straight" / "eval.csv").read_text()
    assert expected.splitlines()[0] == "step,fd_digits,class_accuracy"
    assert [line.split(",")[0] for line in expected.splitlines()[1:]] == ["2", "4"]
    assert straight.eval_metrics.keys() == {"fd_digits", "class_accuracy"}
    assert (tmp_path / "straight" / "eval.png").is_file() and (
        tmp_path / "straight" / "pipeline" / "eval.png"
    ).is_file()
    assert "| fd_digits |" in (tmp_path / "straight" / "pipeline" / "README.md").read_text()

    # A run killed after evaluating step 4 but before its checkpoint: it resumes at step 2 and evaluates step 4 again,
    # in place of the row the killed run wrote.
    output_dir = tmp_path / "killed"
    trained(assets, output_dir, **pixel_settings(pixel_cache, **settings))
    shutil.rmtree(output_dir / "checkpoint-4")
    shutil.rmtree(output_dir / "pipeline")
    resume = {**settings, "resume_from_checkpoint": "latest"}
    resumed = trained(assets, output_dir, **pixel_settings(pixel_cache, **resume))
    assert resumed.global_step == 4
    assert (output_dir / "eval.csv").read_text() == expected  # same rows, same numbers, each step once


def test_fine_tuning_refuses_size_flags_that_the_pretrained_model_does_not_have(assets, base_pipeline, tmp_path):
    args = tiny_args(assets, tmp_path / "run", pretrained_model=str(base_pipeline), lora_rank=4, hidden_size=64)
    with pytest.raises(ValueError, match=r"has hidden_size 32, not hidden_size 64: leave those flags out"):
        REPATrainer(args)


# ------------------------------------------------------------------------------------------ DiT + improved DDPM


def test_dit_with_repa_trains_resumes_exactly_and_exports_a_dit_pipeline(assets, tmp_path):
    # DiT-S/2 resized: 4×4×4 latents, patch 2 → a 2×2 token grid, the tiny encoder's; REPA head after block 1.
    settings = {"model": "DiT-S/2", "max_train_steps": 4, "checkpointing_steps": 2}
    straight = trained(assets, tmp_path / "straight", **settings)
    assert straight.is_dit and isinstance(straight.objective, DDPMObjective)
    assert isinstance(straight.unwrapped_model, TransformerWithREPAHead)
    assert straight.num_nonfinite_steps == 0

    trained(assets, tmp_path / "resumed", **{**settings, "max_train_steps": 2})
    resumed = trained(assets, tmp_path / "resumed", **settings, resume_from_checkpoint="latest")
    assert_same_tensors(parameters(resumed.unwrapped_model), parameters(straight.unwrapped_model), rtol=0, atol=0)
    assert_same_tensors(parameters(resumed.ema_model), parameters(straight.ema_model), rtol=0, atol=0)

    pipe = DiTPipeline.from_pretrained(tmp_path / "resumed" / "pipeline")  # plain diffusers, no REPA head inside
    assert pipe.transformer.config.out_channels == 8 and not hasattr(pipe.transformer, "head")
    images = pipe(class_labels=[0, 3], num_inference_steps=3, guidance_scale=4.0, output_type="np").images
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()
    assert "DiTPipeline.from_pretrained" in (tmp_path / "resumed" / "pipeline" / "README.md").read_text()


def test_dit_presets_refuse_what_their_path_does_not_do(assets, tmp_path):
    with pytest.raises(ValueError, match=r"--model DiT-S/2 \(a DiT\) does not support --compile"):
        tiny_args(assets, tmp_path, model="DiT-S/2", compile=True)


def test_a_pretrained_dit_is_fine_tuned_with_repa(assets, tmp_path):
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=4,
        patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    base = tmp_path / "base"
    DiTPipeline(dit, AutoencoderKL.from_pretrained(assets.vae), DPMSolverMultistepScheduler()).save_pretrained(base)
    sizes = {"depth": None, "hidden_size": None, "num_attention_heads": None}
    tuned = trained(
        assets, tmp_path / "run", model="DiT-S/2", pretrained_model=str(base), max_train_steps=2, **sizes
    ).ema_model.transformer
    start = DiTTransformer2DModel.from_pretrained(base, subfolder="transformer")
    changes = [(a - b).abs().max().item() for a, b in zip(tuned.parameters(), start.parameters(), strict=True)]
    assert 0 < max(changes) < 0.01  # two AdamW steps of lr 1e-3 from the pretrained weights, not a new model
    with pytest.raises(ValueError, match="leave out --depth/--hidden_size/--num_attention_heads"):
        REPATrainer(tiny_args(assets, tmp_path / "other", model="DiT-S/2", pretrained_model=str(base), depth=3))


def test_a_new_dit_starts_as_dit_does(tmp_path):
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=4
    )
    init_dit_weights(dit)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.tensor([3, 1000])
    assert torch.equal(dit(x, timestep=t, class_labels=y).sample, torch.zeros(2, 8, 4, 4))  # adaLN-Zero: predicts 0
    first, second = (block.norm1.emb for block in dit.transformer_blocks)
    assert_same_tensors(dict(first.named_parameters()), dict(second.named_parameters()), rtol=0, atol=0)
    assert 0.015 < first.class_embedder.embedding_table.weight.std() < 0.025
