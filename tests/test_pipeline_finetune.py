"""Fine-tuning a tiny random SD3 pipeline with REPA through the trainer's `TrainingStep`: LoRA and full weights,
diffusers' SD3 flow-matching loss, reproducible draws, and the adapter loaded back with `load_lora_weights`."""

import json

import pytest
import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft.utils import get_peft_model_state_dict

from diffusers_repa.encoders import load_encoder, save_tiny_random_encoder
from diffusers_repa.losses import projection_loss
from diffusers_repa.models.tiny_pipelines import build_tiny_sd3_pipeline
from diffusers_repa.repa_head import TransformerWithREPAHead
from diffusers_repa.training import TrainingStep
from diffusers_repa.training.model_setup import token_count
from diffusers_repa.training.pipeline_finetune import (
    SD3FlowObjective,
    load_finetune_pipeline,
    prepare_transformer,
)

pytestmark = pytest.mark.usefixtures("single_thread")

RESOLUTION, LATENT, CHANNELS = 64, 8, 16  # the tiny pipeline: 64 px images, 8×8 latents of 16 channels
ENCODER_WIDTH = 16
CAPTIONS = ["a red cat", "a dog", "", "blue sky"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny SD3 pipeline folder (patch 2: 4×4 image tokens)."""
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny random DINOv2 at 64 px: 4×4 tokens of width 16, the tiny pipeline's grid."""
    folder = tmp_path_factory.mktemp("encoder") / "dinov2"
    return load_encoder(save_tiny_random_encoder("dinov2", folder, hidden_size=ENCODER_WIDTH, num_hidden_layers=1), 64)


def make_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (4, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, generator=generator),
        "latent_mean": torch.randn(4, CHANNELS, LATENT, LATENT, generator=generator),
        "latent_std": torch.rand(4, CHANNELS, LATENT, LATENT, generator=generator) * 0.1,
        "caption": list(CAPTIONS),
    }


def lora_setup(base, encoder, *, seed: int = 0, lr: float = 1e-3, **objective_kwargs):
    """A LoRA + REPA fine-tune of `base` as the trainer builds it: (pipeline, model, objective, training step)."""
    torch.manual_seed(seed)  # the LoRA and head initialisations draw from the global RNG (the trainer seeds it)
    pipeline = load_finetune_pipeline(base)
    model = prepare_transformer(
        pipeline, projection_dims=(ENCODER_WIDTH,), encoder_depth=1, projector_dim=32, lora_rank=4
    )
    objective = SD3FlowObjective(pipeline, [encoder], proj_coeff=0.5, **objective_kwargs)
    params = [param for param in model.parameters() if param.requires_grad]
    step = TrainingStep(
        Accelerator(cpu=True),
        model,
        objective,
        torch.optim.AdamW(params, lr=lr),
        None,
        torch.Generator().manual_seed(seed),
    )
    return pipeline, model, objective, step


def transformer_output(transformer, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(2, CHANNELS, LATENT, LATENT, generator=generator),
            timestep=torch.tensor([250.0, 900.0]),
            encoder_hidden_states=torch.randn(2, 20, config.joint_attention_dim, generator=generator),
            pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
            return_dict=False,
        )[0]


