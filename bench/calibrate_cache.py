"""Calibrate step caching for a checkpoint and measure what it costs in fidelity.

    python bench/calibrate_cache.py --tiny                       # tiny random model, synthetic keyframes
    python bench/calibrate_cache.py --ckpt CKPT --first a.png --last b.png --prompt "..." --device cuda
    python bench/calibrate_cache.py --first a.png --last b.png   # the built-in model (segue.load())

Runs one full uncached generation, records per step the TeaCache indicator, the output change and the
residual magnitude ratio, writes the calibration JSON (``--out``), then generates again with the same seed
under TeaCache and MagCache at a few thresholds and prints a markdown table: skipped calls, PSNR of the
cached video against the uncached one, relative error of the final latent, denoising time.

``--fp8`` also measures the relative error of one DiT forward (the first conditional call of a 1-step
run) with fp8 weights, per channel and per tensor, weight-only and with fp8 matmuls. It swaps layers in
place and back, so it needs the DiT's memory plus half of it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import segue
from segue.accel.cache import apply_step_cache, calibrate_with_video, remove_step_cache
from segue.evaluate import psnr


def synthetic_frame(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7.0 + seed)], -1) * 255
    return Image.fromarray(np.clip(base + rng.integers(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def video_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([psnr(x, y) for x, y in zip(a, b)])) if not np.array_equal(a, b) else float("inf")


class _Capture(torch.nn.Module):
    """Stands in for pipe.dit for one run and keeps the inputs of its first call."""

    def __init__(self, dit: torch.nn.Module) -> None:
        super().__init__()
        self.dit = dit
        self.inputs: tuple | None = None

    def forward(self, *args: Any, step: Any = None) -> torch.Tensor:
        if self.inputs is None:
            self.inputs = args
        return self.dit(*args, step=step)


@torch.no_grad()
def fp8_errors(pipe: Any, gen: dict[str, Any]) -> list[tuple[str, float]]:
    from segue.accel.fp8 import fp8_targets, quantize_fp8

    dit = pipe.dit
    cap = _Capture(dit)
    pipe.dit = cap
    try:
        pipe.generate(**{**gen, "steps": 1})
    finally:
        pipe.dit = dit
    assert cap.inputs is not None
    ref = dit(*cap.inputs)
    originals = {name: dit.get_submodule(name) for name in fp8_targets(dit)}
    rows = []
    for granularity in ("channel", "tensor"):
        for scaled_mm in (False, True):
            quantize_fp8(dit, granularity, scaled_mm=scaled_mm)
            kind = "fp8 matmul" if scaled_mm else "weight-only"
            rows.append((f"{granularity}, {kind}", rel_err(dit(*cap.inputs), ref)))
            for name, module in originals.items():
                parent, _, child = name.rpartition(".")
                setattr(dit.get_submodule(parent), child, module)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="checkpoint folder or bundle (default: the built-in model)")
    src.add_argument("--tiny", action="store_true", help="a tiny random-weight model (no download, CPU)")
    p.add_argument("--first", type=Path)
    p.add_argument("--last", type=Path)
    p.add_argument("--prompt", default="a red fox runs through fresh snow, cinematic")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20 with --tiny)")
    p.add_argument("--frames", type=int)
    p.add_argument("--max-area", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--teacache", default="0.05,0.1,0.2,0.3", help="TeaCache thresholds, comma separated")
    p.add_argument("--magcache", default="0.06,0.12,0.24", help="MagCache thresholds, comma separated")
    p.add_argument("--warmup", type=int, default=2, help="calls per branch always computed at the start")
    p.add_argument("--out", type=Path, default=Path("cache_calibration.json"))
    p.add_argument("--fp8", action="store_true", help="also measure one-step fp8 errors")
    args = p.parse_args()

    if args.tiny:
        from segue.testing import make_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory()
        pipe = segue.load(make_tiny_checkpoint(Path(tmp.name) / "tiny"), device=args.device, dtype=args.dtype)
        first = synthetic_frame(80, 64, 1) if args.first is None else args.first
        last = synthetic_frame(80, 64, 2) if args.last is None else args.last
        steps = 20 if args.steps is None else args.steps
    else:
        if args.first is None:
            p.error("--first (and usually --last) keyframes are required unless --tiny")
        pipe = segue.load(args.ckpt, device=args.device, dtype=args.dtype)
        first, last, steps = args.first, args.last, args.steps
    gen = dict(first=first, last=last, prompt=args.prompt, steps=steps, frames=args.frames,
               max_area=args.max_area, seed=args.seed)  # fmt: skip

    calibration, ref = calibrate_with_video(pipe, **gen)
    args.out.write_text(json.dumps(calibration, indent=1))
    # Time (and check the determinism of) a plain uncached run: the calibration run carries recording costs
    # and, on a fresh process, warm-up.
    plain = pipe.generate(**gen)
    base_s = plain.info["seconds"]["denoise"]
    n_calls = sum(len(b["output_change"]) + 1 for b in calibration["records"])
    print(f"calibration: {args.out} ({len(calibration['records'])} branches, {n_calls} DiT calls, "
          f"settings {calibration['settings']})\n")  # fmt: skip

    print("| method | threshold | computed | skipped | skip % | PSNR vs uncached (dB) | latent rel. err | "
          "denoise s | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| none | - | {n_calls} | 0 | 0 | {video_psnr(plain.frames, ref.frames):.2f} | "
          f"{rel_err(plain.latent, ref.latent):.2e} | {base_s:.2f} | 1.00 |")  # fmt: skip
    for method, values in (("teacache", args.teacache), ("magcache", args.magcache)):
        for th in (float(v) for v in values.split(",") if v):
            cache = apply_step_cache(pipe, method, th, calibration, warmup_steps=args.warmup)
            try:
                video = pipe.generate(**gen)
            finally:
                remove_step_cache(pipe)
            st = cache.stats()
            secs = video.info["seconds"]["denoise"]
            print(f"| {method} | {th:g} | {st['computed']} | {st['skipped']} | {100 * st['skip_fraction']:.0f} | "
                  f"{video_psnr(video.frames, ref.frames):.2f} | {rel_err(video.latent, ref.latent):.2e} | "
                  f"{secs:.2f} | {base_s / secs:.2f} |")  # fmt: skip

    if args.fp8:
        print("\n| fp8 weights | one DiT forward rel. err |\n|---|---|")
        for name, err in fp8_errors(pipe, gen):
            print(f"| {name} | {err:.2e} |")


if __name__ == "__main__":
    main()
