"""MMDiTPipeline: parity with the original ``samplers_t2i.py`` on the mmdit_tiny reference tensors, the prompt path
with a tiny local CLIP text encoder (the empty caption as unconditional context), guidance interval, output types,
pixel space, input errors and the save/load round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import diffusers_repa
from diffusers_repa.conversion_mmdit import convert_mmdit_checkpoint
from diffusers_repa.models.tiny_text_encoder import save_letter_tokenizer, tiny_clip_text_encoder
from diffusers_repa.models.tiny_vae import tiny_random_vae
from diffusers_repa.models.transformer_mmdit import MMDiTTransformer2DModel
from diffusers_repa.pipelines import MMDiTPipeline
from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

from .conftest import REPA_REFERENCE, write_hub_cache

MMDIT_TINY = REPA_REFERENCE / "mmdit_tiny"
META = json.loads((MMDIT_TINY / "meta.json").read_text())
TOLERANCE = 1e-5
TEXT_DIM = 16
PROMPTS = ["a cat", "a dog on a mat"]

pytestmark = pytest.mark.usefixtures("single_thread")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


class RecordedNoiseSDEScheduler(SiTSDEScheduler):
    """`SiTSDEScheduler` that replays recorded Gaussian noises, one per stochastic step, through `step(noise=)`."""

    recorded_noises: list[torch.Tensor] = []

    def step(self, model_output, timestep, sample, generator=None, noise=None, return_dict=True):
        if self.step_index < len(self.recorded_noises):
            noise = self.recorded_noises[self.step_index]
        return super().step(model_output, timestep, sample, generator=generator, noise=noise, return_dict=return_dict)


@pytest.fixture(scope="module")
def reference_transformer() -> MMDiTTransformer2DModel:
    path = MMDIT_TINY / "official_state_dict.safetensors"
    return convert_mmdit_checkpoint(path, encoder_depth=META["config"]["encoder_depth"]).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The library's letter tokenizer and a random 2-layer CLIP text model whose width is the tiny transformer's
    joint_attention_dim, with CLIP's 77 positions."""
    return save_letter_tokenizer(tmp_path_factory.mktemp("clip")), tiny_clip_text_encoder(TEXT_DIM)


def tiny_transformer(in_channels: int = 4) -> MMDiTTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MMDiTTransformer2DModel.from_depth(
            depth=2, sample_size=8, in_channels=in_channels, joint_attention_dim=TEXT_DIM, projection_dims=()
        ).eval()


def make_pipeline(transformer, scheduler=None, vae=None, clip=(None, None)) -> MMDiTPipeline:
    tokenizer, text_encoder = clip
    pipe = MMDiTPipeline(transformer, vae, scheduler or SiTODEScheduler(), tokenizer, text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_batch_sizes(transformer) -> list[int]:
    sizes = []
    transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True
    )
    return sizes


# --- parity with the original samplers_t2i ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(META["samplers"]))
def test_reproduces_the_original_t2i_samplers(reference_transformer, name):
    settings = META["samplers"][name]
    reference = load_file(str(MMDIT_TINY / f"{name}.safetensors"))
    if name.startswith("sampler_ode"):
        scheduler = SiTODEScheduler(solver="heun" if settings["heun"] else "euler")
    else:
        scheduler = RecordedNoiseSDEScheduler(path_type=settings["path_type"])
        scheduler.recorded_noises = [reference[f"noise_{i:03d}"] for i in range(settings["num_noises"])]
    pipe = make_pipeline(reference_transformer, scheduler)
    (samples,) = pipe(
        prompt_embeds=reference["context"],
        negative_prompt_embeds=reference["null_context"],
        num_inference_steps=settings["num_steps"],
        guidance_scale=settings["cfg_scale"],
        guidance_interval=(settings.get("guidance_low", 0.0), settings.get("guidance_high", 1.0)),
        latents=reference["latents"],
        output_type="latent",
        return_dict=False,
    )
    assert samples.dtype == torch.float64 and samples.shape == reference["sample"].shape
    assert relative_error(samples, reference["sample"]) <= TOLERANCE


