"""The conversion scripts with --text_to_image: an original MMDiT checkpoint (bare or from ``train_t2i.py``) → an
`MMDiTTransformer2DModel` folder → back, bit-identical; the model class is read from the folder; a SiT checkpoint
with the flag and an MMDiT one without it are one ``error:`` line."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from diffusers_repa.cli import run_cli
from diffusers_repa.models.tiny_text_encoder import save_letter_tokenizer, tiny_clip_text_encoder
from diffusers_repa.models.tiny_vae import save_tiny_random_vae
from diffusers_repa.models.transformer_mmdit import MMDiTTransformer2DModel

from .conftest import REPA_REFERENCE, SIT_TINY, load_script

MMDIT_TINY = REPA_REFERENCE / "mmdit_tiny"
OFFICIAL = load_file(str(MMDIT_TINY / "official_state_dict.safetensors"))
ENCODER_DEPTH = json.loads((MMDIT_TINY / "meta.json").read_text())["config"]["encoder_depth"]

to_diffusers = load_script("pipelines/convert_repa_to_diffusers.py")
to_repa = load_script("pipelines/convert_diffusers_to_repa.py")

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def error_line(script, argv: list[str], capsys) -> str:
    """The last stderr line of a run that must fail with a user error (exit status 2)."""
    assert run_cli(script.main, argv, prog="script.py") == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_bare_state_dict_round_trip_is_bit_identical(tmp_path, capsys):
    folder = tmp_path / "transformer"
    to_diffusers.main(
        ["--checkpoint", str(MMDIT_TINY / "official_state_dict.safetensors"), "--output", str(folder),
         "--text_to_image", "--encoder_depth", str(ENCODER_DEPTH)]
    )  # fmt: skip
    assert "MMDiT depth 2, width 64" in capsys.readouterr().out
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "MMDiTTransformer2DModel"
    model = MMDiTTransformer2DModel.from_pretrained(folder)
    assert model.config.encoder_depth == ENCODER_DEPTH and list(model.config.projection_dims) == [32]

    for suffix in (".safetensors", ".pt"):
        exported = tmp_path / f"back{suffix}"
        to_repa.main(["--model", str(folder), "--output", str(exported)])
        state = load_file(str(exported)) if suffix == ".safetensors" else torch.load(exported, weights_only=True)
        assert_bit_identical(state, OFFICIAL)


def test_train_t2i_checkpoint_converts_its_ema_weights_and_reads_the_encoder_depth(tmp_path):
    # A train_t2i.py checkpoint: EMA and online weights differ; its args (a Namespace) hold the encoder depth.
    online = {key: tensor + 1.0 for key, tensor in OFFICIAL.items()}
    checkpoint = tmp_path / "0400000.pt"
    torch.save(
        {"model": online, "ema": OFFICIAL, "opt": {}, "args": argparse.Namespace(encoder_depth=2), "steps": 7},
        checkpoint,
    )
    for weights, expected in (("ema", OFFICIAL), ("model", online)):
        folder = tmp_path / weights
        to_diffusers.main(
            ["--checkpoint", str(checkpoint), "--output", str(folder), "--text_to_image", "--weights", weights]
        )
        assert MMDiTTransformer2DModel.load_config(folder)["encoder_depth"] == 2
        to_repa.main(["--model", str(folder), "--output", str(tmp_path / f"{weights}.safetensors")])
        assert_bit_identical(load_file(str(tmp_path / f"{weights}.safetensors")), expected)


def test_whole_pipeline_with_vae_and_text_encoder(tmp_path, capsys):
    from diffusers_repa.pipelines import MMDiTPipeline

    vae = save_tiny_random_vae(tmp_path / "vae")
    clip = tmp_path / "clip"  # the tokenizer/ + text_encoder/ layout; 768 wide like CLIP ViT-L/14's features
    save_letter_tokenizer(clip / "tokenizer")
    tiny_clip_text_encoder(768, num_layers=1).save_pretrained(clip / "text_encoder")
    output = tmp_path / "pipeline"
    to_diffusers.main(
        ["--checkpoint", str(MMDIT_TINY / "official_state_dict.safetensors"), "--output", str(output),
         "--text_to_image", "--encoder_depth", "1", "--vae", str(vae), "--text_encoder", str(clip)]
    )  # fmt: skip
    pipe = MMDiTPipeline.from_pretrained(output)
    to_repa.main(["--model", str(output), "--subfolder", "transformer", "--output", str(tmp_path / "t.safetensors")])
    assert_bit_identical(load_file(str(tmp_path / "t.safetensors")), OFFICIAL)
    images = pipe("a cat", num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (1, 256, 256, 3)

    # The built-in tiny-clip is 64 wide; the original MMDiT reads 768-d CLIP ViT-L/14 features.
    argv = ["--checkpoint", str(MMDIT_TINY / "official_state_dict.safetensors"), "--output", str(tmp_path / "other"),
            "--text_to_image", "--encoder_depth", "1", "--vae", str(vae), "--text_encoder", "tiny-clip"]  # fmt: skip
    assert "has width 64, but the MMDiT reads 768-d token features" in error_line(to_diffusers, argv, capsys)
    assert not (tmp_path / "other").exists()


def test_family_mismatches_are_one_error_line(tmp_path, capsys):
    sit = str(SIT_TINY / "train_checkpoint.pt")
    mmdit = str(MMDIT_TINY / "official_state_dict.safetensors")
    output = str(tmp_path / "out")
    line = error_line(to_diffusers, ["--checkpoint", sit, "--output", output, "--text_to_image"], capsys)
    assert line.startswith("script.py: error: --text_to_image:") and "without --text_to_image" in line
    line = error_line(to_diffusers, ["--checkpoint", mmdit, "--output", output], capsys)
    assert (
        line
        == f"script.py: error: {mmdit} is an original text-to-image MMDiT checkpoint (joint_blocks.*); add --text_to_image."
    )
    line = error_line(
        to_diffusers, ["--checkpoint", mmdit, "--output", output, "--text_to_image", "--num_heads", "2"], capsys
    )
    assert "--model and --num_heads describe a SiT" in line
    assert not (tmp_path / "out").exists()

    # A folder of another class (a VAE) is refused by name before anything is exported.
    vae = save_tiny_random_vae(tmp_path / "vae")
    line = error_line(to_repa, ["--model", str(vae), "--output", str(tmp_path / "x.pt")], capsys)
    assert "holds a model of class AutoencoderKL, not one of SiTTransformer2DModel, MMDiTTransformer2DModel" in line
    assert not (tmp_path / "x.pt").exists()
