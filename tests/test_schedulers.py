"""SiTODEScheduler / SiTSDEScheduler: grids, the Heun interface, closed-form steps, noise handling, errors.

Parity with the original samplers on the tiny model is checked through the pipeline in test_pipeline_sit.py.
"""

import math

import pytest
import torch

from diffusers_repa.schedulers import SiTODEScheduler, SiTSDEScheduler


def run_linear_ode(scheduler: SiTODEScheduler, x: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = x from t = 1 to 0 with the scheduler (the model output is the state itself)."""
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    return x


def test_ode_euler_grid_and_closed_form():
    scheduler = SiTODEScheduler()
    scheduler.set_timesteps(4)
    assert scheduler.order == 1
    assert scheduler.timesteps.dtype == torch.float64
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    # Each Euler step backwards in time multiplies by (1 − h), h = 1/N.
    torch.testing.assert_close(run_linear_ode(scheduler, x), x * (1 - 1 / 4) ** 4, rtol=1e-12, atol=1e-12)


def test_ode_heun_follows_diffusers_heun_interface():
    scheduler = SiTODEScheduler(solver="heun")
    scheduler.set_timesteps(4)
    assert scheduler.order == 2
    # Interior points repeat: predictor, then corrector evaluated at the end of the interval; 2N − 1 model calls.
    expected = torch.tensor([1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(scheduler.timesteps, expected)

    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    first_order = []
    state = x
    for t in scheduler.timesteps:
        first_order.append(scheduler.state_in_first_order)
        state = scheduler.step(state, t, state).prev_sample
    assert first_order == [True, False, True, False, True, False, True]
    # Heun on dx/dt = x multiplies by (1 − h + h²/2) per interval; the last interval is a plain Euler step.
    h = 1 / 4
    torch.testing.assert_close(state, x * (1 - h + h**2 / 2) ** 3 * (1 - h), rtol=1e-12, atol=1e-12)


def test_ode_step_keeps_the_sample_dtype():
    scheduler = SiTODEScheduler()
    scheduler.set_timesteps(2)
    sample = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    out = scheduler.step(torch.randn(1, 4, 2, 2, dtype=torch.float32), scheduler.timesteps[0], sample)
    assert out.prev_sample.dtype == torch.float64
    assert scheduler.scale_model_input(sample, scheduler.timesteps[0]) is sample


@pytest.mark.parametrize("scheduler_class", [SiTODEScheduler, SiTSDEScheduler])
def test_step_outside_a_run_raises(scheduler_class):
    scheduler = scheduler_class()
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 1.0, x)
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        scheduler.step(x, t, x)
    with pytest.raises(ValueError, match="steps are done"):
        scheduler.step(x, 0.0, x)


@pytest.mark.parametrize("scheduler_class", [SiTODEScheduler, SiTSDEScheduler])
@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_count_raises(scheduler_class, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler_class().set_timesteps(steps)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="solver"):
        SiTODEScheduler(solver="rk4")
    with pytest.raises(ValueError, match="path_type"):
        SiTSDEScheduler(path_type="vp")
    with pytest.raises(ValueError, match="last_step_size"):
        SiTSDEScheduler(last_step_size=0.0)


def test_sde_grid():
    scheduler = SiTSDEScheduler()
    scheduler.set_timesteps(7)
    torch.testing.assert_close(scheduler.timesteps, torch.linspace(1, 0.04, 7, dtype=torch.float64))
    assert scheduler.time_grid[-1] == 0
    assert scheduler.num_stochastic_steps == 6


def test_sde_linear_step_closed_form():
    # Linear path: score = −((1 − t)·v + x) / t, so the drift v − t·score is (2 − t)·v + x.
    scheduler = SiTSDEScheduler(path_type="linear")
    scheduler.set_timesteps(3)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    velocity = torch.randn_like(x)
    noise = torch.randn_like(x)
    grid = [1.0, 0.52, 0.04, 0.0]
    for index in range(3):
        t, dt = grid[index], grid[index + 1] - grid[index]
        mean = x + ((2 - t) * velocity + x) * dt
        is_last = index == 2
        out = scheduler.step(velocity, scheduler.timesteps[index], x, noise=None if is_last else noise)
        expected = mean if is_last else mean + math.sqrt(2 * t) * math.sqrt(-dt) * noise
        torch.testing.assert_close(out.prev_sample_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-12, atol=1e-12)
        x = out.prev_sample


def test_sde_noise_from_generator_and_checks():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    velocity = torch.randn_like(x)

    def first_step(**kwargs):
        scheduler = SiTSDEScheduler(path_type="cosine")
        scheduler.set_timesteps(3)
        return scheduler.step(velocity, scheduler.timesteps[0], x, **kwargs).prev_sample

    same = first_step(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first_step(generator=torch.Generator().manual_seed(1)), same, rtol=0, atol=0)
    assert not torch.allclose(first_step(generator=torch.Generator().manual_seed(2)), same)
    with pytest.raises(ValueError, match="shape"):
        first_step(noise=torch.randn(1, 4, 4, 4))

    scheduler = SiTSDEScheduler()
    scheduler.set_timesteps(1)
    with pytest.raises(ValueError, match="deterministic"):
        scheduler.step(velocity, scheduler.timesteps[0], x, noise=torch.randn_like(x))


@pytest.mark.parametrize(
    "scheduler", [SiTODEScheduler(solver="heun"), SiTSDEScheduler(path_type="cosine", last_step_size=0.05)]
)
def test_config_round_trip(tmp_path, scheduler):
    scheduler.save_pretrained(tmp_path)
    loaded = type(scheduler).from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(scheduler.config)
