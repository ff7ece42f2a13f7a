"""SiTODEScheduler / SiTSDEScheduler: grids, the Heun interface, closed-form steps, noise handling, errors,
begin_index, len() and compatibility with diffusers' FlowMatchEulerDiscreteScheduler.

Parity with the original samplers on the tiny model is checked through the pipeline in test_pipeline_sit.py.
"""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

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


def test_begin_index_starts_a_run_part_way():
    # Euler on dx/dt = x from timesteps[2] = 0.5: two steps of (1 − h).
    scheduler = SiTODEScheduler()
    scheduler.set_timesteps(4)
    assert scheduler.begin_index is None
    scheduler.set_begin_index(2)
    assert scheduler.begin_index == 2 and scheduler.step_index == 2
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    state = x
    for t in scheduler.timesteps[2:]:
        state = scheduler.step(state, t, state).prev_sample
    torch.testing.assert_close(state, x * (1 - 1 / 4) ** 2, rtol=1e-12, atol=1e-12)
    scheduler.set_timesteps(4)
    assert scheduler.begin_index is None and scheduler.step_index == 0

    # Heun from entry 2 (the predictor of interval 1): two Heun intervals, then the last Euler one.
    heun = SiTODEScheduler(solver="heun")
    heun.set_timesteps(4)
    with pytest.raises(ValueError, match="corrector entry"):
        heun.set_begin_index(3)
    heun.set_begin_index(2)
    state = x
    for t in heun.timesteps[2:]:
        state = heun.step(state, t, state).prev_sample
    h = 1 / 4
    torch.testing.assert_close(state, x * (1 - h + h**2 / 2) ** 2 * (1 - h), rtol=1e-12, atol=1e-12)

    # SDE from the last entry: only the deterministic step to t = 0 is left.
    sde = SiTSDEScheduler()
    sde.set_timesteps(3)
    sde.set_begin_index(2)
    velocity = torch.randn_like(x)
    out = sde.step(velocity, sde.timesteps[2], x)
    torch.testing.assert_close(out.prev_sample, x + ((2 - 0.04) * velocity + x) * -0.04, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheduler_class", [SiTODEScheduler, SiTSDEScheduler])
@pytest.mark.parametrize(
    ("begin_index", "match"),
    [(None, "set_timesteps"), (3, r"must be in \[0, 2\]"), (-1, "must be in"), (1.0, "integer")],
)
def test_bad_begin_index_raises(scheduler_class, begin_index, match):
    scheduler = scheduler_class()
    if begin_index is not None:
        scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match=match):
        scheduler.set_begin_index(0 if begin_index is None else begin_index)


@pytest.mark.parametrize("scheduler_class", [SiTODEScheduler, SiTSDEScheduler])
def test_len_compatibles_and_swapping_with_flow_match(scheduler_class):
    scheduler = scheduler_class()
    # len(scheduler) is diffusers' num_train_timesteps, the factor between timesteps and the model's time t.
    assert len(scheduler) == 1 and len(FlowMatchEulerDiscreteScheduler()) == 1000
    assert set(scheduler.compatibles) == {SiTODEScheduler, SiTSDEScheduler, FlowMatchEulerDiscreteScheduler}
    for other_class in scheduler.compatibles:
        swapped = other_class.from_config(scheduler.config)
        assert isinstance(swapped, other_class)
        swapped.set_timesteps(4)
        assert swapped.timesteps[0] / len(swapped) == 1  # every run starts from noise at t = 1
    assert type(scheduler_class.from_config(FlowMatchEulerDiscreteScheduler().config)) is scheduler_class


@pytest.mark.parametrize("scheduler", [SiTODEScheduler(solver="heun"), SiTSDEScheduler()])
def test_config_that_is_not_a_json_object_is_named(tmp_path, scheduler):
    scheduler.save_pretrained(tmp_path)
    config_file = tmp_path / "scheduler_config.json"
    config_file.write_text(json.dumps([json.loads(config_file.read_text())]))
    with pytest.raises(
        ValueError, match=r"scheduler_config.json must hold a JSON object of .* settings, not a JSON list"
    ):
        type(scheduler).from_pretrained(tmp_path)


@pytest.mark.parametrize("last_step_size", ["0.04", True, None])
def test_last_step_size_of_the_wrong_type_is_named(last_step_size):
    with pytest.raises(ValueError, match="last_step_size must be a number in"):
        SiTSDEScheduler(last_step_size=last_step_size)
