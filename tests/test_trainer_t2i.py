"""Text-to-image REPA through the one trainer and step: an MMDiT on digits with captions, conditioned on a tiny random
CLIP's token features (cached), caption dropout to the empty caption, exact resume, MMDiTPipeline export, sampling by
prompt — the text-conditioned objective itself — and LoRA + REPA fine-tuning of a tiny random SD3 pipeline."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffusers_repa import MMDiTPipeline
from diffusers_repa.data import load_latent_cache, make_train_dataloader, read_cache_info
from diffusers_repa.encoders import save_tiny_random_encoder
from diffusers_repa.models.tiny_pipelines import build_tiny_sd3_pipeline
from diffusers_repa.models.transformer_mmdit import MMDiTTransformer2DModel
from diffusers_repa.text_encoding import encode_text, load_text_encoder
from diffusers_repa.training import REPATrainer, REPATrainingArguments
from diffusers_repa.training.model_setup import diffusion_transformer
from diffusers_repa.training.objectives import TextToImageObjective
from diffusers_repa.training.pipeline_finetune import SD3FlowObjective

RESOLUTION = 16


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return save_tiny_random_encoder("dinov2", tmp_path_factory.mktemp("encoder"), hidden_size=32, num_hidden_layers=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches") / "digits-captions"


def t2i_args(encoder: Path, cache_dir: Path, output_dir: Path, **overrides) -> REPATrainingArguments:
    values = {
        "output_dir": str(output_dir),
        "dataset": "digits-captions",
        "caption_column": "caption",
        "text_encoder": "tiny-clip",
        "max_train_samples": 24,
        "cache_dir": str(cache_dir),
        "vae": "none",
        "encoder": str(encoder),
        "interpolate_targets": True,  # the tiny encoder's grid resampled to the model's 4×4
        "resolution": RESOLUTION,
        "model": "MMDiT-2/4",
        "encoder_depth": 1,
        "projector_dim": 16,
        "max_train_steps": 4,
        "global_batch_size": 4,
        "learning_rate": 1e-3,
        "ema_decay": 0.9,
        "cfg_prob": 0.5,
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


def trained(*args, **overrides) -> REPATrainer:
    trainer = REPATrainer(t2i_args(*args, **overrides))
    trainer.train()
    return trainer


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_mmdit_trains_resumes_exactly_exports_and_samples_by_prompt(encoder, cache_dir, tmp_path, single_thread):
    straight = trained(encoder, cache_dir, tmp_path / "straight")
    assert isinstance(straight.unwrapped_model, MMDiTTransformer2DModel)
    assert isinstance(straight.objective, TextToImageObjective)
    info = read_cache_info(cache_dir)
    assert info.caption_column == "caption" and info.text_encoder == "tiny-clip" and info.num_samples == 24
    # The training grid is drawn for training captions of the spread-out classes, recorded in the card.
    assert all(isinstance(prompt, str) and prompt for prompt in straight.validation_conditions)

    trained(encoder, cache_dir, tmp_path / "resumed", max_train_steps=2)
    resumed = trained(encoder, cache_dir, tmp_path / "resumed", resume_from_checkpoint="latest")
    assert resumed.global_step == 4
    for name, value in parameters(straight.unwrapped_model).items():
        assert torch.equal(parameters(resumed.unwrapped_model)[name], value), name
    for name, value in parameters(straight.ema_model).items():
        assert torch.equal(parameters(resumed.ema_model)[name], value), name

    export = tmp_path / "straight" / "pipeline"
    pipe = MMDiTPipeline.from_pretrained(export)
    assert pipe.tokenizer is not None and pipe.text_encoder is not None and pipe.vae is None
    torch.testing.assert_close(
        pipe.transformer.state_dict(), straight.ema_model.state_dict(), rtol=0, atol=0
    )  # the EMA weights
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        prompt=["the number three", "a handwritten digit 7"], num_inference_steps=2, generator=generator,
        output_type="np",
    ).images  # fmt: skip
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and 0 <= images.min() <= images.max() <= 1
    card = (export / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "text-to-image" in card and "MMDiTPipeline" in card
    assert straight.validation_conditions[0] in card  # the grid's prompts
    assert "| `text_encoder` | `tiny-clip` |" in card and "| `caption_column` | `caption` |" in card


def test_caption_dropout_replaces_whole_contexts_with_the_empty_captions_reproducibly():
    null = torch.full((1, 3, 2), -1.0)
    batch = {"text_features": torch.arange(8 * 3 * 2, dtype=torch.float32).reshape(8, 3, 2)}
    contexts = [
        TextToImageObjective(null_context=null, caption_dropout=0.5).condition(batch, torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(contexts[0], contexts[1])  # drawn from the generator: a resumed run drops the same ones
    dropped = (contexts[0] == -1).all(dim=(1, 2))
    kept = (contexts[0] == batch["text_features"]).all(dim=(1, 2))
    assert torch.equal(dropped, ~kept) and 0 < dropped.sum() < 8
    never = TextToImageObjective(null_context=null, caption_dropout=0.0).condition(batch, torch.Generator())
    always = TextToImageObjective(null_context=null, caption_dropout=1.0).condition(batch, torch.Generator())
    assert torch.equal(never, batch["text_features"]) and (always == -1).all()


def test_cached_text_features_equal_encoding_the_drawn_caption_on_the_fly(encoder, cache_dir, tmp_path):
    trainer = REPATrainer(t2i_args(encoder, cache_dir, tmp_path / "run"))
    trainer.close()
    tokenizer, text_encoder = load_text_encoder("tiny-clip")
    batch = next(iter(make_train_dataloader(load_latent_cache(cache_dir), 4, seed=0)))
    on_the_fly = TextToImageObjective(
        null_context=torch.zeros(1, 1, 1),
        caption_dropout=0.0,
        encode_text=lambda captions: encode_text(tokenizer, text_encoder, captions),
    )
    without_features = {name: value for name, value in batch.items() if name != "text_features"}
    computed = on_the_fly.condition(without_features, torch.Generator())
    torch.testing.assert_close(computed, batch["text_features"], rtol=0, atol=2e-3)  # cached in float16
    empty = encode_text(tokenizer, text_encoder, [""])
    torch.testing.assert_close(trainer.objective.null_context, empty, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"caption_column": None}, r"is text-to-image: pass --caption_column"),
        ({"model": "SiT-S/4"}, r"--caption_column trains on captions, which --model SiT-S/4"),
        ({"depth": 3}, r"does not support --depth/--hidden_size/--num_attention_heads"),
        ({"model": "MMDiT-2x4"}, r"Unknown MMDiT preset 'MMDiT-2x4'"),
    ],
)
def test_text_to_image_flags_are_checked_up_front(encoder, cache_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        t2i_args(encoder, cache_dir, tmp_path / "run", **overrides)


def test_a_cache_of_another_text_encoder_is_refused(encoder, cache_dir, tmp_path):
    REPATrainer(t2i_args(encoder, cache_dir, tmp_path / "first")).close()  # the cache exists (tiny-clip features)
    other = tmp_path / "other-clip"
    tokenizer, text_encoder = load_text_encoder("tiny-clip")
    tokenizer.save_pretrained(other / "tokenizer")
    with torch.no_grad():
        next(text_encoder.parameters()).add_(1.0)  # other weights, same shapes
    text_encoder.save_pretrained(other / "text_encoder")
    with pytest.raises(ValueError, match=r"holds text features of 'tiny-clip', not of --text_encoder"):
        REPATrainer(t2i_args(encoder, cache_dir, tmp_path / "second", text_encoder=str(other)))


# --- fine-tuning a pretrained SD3-family pipeline with LoRA + REPA, through the same trainer --------------------------


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline")


def sd3_args(encoder: Path, tiny_sd3: Path, tmp_path: Path, output_dir: str, **overrides) -> REPATrainingArguments:
    values = {
        "model": "SD3",
        "pretrained_model": str(tiny_sd3),  # its vae/ is the run's VAE
        "lora_rank": 4,
        "resolution": 64,  # 8×8 latents of the tiny VAE, 16 tokens with patch 2
        "vae": "stabilityai/sd-vae-ft-mse",  # the default: replaced by the pipeline's own
        "max_train_samples": 8,
        "validation_inference_steps": 2,
    }
    return t2i_args(encoder, tmp_path / "sd3-cache", tmp_path / output_dir, **{**values, **overrides})


def test_sd3_lora_with_repa_trains_resumes_exactly_and_the_adapter_loads_into_the_pipeline(
    encoder, tiny_sd3, tmp_path, single_thread
):
    args = sd3_args(encoder, tiny_sd3, tmp_path, "straight")
    assert args.vae == str(tiny_sd3 / "vae")
    straight = REPATrainer(args)
    base = parameters(diffusion_transformer(straight.unwrapped_model))
    straight.train()
    assert isinstance(straight.objective, SD3FlowObjective)
    trained_names = {name for name, param in straight.unwrapped_model.named_parameters() if param.requires_grad}
    assert trained_names and all("lora" in name or name.startswith("head.") for name in trained_names)
    after = parameters(diffusion_transformer(straight.unwrapped_model))
    for name, value in base.items():  # the pretrained weights stay as they were
        assert "lora" in name or torch.equal(after[name], value), name
    moved = [name for name, value in base.items() if "lora" in name and not torch.equal(after[name], value)]
    # All adapters but the last block's text-query one train (SD3 drops that block's text outputs, so its gradient is
    # zero, as in diffusers' own SD3 LoRA example).
    assert len(moved) == sum("lora" in name for name in base) - 2

    # The sampling copy of the EMA shares the frozen base with the trained model instead of holding a second one.
    ema_params = dict(straight.ema_model.named_parameters())
    for name, param in straight.unwrapped_model.named_parameters():
        assert (ema_params[name] is param) == (not param.requires_grad), name
    # The checkpoints hold the trained parameters only (adapters and head): the base comes from --pretrained_model.
    saved = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    assert set(saved) == trained_names

    REPATrainer(sd3_args(encoder, tiny_sd3, tmp_path, "resumed", max_train_steps=2)).train()
    resumed = REPATrainer(sd3_args(encoder, tiny_sd3, tmp_path, "resumed", resume_from_checkpoint="latest"))
    resumed.train()
    for name, value in parameters(straight.ema_model).items():
        assert torch.equal(parameters(resumed.ema_model)[name], value), name

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    inputs = {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 5, pipe.transformer.config.joint_attention_dim),
        "pooled_projections": torch.randn(1, pipe.transformer.config.pooled_projection_dim),
    }
    with torch.no_grad():
        before = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(tmp_path / "straight" / "lora")
        loaded = pipe.transformer(**inputs).sample
        expected = diffusion_transformer(straight.ema_model)(**inputs).sample
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)  # the EMA adapter
    assert not torch.allclose(loaded, before)
    image = pipe("the number three", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    card = (tmp_path / "straight" / "lora" / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "load_lora_weights" in card


def test_sd3_full_fine_tune_exports_the_pipeline_with_the_trained_transformer(encoder, tiny_sd3, tmp_path):
    trainer = REPATrainer(sd3_args(encoder, tiny_sd3, tmp_path, "full", lora_rank=0, max_train_steps=2))
    assert all(param.requires_grad for param in trainer.unwrapped_model.parameters())
    trainer.train()
    exported = StableDiffusion3Pipeline.from_pretrained(tmp_path / "full" / "pipeline")
    ema = diffusion_transformer(trainer.ema_model).state_dict()  # the EMA weights, without the REPA head
    assert exported.transformer.state_dict().keys() == ema.keys()
    assert all(torch.equal(value, ema[name]) for name, value in exported.transformer.state_dict().items())
    original = StableDiffusion3Pipeline.from_pretrained(tiny_sd3).transformer.state_dict()
    assert not all(torch.equal(value, original[name]) for name, value in ema.items())
    assert exported.vae.config.latent_channels == 16 and exported.text_encoder is not None


def test_sd3_needs_a_pretrained_pipeline_and_captions(encoder, tiny_sd3, tmp_path):
    with pytest.raises(
        ValueError, match=r"SD3 names a pretrained pipeline's transformer: pass it with --pretrained_model"
    ):
        sd3_args(encoder, tiny_sd3, tmp_path, "run", pretrained_model=None, lora_rank=0)
    with pytest.raises(ValueError, match=r"is text-to-image: pass --caption_column"):
        sd3_args(encoder, tiny_sd3, tmp_path, "run", caption_column=None)
