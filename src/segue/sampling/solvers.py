"""Flow-matching solvers for Wan2.1 sampling: UniPC (the reference default), DPM++, Euler, and the few-step
stochastic LCM sampler of step-distilled models.

The model predicts a velocity `v` on the straight path `x_t = (1 - sigma) * x0 + sigma * noise`, so the
data prediction is `x0 = x_t - sigma * v`, with `alpha = 1 - sigma` and half-log-SNR
`lambda = log(alpha) - log(sigma)`. UniPC and DPM++ are multistep solvers in `lambda` on that x0
prediction; Euler steps the velocity directly. LCM (for the 4-step distilled LoRAs: lightx2v, CausVid) takes
the same x0 and re-noises it to the next sigma with fresh Gaussian noise, as those models were trained to
be sampled (see `LCM`).

The numerics follow the reference's step code (Wan2.1 `wan/utils/fm_solvers_unipc.py` and
`fm_solvers.py`, adapted from diffusers) op for op: the per-step scalars are 0-d float32 tensors
indexed from `sigmas`, which stay on the CPU as in the reference, and every expression keeps the
reference's evaluation order, so the same inputs give the same bits.

Usage:
    solver = make_solver("unipc", steps=50, shift=16.0, device="cuda")
    for t in solver.timesteps:
        x = solver.step(velocity(x, t), x)
    make_solver("lcm", steps=4, shift=5.0, device="cuda", seed=seed)  # stochastic: re-noises from `seed`
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from segue.errors import InputError
from segue.settings import SOLVERS  # the names live with the other settings checks

NUM_TRAIN_TIMESTEPS = 1000
# First sigma of the 1000-step training grid `1 - linspace(1, 1/1000, 1000)`, stored in float32 by the
# reference and read back as a Python float: 0.999 rounded to float32.
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    """Time shift of the flow schedule: spends more steps at high noise when shift > 1."""
    return shift * s / (1 + (shift - 1) * s)


def _schedule(s: np.ndarray, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Shifted float64 sigmas [N] -> (int64 timesteps [N] on device, float32 sigmas [N+1] ending in 0)."""
    timesteps = torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(device=device, dtype=torch.int64)  # truncates
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return timesteps, sigmas


def unipc_schedule(steps: int, shift: float, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """UniPC/Euler grid: `steps` points from SIGMA_MAX down towards 0 (0 itself excluded), then shifted."""
    s = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]
    return _schedule(shift_sigmas(s, shift), device)