@pytest.mark.parametrize(
    ("solver", "steps", "interval", "expected"),
    [
        ("euler", 4, (0.0, 0.5), [1, 1, 2, 2]),  # t = 1, 0.75, 0.5, 0.25
        # Predictors at t = 1, 2/3, 1/3 (the last interval is plain Euler); the corrector at 1/3 follows the
        # predictor at 2/3, which started inside the interval.
        ("heun", 3, (0.5, 1.0), [2, 2, 2, 2, 1]),
    ],
)
def test_guidance_doubles_the_batch_only_inside_the_interval(solver, steps, interval, expected):
    transformer = tiny_transformer()
    sizes = record_batch_sizes(transformer)
    embeds = torch.randn(1, 3, TEXT_DIM)
    pipe = make_pipeline(transformer, SiTODEScheduler(solver=solver))
    pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        num_inference_steps=steps,
        guidance_scale=2.0,
        guidance_interval=interval,
        output_type="latent",
    )
    assert sizes == expected and pipe.num_timesteps == len(expected)


# --- prompts through the CLIP text encoder ------------------------------------------------------------------------


def test_prompts_are_encoded_like_the_original_features(clip):
    """Prompts become CLIP's last hidden state over 77 tokens (truncated and padded to max length, no attention
    mask), and the unconditional context is the empty caption's: the prompt path equals passing those features."""
    tokenizer, text_encoder = clip
    ids = tokenizer([*PROMPTS, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        features = text_encoder(ids.input_ids).last_hidden_state
    transformer = tiny_transformer()
    with_text_encoder = make_pipeline(transformer, clip=clip)
    context, null_context = with_text_encoder.encode_prompt(PROMPTS, torch.device("cpu"), True)
    assert context.shape == null_context.shape == (2, 77, TEXT_DIM)
    torch.testing.assert_close(context, features[:2], rtol=0, atol=0)
    torch.testing.assert_close(null_context, features[2:].expand(2, -1, -1), rtol=0, atol=0)

    kwargs = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "latent"}
    from_prompts = with_text_encoder(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    from_features = make_pipeline(transformer)(
        prompt_embeds=features[:2],
        negative_prompt_embeds=features[2:],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    torch.testing.assert_close(from_prompts, from_features, rtol=0, atol=0)


def test_prompt_path_shapes_determinism_and_guidance(clip):
    pipe = make_pipeline(tiny_transformer(), SiTSDEScheduler(), tiny_random_vae(), clip)

    def sample(prompt, guidance_scale=4.0, seed=0, output_type="pt"):
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            prompt, num_inference_steps=3, guidance_scale=guidance_scale, generator=generator, output_type=output_type
        ).images

    images = sample(PROMPTS)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(sample(PROMPTS), images, rtol=0, atol=0)
    assert sample(PROMPTS, seed=1).sub(images).abs().max() > 1e-3
    latents = sample(PROMPTS, output_type="latent")
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float64
    assert relative_error(sample(PROMPTS, guidance_scale=1.0, output_type="latent"), latents) > 1e-3
    # Another first caption changes the first image only.
    other = sample(["a bird", "a dog on a mat"], output_type="latent")
    assert relative_error(other[0], latents[0]) > 1e-3 and relative_error(other[1], latents[1]) <= 1e-6
    decoded = pipe.vae.decode(latents.float() / 0.18215).sample
    torch.testing.assert_close(pipe.image_processor.postprocess(decoded, output_type="pt"), images)
    (single,) = pipe("a cat", num_inference_steps=2, output_type="pil", return_dict=False)
    assert [image.size for image in single] == [(64, 64)]


def test_pixel_space_pipeline_samples_images():
    pipe = make_pipeline(tiny_transformer(in_channels=3))
    kwargs = {"prompt_embeds": torch.randn(2, 3, TEXT_DIM), "num_inference_steps": 2, "guidance_scale": 1.0}
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    final = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images, (final.float() / 2 + 0.5).clamp(0, 1))


def test_callback_can_stop_guidance_and_interrupt():
    transformer = tiny_transformer()
    sizes = record_batch_sizes(transformer)
    embeds = torch.randn(1, 3, TEXT_DIM)

    def guide_once_then_stop(pipe, step, timestep, tensors):
        pipe._guidance_scale = 1.0
        pipe._interrupt = step == 1
        return {}

    pipe = make_pipeline(transformer)
    pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=embeds,
        num_inference_steps=5,
        guidance_scale=3.0,
        output_type="latent",
        callback_on_step_end=guide_once_then_stop,
    )
    assert sizes == [2, 1] and pipe.num_timesteps == 5

    def turn_guidance_on(pipe, step, timestep, tensors):
        pipe._guidance_scale = 2.0
        return {}

    with pytest.raises(ValueError, match="no unconditional context"):
        pipe(
            prompt_embeds=embeds,
            num_inference_steps=2,
            guidance_scale=1.0,
            callback_on_step_end=turn_guidance_on,
            output_type="latent",
        )