def test_tiny_sd3_pipeline_loads_and_draws(base):
    assert json.loads((base / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    pipeline = StableDiffusion3Pipeline.from_pretrained(base)
    assert pipeline.vae.config.latent_channels == CHANNELS
    assert (pipeline.vae.config.shift_factor, pipeline.vae.config.scaling_factor) == (0.0609, 1.5305)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)


def test_unsupported_pipelines_are_refused_naming_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline; .* supports StableDiffusion3Pipeline"):
        load_finetune_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved pipeline"):
        load_finetune_pipeline(tmp_path / "..")


def test_lora_steps_train_only_the_adapters_and_the_head(base, encoder):
    pipeline, model, _, step = lora_setup(base, encoder)
    frozen = [pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3, pipeline.vae]
    assert not any(param.requires_grad for module in frozen for param in module.parameters())
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("head.") for name in trainable)

    batch = make_batch()
    outputs = [step(iter([batch]), index) for index in range(3)]

    assert all(output.updated and torch.isfinite(output.losses).all() for output in outputs)
    assert all(output.losses[2] != 0 and -1 <= output.losses[2] <= 1 for output in outputs)  # the REPA term
    moved = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert moved <= trainable  # the base weights are bit-identical
    # Every adapter and the head train, but for the last block's text-stream queries: SD3 discards that block's text
    # outputs (context_pre_only), so their zero-initialised B gets no gradient (as in diffusers' example, which
    # targets them too; their A only decays).
    assert trainable - moved == {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"}


def test_fine_tuning_lowers_the_loss_and_the_same_seed_repeats_it(base, encoder):
    _, model, objective, step = lora_setup(base, encoder, lr=1e-2)
    batch = make_batch()
    # The loss on fixed draws (σ, noise, latents, text) measures the model alone, without the draws' variance.
    generator = torch.Generator().manual_seed(7)
    x_0 = objective.clean_inputs(batch, generator)
    fixed = {
        "x_0": x_0,
        "condition": objective.encode_captions(batch["caption"], x_0.device),
        "targets": objective.encode_targets(batch["image"]),
        "indices": objective.sample_sigma_indices(4, generator),
        "noise": torch.randn(x_0.shape, generator=generator),
    }

    def fixed_loss() -> tuple[float, float]:
        with torch.no_grad():
            output = objective.loss(
                model,
                fixed["x_0"],
                fixed["condition"],
                fixed["targets"],
                indices=fixed["indices"],
                noise=fixed["noise"],
            )
        return output.denoising_loss.mean().item(), output.projection_loss.item()

    initial = fixed_loss()
    losses = [step(iter([batch]), index).losses[0].item() for index in range(30)]
    final = fixed_loss()
    # Measured: flow matching 3.70 → 3.52, alignment (mean −cos) −0.04 → −0.37; both terms learn.
    assert final[0] < 0.97 * initial[0] and final[1] < initial[1] - 0.2

    _, _, _, replay = lora_setup(base, encoder, lr=1e-2)
    assert [replay(iter([batch]), index).losses[0].item() for index in range(5)] == losses[:5]


@pytest.mark.parametrize("weighting_scheme", ["logit_normal", "cosmap"])
def test_the_loss_is_diffusers_sd3_flow_matching_plus_repa(base, encoder, weighting_scheme):
    pipeline, model, objective, _ = lora_setup(base, encoder, weighting_scheme=weighting_scheme)
    batch = make_batch()
    generator = torch.Generator().manual_seed(5)
    replay = torch.Generator().set_state(generator.get_state())
    with torch.no_grad():
        output = objective(model, batch, generator, step=0)

    # train_dreambooth_lora_sd3.py's computation, step by step, on the same draws.
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    vae = pipeline.vae.config
    posterior = batch["latent_mean"] + batch["latent_std"] * torch.randn(batch["latent_mean"].shape, generator=replay)
    model_input = (posterior - vae.shift_factor) * vae.scaling_factor
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=4,
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        generator=replay,
    )
    noise = torch.randn(model_input.shape, generator=replay)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # the example's get_sigmas
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    prompt_embeds, _, pooled_prompt_embeds, _ = pipeline.encode_prompt(
        CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=77
    )
    with torch.no_grad(), model.head.capture(model.transformer) as captured:
        model_pred = model.transformer(
            hidden_states=noisy_model_input,
            timestep=timesteps,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_prompt_embeds,
            return_dict=False,
        )[0]
        alignment = projection_loss([encoder(batch["image"])], model.head(captured.hidden_states))
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    per_sample = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(4, -1), 1)

    torch.testing.assert_close(output.denoising_loss, per_sample)
    torch.testing.assert_close(output.projection_loss, alignment)
    torch.testing.assert_close(output.loss, per_sample.mean() + 0.5 * alignment)


def test_caption_dropout_draws_empty_captions_from_the_generator(base, encoder):
    pipeline, _, objective, _ = lora_setup(base, encoder, caption_dropout_prob=0.5)
    generator = torch.Generator().manual_seed(11)
    keep = torch.rand(4, generator=torch.Generator().set_state(generator.get_state())) >= 0.5
    assert 0 < keep.sum() < 4  # this seed drops some captions and keeps others
    condition = objective.condition(make_batch(), generator)
    expected = [caption if kept else "" for caption, kept in zip(CAPTIONS, keep.tolist())]
    embeds, _, pooled, _ = pipeline.encode_prompt(
        expected, None, None, do_classifier_free_guidance=False, max_sequence_length=77
    )
    torch.testing.assert_close(condition, {"encoder_hidden_states": embeds, "pooled_projections": pooled})
    assert not condition["encoder_hidden_states"].requires_grad


@pytest.mark.parametrize("layout", ["sd3", "sd3.5-medium"])
def test_the_adapter_loads_into_the_pipeline_with_load_lora_weights(base, encoder, tmp_path, layout):
    if layout == "sd3.5-medium":  # a second image attention in the first block, RMS-normalised q and k
        base = build_tiny_sd3_pipeline(tmp_path / "sd35", dual_attention_layers=(0,), qk_norm="rms_norm")
    _, model, _, step = lora_setup(base, encoder, lr=1e-2)
    for index in range(3):
        step(iter([make_batch(index)]), index)
    model.eval()

    # What the trainer's export writes for LoRA (export.write_export): diffusers' own adapter format.
    folder = tmp_path / "lora"
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(model.transformer)
    )

    pipeline = StableDiffusion3Pipeline.from_pretrained(base)
    untouched = transformer_output(pipeline.transformer)
    pipeline.load_lora_weights(folder)
    loaded = transformer_output(pipeline.transformer)
    torch.testing.assert_close(loaded, transformer_output(model.transformer))
    assert not torch.allclose(loaded, untouched, atol=1e-4)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)


def test_encoder_tokens_are_interpolated_to_the_transformer_grid(tmp_path, encoder):
    base = build_tiny_sd3_pipeline(tmp_path / "patch1", patch_size=1)  # 8×8 image tokens, the encoder has 4×4
    torch.manual_seed(0)
    pipeline = load_finetune_pipeline(base)
    model = prepare_transformer(
        pipeline, projection_dims=(ENCODER_WIDTH,), encoder_depth=1, projector_dim=32, lora_rank=2
    )
    assert isinstance(model, TransformerWithREPAHead)
    num_tokens = token_count(model, LATENT)
    assert num_tokens == 64
    batch = make_batch()
    with torch.no_grad():
        output = SD3FlowObjective(pipeline, [encoder], target_num_tokens=num_tokens)(
            model, batch, torch.Generator(), step=0
        )
        assert torch.isfinite(output.loss) and output.projection_loss != 0
        with pytest.raises(ValueError, match="differ in shape"):
            SD3FlowObjective(pipeline, [encoder])(model, batch, torch.Generator(), step=0)
