"""MMDiTTransformer2DModel (REPA's text-to-image model): parity with the original ``models/mmdit.py``, its loss and its
``samplers_t2i.py`` samplers on the reference tensors in fixtures/repa_reference/mmdit_tiny, the checkpoint
conversion, and the diffusers features (save/load, LoRA, gradient checkpointing, regional compile)."""

import argparse
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig
from safetensors.torch import load_file

import diffusers_repa
from diffusers_repa.conversion_mmdit import (
    convert_mmdit_checkpoint,
    convert_mmdit_state_dict,
    export_to_mmdit_state_dict,
    infer_mmdit_config,
)
from diffusers_repa.interpolants import interpolate
from diffusers_repa.losses import denoising_loss, projection_loss
from diffusers_repa.models.transformer_mmdit import MMDiTTransformer2DModel
from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler

from .conftest import REPA_REFERENCE

MMDIT_TINY = REPA_REFERENCE / "mmdit_tiny"
OFFICIAL_PATH = MMDIT_TINY / "official_state_dict.safetensors"
OFFICIAL = load_file(str(OFFICIAL_PATH))
META = json.loads((MMDIT_TINY / "meta.json").read_text())
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


def load_mmdit_reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(MMDIT_TINY / f"{name}.safetensors"))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_same_state(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def model() -> MMDiTTransformer2DModel:
    return convert_mmdit_checkpoint(OFFICIAL_PATH, encoder_depth=META["config"]["encoder_depth"]).eval()


def small_model(**config) -> MMDiTTransformer2DModel:
    torch.manual_seed(0)
    defaults = {"sample_size": 8, "depth": 2, "joint_attention_dim": 16, "encoder_depth": 1, "projector_dim": 16}
    return MMDiTTransformer2DModel.from_depth(**{**defaults, "projection_dims": (8,), **config})


def small_inputs(batch: int = 2, side: int = 8, context_len: int = 3) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, side, side, generator=generator),
        torch.rand(batch, generator=generator),
        torch.randn(batch, context_len, 16, generator=generator),
    )


# --- the original's configuration -------------------------------------------------------------------------------


def test_config_follows_the_original_sizing(model):
    config = META["config"]
    assert model.config.sample_size == config["input_size"]
    assert (model.config.depth, model.config.num_attention_heads) == (config["depth"], config["depth"])
    assert model.hidden_size == 32 * config["depth"]
    assert model.config.joint_attention_dim == 768
    assert list(model.config.projection_dims) == config["z_dims"]
    assert model.config.projector_dim == config["projector_dim"]
    assert model.config.encoder_depth == config["encoder_depth"]
    # Only the last block's text stream is pre_only: no MLP and no output projection.
    blocks = model.transformer_blocks
    assert [block.context_pre_only for block in blocks] == [False] * (len(blocks) - 1) + [True]
    assert blocks[-1].ff_context is None and blocks[-1].attn.to_add_out is None
    # No pooled text vector, no class label: the time embedding is the whole conditioning.
    assert {name for name, _ in model.named_children()} == {
        "pos_embed",
        "time_proj",
        "time_embed",
        "context_embedder",
        "transformer_blocks",
        "projectors",
        "norm_out",
        "proj_out",
    }


# --- forward parity -----------------------------------------------------------------------------------------------


def test_forward_matches_the_original(model):
    reference = load_mmdit_reference("forward")
    # A 16×16 latent: 8×8 patches, so the 16×16-patch position table is center-cropped, as in the original.
    assert reference["x"].shape[-1] < model.config.sample_size
    with torch.no_grad():
        output = model(reference["x"], reference["t"], reference["context"])
    assert relative_error(output.sample, reference["velocity"]) <= TOLERANCE
    assert len(output.projections) == 1
    assert relative_error(output.projections[0], reference["projection_0"]) <= TOLERANCE


