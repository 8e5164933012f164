"""Sampling settings (steps x guidance x shift) of a bundle, scored on the validation split.

    python bench/sampling_sweep.py BUNDLE [--steps 4,25] [--guidance 1,4] [--guidance-steps all,1] [--shift 3]
                                          [--clips 8] [--groups 8]

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

from segue.evaluate import GenerateFn, evaluate_model, held_out_set, pipeline_generate_fn
from segue.loader import load


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _timed(generate: GenerateFn) -> tuple[GenerateFn, list[float]]:
    """``generate``, and the list its seconds per clip go to."""
    seconds: list[float] = []

    def timed(first: np.ndarray, last: np.ndarray, caption: str, frames: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = generate(first, last, caption, frames)
        seconds.append(time.perf_counter() - t0)
        return out

    return timed, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="a segue bundle (default: the built-in one)")
    p.add_argument("--steps", default="4,25")
    p.add_argument("--guidance", default="1,4")
    p.add_argument("--shift", default="3")
    p.add_argument("--guidance-steps", default="all", help="guided steps from the first: all, or counts (all,1,2)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    pipe = load(args.bundle)
    d = pipe.config.defaults
    clips, groups = held_out_set(d, args.clips, args.groups, args.split)
    parts = [g for g in args.guidance_steps.split(",") if g]
    if not parts or any(g != "all" and not (g.isdigit() and int(g) >= 1) for g in parts):
        p.error(f"--guidance-steps takes 'all' or counts >= 1, comma-separated; got {args.guidance_steps!r}")
    guided = [None if g == "all" else int(g) for g in parts]
    grid = list(itertools.product([int(s) for s in _floats(args.steps)], _floats(args.guidance), guided,
                                  _floats(args.shift)))  # fmt: skip

    print(f"bundle {args.bundle or 'built-in'}; {args.split} split, {args.clips} clips, {args.groups} groups; "
          f"shipped defaults: steps {d.steps}, guidance {d.guidance} (guided steps {d.guidance_steps or 'all'}), "
          f"shift {d.shift}\n")  # fmt: skip
    print("| steps | guidance | guided steps | shift | first | last | in-between | SSIM | compliance | s/clip |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    m = None  # the crossfade's scores are the same in every setting's means: printed once, from the last
    for n, (steps, guidance, guidance_steps, shift) in enumerate(grid):
        settings = {"steps": steps, "guidance": guidance, "guidance_steps": guidance_steps, "shift": shift,
                    "seed": args.seed}  # fmt: skip
        generate, calls = _timed(pipeline_generate_fn(pipe, **settings))
        with tempfile.TemporaryDirectory() as tmp:
            m = evaluate_model(generate, clips, groups, tmp, sheet_clips=0, verbose=False)["means"]
        guided_col = "all" if guidance_steps is None else guidance_steps
        row = (steps, f"{guidance:g}", guided_col, f"{shift:g}", f"{m['model_first_psnr']:.2f}",
               f"{m['model_last_psnr']:.2f}", f"{m['model_psnr']:.2f}", f"{m['model_ssim']:.3f}",
               f"{m['model_compliance']:.3f}", f"{float(np.median(calls)):.2f}")  # fmt: skip
        print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
        print(f"[sweep] {n + 1}/{len(grid)} done", file=sys.stderr, flush=True)
    if m is not None:
        print(f"\ncrossfade: in-between {m['crossfade_psnr']:.2f} dB, SSIM {m['crossfade_ssim']:.3f}, "
              f"compliance {m['crossfade_compliance']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
