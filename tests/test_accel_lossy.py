"""Lossy speed-ups, applied from outside the DiT: fp8 weights and step caching, with their fidelity measured.

fp8: one DiT forward against the unquantized model on random weights (printed, bounded), weight memory,
state dict round trip. Step cache (the DiT's blocks runner): bit-exact when nothing is skipped, a skipped
call equals the blocks' cached residual added to the new tokens (checked through hooks on the plain DiT),
state per CFG branch and per sampling loop as the step context says, and a short real generation at a few
thresholds (PSNR against the uncached video, printed).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import segue
from segue.accel.cache import StepCache, apply_step_cache, calibrate_with_video, remove_step_cache
from segue.accel.fp8 import E4M3, E4M3_MAX, FP8Linear, fp8_targets, quantize_fp8, quantize_weight, weight_bytes
from segue.config import REGISTRY
from segue.errors import InputError
from segue.evaluate import psnr
from segue.models.dit import WanDiT
from segue.sampling.guidance import StepContext
from segue.testing import randomize_

TINY = REGISTRY["tiny-flf2v"].dit


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_dit(seed: int = 0) -> WanDiT:
    return randomize_(WanDiT(TINY), seed).eval()


def dit_inputs(b: int = 1, t: int = 999, seed: int = 1, ctx: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, TINY.out_dim, 3, 8, 8, generator=g)
    y = torch.randn(b, TINY.in_dim - TINY.out_dim, 3, 8, 8, generator=g)
    context = torch.randn(b, 7, TINY.text_dim, generator=g) if ctx is None else ctx
    clip = torch.randn(b, TINY.image_pos_len, TINY.image_dim, generator=g)
    return x, torch.tensor([t]), context, clip, y


# -- fp8 --------------------------------------------------------------------------------------------


def test_quantize_weight_codes_scales_and_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 32) * torch.logspace(-4, 1, 24)[:, None]  # rows of very different magnitude
    w[3] = 0.0  # an all-zero row must not divide by zero
    for gran, scale_shape in (("channel", (24, 1)), ("tensor", ())):
        codes, scale = quantize_weight(w, gran)
        assert codes.dtype == E4M3 and scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape
        assert codes.float().abs().max() <= E4M3_MAX
        deq = codes.float() * scale
        assert torch.equal(deq[3], torch.zeros(32))
        row_err = ((deq - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-30))[[0, 1, 2, 23]]
        if gran == "channel":  # 3 mantissa bits: <= 2^-4 relative per element, about 2.5% RMS
            assert row_err.max() < 0.05, row_err
        else:  # one scale for the whole tensor: the smallest rows fall into e4m3's subnormals
            assert row_err[0] > 0.05
    # round to nearest: values exactly representable in e4m3 survive unchanged
    exact = torch.tensor([[448.0, -448.0, 1.0, 0.5, 0.0, 3.5, -240.0, 0.015625]])
    codes, scale = quantize_weight(exact, "tensor")
    assert scale.item() == 1.0 and torch.equal(codes.float(), exact)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_dit_forward_error_and_memory(granularity: str) -> None:
    model = tiny_dit()
    args = dit_inputs()
    with torch.no_grad():
        ref = model(*args)
    errs = {}
    for scaled_mm in (False, True):  # weight-only, then fp8 matmuls (torch's CPU kernel stands in for CUDA)
        q = quantize_fp8(copy.deepcopy(model), granularity, scaled_mm=scaled_mm)
        with torch.no_grad():
            errs[scaled_mm] = rel_err(q(*args), ref)
    print(f"\nfp8 {granularity}: one DiT forward rel. err weight-only {errs[False]:.2e}, fp8 matmul {errs[True]:.2e}")
    assert 0 < errs[False] < 5e-2 and 0 < errs[True] < 5e-2
    assert errs[True] != errs[False]  # the matmul path quantized the activations too

    # what was replaced: the 12 block Linears, nothing outside the blocks, norms/modulation untouched
    assert len(fp8_targets(model)) == 12 * TINY.num_layers
    for name, module in q.named_modules():
        in_block = name.startswith("blocks.") and name.count(".") >= 3
        assert isinstance(module, FP8Linear) == (in_block and name.split(".", 2)[2] in fp8_names())
    assert q.blocks[0].modulation.dtype == torch.float32 and q.head.head.weight.dtype == torch.float32

    # memory: the replaced weights are half of bf16 (plus one fp32 scale per row or per tensor)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    before = sum(m.weight.numel() * 2 for n, m in bf16.named_modules() if n in fp8_targets(model))
    q16 = quantize_fp8(bf16, granularity)
    after = sum(weight_bytes(m) - (m.bias.numel() * 2) for m in q16.modules() if isinstance(m, FP8Linear))
    ratio = after / before
    print(f"fp8 {granularity}: block Linear weights {after} B vs bf16 {before} B (x{ratio:.3f})")
    # (tiny rows of 32 or 64 inputs: a per-row fp32 scale is 4 of 36..68 bytes; at 14B size it is 4 of 5124)
    assert 0.5 <= ratio < (0.57 if granularity == "channel" else 0.51)
    assert q16.blocks[0].self_attn.o.weight.dtype == torch.bfloat16  # what the attention reads as its dtype
    with torch.no_grad():
        assert rel_err(q16(*args), ref) < 5e-2


def fp8_names() -> set[str]:
    from segue.accel.fp8 import BLOCK_LINEARS

    return set(BLOCK_LINEARS)


def test_fp8_state_dict_round_trip_through_meta(tmp_path) -> None:
    q = quantize_fp8(tiny_dit(), "channel", skip=("blocks.1.ffn.*",))
    assert isinstance(q.blocks[1].ffn[0], torch.nn.Linear) and not isinstance(q.blocks[1].ffn[0], FP8Linear)
    sd = q.state_dict()
    assert sd["blocks.0.self_attn.q.weight"].dtype == E4M3
    assert sd["blocks.0.self_attn.q.scale_weight"].shape == (TINY.dim, 1)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "fp8.safetensors")
    loaded = load_file(tmp_path / "fp8.safetensors")
    with torch.device("meta"):
        fresh = WanDiT(TINY)
    quantize_fp8(fresh, "channel", skip=("blocks.1.ffn.*",))
    fresh.load_state_dict(loaded, strict=True, assign=True)
    args = dit_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(*args), q(*args))
    # casting the model afterwards would drop the scales: the layer refuses to run
    fresh.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="cast after quantize_fp8"), torch.no_grad():
        fresh(*args)


# -- step cache: the blocks runner against the plain DiT -----------------------------------------------


class _Pipe:
    def __init__(self, dit: torch.nn.Module) -> None:
        self.dit = dit


def at(index: int, t: int, branch: str = "cond", run: int = 0) -> StepContext:
    """The step context the sampling loop would pass (``total`` is not read by the cache)."""
    return StepContext(index=index, total=10, timestep=torch.tensor([t]), run=run, branch=branch)


def test_cache_never_skipping_is_bit_exact_and_removable() -> None:
    model = tiny_dit()
    keys = list(model.state_dict())
    pipe = _Pipe(model)
    cache = apply_step_cache(pipe, "teacache", threshold=0.0, warmup_steps=0)
    assert pipe.dit is model and model.blocks_runner is cache  # the DiT stays the DiT
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        for i, t in enumerate((999, 800, 500)):
            for seed, branch in ((1, "cond"), (2, "uncond")):
                args = dit_inputs(t=t, seed=seed)
                assert torch.equal(model(*args, step=at(i, t, branch)), model(*args))  # no step: every block
    assert cache.stats() == {"computed": 6, "skipped": 0, "skip_fraction": 0.0}
    assert remove_step_cache(pipe) is cache and model.blocks_runner is None
    assert remove_step_cache(pipe) is None
    with pytest.raises(InputError, match="MagCache needs a calibration"):
        apply_step_cache(pipe, "magcache")
    with pytest.raises(InputError, match="unknown cache method"):
        apply_step_cache(pipe, "fora")
    assert model.blocks_runner is None
    StepCache().install(model)
    with pytest.raises(InputError, match="already has a step cache"):
        StepCache().install(model)


def _expected_skip(model: WanDiT, args, residual: torch.Tensor) -> torch.Tensor:
    """The plain DiT with its blocks replaced by 'tokens before the blocks + residual' (via hooks)."""
    seen = {}

    def pre(_m, a):
        seen["before"] = a[0]

    def post(_m, _a, _out):
        return seen["before"] + residual

    h1 = model.blocks[0].register_forward_pre_hook(pre)
    h2 = model.blocks[-1].register_forward_hook(post)
    try:
        return model(*args)
    finally:
        h1.remove()
        h2.remove()


def _residual(model: WanDiT, args) -> torch.Tensor:
    seen = {}

    def pre(_m, a) -> None:
        seen["before"] = a[0]

    def post(_m, _a, out) -> None:
        seen["after"] = out

    h1 = model.blocks[0].register_forward_pre_hook(pre)
    h2 = model.blocks[-1].register_forward_hook(post)
    try:
        model(*args)
    finally:
        h1.remove()
        h2.remove()
    return seen["after"] - seen["before"]


@torch.no_grad()
def test_skipped_call_reuses_its_own_branch_residual_and_resets() -> None:
    model = tiny_dit()
    cache = StepCache("teacache", threshold=1e9, warmup_steps=1).install(model)  # skip whenever allowed
    cond1, unc1 = dit_inputs(t=999, seed=1), dit_inputs(t=999, seed=2)
    # the next step: same contexts, new latent and timestep
    cond2 = (dit_inputs(seed=3)[0], torch.tensor([900]), *cond1[2:])
    unc2 = (dit_inputs(seed=3)[0], torch.tensor([900]), *unc1[2:])
    assert torch.equal(model(*cond1, step=at(0, 999, "cond")), model(*cond1))
    assert torch.equal(model(*unc1, step=at(0, 999, "uncond")), model(*unc1))
    got_c, got_u = model(*cond2, step=at(1, 900, "cond")), model(*unc2, step=at(1, 900, "uncond"))
    assert cache.stats()["skipped"] == 2
    want_c = _expected_skip(model, cond2, _residual(model, cond1))
    want_u = _expected_skip(model, unc2, _residual(model, unc1))
    assert torch.equal(got_c, want_c) and torch.equal(got_u, want_u)
    assert rel_err(got_c, model(*cond2)) > 1e-3  # skipping did change the output
    assert rel_err(_expected_skip(model, cond2, _residual(model, unc1)), want_c) > 1e-3  # branches differ

    # a new sampling loop (the step context's run) starts a new generation: nothing cached, the blocks run
    assert torch.equal(model(*cond2, step=at(1, 900, "cond", run=1)), model(*cond2))
    assert cache.stats() == {"computed": 3, "skipped": 2, "skip_fraction": 0.4}
    cache.reset()
    assert torch.equal(model(*cond2, step=at(2, 800, "cond", run=1)), model(*cond2))  # explicit reset: computes

    # a batch of two (cond and uncond in one call) is the branch "both" and works the same way
    both1 = [torch.cat([a, b]) if a.shape[0] == 1 and a.ndim > 1 else a for a, b in zip(cond1, unc1)]
    both2 = [torch.cat([a, b]) if a.shape[0] == 1 and a.ndim > 1 else a for a, b in zip(cond2, unc2)]
    cache.reset()
    assert torch.equal(model(*both1, step=at(0, 999, "both", run=1)), model(*both1))
    got = model(*both2, step=at(1, 900, "both", run=1))
    assert torch.equal(got, _expected_skip(model, both2, _residual(model, both1)))


@torch.no_grad()
def test_max_skip_and_warmup_bound_the_skips() -> None:
    model = tiny_dit()
    cache = StepCache("teacache", threshold=1e9, warmup_steps=2, max_skip=2).install(model)
    ctx = dit_inputs(seed=1)[2]
    for i, t in enumerate(range(999, 899, -10)):  # 10 calls of one branch
        model(*dit_inputs(t=t, seed=t, ctx=ctx), step=at(i, t))
    # 2 warm-up calls, then skip, skip, compute, skip, skip, compute, skip, skip
    assert cache.stats()["computed"] == 4 and cache.stats()["skipped"] == 6


# -- step cache on a real (tiny) generation --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(official_ckpt):
    return segue.load(official_ckpt)


def _video_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float("inf") if np.array_equal(a, b) else float(np.mean([psnr(x, y) for x, y in zip(a, b)]))


def test_calibrate_and_cached_generation_fidelity(tiny_pipe, frames_dir, tmp_path) -> None:
    pipe = tiny_pipe
    gen = dict(first=frames_dir / "first.png", last=frames_dir / "last.png", prompt="a fox", steps=10, seed=3,
               frames=5)  # fmt: skip
    cal, ref = calibrate_with_video(pipe, **gen)
    assert pipe.dit.blocks_runner is None  # calibration leaves the plain DiT as it was
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))  # JSON-able
    assert cal["format"] == "segue-step-cache" and cal["settings"]["steps"] == 10
    assert len(cal["records"]) == 2  # cond and uncond
    for rec, curve in zip(cal["records"], cal["magcache"]["branches"]):
        assert len(rec["indicator_change"]) == len(rec["output_change"]) == len(rec["t"]) == 9
        assert len(curve["t_mid"]) == 9
        assert all(0 < r < 10 for r in rec["magnitude_ratio"])
    assert len(cal["teacache"]["coefficients"]) == 5

    rows = []
    for method, th in (("teacache", 0.0), ("teacache", 0.15), ("teacache", 0.4), ("magcache", 0.5)):
        calibration = str(path) if method == "magcache" else cal  # a path works as well as the dict
        cache = apply_step_cache(pipe, method, th, calibration, warmup_steps=2)
        try:
            video = pipe.generate(**gen)
        finally:
            remove_step_cache(pipe)
        st = cache.stats()
        rows.append((method, th, st["skipped"], st["computed"], _video_psnr(video.frames, ref.frames),
                     rel_err(video.latent, ref.latent)))  # fmt: skip
    print("\n| method | threshold | skipped | computed | PSNR vs uncached dB | latent rel err |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2e} |")
    by = {(r[0], r[1]): r for r in rows}
    assert by[("teacache", 0.0)][2] == 0 and by[("teacache", 0.0)][4] == float("inf")  # threshold 0: identical
    loose_t, loose_m = by[("teacache", 0.4)], by[("magcache", 0.5)]
    assert loose_t[2] > 0 and loose_m[2] > 0 and loose_t[2] + loose_t[3] == 20
    assert 0 < loose_t[5] < 0.2 and 0 < loose_m[5] < 0.2 and 20 < loose_t[4] < float("inf")
    assert by[("teacache", 0.15)][2] <= loose_t[2]  # a tighter threshold skips less


def test_cache_with_cfg_as_one_batch(tiny_pipe, frames_dir) -> None:
    pipe = tiny_pipe
    gen = dict(first=frames_dir / "first.png", last=frames_dir / "last.png", prompt="a fox", steps=8, seed=1,
               frames=5)  # fmt: skip
    ref = pipe.generate(**gen)
    batched = hasattr(pipe, "cfg_batch")  # a pipeline without the option runs two calls per step
    pipe.cfg_batch = True  # the step context names the branch "both"
    try:
        cache = apply_step_cache(pipe, "teacache", 1e9, warmup_steps=1, max_skip=1)
        video = pipe.generate(**gen)
    finally:
        remove_step_cache(pipe)
        pipe.cfg_batch = False
    st = cache.stats()
    # per branch: compute (warm-up), then skip and compute alternately
    assert st["computed"] + st["skipped"] == (8 if batched else 16)
    assert st["skipped"] == st["computed"]
    assert 0 < rel_err(video.latent, ref.latent) < 0.5


def test_cache_under_block_swap_gives_the_same_video(official_ckpt, frames_dir) -> None:
    """Block swap streams every block, the first included: the cache reads what it needs wherever it is."""
    from segue.placement.apply import apply_profile

    gen = dict(first=frames_dir / "first.png", last=frames_dir / "last.png", prompt="a fox", steps=6, seed=2,
               frames=5)  # fmt: skip
    plain, swapped = segue.load(official_ckpt), segue.load(official_ckpt)
    apply_profile(swapped, "block-swap", resident=0)
    caches = [apply_step_cache(p, "teacache", 1e9, warmup_steps=1, max_skip=1) for p in (plain, swapped)]
    a, b = plain.generate(**gen), swapped.generate(**gen)
    assert torch.equal(a.latent, b.latent)
    assert caches[0].stats() == caches[1].stats() and caches[0].stats()["skipped"] > 0
