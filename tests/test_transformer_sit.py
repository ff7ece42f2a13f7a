"""SiTTransformer2DModel: parity with the original REPA model, presets, save/load, training features, errors."""

import json

import pytest
import torch

from diffusers_repa.conversion import convert_repa_checkpoint
from diffusers_repa.models import SIT_PRESETS, SiTTransformer2DModel
from diffusers_repa.models.transformer_sit import get_2d_sincos_pos_embed

from .conftest import SIT_TINY, load_reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module")
def tiny_model() -> SiTTransformer2DModel:
    model = convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4, encoder_depth=2)
    return model.eval()


def small_model(**overrides) -> SiTTransformer2DModel:
    config = dict(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_attention_heads=2,
        num_classes=10, encoder_depth=2, projector_dim=24, projection_dims=(16, 8),
    )  # fmt: skip
    return SiTTransformer2DModel(**{**config, **overrides})


def test_forward_matches_original_repa(tiny_model):
    reference = load_reference("forward")
    with torch.no_grad():
        output = tiny_model(reference["x"], reference["t"], reference["y"])
    assert relative_error(output.sample, reference["velocity"]) <= 1e-5
    assert len(output.projections) == 2
    assert relative_error(output.projections[0], reference["projection_0"]) <= 1e-5
    assert relative_error(output.projections[1], reference["projection_1"]) <= 1e-5


def test_position_table_is_the_originals_fixed_table(tiny_model):
    from safetensors.torch import load_file

    original = load_file(str(SIT_TINY / "official_state_dict.safetensors"))["pos_embed"][0]
    torch.testing.assert_close(tiny_model.pos_embed, original, rtol=0, atol=1e-6)
    assert "pos_embed" not in tiny_model.state_dict()  # a buffer, not a weight
    assert all("pos_embed" not in name for name, _ in tiny_model.named_parameters())


def test_hidden_states_and_projection_source(tiny_model):
    reference = load_reference("forward")
    with torch.no_grad():
        output = tiny_model(reference["x"], reference["t"], reference["y"], output_hidden_states=True)
    assert len(output.hidden_states) == tiny_model.config.depth
    block_output = output.hidden_states[tiny_model.config.encoder_depth - 1]
    with torch.no_grad():
        expected = tiny_model.projectors[1](block_output)
    torch.testing.assert_close(output.projections[1], expected)


def test_projections_can_be_skipped(tiny_model):
    reference = load_reference("forward")
    with torch.no_grad():
        full = tiny_model(reference["x"], reference["t"], reference["y"])
        lean = tiny_model(reference["x"], reference["t"], reference["y"], return_projections=False)
    assert lean.projections == ()
    torch.testing.assert_close(lean.sample, full.sample)


def test_scalar_timestep_broadcasts(tiny_model):
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 1000])
    with torch.no_grad():
        scalar = tiny_model(x, 0.3, labels).sample
        vector = tiny_model(x, torch.full((2,), 0.3), labels).sample
    torch.testing.assert_close(scalar, vector)


def test_label_dropout_only_in_training_mode():
    model = small_model(class_dropout_prob=1.0)
    x, t, labels = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    null = torch.full_like(labels, model.config.num_classes)
    torch.nn.init.normal_(model.proj_out.weight)  # make the output depend on the input
    for block in model.transformer_blocks:
        torch.nn.init.normal_(block.adaln_modulation.weight, std=0.1)
    model.eval()
    with torch.no_grad():
        conditional = model(x, t, labels).sample
        unconditional = model(x, t, null).sample
        model.train()
        dropped = model(x, t, labels).sample
    assert not torch.allclose(conditional, unconditional)
    torch.testing.assert_close(dropped, unconditional)


def test_original_initialisation_is_adaln_zero():
    model = small_model()
    x = torch.randn(2, 4, 8, 8)
    assert torch.count_nonzero(model(x, torch.rand(2), torch.tensor([0, 3])).sample) == 0
    for block in model.transformer_blocks:
        assert torch.count_nonzero(block.adaln_modulation.weight) == 0
    assert model.class_embed.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize("preset", SIT_PRESETS)
def test_every_preset_builds(preset):
    with torch.device("meta"):
        model = SiTTransformer2DModel.from_preset(preset)
    size, patch = preset.split("-")[1].split("/")
    assert model.config.patch_size == int(patch)
    assert model.proj_out.in_features == model.config.hidden_size  # the original SiT-S got this wrong


def test_sit_xl_parameter_count_matches_original():
    with torch.device("meta"):
        model = SiTTransformer2DModel.from_preset("SiT-XL/2", projection_dims=(768,))
    # The original counts its frozen 256×1152 position table as a parameter; ours is a buffer.
    assert sum(p.numel() for p in model.parameters()) == 683_242_512 - 294_912
    assert (model.config.depth, model.config.hidden_size, model.config.num_attention_heads) == (28, 1152, 16)
    assert model.config.encoder_depth == 8


