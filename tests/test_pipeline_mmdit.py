"""MMDiTPipeline: parity with the original ``samplers_t2i.py`` on the mmdit_tiny reference tensors, the prompt path
with a tiny local CLIP text encoder (the empty caption as unconditional context), guidance interval, output types,
pixel space, input errors and the save/load round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import diffusers_repa
from diffusers_repa.conversion_mmdit import convert_mmdit_checkpoint
from diffusers_repa.models.tiny_vae import tiny_random_vae
from diffusers_repa.models.transformer_mmdit import MMDiTTransformer2DModel
from diffusers_repa.pipelines import MMDiTPipeline
from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

from .conftest import REPA_REFERENCE

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
    """A CLIP tokenizer on a vocabulary of single letters (no merges) and a random 2-layer CLIP text model whose
    width is the tiny transformer's joint_attention_dim, with CLIP's 77 positions."""
    folder = tmp_path_factory.mktemp("clip")
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(letter + "</w>" for letter in letters)]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(config).eval()
    return tokenizer, text_encoder


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
