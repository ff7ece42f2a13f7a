"""Models built locally on first use are written by every process: transformers' own `save_pretrained` writes only on
rank 0 once torch.distributed is initialised, which left the other ranks (and other nodes) a folder without weights."""

import pytest
import torch
from transformers import CLIPTextModel

from diffusers_repa.encoders import save_tiny_random_encoder
from diffusers_repa.models.tiny_text_encoder import save_tiny_clip, tiny_clip_text_encoder


@pytest.fixture
def as_rank_one(monkeypatch):
    """This process seen as rank 1 of an initialised process group (what transformers asks torch.distributed)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)


def test_transformers_itself_skips_the_write_on_rank_one(as_rank_one, tmp_path):
    tiny_clip_text_encoder(16).save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()  # why save_local_model exists


def test_tiny_clip_and_tiny_encoders_are_complete_on_every_rank(as_rank_one, tmp_path):
    folder = save_tiny_clip(tmp_path / "tiny-clip", hidden_size=16)
    loaded = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    for name, value in tiny_clip_text_encoder(16).state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    encoder = save_tiny_random_encoder("dinov2", tmp_path / "encoder", hidden_size=32, num_hidden_layers=1)
    assert (encoder / "model.safetensors").is_file() and (encoder / "config.json").is_file()