def test_sd3_blocks_need_a_dead_pooled_projection_to_match(model):
    """Why the model is not `SD3Transformer2DModel`: with the same weights SD3 adds PixArtAlphaTextProjection(pooled)
    to the conditioning; only with that projection zeroed (and a zero pooled vector) does it reproduce the original."""
    reference = load_mmdit_reference("forward")
    config = model.config
    sd3 = SD3Transformer2DModel(
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        num_layers=config.depth,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        caption_projection_dim=model.hidden_size,
        pooled_projection_dim=8,
        out_channels=config.in_channels,
        pos_embed_max_size=config.sample_size // config.patch_size,
    ).eval()
    weights = {
        key.replace("time_embed.", "time_text_embed.timestep_embedder."): value
        for key, value in model.state_dict().items()
        if not key.startswith("projectors.")
    }
    missing, unexpected = sd3.load_state_dict(weights, strict=False)
    assert not unexpected and all(key.startswith("time_text_embed.text_embedder.") for key in missing)
    pooled = torch.zeros(reference["x"].shape[0], 8)
    with torch.no_grad():
        default_pooled_path = sd3(reference["x"], reference["context"], pooled, reference["t"]).sample
        for parameter in sd3.time_text_embed.text_embedder.parameters():
            parameter.zero_()
        zeroed_pooled_path = sd3(reference["x"], reference["context"], pooled, reference["t"]).sample
    assert relative_error(default_pooled_path, reference["velocity"]) > 1e-2
    assert relative_error(zeroed_pooled_path, reference["velocity"]) <= TOLERANCE


# --- loss parity --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_loss_matches_the_original(model, path_type):
    reference = load_mmdit_reference(f"loss_{path_type}")
    x_t, target = interpolate(reference["latents"], reference["noise"], reference["t"], path_type)
    with torch.no_grad():
        output = model(x_t, reference["t"], reference["context"])
    assert relative_error(denoising_loss(output.sample, target), reference["denoising_loss"]) <= TOLERANCE
    alignment = projection_loss([reference["target_0"]], output.projections)
    assert relative_error(alignment.reshape(1), reference["projection_loss"].reshape(1)) <= TOLERANCE


# --- sampler parity -----------------------------------------------------------------------------------------------


