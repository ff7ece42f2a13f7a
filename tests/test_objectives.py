"""The training step is one for every objective: DiT's improved-DDPM + REPA runs through the same `TrainingStep` as
SiT's flow-matching REPA, with a diffusers `DiTTransformer2DModel` and a `REPAHead`."""

import torch
from accelerate import Accelerator
from diffusers import DiTTransformer2DModel

from diffusers_repa.ddpm_losses import improved_ddpm_repa_loss
from diffusers_repa.encoders import load_encoder, save_tiny_random_encoder
from diffusers_repa.repa_head import REPAHead, TransformerWithREPAHead
from diffusers_repa.training import DDPMObjective, TrainingStep, create_ema

SCALE = 0.18215


def test_the_ddpm_objective_plugs_into_the_same_training_step(tmp_path):
    torch.manual_seed(0)
    encoder = load_encoder(save_tiny_random_encoder("dinov2", tmp_path / "encoder"), 32)  # 2×2 tokens of width 32
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        num_embeds_ada_norm=10,
    )  # fmt: skip
    model = TransformerWithREPAHead(dit, REPAHead.for_transformer(dit, (32,), encoder_depth=2, projector_dim=16))
    objective = DDPMObjective([encoder], proj_coeff=0.5, latent_scale=SCALE, target_num_tokens=16)  # 4×4 DiT tokens
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ema = create_ema(params, decay=0.5)
    generator = torch.Generator().manual_seed(1)
    step = TrainingStep(Accelerator(cpu=True), model, objective, optimizer, ema, generator)
    batch = {
        "latent_mean": torch.randn(4, 4, 8, 8),
        "latent_std": torch.rand(4, 4, 8, 8) * 0.1,
        "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        "label": torch.tensor([0, 3, 7, 9]),
    }

    # The step's loss is DiT's hybrid loss + λ · alignment on the same draws (posterior sample, then t and ε).
    state = generator.get_state()
    replay = torch.Generator().set_state(state)
    noise = torch.randn(batch["latent_mean"].shape, generator=replay)
    x_0 = (batch["latent_mean"] + batch["latent_std"] * noise) * SCALE
    targets = objective.encode_targets(batch["image"])
    label_dropout = torch.get_rng_state()  # DiT drops labels (to its null class) from the global RNG
    with torch.no_grad():
        expected = improved_ddpm_repa_loss(model, x_0, batch["label"], targets, generator=replay)
    head_before = [param.detach().clone() for param in model.head.parameters()]
    torch.set_rng_state(label_dropout)
    output = step(iter([batch]), step=0)

    torch.testing.assert_close(output.losses[0], expected.loss, rtol=1e-5, atol=1e-6)
    assert output.updated and torch.isfinite(output.grad_norm)
    assert -1 <= output.losses[2] <= 1 and output.losses[1] > 0  # alignment is a mean −cos; mse + vb > 0
    assert not any(torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))  # the head trains
    assert ema.optimization_step == 1
