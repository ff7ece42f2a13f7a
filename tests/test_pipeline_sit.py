"""SiTPipeline: parity with the original REPA samplers, guidance interval, save/load (folder and Hub cache), labels,
output types, pixel space (no VAE), input errors, LoRA loading, and the pipelines/sample.py CLI."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.utils import make_image_grid
from huggingface_hub.errors import LocalEntryNotFoundError
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffusers_repa.conversion import convert_repa_checkpoint
from diffusers_repa.models import SiTTransformer2DModel
from diffusers_repa.models.tiny_vae import tiny_random_vae
from diffusers_repa.pipelines import SiTPipeline, imagenet_id2label
from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

from .conftest import SIT_TINY, load_reference, load_script, write_hub_cache

SAMPLER_FIXTURES = sorted(path.stem for path in SIT_TINY.glob("sampler_*.safetensors"))


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_sit():
    return convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4, encoder_depth=2).eval()


@pytest.fixture(scope="module")
def transformer():
    return tiny_sit()


def make_pipeline(transformer, scheduler=None, vae=None, id2label=None) -> SiTPipeline:
    pipe = SiTPipeline(transformer, vae, scheduler or SiTODEScheduler(), id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A complete pipeline (tiny SiT, tiny VAE, Heun scheduler, ImageNet names) saved to a folder."""
    folder = tmp_path_factory.mktemp("pipeline")
    make_pipeline(tiny_sit(), SiTODEScheduler(solver="heun"), tiny_random_vae(), imagenet_id2label()).save_pretrained(
        folder
    )
    return folder


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("name", SAMPLER_FIXTURES)
def test_reproduces_original_samplers(transformer, sit_tiny_meta, name):
    settings = sit_tiny_meta["notes"][name]
    reference = load_reference(name)
    if name.startswith("sampler_sde"):
        scheduler = SiTSDEScheduler(path_type=settings["path_type"])
        step_noises = [reference[f"noise_{i:03d}"] for i in range(settings["n_noises"])]
    else:
        scheduler = SiTODEScheduler(solver="heun" if settings["heun"] else "euler")
        step_noises = None
    latents = make_pipeline(transformer, scheduler)(
        reference["class_labels"],
        num_inference_steps=settings["num_steps"],
        guidance_scale=settings["cfg_scale"],
        guidance_interval=(settings["guidance_low"], settings["guidance_high"]),
        latents=reference["latents"],
        output_type="latent",
        step_noises=step_noises,
    ).images
    assert latents.dtype == torch.float64
    assert relative_error(latents, reference["output"]) <= 1e-5


def record_batch_sizes(transformer):
    sizes = []
    handle = transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize(
    ("solver", "steps", "interval", "expected"),
    [
        # grid 1, 5/6, 4/6, 1/2, 1/3, 1/6: guided (doubled batch) only where t ≤ 0.7
        ("euler", 6, (0.0, 0.7), [3, 3, 6, 6, 6, 6]),
        # Heun, grid 1, .8, .6, .4, .2: a corrector follows its predictor's decision; 2N − 1 calls
        ("heun", 5, (0.2, 0.9), [3, 3, 6, 6, 6, 6, 6, 6, 6]),
    ],
)
def test_guidance_doubles_the_batch_only_inside_the_interval(transformer, solver, steps, interval, expected):
    pipe = make_pipeline(transformer, SiTODEScheduler(solver=solver))
    sizes, handle = record_batch_sizes(transformer)
    try:
        pipe(
            [1, 2, 3], num_inference_steps=steps, guidance_scale=2.0, guidance_interval=interval, output_type="latent"
        )
        assert sizes == expected
        sizes.clear()
        pipe(
            [1, 2, 3], num_inference_steps=steps, guidance_scale=1.0, guidance_interval=interval, output_type="latent"
        )
        assert sizes == [3] * len(expected)
    finally:
        handle.remove()