# --- errors --------------------------------------------------------------------------------------------------------


EMBEDS = torch.randn(2, 3, TEXT_DIM)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_embeds": EMBEDS, "guidance_scale": 2.0}, "needs an unconditional context"),
        ({"prompt_embeds": torch.randn(2, 3, 12)}, r"prompt_embeds must be a tensor of shape \(N, L, 16\)"),
        ({"prompt_embeds": torch.randn(2, 16)}, r"prompt_embeds must be a tensor of shape \(N, L, 16\)"),
        ({"prompt_embeds": [[0.0] * 16]}, r"prompt_embeds must be a tensor of shape \(N, L, 16\)"),
        ({"prompt": "a cat", "prompt_embeds": EMBEDS}, "exactly one of prompt and prompt_embeds, got both"),
        ({}, "exactly one of prompt and prompt_embeds, got neither"),
        ({"prompt": "a cat"}, "needs the pipeline's tokenizer and text_encoder"),
        ({"prompt": ["a cat", 3]}, "prompt must be a string or a non-empty list of strings"),
        (
            {"prompt_embeds": EMBEDS, "negative_prompt_embeds": torch.randn(2, 4, TEXT_DIM), "guidance_scale": 2.0},
            r"negative_prompt_embeds must have shape \(2 or 1, 3, 16\)",
        ),
        (
            {"prompt_embeds": EMBEDS, "guidance_scale": 2.0, "with_clip": True},
            "prompt_embeds have 3 tokens, the empty caption's features .* 77",
        ),
        ({"prompt_embeds": EMBEDS, "latents": torch.randn(2, 4, 10, 10)}, r"multiples of 2 up to 8"),
        ({"prompt_embeds": EMBEDS, "latents": torch.randn(3, 4, 8, 8)}, r"latents must have shape \(2, 4, H, W\)"),
        ({"prompt_embeds": EMBEDS, "guidance_interval": (0.8, 0.2)}, "guidance_interval must satisfy"),
        ({"prompt_embeds": EMBEDS, "output_type": "pil"}, "needs a VAE"),
    ],
)
def test_bad_input_raises(clip, kwargs, match):
    kwargs = dict(kwargs)
    pipe = make_pipeline(tiny_transformer(), clip=clip if kwargs.pop("with_clip", False) else (None, None))
    with pytest.raises(ValueError, match=match):
        pipe(**{"num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "latent", **kwargs})


# --- save / load ---------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, clip):
    pipe = make_pipeline(tiny_transformer(), SiTSDEScheduler(path_type="cosine"), tiny_random_vae(), clip)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # The pipeline's own code is saved with it (for plain diffusers); this package maps it back to its classes.
    assert index["_class_name"] == ["pipeline_mmdit", "MMDiTPipeline"] and (tmp_path / "pipeline_mmdit.py").is_file()
    assert index["transformer"] == ["transformer_mmdit", "MMDiTTransformer2DModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]

    loaded = MMDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, SiTSDEScheduler) and loaded.scheduler.config.path_type == "cosine"
    assert loaded.tokenizer_max_length == 77
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.5, "output_type": "pt"}
    expected = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    actual = loaded(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_hub_repo_id_loads_offline_from_the_cache(tmp_path, monkeypatch, clip):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    make_pipeline(tiny_transformer(), SiTSDEScheduler(), tiny_random_vae(), clip).save_pretrained(tmp_path / "saved")
    write_hub_cache(tmp_path / "cache", "org/tiny-mmdit", tmp_path / "saved")

    pipe = MMDiTPipeline.from_pretrained("org/tiny-mmdit", cache_dir=tmp_path / "cache")
    assert pipe.name_or_path == "org/tiny-mmdit"
    assert isinstance(pipe.transformer, MMDiTTransformer2DModel) and isinstance(pipe.text_encoder, CLIPTextModel)


def test_lazy_package_export():
    assert diffusers_repa.MMDiTPipeline is MMDiTPipeline
