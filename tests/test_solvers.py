"""Flow-matching solvers: schedules, step parity against diffusers, exactness on a linear flow, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from segue.errors import InputError
from segue.sampling.solvers import SOLVERS, DPMpp, Euler, UniPC, make_solver

# Reference UniPC timesteps for 50 steps at shift 16 (the CLI default), checked below against the formula.
UNIPC_50_SHIFT16 = [
    999, 998, 997, 995, 994, 993, 991, 989, 988, 986, 984, 982, 980, 978, 976, 973, 971, 968, 965, 963,
    959, 956, 953, 949, 945, 941, 936, 931, 926, 920, 914, 907, 899, 891, 882, 872, 861, 848, 834, 818,
    799, 778, 752, 722, 685, 639, 581, 504, 399, 245,
]  # fmt: skip


def _formula_unipc(steps: int, shift: float) -> tuple[list[int], np.ndarray]:
    """The reference schedule written out independently: training grid -> sigma_max -> linspace -> shift."""
    train_sigmas = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    sigma_max = train_sigmas[0].item()
    s = np.linspace(sigma_max, train_sigmas[-1].item(), steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return torch.from_numpy(s * 1000).long().tolist(), np.append(s, 0.0).astype(np.float32)


def test_unipc_schedule_matches_reference_values():
    timesteps, sigmas = _formula_unipc(50, 16.0)
    assert timesteps == UNIPC_50_SHIFT16
    solver = make_solver("unipc", 50, 16.0)
    assert isinstance(solver, UniPC) and len(solver) == 50
    assert solver.timesteps.dtype == torch.int64 and solver.timesteps.shape == (50,)
    assert solver.timesteps.tolist() == UNIPC_50_SHIFT16
    assert solver.sigmas.dtype == torch.float32 and solver.sigmas.shape == (51,)
    assert solver.sigmas[-1].item() == 0.0
    assert np.array_equal(solver.sigmas.numpy(), sigmas)
    assert solver.sigmas[0].item() < 1.0
    # Euler runs on the same grid.
    euler = make_solver("euler", 50, 16.0)
    assert isinstance(euler, Euler)
    assert torch.equal(euler.timesteps, solver.timesteps) and torch.equal(euler.sigmas, solver.sigmas)


@pytest.mark.parametrize("steps,shift", [(4, 1.0), (10, 5.0), (50, 16.0)])
def test_dpmpp_schedule(steps: int, shift: float):
    solver = make_solver("dpm++", steps, shift)
    assert isinstance(solver, DPMpp) and len(solver) == steps
    s = np.linspace(1, 0, steps + 1)[:steps]
    s = shift * s / (1 + (shift - 1) * s)
    # The reference's second shift (config shift 1) is the identity, bit for bit.
    assert np.array_equal(1 * s / (1 + (1 - 1) * s), s)
    assert solver.timesteps.dtype == torch.int64
    assert solver.timesteps[0].item() == 1000
    assert solver.timesteps.tolist() == torch.from_numpy(s * 1000).long().tolist()
    assert solver.sigmas.dtype == torch.float32 and solver.sigmas.shape == (steps + 1,)
    assert solver.sigmas[0].item() == 1.0 and solver.sigmas[-1].item() == 0.0
    assert np.array_equal(solver.sigmas.numpy(), np.append(s, 0.0).astype(np.float32))


def _fake_velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A deterministic, non-linear stand-in for the DiT."""
    return torch.tanh(x) * 0.5 + (t.float() / 1000) * c


def _diffusers_scheduler(name: str, steps: int, shift: float, ours):
    common = dict(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    if name == "unipc":
        sched = UniPCMultistepScheduler(**common, solver_type="bh2", predict_x0=True, disable_corrector=[])
    else:
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_type="midpoint")
    sched.set_timesteps(steps)
    # diffusers builds a slightly different grid; run its step code on the reference grid instead.
    sched.sigmas = ours.sigmas.clone()
    sched.timesteps = ours.timesteps.clone()
    sched.set_begin_index(0)  # index by position, not by timestep lookup (duplicates are possible)
    return sched


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps", [4, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 5.0, 16.0])
def test_step_parity_with_diffusers(name: str, steps: int, shift: float):
    torch.manual_seed(0)
    x0 = torch.randn(1, 4, 3, 6, 5)
    c = torch.randn(1, 4, 3, 6, 5)
    ours = make_solver(name, steps, shift)
    ref = _diffusers_scheduler(name, steps, shift, ours)

    x_ours, x_ref = x0.clone(), x0.clone()
    for t in ours.timesteps:
        x_ref = ref.step(_fake_velocity(x_ref, t, c), t, x_ref, return_dict=False)[0]
        x_ours = ours.step(_fake_velocity(x_ours, t, c), x_ours)
    assert ref.step_index == steps
    assert x_ours.dtype == torch.float32
    max_diff = (x_ours - x_ref).abs().max().item()
    assert max_diff < 1e-6, max_diff
    assert torch.equal(x_ours, x_ref)  # same ops in the same order: bit-identical on CPU
    # The final x is far from the start, so the check is not vacuous.
    assert (x_ours - x0).abs().max().item() > 0.1


@pytest.mark.parametrize("name", SOLVERS)
def test_unbatched_latent_and_reset(name: str):
    """The pipeline passes [C, T, H, W] latents; reset() replays the schedule identically."""
    torch.manual_seed(1)
    x0 = torch.randn(4, 3, 6, 5)
    c = torch.randn(4, 3, 6, 5)
    solver = make_solver(name, 6, 5.0)
    outs = []
    for _ in range(2):
        solver.reset()
        x = x0.clone()
        for t in solver.timesteps:
            x = solver.step(_fake_velocity(x, t, c), x)
        outs.append(x)
    assert outs[0].shape == x0.shape
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="already ran"):
        solver.step(x0, x0)


# lcm re-noises with fresh noise, so the constant velocity below is no longer the true one after its first
# step; tests/test_lcm.py checks it with the velocity of the path through each sample instead.
@pytest.mark.parametrize("name", [s for s in SOLVERS if s != "lcm"])
@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 5.0), (50, 16.0)])
def test_exact_on_linear_flow(name: str, steps: int, shift: float):
    """With the true constant velocity x1 - x0, every deterministic solver lands on x0."""
    torch.manual_seed(2)
    data = torch.randn(1, 4, 2, 3, 3)
    noise = torch.randn(1, 4, 2, 3, 3)
    solver = make_solver(name, steps, shift)
    sigma0 = solver.sigmas[0]
    x = (1 - sigma0) * data + sigma0 * noise
    v = noise - data
    for _ in solver.timesteps:
        x = solver.step(v, x)
    err = (x - data).abs().max().item()
    assert err < 1e-5, err


def test_euler_step_value():
    solver = make_solver("euler", 3, 2.0)
    x = torch.ones(2, 3)
    v = torch.full((2, 3), 2.0)
    out = solver.step(v, x)
    expected = 1.0 + (solver.sigmas[1].item() - solver.sigmas[0].item()) * 2.0
    torch.testing.assert_close(out, torch.full((2, 3), expected), rtol=1e-6, atol=1e-6)


def test_errors():
    with pytest.raises(InputError, match=r"unknown solver 'heun'; choose one of: unipc, dpm\+\+, euler"):
        make_solver("heun", 10, 5.0)
    with pytest.raises(InputError, match="steps"):
        make_solver("unipc", 0, 5.0)
    with pytest.raises(InputError, match="shift"):
        make_solver("unipc", 10, 0.0)
    with pytest.raises(InputError, match="shift"):
        make_solver("dpm++", 10, -1.0)