def dpmpp_schedule(steps: int, shift: float, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """DPM++ grid: starts at sigma 1 exactly (first timestep 1000).

    The reference shifts once, then hands the sigmas to a scheduler configured with shift 1, whose
    second shift `1*s / (1 + 0*s)` is the identity in float64.
    """
    s = np.linspace(1.0, 0.0, steps + 1)[:steps]
    return _schedule(shift_sigmas(s, shift), device)


def lcm_schedule(steps: int, shift: float, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """LCM grid: the DPM++ sigmas (1 - k/steps, shifted), with float32 timesteps `sigma * 1000`, unrounded.

    For 4 steps this is the distilled models' `denoising_step_list` [1000, 750, 500, 250] warped by the shift
    (lightx2v, CausVid, Self-Forcing): at shift 5 sigmas 1, 0.9375, 0.8333, 0.625 and timesteps 1000.0, 937.5,
    833.3333, 625.0, which those references feed to the model as floats (DPM++ truncates: 1000, 937, 833, 625).
    """
    _, sigmas = dpmpp_schedule(steps, shift)
    timesteps = (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(device)  # float32 product, as the references
    return timesteps, sigmas


def _lambda(sigma: Tensor) -> Tensor:
    """Half log-SNR of a 0-d sigma: log(alpha) - log(sigma); +inf at sigma 0, -inf at sigma 1."""
    alpha = 1 - sigma
    return torch.log(alpha) - torch.log(sigma)


class Solver:
    """A stateful sampler over a fixed schedule; call `step` once per entry of `timesteps`.

    `timesteps` [N] are what the model sees (int64; float32 for LCM); `sigmas` [N+1] float32 (CPU) end with 0.
    `step(v, x)` takes the velocity predicted at (x, timesteps[i]) and returns x at sigmas[i+1].
    """

    name = "base"

    def __init__(self, timesteps: Tensor, sigmas: Tensor) -> None:
        self.timesteps = timesteps
        self.sigmas = sigmas
        self.reset()

    def __len__(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        """Forget all history so the same schedule can run again from step 0."""
        self.index = 0
        # x0 predictions of the last two steps, newest last (multistep history).
        self.x0_history: list[Tensor] = []

    def step(self, v: Tensor, x: Tensor) -> Tensor:
        if self.index >= len(self):
            raise RuntimeError(f"{self.name} solver already ran all {len(self)} steps; call reset()")
        if v.shape != x.shape:
            raise ValueError(f"velocity shape {tuple(v.shape)} != sample shape {tuple(x.shape)}")
        out = self._step(self.index, v, x)
        self.index += 1
        return out

    def _step(self, i: int, v: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _remember(self, x0: Tensor) -> None:
        self.x0_history = [*self.x0_history[-1:], x0]


class Euler(Solver):
    """First-order Euler on the velocity: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v.

    Computed in float32; the result has the promoted dtype of x and v, as DPM++ does.
    """

    name = "euler"

    def _step(self, i: int, v: Tensor, x: Tensor) -> Tensor:
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x.to(torch.float32) + dt * v).to(torch.promote_types(x.dtype, v.dtype))


class DPMpp(Solver):
    """DPM-Solver++ (2M, midpoint) on the x0 prediction, deterministic.

    Order 1 on the first step (no history) and on the last (sigma 0: the update is exactly x0),
    order 2 elsewhere. The sample is upcast to float32 for the update and the result is cast to the
    dtype of the x0 prediction (that of `x - sigma * v`).
    """

    name = "dpm++"

    def _step(self, i: int, v: Tensor, x: Tensor) -> Tensor:
        x0 = x - self.sigmas[i] * v
        self._remember(x0)
        x32 = x.to(torch.float32)
        first_order = len(self.x0_history) < 2 or i == len(self) - 1

        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        h = _lambda(sigma_t) - _lambda(sigma_s0)
        if first_order:
            out = (sigma_t / sigma_s0) * x32 - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            m0, m1 = self.x0_history[-1], self.x0_history[-2]
            h_0 = _lambda(sigma_s0) - _lambda(self.sigmas[i - 1])
            r0 = h_0 / h
            d1 = (1.0 / r0) * (m0 - m1)  # finite-difference slope of x0 in lambda, scaled by h
            out = (
                (sigma_t / sigma_s0) * x32
                - (alpha_t * (torch.exp(-h) - 1.0)) * m0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        return out.to(x0.dtype)


class UniPC(Solver):
    """UniPC, order 2, B(h) = expm1(-h) ('bh2'), on the x0 prediction.

    Each step: (1) convert v to x0 at the incoming sample; (2) from step 1 on, correct the incoming
    sample with UniC, which re-solves the previous interval using this fresh x0; (3) predict the next
    sample with UniP from the corrected one. The predictor order warms up (1 on the first step) and
    drops to 1 on the last step (lower_order_final); the corrector uses the previous predictor's order.
    Results keep the sample's dtype.
    """

    name = "unipc"

    def reset(self) -> None:
        super().reset()
        self.last_sample: Tensor | None = None  # corrected sample the previous predictor started from
        self.last_order = 0  # order the previous predictor used

    def _step(self, i: int, v: Tensor, x: Tensor) -> Tensor:
        x0 = x - self.sigmas[i] * v  # from the uncorrected sample, as in the reference
        if self.last_sample is not None:
            x = self._correct(i, x0, x)
        self._remember(x0)
        order = min(2, len(self) - i, len(self.x0_history))
        self.last_sample = x
        self.last_order = order
        return self._predict(i, x, order)

    def _coefficients(self, sigma_t: Tensor, sigma_s0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha_t, h, h*phi_1 = expm1(-h), B(h)) for the interval sigma_s0 -> sigma_t."""
        alpha_t = 1 - sigma_t
        h = _lambda(sigma_t) - _lambda(sigma_s0)
        h_phi_1 = torch.expm1(-h)  # the x0-prediction form integrates in -h
        b_h = torch.expm1(-h)
        return alpha_t, h, h_phi_1, b_h

    def _predict(self, i: int, x: Tensor, order: int) -> Tensor:
        """UniP: x at sigmas[i+1] from x at sigmas[i] and the x0 history."""
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t, h, h_phi_1, b_h = self._coefficients(sigma_t, sigma_s0)
        m0 = self.x0_history[-1]
        out = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = (_lambda(self.sigmas[i - 1]) - _lambda(sigma_s0)) / h
            d1 = (self.x0_history[-2] - m0) / rk
            # For order 2 the predictor weight is fixed at 0.5 (the reference's simplification).
            out = out - alpha_t * b_h * (0.5 * d1)
        return out.to(x.dtype)

    def _correct(self, i: int, x0: Tensor, x_pred: Tensor) -> Tensor:
        """UniC: redo the step sigmas[i-1] -> sigmas[i] from `last_sample`, now also using x0 at i."""
        order = self.last_order
        x = self.last_sample
        assert x is not None
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        alpha_t, h, h_phi_1, b_h = self._coefficients(sigma_t, sigma_s0)
        m0 = self.x0_history[-1]
        # The order conditions are solved on the CPU (the sigmas live there): a device solve and
        # host-to-device copies would make every step wait for the GPU. rhos stay 0-d CPU scalars.
        if order == 1:
            rhos = torch.tensor([0.5], dtype=x.dtype)
            corr = None
        else:
            # Solve the 2x2 order conditions R @ rho = b, with R = [[1, 1], [rk, 1]].
            hh = -h
            rk = (_lambda(self.sigmas[i - 2]) - _lambda(sigma_s0)) / h
            rks = torch.stack([rk, torch.ones((), dtype=rk.dtype)])
            r = torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)])
            h_phi_k = h_phi_1 / hh - 1
            b1 = h_phi_k * 1 / b_h
            h_phi_k = h_phi_k / hh - 1 / 2
            b2 = h_phi_k * 2 / b_h
            b = torch.stack([b1, b2])
            rhos = torch.linalg.solve(r, b).to(x.dtype)
            d1 = (self.x0_history[-2] - m0) / rk
            corr = rhos[0] * d1

        out = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        d1_t = x0 - m0
        last_term = rhos[-1] * d1_t
        res = last_term if corr is None else corr + last_term
        out = out - alpha_t * b_h * res
        return out.to(x.dtype)


class LCM(Solver):
    """Few-step consistency sampler (LCM-style) for step-distilled models: x0 = x - sigma * v, then
    x_next = (1 - sigma_next) * x0 + sigma_next * noise with FRESH Gaussian noise; the last step returns x0.

    This is how the distilled Wan2.1 generators were trained and sampled (CausVid and Self-Forcing
    inference; lightx2v's Wan2.1 step-distill scheduler until Nov 2025, when it switched to the
    deterministic x0 + sigma_next * v, an Euler step on this grid; segue's `euler` runs on the UniPC grid,
    first timestep 999). Matches diffusers' FlowMatchLCMScheduler given the same sigmas and noise.

    The noise comes from a CPU generator seeded once from `seed` (`noise_seed`), drawn in float32 and moved
    to the sample's device, so CPU and GPU runs re-noise identically; `reset` replays the same noise. The
    seed is salted so that on the CPU the first re-noise draw is not the initial noise of a generation with
    the same seed (segue.recipe.initial_noise). Math in float32; the result has the promoted dtype of x and v.
    """

    name = "lcm"
    _SEED_SALT = 0x1C35EED  # fixed; XOR with a value below 2**63 keeps the seed in [0, 2**63)

    def __init__(self, timesteps: Tensor, sigmas: Tensor, seed: int = 0) -> None:
        self.noise_seed = seed ^ self._SEED_SALT
        super().__init__(timesteps, sigmas)

    def reset(self) -> None:
        super().reset()
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.noise_seed)

    def _step(self, i: int, v: Tensor, x: Tensor) -> Tensor:
        out_dtype = torch.promote_types(x.dtype, v.dtype)
        x0 = x.to(torch.float32) - self.sigmas[i] * v.to(torch.float32)
        if i == len(self) - 1:  # next sigma is 0: the clean estimate is the result
            return x0.to(out_dtype)
        sigma_next = self.sigmas[i + 1]
        noise = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(x0.device)
        return ((1 - sigma_next) * x0 + sigma_next * noise).to(out_dtype)


def make_solver(name: str, steps: int, shift: float, device: torch.device | str = "cpu", seed: int = 0) -> Solver:
    """Build a solver with the reference's schedule for `steps` model calls and time shift `shift`.

    `seed` seeds the re-noising of the stochastic `lcm` solver; the other solvers are deterministic and
    ignore it.
    """
    if name not in SOLVERS:
        raise InputError(f"unknown solver '{name}'; choose one of: {', '.join(SOLVERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise InputError(f"shift must be > 0, got {shift!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if name == "dpm++":
        return DPMpp(*dpmpp_schedule(steps, shift, device))
    if name == "lcm":
        return LCM(*lcm_schedule(steps, shift, device), seed=seed)
    timesteps, sigmas = unipc_schedule(steps, shift, device)
    return UniPC(timesteps, sigmas) if name == "unipc" else Euler(timesteps, sigmas)
