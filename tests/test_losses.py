"""Interpolants and the REPA loss: parity with the original SILoss, conventions, half-precision safety."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_repa.conversion import convert_repa_checkpoint
from diffusers_repa.interpolants import (
    interpolate,
    path_coefficients,
    sample_timesteps,
    velocity_to_score,
)
from diffusers_repa.losses import denoising_loss, projection_loss, repa_loss

from .conftest import SIT_TINY, load_reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module")
def tiny_model():
    model = convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4, encoder_depth=2)
    return model.eval()


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_loss_matches_original_siloss(tiny_model, path_type):
    reference = load_reference(f"loss_{path_type}")
    with torch.no_grad():
        output = repa_loss(
            tiny_model,
            reference["latents"],
            reference["class_labels"],
            [reference["target_0"], reference["target_1"]],
            path_type=path_type,
            t=reference["t"],
            noise=reference["noise"],
            proj_coeff=0.5,
        )
    assert relative_error(output.denoising_loss, reference["denoising_loss_per_sample"]) <= 1e-5
    assert relative_error(output.projection_loss.reshape(1), reference["projection_loss"]) <= 1e-5
    expected_total = reference["denoising_loss_per_sample"].mean() + 0.5 * reference["projection_loss"][0]
    assert output.loss.item() == pytest.approx(expected_total.item(), rel=1e-5)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_path_endpoints_and_derivatives(path_type):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64, requires_grad=True)
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path_type)
    auto_d_alpha = torch.autograd.grad(alpha.sum(), t, retain_graph=True)[0]
    auto_d_sigma = torch.autograd.grad(sigma.sum(), t)[0]
    torch.testing.assert_close(d_alpha, auto_d_alpha)
    torch.testing.assert_close(d_sigma, auto_d_sigma)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    alpha, sigma, _, _ = path_coefficients(ends, path_type)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(sigma, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_t_zero_is_data_and_t_one_is_noise():
    data, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, _ = interpolate(data, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(x_t[0], data[0])
    torch.testing.assert_close(x_t[1], noise[1])


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_velocity_to_score_on_gaussian_data(path_type):
    # For x_0 ~ N(0, s²I) the ideal velocity and the true score of x_t are known in closed form.
    s2 = 0.7
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = torch.randn(3, 5, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = (c[:, None] for c in path_coefficients(t, path_type))
    variance = alpha**2 * s2 + sigma**2
    ideal_velocity = (d_alpha * alpha * s2 + d_sigma * sigma) * x_t / variance
    torch.testing.assert_close(velocity_to_score(ideal_velocity, x_t, t, path_type), -x_t / variance)


def test_uniform_and_logit_normal_time_sampling():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, "uniform", generator=generator)
    assert uniform.min() >= 0 and uniform.max() < 1
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    for path_type in ["linear", "cosine"]:
        t = sample_timesteps(20000, "logit_normal", path_type, generator=torch.Generator().manual_seed(1)).double()
        alpha, sigma, _, _ = path_coefficients(t, path_type)
        log_noise_to_signal = torch.log(sigma / alpha)  # must be N(0, 1) on both paths
        assert log_noise_to_signal.mean().item() == pytest.approx(0.0, abs=0.03)
        assert log_noise_to_signal.std().item() == pytest.approx(1.0, abs=0.03)


def test_unknown_path_and_time_sampling():
    with pytest.raises(ValueError, match="Unknown path_type 'edm'"):
        path_coefficients(torch.rand(2), "edm")
    with pytest.raises(ValueError, match="Unknown time_sampling 'beta'"):
        sample_timesteps(2, "beta")


def test_projection_loss_is_mean_negative_cosine():
    targets = [torch.randn(2, 5, 8), torch.randn(2, 5, 4)]
    projections = [torch.randn(2, 5, 8), torch.randn(2, 5, 4)]
    expected = -sum(F.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(targets, projections)) / 2
    assert projection_loss(targets, projections).item() == pytest.approx(expected.item(), abs=1e-6)
    assert projection_loss(targets, targets).item() == pytest.approx(-1.0, abs=1e-6)


def test_projection_loss_is_finite_in_half_precision_where_naive_overflows():
    torch.manual_seed(0)
    target = (torch.randn(2, 16, 768) * 300).half()  # squared norm ~7e7 > fp16 max 65504
    projection = (target.float() + torch.randn(2, 16, 768) * 100).half()
    naive_norm = target.pow(2).sum(-1).sqrt()
    assert not torch.isfinite(naive_norm).all()  # what half-precision normalisation runs into
    loss = projection_loss([target], [projection])
    expected = -F.cosine_similarity(target.double(), projection.double(), dim=-1).mean()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)


def test_projection_loss_shape_errors():
    with pytest.raises(ValueError, match="2 alignment targets but the model has 1 projectors"):
        projection_loss([torch.randn(1, 4, 8)] * 2, [torch.randn(1, 4, 8)])
    with pytest.raises(ValueError, match="differ in shape"):
        projection_loss([torch.randn(1, 4, 8)], [torch.randn(1, 9, 8)])


def test_denoising_loss_is_per_sample_mse():
    prediction, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expected = torch.stack([((p - q) ** 2).mean() for p, q in zip(prediction, target)])
    torch.testing.assert_close(denoising_loss(prediction, target), expected)


def test_without_targets_the_projectors_are_skipped(tiny_model):
    reference = load_reference("loss_linear")
    with torch.no_grad():
        output = repa_loss(tiny_model, reference["latents"], reference["class_labels"], (), t=reference["t"],
                           noise=reference["noise"])  # fmt: skip
    assert output.projection_loss.item() == 0.0
    assert output.loss.item() == pytest.approx(reference["denoising_loss_per_sample"].mean().item(), rel=1e-5)


def test_random_draws_follow_the_generator(tiny_model):
    latents, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        first = repa_loss(tiny_model, latents, labels, generator=torch.Generator().manual_seed(5)).loss
        second = repa_loss(tiny_model, latents, labels, generator=torch.Generator().manual_seed(5)).loss
    assert first.item() == second.item() and math.isfinite(first.item())