def test_sit_s_forward_runs():
    model = SiTTransformer2DModel.from_preset("SiT-S/2", sample_size=8, projection_dims=(16,))
    output = model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([5]))
    assert output.sample.shape == (1, 4, 8, 8)
    assert output.projections[0].shape == (1, 16, 16)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path).eval()
    settings = {name: value for name, value in tiny_model.config.items() if not name.startswith("_")}
    assert {name: value for name, value in loaded.config.items() if not name.startswith("_")} == settings
    reference = load_reference("forward")
    with torch.no_grad():
        expected = tiny_model(reference["x"], reference["t"], reference["y"])
        actual = loaded(reference["x"], reference["t"], reference["y"])
    torch.testing.assert_close(actual.sample, expected.sample, rtol=0, atol=0)
    torch.testing.assert_close(actual.projections[0], expected.projections[0], rtol=0, atol=0)
    torch.testing.assert_close(loaded.pos_embed, tiny_model.pos_embed, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = small_model(class_dropout_prob=0.0)
    for block in model.transformer_blocks:  # non-zero gates so every block gets gradients
        torch.nn.init.normal_(block.adaln_modulation.weight, std=0.1)
    torch.nn.init.normal_(model.proj_out.weight, std=0.1)
    x, t, labels = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])

    def gradients():
        model.zero_grad()
        output = model(x, t, labels)
        (output.sample.square().mean() + sum(p.square().mean() for p in output.projections)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_bf16_autocast_forward(tiny_model):
    reference = load_reference("forward")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = tiny_model(reference["x"], reference["t"], reference["y"])
    assert output.sample.dtype == torch.bfloat16
    assert torch.isfinite(output.sample).all()
    assert relative_error(output.sample.float(), reference["velocity"]) < 0.05


def test_return_tuple(tiny_model):
    reference = load_reference("forward")
    with torch.no_grad():
        sample, projections = tiny_model(reference["x"], reference["t"], reference["y"], return_dict=False)
    assert sample.shape == reference["velocity"].shape and len(projections) == 2


def test_model_without_projectors():
    model = small_model(projection_dims=(), encoder_depth=99)
    assert len(model.projectors) == 0
    assert model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0])).projections == ()


def test_position_table_is_float32_and_finite():
    table = get_2d_sincos_pos_embed(64, 4)
    assert table.shape == (16, 64) and table.dtype == torch.float32
    # column index lives in the first half of the channels (the original's meshgrid(w, h) order)
    torch.testing.assert_close(table[0, :32], table[4, :32])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SiTTransformer2DModel.from_preset("SiT-M/2"), "Unknown SiT preset"),
        (lambda: SiTTransformer2DModel.from_preset("SiT-XL/3"), "Unknown SiT preset"),
        (lambda: small_model(encoder_depth=4), "encoder_depth must be between 1 and depth"),
        (lambda: small_model(num_attention_heads=3), "divisible by num_attention_heads"),
        (lambda: small_model(sample_size=9), "divisible by patch_size"),
    ],
)
def test_bad_configs_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_wrong_input_shapes_are_rejected():
    model = small_model()
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(N, 4, 8, 8\)"):
        model(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="timestep and class_labels must have shape"):
        model(torch.randn(2, 4, 8, 8), torch.rand(3), torch.tensor([0, 1]))


@pytest.mark.slow
def test_regional_compile_matches_eager(tiny_model):
    reference = load_reference("forward")
    compiled = convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4, encoder_depth=2)
    compiled.eval().compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        output = compiled(reference["x"], reference["t"], reference["y"])
    assert relative_error(output.sample, reference["velocity"]) <= 1e-5


@pytest.mark.parametrize(
    ("field", "value"), [("sample_size", "8"), ("depth", 0), ("num_classes", 2.5), ("projection_dims", [32, True])]
)
def test_an_edited_config_names_the_wrong_field(tmp_path, field, value):
    model = SiTTransformer2DModel(sample_size=8, hidden_size=32, depth=2, num_attention_heads=2, encoder_depth=1)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=r"SiTTransformer2DModel config: .* must be a positive int"):
        SiTTransformer2DModel.from_pretrained(tmp_path)


def test_a_config_that_is_not_a_json_object_is_named(tmp_path):
    SiTTransformer2DModel(
        sample_size=8, hidden_size=32, depth=2, num_attention_heads=2, encoder_depth=1
    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps([config]))
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object of SiTTransformer2DModel settings"):
        SiTTransformer2DModel.from_pretrained(tmp_path)


def test_a_config_edited_to_another_sample_size_warns(tmp_path, caplog):
    model = SiTTransformer2DModel(sample_size=8, hidden_size=32, depth=2, num_attention_heads=2, encoder_depth=1)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["trained_sample_size"] == 8
    with caplog.at_level("WARNING"):
        SiTTransformer2DModel.from_pretrained(tmp_path)
    assert "differs" not in caplog.text
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sample_size": 4}))
    with caplog.at_level("WARNING"):
        SiTTransformer2DModel.from_pretrained(tmp_path)
    assert "sample_size 4 differs from the 8 its weights were trained at" in caplog.text
