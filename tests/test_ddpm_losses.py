"""DiT's improved-DDPM hybrid loss against reference tensors of the original DiT code (tests/fixtures/dit_reference)."""

import pytest
import torch
from safetensors.torch import load_file

from diffusers_repa.ddpm_losses import (
    DDPMSchedule,
    improved_ddpm_loss,
    improved_ddpm_repa_loss,
    q_sample,
    sample_ddpm_inputs,
)

from .conftest import FIXTURES

DIT_REFERENCE = FIXTURES / "dit_reference" / "improved_ddpm_loss.safetensors"


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(DIT_REFERENCE)


def test_schedule_matches_dit(reference):
    schedule = DDPMSchedule.linear()
    assert schedule.num_timesteps == 1000 and schedule.betas.dtype == torch.float64
    # DiT's SpacedDiffusion re-derives β from ᾱ even without respacing: equal up to float64 rounding.
    for name in ("betas", "alphas_cumprod", "posterior_log_variance_clipped"):
        assert _relative_error(getattr(schedule, name), reference[name]) < 1e-11, name
    moved = schedule.to("meta")
    assert moved.betas.device.type == "meta" and moved.betas.dtype == torch.float64
    assert q_sample(reference["x_start"], reference["t"], reference["noise"], schedule).equal(reference["x_t"])


def test_loss_terms_and_gradient_match_dit(reference):
    # The fixture's steps are [0, 1, 500, 999]: t = 0 takes the decoder-NLL branch, the others the KL.
    assert reference["t"].tolist() == [0, 1, 500, 999]
    model_output = reference["model_output"].clone().requires_grad_(True)
    terms = improved_ddpm_loss(model_output, reference["x_start"], reference["t"], reference["noise"])
    terms.loss.sum().backward()
    for name in ("mse", "vb", "loss"):
        assert _relative_error(getattr(terms, name), reference[name]) <= 1e-5, name
    assert _relative_error(model_output.grad, reference["grad_model_output"]) <= 1e-5


def test_bound_does_not_train_the_mean(reference):
    """The ε channels' gradient is the MSE's alone, 2(ε̂ − ε)/(C·H·W); the variance channels get the bound's."""
    model_output = reference["model_output"].clone().requires_grad_(True)
    noise = reference["noise"]
    terms = improved_ddpm_loss(model_output, reference["x_start"], reference["t"], noise)
    terms.loss.sum().backward()
    channels = noise.shape[1]
    eps = reference["model_output"][:, :channels]
    torch.testing.assert_close(model_output.grad[:, :channels], 2 * (eps - noise) / noise[0].numel())
    assert model_output.grad[:, channels:].abs().min() > 0


def test_decoder_nll_branch_at_t0_differs_from_kl(reference):
    x_start, noise, model_output = reference["x_start"], reference["noise"], reference["model_output"]
    at_0 = improved_ddpm_loss(model_output, x_start, torch.zeros(4, dtype=torch.long), noise)
    at_1 = improved_ddpm_loss(model_output, x_start, torch.ones(4, dtype=torch.long), noise)
    assert at_0.mse.equal(at_1.mse)
    # The KL of two Gaussians is ≥ 0; the decoder NLL in bits per dimension is a different, larger quantity here.
    assert (at_1.vb >= 0).all() and not torch.allclose(at_0.vb, at_1.vb)


def test_input_checks():
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="model_output must have shape"):
        improved_ddpm_loss(torch.zeros(2, 4, 8, 8), x, torch.zeros(2, dtype=torch.long), x)
    with pytest.raises(ValueError, match="integer steps"):
        improved_ddpm_loss(torch.zeros(2, 8, 8, 8), x, torch.zeros(2), x)
    with pytest.raises(ValueError, match="betas"):
        DDPMSchedule.from_betas(torch.tensor([0.5]))


def test_sample_ddpm_inputs_is_reproducible_and_uniform():
    x = torch.zeros(4096, 1, 1, 1)
    t, noise = sample_ddpm_inputs(x, torch.Generator().manual_seed(0))
    t_again, noise_again = sample_ddpm_inputs(x, torch.Generator().manual_seed(0))
    assert t.equal(t_again) and noise.equal(noise_again)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and t.max() > 990 and t.min() < 10
    assert noise.shape == x.shape and abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1


class _EchoModel(torch.nn.Module):
    """Stands in for a DiT: returns a stored output, records what it was called with."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output
        self.calls = []

    def forward(self, x_t, timestep, class_labels, return_dict=True):
        self.calls.append((x_t, timestep, class_labels))
        return (self.output,)


def test_model_level_loss_feeds_x_t_and_integer_steps(reference):
    model = _EchoModel(reference["model_output"])
    labels = torch.tensor([1, 2, 3, 1000])
    out = improved_ddpm_repa_loss(
        model, reference["x_start"], labels, t=reference["t"], noise=reference["noise"], proj_coeff=0.5
    )
    x_t, timestep, class_labels = model.calls[0]
    assert x_t.equal(reference["x_t"]) and timestep.equal(reference["t"]) and class_labels.equal(labels)
    assert _relative_error(out.denoising_loss, reference["loss"]) <= 1e-5
    assert _relative_error(out.vb, reference["vb"]) <= 1e-5
    assert out.projection_loss.item() == 0 and out.loss.item() == pytest.approx(reference["loss"].mean().item())
