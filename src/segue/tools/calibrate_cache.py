"""``segue calibrate-cache``: calibrate step caching for a model and measure what it costs in fidelity.

    segue calibrate-cache --tiny                                   # tiny random model, synthetic keyframes
    segue calibrate-cache --ckpt CKPT --first a.png --last b.png --prompt "..." --device cuda
    segue calibrate-cache --first a.png --last b.png               # the built-in model

Runs one full uncached generation, records per step the TeaCache indicator, the output change and the
residual magnitude ratio, writes the calibration JSON (``--out``, what ``segue generate --cache-calibration``
reads), then generates again with the same seed under TeaCache and MagCache at a few thresholds and prints a
markdown table: skipped calls, PSNR of the cached video against the uncached one, relative error of the final
latent, denoising time. ``--fp8`` also measures the relative error of one DiT forward (the first conditional
call of a 1-step run) with fp8 weights, per channel and per tensor, weight-only and with fp8 matmuls. It swaps
layers in place and back, so it needs the DiT's memory plus half of it.
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

from ..accel.cache import apply_step_cache, calibrate_with_video, remove_step_cache
from ..errors import InputError
from ..evaluate import psnr
from ..io import atomic_path
from ..loader import load


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
    from ..accel.fp8 import fp8_targets, quantize_fp8

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


def _thresholds(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _model(args: argparse.Namespace, tmp: str) -> tuple[Any, dict[str, Any]]:
    """The pipeline and the generation arguments the calibration runs with."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        from ..testing import make_tiny_checkpoint

        pipe = load(make_tiny_checkpoint(Path(tmp) / "tiny"), device=device, dtype=args.dtype)
        first = synthetic_frame(80, 64, 1) if args.first is None else args.first
        last = synthetic_frame(80, 64, 2) if args.last is None else args.last
        steps = 20 if args.steps is None else args.steps
    else:
        if args.first is None:
            raise InputError("--first (and usually --last) keyframes are required unless --tiny")
        pipe = load(args.ckpt, device=device, dtype=args.dtype)
        first, last, steps = args.first, args.last, args.steps
    gen = dict(first=first, last=last, prompt=args.prompt, steps=steps, frames=args.frames,
               max_area=args.max_area, seed=args.seed)  # fmt: skip
    return pipe, gen


def run(args: argparse.Namespace) -> int:
    """Calibrate, write ``args.out``, print the table (the ``segue calibrate-cache`` arguments)."""
    methods = (("teacache", _thresholds(args.teacache, "--teacache")),
               ("magcache", _thresholds(args.magcache, "--magcache")))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        pipe, gen = _model(args, tmp)
        calibration, ref = calibrate_with_video(pipe, **gen)
        with atomic_path(args.out) as part:
            part.write_text(json.dumps(calibration, indent=1))
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
        for method, values in methods:
            for th in values:
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
    return 0