def sample_with_guidance(
    model: MMDiTTransformer2DModel,
    scheduler: SiTODEScheduler | SiTSDEScheduler,
    reference: dict[str, torch.Tensor],
    settings: dict,
) -> torch.Tensor:
    """The class-conditional pipeline's loop with text instead of labels: inside the guidance interval the batch is
    doubled as [cond; uncond] against the null (empty-caption) context; the state stays in float64."""
    context, null_context = reference["context"], reference["null_context"]
    guided_context = torch.cat([context, null_context])
    scale = settings["cfg_scale"]
    low, high = settings.get("guidance_low", 0.0), settings.get("guidance_high", 1.0)
    scheduler.set_timesteps(settings["num_steps"])
    latents = reference["latents"].to(torch.float64)
    use_guidance = False
    for index, t in enumerate(scheduler.timesteps):
        time = float(t)
        # A Heun corrector follows its predictor's guidance decision (the original decides on the interval start).
        if getattr(scheduler, "state_in_first_order", True):
            use_guidance = scale > 1 and low <= time <= high
        model_input = latents.to(torch.float32)
        if use_guidance:
            model_input = torch.cat([model_input, model_input])
        timestep = torch.full((model_input.shape[0],), time, dtype=torch.float32)
        with torch.no_grad():
            velocity = model(
                model_input, timestep, guided_context if use_guidance else context, return_projections=False
            ).sample.to(torch.float64)
        if use_guidance:
            conditional, unconditional = velocity.chunk(2)
            velocity = unconditional + scale * (conditional - unconditional)
        noise_key = f"noise_{index:03d}"
        noise = {"noise": reference[noise_key]} if noise_key in reference else {}
        latents = scheduler.step(velocity, t, latents, **noise, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("name", sorted(META["samplers"]))
def test_samplers_match_the_original(model, name):
    settings = META["samplers"][name]
    reference = load_mmdit_reference(name)
    if name.startswith("sampler_ode"):
        scheduler = SiTODEScheduler(solver="heun" if settings["heun"] else "euler")
    else:
        scheduler = SiTSDEScheduler(path_type=settings["path_type"])
    samples = sample_with_guidance(model, scheduler, reference, settings)
    recorded = sum(key.startswith("noise_") for key in reference)
    assert recorded == settings["num_noises"] == getattr(scheduler, "num_stochastic_steps", 0)
    assert relative_error(samples, reference["sample"]) <= TOLERANCE


# --- conversion ---------------------------------------------------------------------------------------------------


def test_conversion_round_trip_is_bit_identical(model):
    assert_same_state(export_to_mmdit_state_dict(model), OFFICIAL)
    assert_same_state(convert_mmdit_state_dict(export_to_mmdit_state_dict(model)), model.state_dict())


def test_conversion_splits_qkv_and_reorders_two_chunk_adaln():
    converted = convert_mmdit_state_dict(OFFICIAL)
    qkv = OFFICIAL["joint_blocks.0.context_block.attn.qkv.weight"]
    for rows, name in zip(qkv.chunk(3), ["add_q_proj", "add_k_proj", "add_v_proj"], strict=True):
        assert torch.equal(converted[f"transformer_blocks.0.attn.{name}.weight"], rows)
    # Original [shift; scale], diffusers' AdaLayerNormContinuous [scale; shift].
    shift, scale = OFFICIAL["final_layer.adaLN_modulation.1.bias"].chunk(2)
    assert torch.equal(converted["norm_out.linear.bias"], torch.cat([scale, shift]))
    shift, scale = OFFICIAL["joint_blocks.1.context_block.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(converted["transformer_blocks.1.norm1_context.linear.weight"], torch.cat([scale, shift]))
    # Six-chunk adaLN layers keep their order (AdaLayerNormZero chunks as the original).
    assert torch.equal(
        converted["transformer_blocks.0.norm1_context.linear.weight"],
        OFFICIAL["joint_blocks.0.context_block.adaLN_modulation.1.weight"],
    )


def test_wrapped_keys_convert_and_foreign_keys_are_rejected():
    wrapped = {f"module._orig_mod.{key}": value for key, value in OFFICIAL.items()}
    assert_same_state(convert_mmdit_state_dict(wrapped), convert_mmdit_state_dict(OFFICIAL))
    with pytest.raises(ValueError, match="Unexpected parameter 'y_embedder.mlp.0.weight'"):
        convert_mmdit_state_dict({**OFFICIAL, "y_embedder.mlp.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Not an original REPA MMDiT state dict"):
        convert_mmdit_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(1)})


def test_infer_config_reads_encoder_depth_from_args_or_defaults_to_8():
    assert infer_mmdit_config(OFFICIAL, args={"encoder_depth": 2})["encoder_depth"] == 2
    assert infer_mmdit_config(OFFICIAL, encoder_depth=1, args={"encoder_depth": 2})["encoder_depth"] == 1
    assert infer_mmdit_config(OFFICIAL)["encoder_depth"] == 8


def test_train_t2i_checkpoint_defaults_to_ema(tmp_path, model):
    """A ``train_t2i.py`` checkpoint: {"model", "ema", "opt", "args", "steps"}, args an argparse.Namespace."""
    online = {key: value + 1 for key, value in OFFICIAL.items()}
    checkpoint = {
        "model": online,
        "ema": OFFICIAL,
        "opt": {},
        "args": argparse.Namespace(encoder_depth=1, path_type="linear", proj_coeff=0.5),
        "steps": 10,
    }
    path = tmp_path / "0000010.pt"
    torch.save(checkpoint, path)
    ema = convert_mmdit_checkpoint(path)
    assert ema.config.encoder_depth == 1
    assert_same_state(export_to_mmdit_state_dict(ema), OFFICIAL)
    assert_same_state(export_to_mmdit_state_dict(convert_mmdit_checkpoint(path, weights="model")), online)


# --- diffusers features -------------------------------------------------------------------------------------------


def test_save_and_load_pretrained(tmp_path, model):
    reference = load_mmdit_reference("forward")
    model.save_pretrained(tmp_path)
    loaded = MMDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    public = [{key: value for key, value in m.config.items() if not key.startswith("_")} for m in (loaded, model)]
    assert public[0] == public[1]
    with torch.no_grad():
        output = loaded(reference["x"], reference["t"], reference["context"])
    assert relative_error(output.sample, reference["velocity"]) <= TOLERANCE


def test_outputs_projections_and_hidden_states_on_request():
    tiny = small_model(depth=3, encoder_depth=2, projection_dims=(8, 12)).eval()
    x, t, context = small_inputs()
    with torch.no_grad():
        full = tiny(x, t, context, output_hidden_states=True)
        plain = tiny(x, t, context, return_projections=False)
        as_tuple = tiny(x, t, context, return_dict=False)
    assert full.sample.shape == x.shape
    assert [tuple(p.shape) for p in full.projections] == [(2, 16, 8), (2, 16, 12)]
    assert len(full.hidden_states) == 3
    # The projectors read the image-token output of block encoder_depth.
    torch.testing.assert_close(full.projections[0], tiny.projectors[0](full.hidden_states[1]), rtol=0, atol=0)
    assert plain.projections == () and plain.hidden_states is None
    torch.testing.assert_close(plain.sample, full.sample, rtol=0, atol=0)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], full.sample)


def test_scalar_timestep_and_smaller_or_rectangular_latents():
    tiny = small_model().eval()
    x, t, context = small_inputs()
    with torch.no_grad():
        scalar = tiny(x, 0.3, context).sample
        vector = tiny(x, torch.full((2,), 0.3), context).sample
        rectangular = tiny(x[..., :4], t, context)
    torch.testing.assert_close(scalar, vector, rtol=0, atol=0)
    assert rectangular.sample.shape == (2, 4, 8, 4) and rectangular.projections[0].shape == (2, 8, 8)


