"""Alignment-target encoders: token shapes, CLS/register removal, preprocessing parity with the original REPA,
DINOv2 position-table resampling, freezing, autocast, names, a token stride declared by the checkpoint, token-grid
checks and atomic folder writes.

Every encoder here is a tiny random model built and saved locally (no download).
"""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    IJepaModel,
    SiglipVisionModel,
    ViTMAEModel,
)

from diffusers_repa.atomic_files import write_folder_atomically
from diffusers_repa.encoders import (
    ENCODER_ALIASES,
    FAMILIES,
    TOKEN_STRIDE_CONFIG_KEY,
    check_token_grid,
    interpolate_tokens,
    load_encoder,
    load_encoders,
    save_tiny_random_encoder,
)

from .conftest import load_reference

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
NUM_REGISTERS = 4  # save_tiny_random_encoder's register count for dinov2reg / dinov3


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_encoders")
    return {family: save_tiny_random_encoder(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def reference_256() -> dict:
    return load_reference("encoder_preprocess_256")


def original_pos_embed_rule(table: torch.Tensor, grid: int, num_prefix: int) -> torch.Tensor:
    """The original REPA's load-time rule, written from its description: prefix rows kept, the square patch grid
    reshaped to (1, g0, g0, D) → permuted → bicubic with antialias to (g, g) → back."""
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    old = int(round(patches.shape[1] ** 0.5))
    grid_nchw = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid_nchw, size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([prefix, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def reference_patch_tokens(family: str, path, images: torch.Tensor, reference: dict) -> torch.Tensor:
    """Patch tokens computed by running the transformers model directly and slicing its outputs (256 px)."""
    pixels_01 = images.float() / 255.0
    if family in ("dinov2", "dinov2reg"):
        model = (Dinov2Model if family == "dinov2" else Dinov2WithRegistersModel).from_pretrained(path).eval()
        table = model.embeddings.position_embeddings.data
        model.embeddings.position_embeddings = nn.Parameter(original_pos_embed_rule(table, 16, num_prefix=1))
        drop = 1 + (NUM_REGISTERS if family == "dinov2reg" else 0)
        return model(pixel_values=reference["dinov2"]).last_hidden_state[:, drop:]
    if family == "dinov3":
        model = DINOv3ViTModel.from_pretrained(path).eval()
        pixels = (pixels_01 - IMAGENET_MEAN) / IMAGENET_STD  # patch 16: 256 px is already a 16×16 grid
        return model(pixel_values=pixels).last_hidden_state[:, 1 + NUM_REGISTERS :]
    if family == "clip":
        model = CLIPVisionModel.from_pretrained(path).eval()
        return model(pixel_values=reference["clip"]).last_hidden_state[:, 1:]
    if family == "siglip":
        model = SiglipVisionModel.from_pretrained(path).eval()
        return model(pixel_values=(pixels_01 - 0.5) / 0.5).last_hidden_state
    if family == "mae":
        # The original: timm ViT at 256 px, table resampled 14→16 once, LayerNorm eps 1e-6, no final norm.
        model = ViTMAEModel.from_pretrained(path, mask_ratio=0.0, layer_norm_eps=1e-6).eval()
        table = model.embeddings.position_embeddings.data
        model.embeddings.position_embeddings = nn.Parameter(original_pos_embed_rule(table, 16, num_prefix=1))
        noise = torch.arange(256.0).expand(images.shape[0], -1)
        out = model(
            pixel_values=reference["mae"], noise=noise, interpolate_pos_encoding=True, output_hidden_states=True
        )
        return out.hidden_states[-1][:, 1:]
    if family == "jepa":
        model = IJepaModel.from_pretrained(path, layer_norm_eps=1e-6).eval()
        return model(pixel_values=reference["jepa"]).last_hidden_state
    raise AssertionError(family)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patch_tokens_equal_hf_model_sliced(family, tiny_encoders, reference_256):
    images = reference_256["images_uint8"]
    encoder = load_encoder(tiny_encoders[family], resolution=256)
    tokens = encoder(images)
    with torch.no_grad():
        expected = reference_patch_tokens(family, tiny_encoders[family], images, reference_256)
    assert tokens.shape == expected.shape == (1, 256, 32)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    if family in ("mae", "jepa"):
        assert encoder.model.config.layer_norm_eps == 1e-6  # the original timm-style ViTs


@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_shapes_and_attributes(family, resolution, tiny_encoders):
    images = torch.randint(0, 256, (2, 3, resolution, resolution), dtype=torch.uint8)
    encoder = load_encoder(tiny_encoders[family], resolution=resolution)
    tokens = encoder(images)
    expected_tokens = (resolution // 16) ** 2
    assert tokens.shape == (2, expected_tokens, 32) and tokens.dtype == torch.float32
    assert (encoder.num_tokens, encoder.embed_dim, encoder.family) == (expected_tokens, 32, family)
    assert encoder.name == str(tiny_encoders[family])
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize(
    ("family", "resolution", "key"),
    [
        ("dinov2", 256, "dinov2"),
        ("dinov2", 512, "dinov2"),
        ("dinov2reg", 256, "dinov2"),
        ("clip", 256, "clip"),
        ("mae", 256, "mae"),
        ("jepa", 256, "jepa"),
    ],
)
def test_preprocessing_matches_original(family, resolution, key, tiny_encoders):
    reference = load_reference(f"encoder_preprocess_{resolution}")
    encoder = load_encoder(tiny_encoders[family], resolution=resolution)
    pixels = encoder.preprocess(reference["images_uint8"])
    assert pixels.shape == reference[key].shape
    torch.testing.assert_close(pixels, reference[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("resolution", [256, 512])
def test_dinov2_position_table_resampled_once_like_original(resolution, tiny_encoders):
    path = tiny_encoders["dinov2"]
    raw = Dinov2Model.from_pretrained(path)
    table = raw.embeddings.position_embeddings.data
    assert table.shape[1] == 1 + 37 * 37
    grid = resolution // 16
    encoder = load_encoder(path, resolution=resolution)
    resampled = encoder.model.embeddings.position_embeddings
    expected = original_pos_embed_rule(table, grid, num_prefix=1)
    assert resampled.shape == (1, 1 + grid * grid, 32)
    torch.testing.assert_close(resampled.data, expected, rtol=0, atol=1e-6)
    assert torch.equal(resampled[:, 0], table[:, 0])  # CLS position kept
    # The forward then uses that table unchanged (no per-forward interpolation)...
    dummy = torch.zeros(1, 1 + grid * grid, 32)
    side = encoder.input_size
    assert encoder.model.embeddings.interpolate_pos_encoding(dummy, side, side) is resampled
    # ...which matters: transformers' own per-forward rule (bicubic, no antialias) gives another table.
    per_forward = raw.embeddings.interpolate_pos_encoding(dummy, side, side)
    assert (per_forward - expected).abs().max() > 1e-3


def test_frozen_and_stays_in_eval(tiny_encoders):
    encoder = load_encoder(tiny_encoders["dinov2"])
    assert all(not p.requires_grad for p in encoder.parameters())
    parent = nn.ModuleDict({"head": nn.Linear(2, 2), "target": encoder})
    parent.train()
    assert parent["head"].training
    assert not any(module.training for module in encoder.modules())
    encoder.train(True)
    assert not encoder.training
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    with torch.enable_grad():
        assert not encoder(images).requires_grad


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_autocast_bf16_and_low_precision_weights(family, tiny_encoders):
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    encoder = load_encoder(tiny_encoders[family])
    full = encoder(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = encoder(images)
    bf16_weights = load_encoder(tiny_encoders[family], dtype=torch.bfloat16)
    assert next(bf16_weights.parameters()).dtype == torch.bfloat16
    for tokens in (mixed, bf16_weights(images)):
        assert tokens.dtype == torch.float32
        assert F.cosine_similarity(tokens, full, dim=-1).min() > 0.98


def test_aliases_and_comma_list_load_offline_from_hub_cache(tmp_path):
    # A Hub cache layout (models--org--name/snapshots/<hash>, refs/main) with tiny models under the real repo ids.
    revision = "0" * 40
    for alias in ("dinov2-vit-b", "clip-vit-l"):
        repo = ENCODER_ALIASES[alias].hub_id
        repo_dir = tmp_path / f"models--{repo.replace('/', '--')}"
        save_tiny_random_encoder(ENCODER_ALIASES[alias].family, repo_dir / "snapshots" / revision)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(revision)
    encoders = load_encoders("dinov2-vit-b, clip-vit-L", cache_dir=tmp_path)
    assert [(e.name, e.family, e.num_tokens) for e in encoders] == [
        ("dinov2-vit-b", "dinov2", 256),
        ("clip-vit-l", "clip", 256),
    ]
    by_hub_id = load_encoder("facebook/dinov2-base", cache_dir=tmp_path)
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    torch.testing.assert_close(by_hub_id(images), encoders[0](images))


def test_alias_table():
    for name, spec in ENCODER_ALIASES.items():
        assert spec.family in FAMILIES and name == name.lower()
        assert (spec.num_tokens(256), spec.num_tokens(512)) == (256, 1024)
    assert ENCODER_ALIASES["dinov2-vit-b"].hub_id == "facebook/dinov2-base"
    assert ENCODER_ALIASES["dinov2reg-vit-l"].hub_id == "facebook/dinov2-with-registers-large"


def test_unknown_names_list_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="mocov3-vit-b") as error:
        load_encoder("mocov3-vit-b")
    assert all(name in str(error.value) for name in ENCODER_ALIASES)
    with pytest.raises(ValueError, match="dinov2-vit-b"):
        load_encoder("someone/not-cached-anywhere", cache_dir=tmp_path)


def test_checkpoint_missing_weights_fails(tiny_encoders, tmp_path):
    # DINOv2 weights under a with-registers config: the register tokens would be random.
    folder = tmp_path / "mislabelled"
    save_tiny_random_encoder("dinov2", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "dinov2_with_registers"}))
    with pytest.raises(ValueError, match="register_tokens"):
        load_encoder(folder)


def test_bad_inputs_fail_clearly(tiny_encoders):
    encoder = load_encoder(tiny_encoders["dinov2"], resolution=256)
    with pytest.raises(TypeError, match="uint8"):
        encoder(torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match="resolution=512"):
        encoder(torch.zeros(1, 3, 512, 512, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        load_encoder(tiny_encoders["dinov2"], resolution=250)


def test_check_token_grid(tiny_encoders):
    encoder = load_encoder(tiny_encoders["dinov2"], resolution=256)
    check_token_grid(encoder, 256)
    with pytest.raises(ValueError, match="16×16 grid") as error:
        check_token_grid(encoder, 64)
    assert "8×8 grid (64 tokens)" in str(error.value) and "--interpolate_targets" in str(error.value)


def declare_token_stride(folder, stride) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, TOKEN_STRIDE_CONFIG_KEY: stride}))


def test_checkpoint_declares_its_token_stride(tmp_path):
    folder = save_tiny_random_encoder("dinov2", tmp_path / "stride4")  # patch 14
    declare_token_stride(folder, 4)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    encoder = load_encoder(folder, resolution=16)
    assert (encoder.token_stride, encoder.grid_size, encoder.num_tokens, encoder.input_size) == (4, 4, 16, 56)
    assert encoder(images).shape == (2, 16, 32)
    assert encoder.model.embeddings.position_embeddings.shape == (1, 1 + 16, 32)
    assert load_encoder(folder, resolution=32).num_tokens == 64
    with pytest.raises(ValueError, match="multiple of 4, the token stride"):
        load_encoder(folder, resolution=18)
    with pytest.raises(ValueError, match="16 tokens") as error:
        check_token_grid(encoder, 4)
    assert "4 px per token" in str(error.value)
    for bad in (0, "4", True):
        declare_token_stride(folder, bad)
        with pytest.raises(ValueError, match=f"{TOKEN_STRIDE_CONFIG_KEY}=.*positive int"):
            load_encoder(folder, resolution=16)


def test_write_folder_atomically(tmp_path):
    target = tmp_path / "model"
    with write_folder_atomically(target) as staging:
        (staging / "weights").write_text("one")
        assert not target.exists()
    assert (target / "weights").read_text() == "one"

    with pytest.raises(FileExistsError), write_folder_atomically(target) as staging:
        (staging / "weights").write_text("two")
    with pytest.raises(RuntimeError), write_folder_atomically(target, replace=True) as staging:
        (staging / "weights").write_text("two")
        raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "one"
    with write_folder_atomically(target, replace=True) as staging:
        (staging / "weights").write_text("two")
    assert (target / "weights").read_text() == "two"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no staging or retired folders left


def test_interpolate_tokens():
    # A horizontal ramp on a 32×32 grid: halving with bilinear (align_corners=False) averages column pairs.
    columns = torch.arange(32.0).repeat(32)  # row-major: value = column index
    features = torch.stack([columns, -columns], dim=-1).expand(2, -1, -1)  # (2, 1024, 2)
    resized = interpolate_tokens(features, 256)
    expected_columns = (2 * torch.arange(16.0) + 0.5).repeat(16)
    torch.testing.assert_close(resized, torch.stack([expected_columns, -expected_columns], -1).expand(2, -1, -1))
    assert interpolate_tokens(features, 1024) is features
    with pytest.raises(ValueError, match="square"):
        interpolate_tokens(features, 200)


def test_tiny_encoder_says_it_is_random(tmp_path, caplog):
    path = save_tiny_random_encoder("jepa", tmp_path / "smoke")
    assert "RANDOM" in (path / "README.md").read_text()
    with caplog.at_level(logging.WARNING):
        load_encoder(path)
    assert "RANDOMLY INITIALISED" in caplog.text
    assert save_tiny_random_encoder("jepa", path, exist_ok=True) == path
    with pytest.raises(FileExistsError):
        save_tiny_random_encoder("jepa", path)
    with pytest.raises(ValueError, match="dinov2"):
        save_tiny_random_encoder("mocov3", tmp_path / "other")
