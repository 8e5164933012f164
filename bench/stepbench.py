"""Shared machinery of bench/gpu.py and bench/cpu.py: one CFG sampling step of the DiT per speed option.

A "CFG step" is what the sampling loop does once per timestep: ``Pipeline.velocity`` (conditional and
unconditional passes, or one batch of two with ``cfg_batch``) at a fixed timestep. Every option starts
from the same random weights and the same inputs; its velocity is compared with the plain path's
(relative error), so the table shows speed and fidelity side by side. diffusers' WanTransformer3DModel
runs the same step (two forwards, the same weights mapped to its names) in the same process.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from segue.config import ModelConfig
from segue.models.dit import WanDiT, apply_dtype_policy
from segue.parallel import cost
from segue.pipeline import Pipeline
from segue.sampling.guidance import Conditioning, StepContext


@dataclass
class Row:
    option: str
    seconds: float | None = None  # per CFG step (median)
    tflops: float | None = None
    ceiling_pct: float | None = None
    peak_gb: float | None = None
    rel_err: float | None = None  # velocity vs the plain path
    lossy: bool = False
    note: str = ""


@dataclass
class Case:
    """One resolution: the latent grid and the conditioning tensors of a FLF2V step."""

    name: str
    frames: int
    height: int
    width: int
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def tokens(self, cfg: ModelConfig) -> int:
        return cost.tokens(cfg, self.frames, self.height, self.width)

    def step_flop(self, cfg: ModelConfig) -> float:
        """FLOP of one CFG step: two DiT forwards (Linear layers + self-attention, SPEC section 7)."""
        return 2 * cost.dit_flops(cfg, self.tokens(cfg))["total"]


def make_inputs(cfg: ModelConfig, case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random latent, text contexts (cond 64 tokens, uncond the full length, as real prompts differ),
    CLIP tokens of two frames and the mask + conditioning latent y."""
    g = torch.Generator().manual_seed(seed)
    z, s, tf = cfg.vae.z_dim, cfg.vae.spatial_factor, cfg.vae.temporal_factor
    lat = ((case.frames - 1) // tf + 1, case.height // s, case.width // s)
    d = cfg.dit

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    n_img = d.image_pos_len or 257  # FLF2V: 257 CLIP tokens of each of the two frames
    return {
        "latent": rnd(z, *lat),  # [z, T, h, w]
        "context": rnd(min(64, d.text_len), d.text_dim),  # [L_text, text_dim]
        "context_neg": rnd(d.text_len, d.text_dim),
        "clip": rnd(1, n_img, d.image_dim) if d.image_dim is not None else None,  # [1, N_img, image_dim]
        "y": rnd(1, d.in_dim - z, *lat) if d.in_dim > z else None,  # [1, 4 + z, T, h, w]
        "timestep": torch.tensor([937.0], device=device),
    }


def build_dit(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanDiT:
    """The DiT with random weights made directly on ``device`` (no CPU copy of 14B parameters)."""
    with torch.device("meta"):
        dit = WanDiT(cfg.dit)
    dit.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.ndim >= 2 and "modulation" not in name and "emb_pos" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=g)
            elif "norm" in name:
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)
    return apply_dtype_policy(dit.eval().requires_grad_(False), dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[float, torch.Tensor]:
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    assert out is not None
    return statistics.median(times), out


def peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 10) -> float:
    """Measured dense-matmul TFLOP/s of this device at ``dtype`` (the best of ``iters``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(iters + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def segue_step(pipe: Pipeline, x: dict[str, torch.Tensor], guidance: float = 5.0) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.no_grad():
            cond = Conditioning(x["context"], x["context_neg"], x["clip"], x["y"])
            return pipe.velocity(x["latent"], cond, StepContext(0, 1, x["timestep"], 0), guidance)

    return step


def diffusers_step(
    model: torch.nn.Module, x: dict[str, torch.Tensor], dtype: torch.dtype, text_len: int, guidance: float = 5.0
) -> Callable[[], torch.Tensor]:
    """The same CFG step on diffusers' transformer: two forwards, as its FLF2V pipeline runs them."""
    hidden = torch.cat([x["latent"][None], x["y"]], dim=1).to(dtype)  # [1, in_dim, T, H, W]
    t = x["timestep"]
    pad = [text_len - c.shape[0] for c in (x["context"], x["context_neg"])]
    ctx = [
        torch.nn.functional.pad(c, (0, 0, 0, p)).to(dtype)[None] for c, p in zip((x["context"], x["context_neg"]), pad)
    ]
    clip = x["clip"].to(dtype) if x["clip"] is not None else None
    pos_len = model.config.get("pos_embed_seq_len")
    if clip is not None and pos_len:  # diffusers takes one row per frame [2, N/2, d] and regroups it itself
        clip = clip.reshape(2, pos_len // 2, clip.shape[-1])

    def step() -> torch.Tensor:
        with torch.no_grad():
            v = model(hidden, t, ctx[0], encoder_hidden_states_image=clip, return_dict=False)[0]
            v_neg = model(hidden, t, ctx[1], encoder_hidden_states_image=clip, return_dict=False)[0]
            return (v_neg + guidance * (v - v_neg))[0].float()

    return step


def diffusers_from(dit: WanDiT, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' WanTransformer3DModel holding ``dit``'s weights (shared storage where dtypes agree)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from segue.adapters.dit import config_to_diffusers, native_to_diffusers

    # parameters on meta (assigned below), buffers (RoPE tables) made on the device
    device = next(dit.parameters()).device
    with init_empty_weights(include_buffers=False), torch.device(device):
        model = WanTransformer3DModel.from_config(config_to_diffusers(dit.cfg))
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    sd = {}
    for k, v in native_to_diffusers(dit.state_dict()).items():
        want = torch.float32 if keep.intersection(k.split(".")) else dtype
        sd[k] = v if v.dtype == want else v.to(want)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def fmt(v: float | None, spec: str, missing: str = "not measured") -> str:
    return missing if v is None else format(v, spec)


def table(rows: list[Row], title: str) -> str:
    head = "| option | lossy | s / CFG step | TFLOP/s | % of matmul ceiling | peak GPU GB | rel. err vs plain | note |"
    lines = [f"\n### {title}\n", head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.option} | {'yes' if r.lossy else 'no'} | {fmt(r.seconds, '.3f')} | {fmt(r.tflops, '.3g', '-')} "
            f"| {fmt(r.ceiling_pct, '.0f', '-')} | {fmt(r.peak_gb, '.1f', '-')} | {fmt(r.rel_err, '.1e', '-')} "
            f"| {r.note} |"
        )
    return "\n".join(lines)