def test_flow_match_scheduler_gets_the_model_time(transformer):
    """diffusers' FlowMatchEulerDiscreteScheduler counts t·1000; the model must still see t (and the null class
    must never appear without guidance)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    latents = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([5, 9])
    out = make_pipeline(transformer, scheduler)(labels, 3, latents=latents, output_type="latent").images

    sigmas = scheduler.sigmas.double()  # linspace(1, 1/1000, 3) then 0
    x = latents.double()
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            velocity = transformer(x.float(), sigma.float().expand(2), labels, return_projections=False).sample
            x = x + (sigma_next - sigma) * velocity.double()
    assert relative_error(out, x) <= 1e-5


def test_save_load_round_trip_and_output_types(saved_pipeline):
    index = json.loads((saved_pipeline / "model_index.json").read_text())
    # The components name the code files saved with them (plain diffusers loads them with trust_remote_code=True).
    assert index["transformer"] == ["transformer_sit", "SiTTransformer2DModel"]
    assert index["scheduler"] == ["scheduling_sit_ode", "SiTODEScheduler"]
    assert index["id2label"]["207"] == "golden retriever"

    pipe = SiTPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, SiTODEScheduler) and pipe.scheduler.config.solver == "heun"
    assert pipe.get_label_ids(["golden retriever"]) == [207]

    original = make_pipeline(tiny_sit(), SiTODEScheduler(solver="heun"), tiny_random_vae(), imagenet_id2label())
    kwargs = {"class_labels": [207, 3], "num_inference_steps": 2, "guidance_scale": 1.5}
    expected = original(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    outputs = {
        output_type: pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type=output_type).images
        for output_type in ("pt", "np", "pil", "latent")
    }
    torch.testing.assert_close(outputs["pt"], expected)
    assert outputs["pt"].shape == (2, 3, 64, 64) and outputs["pt"].min() >= 0 and outputs["pt"].max() <= 1
    np.testing.assert_allclose(outputs["np"], outputs["pt"].permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert [image.size for image in outputs["pil"]] == [(64, 64)] * 2
    assert isinstance(outputs["pil"][0], PIL.Image.Image)
    assert outputs["latent"].shape == (2, 4, 8, 8)
    decoded = pipe.vae.decode(outputs["latent"].float() / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(pipe.image_processor.postprocess(decoded, output_type="pt"), outputs["pt"])
    (images,) = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False)
    torch.testing.assert_close(images, outputs["pt"])


@pytest.mark.parametrize(
    ("vae_config", "to_vae_latents"),
    [
        ({"shift_factor": 0.1, "scaling_factor": 1.5}, lambda z: z / 1.5 + 0.1),
        (
            {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [2.0, 1.0, 0.5, 1.0], "scaling_factor": 0.5},
            lambda z: (
                z * torch.tensor([2.0, 1.0, 0.5, 1.0]).view(1, 4, 1, 1) / 0.5
                + torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
            ),
        ),
    ],
)
def test_decoding_inverts_the_latent_normalisation(transformer, vae_config, to_vae_latents):
    vae = tiny_random_vae()
    vae.register_to_config(**vae_config)
    pipe = make_pipeline(transformer, vae=vae)
    latents = pipe([1], 2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    images = pipe([1], 2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    expected = pipe.image_processor.postprocess(vae.decode(to_vae_latents(latents.float())).sample, output_type="pt")
    torch.testing.assert_close(images, expected)


def tiny_pixel_sit() -> SiTTransformer2DModel:
    """A pixel-space SiT: 16×16 RGB, patch 4 (a 4×4 grid of 16 tokens), 10 classes. The weights that adaLN-Zero
    starts at zero are drawn at random too, so that noise, time, class and null class all change the velocity."""
    torch.manual_seed(0)
    model = SiTTransformer2DModel(
        sample_size=16,
        patch_size=4,
        in_channels=3,
        hidden_size=32,
        depth=2,
        num_attention_heads=2,
        num_classes=10,
        encoder_depth=1,
        projector_dim=16,
        projection_dims=(8,),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    return model.eval()


@pytest.mark.parametrize(("guidance_scale", "guidance_interval"), [(1.0, (0.0, 1.0)), (4.0, (0.0, 0.7))])
def test_pixel_space_pipeline_samples_images(guidance_scale, guidance_interval):
    pipe = make_pipeline(tiny_pixel_sit(), SiTSDEScheduler())
    assert pipe.vae is None and pipe.vae_scale_factor == 1
    kwargs = {"class_labels": [1, 7], "num_inference_steps": 4, "guidance_scale": guidance_scale}
    kwargs["guidance_interval"] = guidance_interval

    def sample(output_type: str, seed: int = 0):
        return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type=output_type).images

    x = sample("latent")
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float64
    assert x.abs().max() > 1  # an untrained model leaves [-1, 1]: the image outputs must clamp
    images = sample("pt")
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images, (x.float() / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    assert images.min() == 0 and images.max() == 1
    np.testing.assert_allclose(sample("np"), images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = sample("pil")
    assert [(image.mode, image.size) for image in pil] == [("RGB", (16, 16))] * 2
    np.testing.assert_array_equal(
        np.stack([np.asarray(image) for image in pil]),
        (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8),
    )
    torch.testing.assert_close(sample("pt"), images, rtol=0, atol=0)  # same generator, same images
    assert not torch.equal(sample("pt", seed=1), images)


def test_pixel_space_guidance_changes_the_samples():
    pipe = make_pipeline(tiny_pixel_sit())
    latents = torch.randn(2, 3, 16, 16)
    kwargs = {"class_labels": [1, 7], "num_inference_steps": 4, "latents": latents, "output_type": "latent"}
    plain = pipe(**kwargs, guidance_scale=1.0).images
    guided = pipe(**kwargs, guidance_scale=4.0, guidance_interval=(0.0, 0.7)).images
    assert relative_error(guided, plain) > 1e-3


def test_pixel_space_pipeline_save_load_round_trip(tmp_path):
    make_pipeline(
        tiny_pixel_sit(), SiTSDEScheduler(), id2label={str(i): f"digit {i}" for i in range(10)}
    ).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["id2label"]["3"] == "digit 3"
    assert not (tmp_path / "vae").exists()

    pipe = SiTPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is None and isinstance(pipe.scheduler, SiTSDEScheduler) and pipe.vae_scale_factor == 1
    original = make_pipeline(tiny_pixel_sit(), SiTSDEScheduler())
    kwargs = {"class_labels": ["digit 3", 5], "num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np"}
    loaded = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    kwargs["class_labels"] = [3, 5]
    np.testing.assert_array_equal(loaded, original(**kwargs, generator=torch.Generator().manual_seed(0)).images)


def test_low_precision_model_keeps_a_float64_sampler(saved_pipeline):
    pipe = SiTPipeline.from_pretrained(saved_pipeline, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.bfloat16
    latents = torch.randn(2, 4, 8, 8)
    kwargs = {"class_labels": [1, 2], "num_inference_steps": 3, "guidance_scale": 1.5, "latents": latents}
    low_precision = pipe(**kwargs, output_type="latent").images
    assert low_precision.dtype == torch.float64
    reference = SiTPipeline.from_pretrained(saved_pipeline)
    reference.set_progress_bar_config(disable=True)
    assert relative_error(low_precision, reference(**kwargs, output_type="latent").images) < 0.05
    assert pipe(**kwargs, output_type="pt").images.dtype == torch.bfloat16


def test_hub_repo_id_loads_offline_from_the_cache(tmp_path, monkeypatch, saved_pipeline):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    write_hub_cache(tmp_path / "cache", "org/tiny-sit", saved_pipeline)

    pipe = SiTPipeline.from_pretrained("org/tiny-sit", cache_dir=tmp_path / "cache")
    assert pipe.name_or_path == "org/tiny-sit"
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.get_label_ids("tench") == [0]

    # Without cache_dir the default cache is used (huggingface_hub reads it at call time from its constants).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    assert isinstance(SiTPipeline.from_pretrained("org/tiny-sit").scheduler, SiTODEScheduler)
    with pytest.raises(LocalEntryNotFoundError):
        SiTPipeline.from_pretrained("org/not-cached")


def test_class_names(transformer):
    pipe = make_pipeline(transformer, id2label=imagenet_id2label())
    assert pipe.get_label_ids(["golden retriever", "Carassius auratus", "tench"]) == [207, 1, 0]
    latents = torch.randn(3, 4, 8, 8)
    by_name = pipe(["golden retriever", "3", 7], 2, latents=latents, output_type="latent").images
    by_id = pipe([207, 3, 7], 2, latents=latents, output_type="latent").images
    torch.testing.assert_close(by_name, by_id, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"several classes \[134, 517\]"):
        pipe.get_label_ids("crane")
    with pytest.raises(ValueError, match="Did you mean 'golden retriever'"):
        pipe("golden retreiver", 2, output_type="latent")
    with pytest.raises(ValueError, match="no id2label"):
        make_pipeline(transformer)("tench", 2, output_type="latent")
    with pytest.raises(ValueError, match="out of range"):
        make_pipeline(transformer, id2label={1000: "null"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_labels": "unicorn"}, "Unknown class name 'unicorn'"),
        ({"class_labels": [3, 1000]}, "1000 is out of range"),
        ({"class_labels": [-1]}, "out of range"),
        ({"class_labels": [2.5]}, "not an integer class id"),
        ({"class_labels": []}, "empty"),
        ({"guidance_interval": (0.5, 1.2)}, "guidance_interval"),
        ({"guidance_interval": (0.8, 0.2)}, "guidance_interval"),
        ({"guidance_interval": (-0.1, 0.5)}, "guidance_interval"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"latents": torch.randn(2, 4, 8, 8)}, r"latents must have shape \(1, 4, 8, 8\)"),
        ({"latents": torch.randn(1, 4, 16, 16)}, "latents must have shape"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"output_type": "pil"}, "needs a VAE"),
        ({"callback_on_step_end_tensor_inputs": ["velocity"]}, "callback_on_step_end_tensor_inputs"),
        ({"step_noises": [torch.randn(1, 4, 8, 8)]}, "injected noise"),
    ],
)
def test_bad_input_raises(transformer, kwargs, match):
    pipe = make_pipeline(transformer, id2label=imagenet_id2label())
    with pytest.raises(ValueError, match=match):
        pipe(**{"class_labels": [3], "num_inference_steps": 2, "output_type": "latent", **kwargs})


def test_step_noises_count_is_checked(transformer):
    pipe = make_pipeline(transformer, SiTSDEScheduler())
    with pytest.raises(ValueError, match="must hold 2 tensors"):
        pipe([3], 3, output_type="latent", step_noises=[torch.randn(1, 4, 8, 8)] * 3)


def test_callback_can_replace_latents(transformer):
    calls = []

    def zero_at_the_end(pipe, step, timestep, tensors):
        calls.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    out = make_pipeline(transformer)([3], 3, output_type="latent", callback_on_step_end=zero_at_the_end).images
    assert calls == [0, 1, 2]
    assert torch.count_nonzero(out) == 0


def test_training_mode_model_samples_without_label_dropout():
    model = tiny_sit()
    latents = torch.randn(3, 4, 8, 8)
    expected = make_pipeline(model)([1, 2, 3], 6, latents=latents, output_type="latent").images
    model.train()
    out = make_pipeline(model)([1, 2, 3], 6, latents=latents, output_type="latent").images
    assert model.training
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["blocks", "graph"])
def test_compiled_transformer_samples_like_the_eager_one(mode):
    # Guidance on part of the trajectory: both batch shapes (2N guided, N plain) go through the compiled model.
    latents = torch.randn(2, 4, 8, 8)
    call = {"class_labels": [1, 2], "num_inference_steps": 4, "guidance_scale": 1.8, "guidance_interval": (0, 0.6)}
    expected = make_pipeline(tiny_sit(), SiTSDEScheduler())(
        **call, latents=latents, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).images
    pipe = make_pipeline(tiny_sit(), SiTSDEScheduler())
    pipe.compile_transformer(mode)
    out = pipe(**call, latents=latents, generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    compiled_blocks = [block for block in pipe.transformer.transformer_blocks if block._compiled_call_impl is not None]
    assert len(compiled_blocks) == (len(pipe.transformer.transformer_blocks) if mode == "blocks" else 0)
    assert (pipe.transformer._compiled_call_impl is not None) == (mode == "graph")


@pytest.mark.parametrize(
    "mode, match",
    [("cuda_graphs", "CUDA graphs need the transformer on a CUDA device, it is on cpu"), ("fast", "one of")],
)
def test_compile_transformer_rejects_bad_modes(transformer, mode, match):
    with pytest.raises(ValueError, match=match):
        make_pipeline(transformer).compile_transformer(mode)
    assert transformer._compiled_call_impl is None


@pytest.mark.parametrize("writer", ["pipeline", "transformer", "bare_peft_dict"])
def test_lora_weights_round_trip(tmp_path, writer):
    # Without metadata in the file, alpha defaults to the rank; with it, alpha = 2·rank must be restored.
    alpha = 4 if writer == "bare_peft_dict" else 8
    config = LoraConfig(
        r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    tuned = tiny_sit()
    tuned.add_adapter(config)
    if writer == "pipeline":
        SiTPipeline.save_lora_weights(
            tmp_path,
            transformer_lora_layers=get_peft_model_state_dict(tuned),
            transformer_lora_adapter_metadata=config.to_dict(),
        )
    elif writer == "transformer":  # what the trainer's LoRA export writes
        tuned.save_lora_adapter(tmp_path)
    else:
        save_file(get_peft_model_state_dict(tuned), tmp_path / "pytorch_lora_weights.safetensors")
    assert [path.name for path in tmp_path.iterdir()] == ["pytorch_lora_weights.safetensors"]

    latents = torch.randn(2, 4, 8, 8)
    expected = make_pipeline(tuned)([4, 5], 2, latents=latents, output_type="latent").images
    base = make_pipeline(tiny_sit())([4, 5], 2, latents=latents, output_type="latent").images
    assert relative_error(base, expected) > 1e-3  # the adapter changes the output

    pipe = make_pipeline(tiny_sit())
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(pipe([4, 5], 2, latents=latents, output_type="latent").images, expected)
    pipe.fuse_lora()  # merged into the base weights: kept after unloading the adapter, up to rounding
    pipe.unload_lora_weights()
    assert relative_error(pipe([4, 5], 2, latents=latents, output_type="latent").images, expected) <= 1e-5


def test_lora_rejects_non_lora_weights(transformer):
    with pytest.raises(ValueError, match="Not a LoRA checkpoint"):
        make_pipeline(tiny_sit()).load_lora_weights({"proj_out.weight": torch.zeros(1)})


def test_sample_cli_writes_grid_and_images(tmp_path, saved_pipeline):
    sample = load_script("pipelines/sample.py")
    grid_path, individual = tmp_path / "grid.png", tmp_path / "images"
    argv = ["--model", str(saved_pipeline), "--class_labels", "207", "golden retriever", "tench"]
    argv += ["--sampler", "sde", "--steps", "3", "--guidance_scale", "1.8", "--guidance_interval", "0", "0.7"]
    argv += ["--seed", "0", "--output", str(grid_path), "--save_individual", str(individual), "--device", "cpu"]
    sample.main(argv)

    pipe = SiTPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SiTSDEScheduler()
    images = pipe(
        [207, 207, 0], 3, 1.8, (0.0, 0.7), generator=torch.Generator().manual_seed(0), output_type="pil"
    ).images
    expected_grid = make_image_grid(images + [PIL.Image.new("RGB", (64, 64))], rows=2, cols=2)
    assert np.array_equal(np.asarray(PIL.Image.open(grid_path)), np.asarray(expected_grid))
    written = sorted(individual.iterdir())
    assert [path.name for path in written] == ["0000.png", "0001.png", "0002.png"]
    assert np.array_equal(np.asarray(PIL.Image.open(written[2])), np.asarray(images[2]))

    with pytest.raises(ValueError, match="--heun is an ODE solver option"):
        sample.parse_args(["--model", "x", "--class_labels", "1", "--sampler", "sde", "--heun"])
