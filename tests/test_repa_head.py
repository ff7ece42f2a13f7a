"""REPAHead on tiny random diffusers transformers: captured tokens, gradient reach, save/load, a DiT + REPA step."""

import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
)
from safetensors.torch import load_file

from diffusers_repa import SiTTransformer2DModel
from diffusers_repa.ddpm_losses import improved_ddpm_repa_loss
from diffusers_repa.losses import projection_loss
from diffusers_repa.repa_head import REPAHead, TransformerWithREPAHead

BATCH, WIDTH, DEPTH = 2, 16, 3  # tokens are WIDTH = 2 heads × 8 wide; every model has DEPTH blocks


def _dit() -> tuple[torch.nn.Module, dict]:
    # Learned sigma as in DiT: 8 output channels for 4 latent channels.
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=DEPTH, sample_size=8
    )
    inputs = {"hidden_states": torch.randn(BATCH, 4, 8, 8), "timestep": torch.tensor([0, 999])}
    return model, {**inputs, "class_labels": torch.tensor([1, 2])}


def _pixart() -> tuple[torch.nn.Module, dict]:
    model = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=DEPTH,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=WIDTH,
        caption_channels=8,
        use_additional_conditions=False,
    )
    inputs = {"hidden_states": torch.randn(BATCH, 4, 8, 8), "encoder_hidden_states": torch.randn(BATCH, 5, 8)}
    return model, {**inputs, "timestep": torch.tensor([3, 999]), "added_cond_kwargs": {}}


def _sana() -> tuple[torch.nn.Module, dict]:
    model = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=DEPTH,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=WIDTH,
        caption_channels=8,
        sample_size=8,
        patch_size=1,
    )
    inputs = {"hidden_states": torch.randn(BATCH, 4, 8, 8), "encoder_hidden_states": torch.randn(BATCH, 5, 8)}
    return model, {**inputs, "timestep": torch.tensor([3, 999])}


def _sd3() -> tuple[torch.nn.Module, dict]:
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=DEPTH,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=6,
        out_channels=4,
        pos_embed_max_size=16,
    )
    inputs = {"hidden_states": torch.randn(BATCH, 4, 8, 8), "encoder_hidden_states": torch.randn(BATCH, 5, 12)}
    return model, {**inputs, "pooled_projections": torch.randn(BATCH, 6), "timestep": torch.tensor([3.0, 999.0])}


def _flux() -> tuple[torch.nn.Module, dict]:
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=DEPTH,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=6,
        axes_dims_rope=(2, 2, 4),
    )
    # Flux takes packed latents: 16 image tokens (a 4 × 4 grid, row-major) of 4 channels, and 5 text tokens.
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    inputs = {"hidden_states": torch.randn(BATCH, 16, 4), "encoder_hidden_states": torch.randn(BATCH, 5, 12)}
    return model, {
        **inputs,
        "pooled_projections": torch.randn(BATCH, 6),
        "timestep": torch.tensor([0.3, 0.9]),
        "img_ids": image_ids.reshape(16, 3),
        "txt_ids": torch.zeros(5, 3),
    }


# Builder and image tokens of the tiny model: DiT, PixArt and SD3 patch 8×8 latents by 2 (16 tokens), Sana by 1 (64).
MODELS = {"dit": (_dit, 16), "pixart": (_pixart, 16), "sana": (_sana, 64), "sd3": (_sd3, 16), "flux": (_flux, 16)}


