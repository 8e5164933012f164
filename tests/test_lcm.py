"""The few-step stochastic `lcm` solver: grid of the distilled references, step formula, diffusers parity,
seeded determinism, and the CLI end to end on a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchLCMScheduler

from segue.cli import main
from segue.errors import InputError
from segue.lora import FEW_STEP
from segue.recipe import initial_noise
from segue.sampling.solvers import LCM, SOLVERS, make_solver


def _lightx2v_grid(shift: float, step_list: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled references' construction, written out: a float32 1000-point grid from sigma 1, shifted,
    timesteps sigma * 1000, then the entries at 1000 - t for t in `denoising_step_list`."""
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    t = s * 1000
    idx = [1000 - x for x in step_list]
    return t[idx], s[idx]


def _fake_velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A deterministic, non-linear stand-in for the DiT."""
    return torch.tanh(x) * 0.5 + (t.float() / 1000) * c


@pytest.mark.parametrize("shift", [5.0, 8.0])
def test_schedule_is_the_distilled_grid(shift: float):
    solver = make_solver("lcm", 4, shift)
    assert isinstance(solver, LCM) and "lcm" in SOLVERS and len(solver) == 4
    ref_t, ref_s = _lightx2v_grid(shift, [1000, 750, 500, 250])
    # float32 timesteps, unrounded, bit-equal to the reference's
    assert solver.timesteps.dtype == torch.float32
    assert torch.equal(solver.timesteps, ref_t)
    assert torch.equal(solver.sigmas, torch.cat([ref_s, torch.zeros(1)]))
    # the sigmas are those of the dpm++ grid; only the timesteps' rounding differs
    assert torch.equal(solver.sigmas, make_solver("dpm++", 4, shift).sigmas)


def test_schedule_values_shift5_against_other_grids():
    lcm = make_solver("lcm", 4, 5.0)
    assert lcm.timesteps.tolist() == [1000.0, 937.5, np.float32(2500 / 3).item(), 625.0]
    np.testing.assert_allclose(lcm.sigmas.numpy(), [1.0, 0.9375, 5 / 6, 0.625, 0.0], rtol=1e-7)
    assert make_solver("dpm++", 4, 5.0).timesteps.tolist() == [1000, 937, 833, 625]  # truncated to int64
    unipc = make_solver("unipc", 4, 5.0)  # starts at sigma 0.999 before the shift
    assert unipc.timesteps.tolist() == [999, 937, 833, 624]
    assert unipc.sigmas[0].item() < 1.0 and not torch.equal(unipc.sigmas, lcm.sigmas)


def test_step_formula_and_last_step():
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    solver = make_solver("lcm", 4, 5.0, seed=7)
    g = torch.Generator().manual_seed(solver.noise_seed)
    sigmas = solver.sigmas.tolist()
    for i in range(3):
        noise = torch.randn(x.shape, generator=g)
        x0 = x - sigmas[i] * v
        expected = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise
        out = solver.step(v, x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        # fresh noise: the result is not the deterministic (Euler) step
        assert (out - (x + (sigmas[i + 1] - sigmas[i]) * v)).abs().max().item() > 0.1
        x = out
    out = solver.step(v, x)  # sigma_next = 0: exactly x0, no noise
    assert torch.equal(out, x - solver.sigmas[3] * v)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 5.0), (4, 8.0), (10, 16.0)])
def test_exact_with_oracle_velocity(steps: int, shift: float):
    """Given the velocity of the straight path from the data through the current sample, every clean
    estimate is the data, whatever noise was added, so the last step lands on it."""
    torch.manual_seed(4)
    data, noise = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    solver = make_solver("lcm", steps, shift)
    x = noise  # sigma 0 is 1: pure noise
    assert solver.sigmas[0].item() == 1.0
    for i in range(steps):
        sigma = solver.sigmas[i]
        x = solver.step((x - data) / sigma, x)
    err = (x - data).abs().max().item()
    assert err < 1e-5, err


@pytest.mark.parametrize("shift", [5.0, 8.0])
def test_parity_with_diffusers_flow_match_lcm(shift: float):
    torch.manual_seed(1)
    x_start = torch.randn(1, 4, 3, 6, 5)
    c = torch.randn(1, 4, 3, 6, 5)
    ours = make_solver("lcm", 4, shift, seed=123)
    ref = FlowMatchLCMScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # the unshifted distilled points
    assert torch.equal(ref.sigmas, ours.sigmas) and torch.equal(ref.timesteps, ours.timesteps)
    ref.set_begin_index(0)
    g = torch.Generator().manual_seed(ours.noise_seed)  # the same noise stream as ours

    x_ours, x_ref = x_start.clone(), x_start.clone()
    for t in ours.timesteps:
        x_ref = ref.step(_fake_velocity(x_ref, t, c), t, x_ref, generator=g, return_dict=False)[0]
        x_ours = ours.step(_fake_velocity(x_ours, t, c), x_ours)
    max_diff = (x_ours - x_ref).abs().max().item()
    assert max_diff < 1e-6, max_diff
    assert torch.equal(x_ours, x_ref)  # same ops in the same order: bit-identical on CPU
    assert (x_ours - x_start).abs().max().item() > 0.1


def test_seeded_determinism_reset_and_dtype():
    torch.manual_seed(2)
    x_start, c = torch.randn(4, 3, 6, 5), torch.randn(4, 3, 6, 5)

    def run(solver: LCM) -> torch.Tensor:
        x = x_start.clone()
        for t in solver.timesteps:
            x = solver.step(_fake_velocity(x, t, c), x)
        return x

    a = make_solver("lcm", 4, 5.0, seed=11)
    out_a = run(a)
    assert torch.equal(out_a, run(make_solver("lcm", 4, 5.0, seed=11)))
    a.reset()
    assert torch.equal(out_a, run(a))  # reset replays the same noise
    assert (out_a - run(make_solver("lcm", 4, 5.0, seed=12))).abs().max().item() > 0.1
    # the re-noising stream is not the initial noise of a CPU generation with the same seed
    init = initial_noise(4, 3, 6, 5, 11, torch.device("cpu"))
    first = torch.randn(init.shape, generator=torch.Generator().manual_seed(a.noise_seed))
    assert not torch.allclose(first, init)
    # bf16 in, bf16 out (math in float32)
    b = make_solver("lcm", 4, 5.0)
    out = b.step(x_start.bfloat16(), x_start.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x_start.shape


def test_errors():
    with pytest.raises(InputError, match="seed"):
        make_solver("lcm", 4, 5.0, seed=-1)
    with pytest.raises(InputError, match=r"choose one of: unipc, dpm\+\+, euler, lcm"):
        make_solver("lcm4", 4, 5.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    torch.manual_seed(3)
    x_start, c = torch.randn(4, 3, 6, 5), torch.randn(4, 3, 6, 5)
    outs = []
    for device in ("cpu", "cuda"):
        solver = make_solver("lcm", 4, 5.0, device, seed=5)
        assert solver.timesteps.device.type == device
        x, cd = x_start.to(device), c.to(device)
        for t in solver.timesteps:
            x = solver.step(_fake_velocity(x, t, cd), x)
        outs.append(x.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_cli_generate_lcm(official_ckpt, frames_dir, tmp_path):
    import segue

    assert FEW_STEP["solver"] == "lcm" and FEW_STEP["steps"] == 4 and FEW_STEP["guidance"] == 1.0
    first, last = frames_dir / "first.png", frames_dir / "last.png"
    out, latent_path = tmp_path / "lcm.mp4", tmp_path / "lcm.pt"
    args = ["--first", str(first), "--last", str(last), "--frames", "5", "--steps", "4", "--guidance", "1"]
    args += ["--shift", "5", "--solver", "lcm", "--seed", "3", "--out", str(out), "--save-latent", str(latent_path)]
    assert main(["-q", "generate", "--ckpt-dir", str(official_ckpt), *args]) == 0
    assert out.exists()
    cli_latent = torch.load(latent_path)

    # The same settings through the Python API (one load for both runs keeps the test short).
    pipe = segue.load(official_ckpt)
    settings = dict(frames=5, steps=4, guidance=1.0, shift=5.0, seed=3)
    lcm = pipe.generate(first, last, "", solver="lcm", **settings)
    euler = pipe.generate(first, last, "", solver="euler", **settings)
    assert lcm.info["settings"]["solver"] == "lcm"
    assert torch.isfinite(cli_latent).all() and cli_latent.shape == euler.latent.shape
    assert torch.equal(cli_latent, lcm.latent)  # seeded: the CLI run is replayed exactly
    assert (cli_latent - euler.latent).abs().max().item() > 1e-3  # re-noising changes the result
