"""Sampling settings (steps x guidance x shift) of a bundle, scored on the validation split.

    python bench/sampling_sweep.py BUNDLE [--steps 4,25] [--guidance 1,4] [--shift 3] [--clips 8] [--groups 8]

The generation defaults a bundle ships with are chosen here, on the ``val`` seed range, so that the
numbers reported by ``segue eval`` (the ``test`` range) are not tuned on the clips they are measured on.
For each setting it runs ``segue.evaluate.evaluate_model`` on ``--clips`` held-out val clips and
``--groups`` ambiguous val groups, then prints one markdown table row per setting (stdout) with the
endpoint, in-between and caption scores and the seconds per generated clip; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segue.data.synthetic import SyntheticVideos, ambiguous_groups
from segue.evaluate import evaluate_model
from segue.loader import load


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _generator(pipe, steps: int, guidance: float, shift: float, seed: int):  # noqa: ANN001, ANN202
    """A ``generate_fn`` for evaluate_model at one setting, and the list its seconds per clip go to."""
    calls: list[float] = []

    def generate(first: np.ndarray, last: np.ndarray, caption: str, frames: int) -> np.ndarray:
        t0 = time.perf_counter()
        h, w = first.shape[:2]
        video = pipe.generate(Image.fromarray(first), Image.fromarray(last), caption, frames=frames, size=(w, h),
                              steps=steps, guidance=guidance, shift=shift, seed=seed)  # fmt: skip
        calls.append(time.perf_counter() - t0)
        return video.frames

    return generate, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="a segue bundle (default: the built-in one)")
    p.add_argument("--steps", default="4,25")
    p.add_argument("--guidance", default="1,4")
    p.add_argument("--shift", default="3")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    pipe = load(args.bundle)
    d = pipe.config.defaults
    side = int(round(d.max_area**0.5))
    data = SyntheticVideos(args.split, length=args.clips, frames=d.frames, size=(side, side), ambiguous_fraction=0.0)
    clips = [data.clip(i) for i in range(args.clips)]
    groups = ambiguous_groups(args.groups, frames=d.frames, size=(side, side), split=args.split)
    grid = list(itertools.product([int(s) for s in _floats(args.steps)], _floats(args.guidance), _floats(args.shift)))

    print(f"bundle {args.bundle or 'built-in'}; {args.split} split, {args.clips} clips, {args.groups} groups; "
          f"shipped defaults: steps {d.steps}, guidance {d.guidance}, shift {d.shift}\n")  # fmt: skip
    print("| steps | guidance | shift | first | last | in-between | SSIM | compliance | s/clip |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    crossfade = None
    for n, (steps, guidance, shift) in enumerate(grid):
        generate, calls = _generator(pipe, steps, guidance, shift, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            m = evaluate_model(generate, clips, groups, tmp, sheet_clips=0, verbose=False)["means"]
        crossfade = m
        row = (steps, f"{guidance:g}", f"{shift:g}", f"{m['model_first_psnr']:.2f}", f"{m['model_last_psnr']:.2f}",
               f"{m['model_psnr']:.2f}", f"{m['model_ssim']:.3f}", f"{m['model_compliance']:.3f}",
               f"{float(np.median(calls)):.2f}")  # fmt: skip
        print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
        print(f"[sweep] {n + 1}/{len(grid)} done", file=sys.stderr, flush=True)
    if crossfade is not None:
        print(f"\ncrossfade: in-between {crossfade['crossfade_psnr']:.2f} dB, SSIM {crossfade['crossfade_ssim']:.3f}, "
              f"compliance {crossfade['crossfade_compliance']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