def _block_has_grad(block: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_captures_image_tokens_and_grads_reach_only_the_first_k_blocks(name):
    torch.manual_seed(0)
    build, num_tokens = MODELS[name]
    model, inputs = build()
    model.eval()  # no label dropout: two passes must agree
    head = REPAHead.for_transformer(model, projection_dims=(12, 6), encoder_depth=2, projector_dim=20)
    assert head.config.hidden_size == WIDTH
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
    with head.capture(model) as captured:
        output = model(**inputs, return_dict=False)[0]
    assert torch.equal(output, reference)  # the hook only reads
    assert not head.hooked_block(model)._forward_hooks  # and is gone after the context
    assert captured.hidden_states.shape == (BATCH, num_tokens, WIDTH)
    projections = head(captured.hidden_states)
    assert [p.shape for p in projections] == [(BATCH, num_tokens, 12), (BATCH, num_tokens, 6)]

    targets = [torch.randn_like(p) for p in projections]
    projection_loss(targets, projections).backward()
    blocks = model.transformer_blocks
    assert [_block_has_grad(block) for block in blocks] == [True, True, False]
    assert all(_block_has_grad(projector) for projector in head.projectors)


def test_sd3_last_block_has_no_context_output():
    """SD3's last joint block is context_pre_only and returns (None, hidden_states): index 1 is still the image."""
    model, inputs = _sd3()
    head = REPAHead.for_transformer(model, projection_dims=(12,), encoder_depth=DEPTH, projector_dim=20)
    with head.capture(model) as captured:
        model(**inputs)
    assert captured.hidden_states.shape == (BATCH, 16, WIDTH)


def test_gradient_checkpointing_and_wrappers():
    """With gradient checkpointing (the block recomputed in backward, after the context) and through a DDP-style
    `.module` wrapper, the head sees the same tokens and the transformer gets the same gradients."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, inputs = _dit()
        model.eval()
        if checkpointing:
            model.enable_gradient_checkpointing()
        wrapper = torch.nn.Module()
        wrapper.module = model
        head = REPAHead.for_transformer(wrapper, projection_dims=(12,), encoder_depth=2, projector_dim=20)
        with torch.enable_grad(), head.capture(wrapper) as captured:
            model(**inputs)
        projections = head(captured.hidden_states)
        projection_loss([torch.ones_like(projections[0])], projections).backward()
        grads.append(model.transformer_blocks[0].attn1.to_q.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_flux_single_stream_blocks():
    model, inputs = _flux()
    head = REPAHead.for_transformer(
        model, projection_dims=(12,), encoder_depth=1, projector_dim=20, block_list="single_transformer_blocks"
    )
    with head.capture(model) as captured:
        model(**inputs)
    assert captured.hidden_states.shape == (BATCH, 16, WIDTH)


def test_same_projections_as_sits_built_in_projectors():
    """On SiT, a head holding SiT's projector weights reproduces `return_projections` exactly."""
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=8, patch_size=2, hidden_size=32, depth=3, num_attention_heads=2, encoder_depth=2,
        projector_dim=24, projection_dims=(12, 6),
    ).eval()  # fmt: skip
    head = REPAHead.for_transformer(sit, projection_dims=(12, 6), encoder_depth=2, projector_dim=24)
    head.projectors.load_state_dict(sit.projectors.state_dict())
    x, t, y = torch.randn(BATCH, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([3, 1000])
    with head.capture(sit) as captured:
        built_in = sit(x, t, y).projections
    for ours, theirs in zip(head(captured.hidden_states), built_in, strict=True):
        assert torch.equal(ours, theirs)


def test_save_and_load_round_trip(tmp_path):
    model, _ = _sd3()
    head = REPAHead.for_transformer(model, projection_dims=(12, 6), encoder_depth=2, projector_dim=20)
    head.save_pretrained(tmp_path / "repa_head")
    stored = load_file(tmp_path / "repa_head" / "diffusion_pytorch_model.safetensors")
    assert set(stored) == set(head.state_dict())
    loaded = REPAHead.from_pretrained(tmp_path / "repa_head")
    public = {key: value for key, value in head.config.items() if not key.startswith("_")}
    assert {key: loaded.config[key] for key in public} == public
    assert loaded.config.output_index == 1 and loaded.config.projection_dims == [12, 6]
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_errors_name_the_fix():
    model, inputs = _sd3()
    with pytest.raises(ValueError, match="exceeds the 3 blocks"):
        REPAHead.for_transformer(model, projection_dims=(12,), encoder_depth=4)
    with pytest.raises(ValueError, match="Unknown transformer class"):
        REPAHead.for_transformer(torch.nn.Linear(2, 2))
    head = REPAHead(hidden_size=WIDTH, projection_dims=(12,), encoder_depth=1, projector_dim=20)
    with pytest.raises(ValueError, match="output_index"), head.capture(model):
        model(**inputs)
    with pytest.raises(ValueError, match="No tokens were captured"):
        head(None)


def test_wrapper_returns_sample_and_projections():
    torch.manual_seed(0)
    model, inputs = _pixart()
    model.eval()
    head = REPAHead.for_transformer(model, projection_dims=(12,), encoder_depth=2, projector_dim=20)
    wrapped = TransformerWithREPAHead(model, head)
    assert {name for name, _ in wrapped.named_children()} == {"transformer", "head"}
    sample, projections = wrapped(**inputs, return_dict=True)
    with head.capture(model) as captured:
        reference = model(**inputs).sample
    assert torch.equal(sample, reference)
    assert torch.equal(projections[0], head(captured.hidden_states)[0])
    sample, projections = wrapped(**inputs, return_projections=False)
    assert torch.equal(sample, reference) and projections == ()
    with pytest.raises(ValueError, match="exceeds"):
        TransformerWithREPAHead(model, REPAHead(hidden_size=WIDTH, projection_dims=(12,), encoder_depth=9))


def test_tiny_dit_repa_step():
    """DiT (learned sigma) + REPAHead: hybrid DDPM loss + λ·alignment, one AdamW step; everything trains."""
    torch.manual_seed(0)
    transformer, inputs = _dit()
    head = REPAHead.for_transformer(transformer, projection_dims=(12,), encoder_depth=2, projector_dim=20)
    model = TransformerWithREPAHead(transformer, head).train()
    latents, labels = inputs["hidden_states"], inputs["class_labels"]
    targets = [torch.randn(BATCH, 16, 12)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    out = improved_ddpm_repa_loss(
        model, latents, labels, targets, proj_coeff=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert out.denoising_loss.shape == out.mse.shape == out.vb.shape == (BATCH,)
    assert torch.isfinite(out.loss) and -1 <= out.projection_loss.item() <= 1
    torch.testing.assert_close(out.loss, out.denoising_loss.mean() + 0.5 * out.projection_loss)
    out.loss.backward()
    assert all(_block_has_grad(block) for block in transformer.transformer_blocks)
    assert all(_block_has_grad(projector) for projector in head.projectors)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    after = dict(model.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(after[name], value)}
    expected = {"transformer.proj_out_2.weight", "transformer.transformer_blocks.0.attn1.to_q.weight"}
    assert expected | {"head.projectors.0.4.weight"} <= changed

    # Vanilla DiT (no targets): the plain transformer, no projectors involved.
    plain = improved_ddpm_repa_loss(transformer, latents, labels, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(plain.loss) and plain.projection_loss.item() == 0
