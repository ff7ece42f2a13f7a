"""Conversion of the original REPA checkpoint forms, export back to the original layout, and the CLIs."""

import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_repa.conversion import (
    convert_repa_checkpoint,
    convert_repa_state_dict,
    export_to_repa_state_dict,
    infer_sit_config,
    load_repa_checkpoint,
)
from diffusers_repa.models import SiTTransformer2DModel

from .conftest import SIT_TINY, load_reference, load_script

convert_repa_to_diffusers = load_script("pipelines/convert_repa_to_diffusers.py")
convert_diffusers_to_repa = load_script("pipelines/convert_diffusers_to_repa.py")

OFFICIAL = load_file(str(SIT_TINY / "official_state_dict.safetensors"))


def assert_same_state(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("filename", ["official_state_dict.safetensors", "official_state_dict.pt"])
def test_bare_state_dicts_convert(filename, sit_tiny_meta):
    model = convert_repa_checkpoint(SIT_TINY / filename, num_heads=4, encoder_depth=2)
    kwargs = sit_tiny_meta["official_constructor_kwargs"]
    config = model.config
    assert (config.sample_size, config.patch_size, config.in_channels) == (8, 2, 4)
    assert (config.hidden_size, config.depth, config.num_attention_heads) == (64, 4, 4)
    assert list(config.projection_dims) == kwargs["z_dims"] and config.projector_dim == kwargs["projector_dim"]
    assert config.num_classes == 1000 and config.qk_norm is False and config.mlp_ratio == 4.0
    assert_same_state(export_to_repa_state_dict(model), OFFICIAL)


def test_train_checkpoint_defaults_to_ema_and_reads_args():
    model = convert_repa_checkpoint(SIT_TINY / "train_checkpoint.pt", num_heads=4)
    assert model.config.encoder_depth == 2  # from the checkpoint's args
    assert model.config.class_dropout_prob == 0.1
    ema = load_file(str(SIT_TINY / "train_checkpoint_ema.safetensors"))
    assert_same_state(export_to_repa_state_dict(model), ema)


def test_train_checkpoint_model_weights_on_request():
    model = convert_repa_checkpoint(SIT_TINY / "train_checkpoint.pt", num_heads=4, weights="model")
    ema = load_file(str(SIT_TINY / "train_checkpoint_ema.safetensors"))
    exported = export_to_repa_state_dict(model)
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    state, args = load_repa_checkpoint(SIT_TINY / "train_checkpoint.pt", weights="model")
    assert args["projector_embed_dims"] == "32,16"
    assert_same_state(exported, state)


def test_export_then_reimport_is_lossless(tmp_path):
    model = convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4, encoder_depth=2)
    path = tmp_path / "exported.pt"
    torch.save(export_to_repa_state_dict(model), path)
    again = convert_repa_checkpoint(path, num_heads=4, encoder_depth=2)
    assert_same_state(again.state_dict(), model.state_dict())


def test_fused_qkv_is_split_into_diffusers_projections():
    converted = convert_repa_state_dict(OFFICIAL)
    for kind in ("weight", "bias"):
        fused = OFFICIAL[f"blocks.1.attn.qkv.{kind}"]
        split = [converted[f"transformer_blocks.1.attn.to_{name}.{kind}"] for name in "qkv"]
        torch.testing.assert_close(torch.cat(split), fused, rtol=0, atol=0)  # rows [q; k; v]
        assert len({tensor.data_ptr() for tensor in split}) == 3  # no shared storage: safetensors can save them
        assert converted[f"transformer_blocks.1.attn.to_out.0.{kind}"] is OFFICIAL[f"blocks.1.attn.proj.{kind}"]
    assert not any("to_qkv" in key for key in converted)


def test_a_model_with_fused_projections_exports_the_same_weights():
    model = convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4, encoder_depth=2)
    model.fuse_qkv_projections()
    assert_same_state(export_to_repa_state_dict(model), OFFICIAL)


def test_ddp_and_compile_prefixes_are_stripped():
    wrapped = {f"module._orig_mod.{key}": value for key, value in OFFICIAL.items()}
    assert_same_state(convert_repa_state_dict(wrapped), convert_repa_state_dict(OFFICIAL))


def test_released_sit_xl_converts_without_flags():
    with torch.device("meta"):
        xl = SiTTransformer2DModel.from_preset("SiT-XL/2", projection_dims=(768,))
        released = export_to_repa_state_dict(xl)  # same keys and shapes as the released last.pt
    config = infer_sit_config(released)
    assert (config["num_attention_heads"], config["encoder_depth"], config["sample_size"]) == (16, 8, 32)
    assert (config["depth"], config["hidden_size"], config["patch_size"]) == (28, 1152, 2)
    assert config["projection_dims"] == (768,) and config["projector_dim"] == 2048


def test_missing_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="Pass --num_heads"):
        convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", encoder_depth=2)


def test_missing_encoder_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="Pass --encoder_depth"):
        convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4)


def test_preset_that_does_not_match_the_weights():
    with pytest.raises(ValueError, match="does not match the weights"):
        convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", model="SiT-XL/2")


def test_foreign_state_dicts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_repa_state_dict({**OFFICIAL, "vae.decoder.weight": torch.zeros(1)})
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="x_embedder.proj.weight' is missing"):
        convert_repa_checkpoint(path, num_heads=4)
    with pytest.raises(FileNotFoundError):
        convert_repa_checkpoint(tmp_path / "missing.pt")


class UnlistedType:
    """Stands for any object a malicious pickle could carry."""


def test_pickles_are_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": OFFICIAL, "args": UnlistedType()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_repa_checkpoint(path)


def test_conversion_cli_round_trip(tmp_path, capsys):
    output = tmp_path / "transformer"
    convert_repa_to_diffusers.main(
        ["--checkpoint", str(SIT_TINY / "train_checkpoint.pt"), "--output", str(output), "--num_heads", "4"]
    )
    assert "encoder depth 2" in capsys.readouterr().out
    model = SiTTransformer2DModel.from_pretrained(output).eval()
    reference = load_reference("forward")
    with torch.no_grad():
        model(reference["x"], reference["t"], reference["y"])  # loads and runs
    exported = tmp_path / "back.safetensors"
    convert_diffusers_to_repa.main(["--model", str(output), "--output", str(exported)])
    assert_same_state(load_file(str(exported)), load_file(str(SIT_TINY / "train_checkpoint_ema.safetensors")))


def test_namespace_args_are_the_only_extra_type(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": OFFICIAL, "model": OFFICIAL, "args": argparse.Namespace(encoder_depth=2)}, path)
    state, args = load_repa_checkpoint(path)
    assert args == {"encoder_depth": 2}
    assert_same_state(state, OFFICIAL)


def test_conversion_cli_writes_a_whole_pipeline(tmp_path):
    from diffusers_repa.models.tiny_vae import save_tiny_random_vae
    from diffusers_repa.pipelines import SiTPipeline

    save_tiny_random_vae(tmp_path / "vae")
    output = tmp_path / "pipeline"
    convert_repa_to_diffusers.main(
        ["--checkpoint", str(SIT_TINY / "train_checkpoint.pt"), "--output", str(output), "--num_heads", "4",
         "--vae", str(tmp_path / "vae")]
    )  # fmt: skip
    pipe = SiTPipeline.from_pretrained(output)
    assert pipe.get_label_ids(["golden retriever"]) == [207]
    images = pipe([207], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