def test_text_conditioning_changes_the_velocity():
    tiny = small_model().eval()
    x, t, context = small_inputs()
    with torch.no_grad():
        conditional = tiny(x, t, context).sample
        other = tiny(x, t, torch.randn_like(context)).sample
        longer = tiny(x, t, torch.cat([context, context], dim=1)).sample
    assert relative_error(conditional, other) > 1e-3
    assert longer.shape == conditional.shape


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, context = small_inputs()
    gradients = []
    for checkpointing in (False, True):
        tiny = small_model()
        if checkpointing:
            tiny.enable_gradient_checkpointing()
        output = tiny(x, t, context)
        (output.sample.square().mean() + output.projections[0].mean()).backward()
        gradients.append({name: p.grad.clone() for name, p in tiny.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_on_both_streams_and_its_scale():
    tiny = small_model().eval()
    x, t, context = small_inputs()
    with torch.no_grad():
        base = tiny(x, t, context).sample
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    tiny.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    adapted = {name.split(".lora_A")[0] for name, _ in tiny.named_parameters() if ".lora_A" in name}
    assert any(name.endswith("attn.add_q_proj") for name in adapted)
    assert any(name.endswith("attn.to_q") for name in adapted)
    with torch.no_grad():
        with_lora = tiny(x, t, context).sample
        scaled_off = tiny(x, t, context, joint_attention_kwargs={"scale": 0.0}).sample
    assert relative_error(with_lora, base) > 1e-4
    torch.testing.assert_close(scaled_off, base, rtol=1e-5, atol=1e-6)


def test_fused_qkv_projections_match_and_export_unchanged():
    reference = load_mmdit_reference("forward")
    fused = convert_mmdit_checkpoint(OFFICIAL_PATH, encoder_depth=1).eval()
    keys = set(fused.state_dict())
    fused.fuse_qkv_projections()
    assert {type(processor).__name__ for processor in fused.attn_processors.values()} == {"FusedJointAttnProcessor2_0"}
    assert "transformer_blocks.0.attn.to_added_qkv.weight" in fused.state_dict()
    with torch.no_grad():
        output = fused(reference["x"], reference["t"], reference["context"])
    assert relative_error(output.sample, reference["velocity"]) <= TOLERANCE
    assert_same_state(export_to_mmdit_state_dict(fused), OFFICIAL)
    fused.unfuse_qkv_projections()
    assert set(fused.state_dict()) == keys
    assert {type(processor).__name__ for processor in fused.attn_processors.values()} == {"JointAttnProcessor2_0"}


def test_repeated_blocks_name_the_joint_blocks():
    tiny = small_model()
    block_classes = {type(module).__name__ for module in tiny.transformer_blocks}
    assert set(MMDiTTransformer2DModel._repeated_blocks) == block_classes == {"JointTransformerBlock"}


@pytest.mark.slow
def test_regional_compile_matches_eager():
    reference = load_mmdit_reference("forward")
    compiled = convert_mmdit_checkpoint(OFFICIAL_PATH, encoder_depth=1).eval()
    compiled.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        output = compiled(reference["x"], reference["t"], reference["context"])
    assert relative_error(output.sample, reference["velocity"]) <= TOLERANCE


def test_lazy_package_exports():
    assert diffusers_repa.MMDiTTransformer2DModel is MMDiTTransformer2DModel
    assert diffusers_repa.convert_mmdit_checkpoint is convert_mmdit_checkpoint


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: small_model(encoder_depth=3), "encoder_depth must be between 1 and depth"),
        (lambda: small_model(sample_size=9), "divisible by patch_size"),
        (lambda: small_model(depth=0, projection_dims=()), "depth must be at least 1"),
    ],
)
def test_bad_configs_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_wrong_inputs_are_rejected():
    tiny = small_model()
    x, t, context = small_inputs()
    with pytest.raises(ValueError, match="position table covers 8×8"):
        tiny(torch.randn(2, 4, 10, 10), t, context)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        tiny(torch.randn(2, 4, 7, 8), t, context)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(N, 4, H, W\)"):
        tiny(torch.randn(2, 3, 8, 8), t, context)
    with pytest.raises(ValueError, match="timestep must be a scalar or have shape"):
        tiny(x, torch.rand(3), context)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have shape \(2, L, 16\)"):
        tiny(x, t, torch.randn(2, 3, 12))
