"""``segue sweep``: sampling settings (steps x guidance x guided steps x shift) of a model, scored on held-out
clips of the validation split.

    segue sweep [--ckpt BUNDLE] [--steps 4,25] [--guidance 1,4] [--guidance-steps all,1] [--shift 3]
                [--clips 8] [--groups 8]

The generation defaults a bundle ships with (a recipe's ``sampling``) are chosen here, on the ``val`` seed
range, so that the numbers ``segue eval`` reports (the ``test`` range) are not tuned on the clips they are
measured on. For each setting it runs ``segue.evaluate.evaluate_model`` and prints one markdown table row
(stdout): endpoint, in-between and caption scores and the median seconds per generated clip. Progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time

import numpy as np

from ..errors import InputError
from ..evaluate import GenerateFn, evaluate_model, held_out_set, pipeline_generate_fn
from ..loader import load


def _numbers(text: str, flag: str, kind: type = float) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise InputError(f"{flag}: expected comma-separated {kind.__name__}s, got {text!r}")
    return values


def guided_counts(text: str) -> list[int | None]:
    """``--guidance-steps``: 'all' (None) or counts >= 1, comma-separated."""
    parts = [g.strip() for g in text.split(",") if g.strip()]
    if not parts or any(g != "all" and not (g.isdigit() and int(g) >= 1) for g in parts):
        raise InputError(f"--guidance-steps takes 'all' or counts >= 1, comma-separated; got {text!r}")
    return [None if g == "all" else int(g) for g in parts]


def _timed(generate: GenerateFn) -> tuple[GenerateFn, list[float]]:
    """``generate``, and the list its seconds per clip go to."""
    seconds: list[float] = []

    def timed(first: np.ndarray, last: np.ndarray, caption: str, frames: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = generate(first, last, caption, frames)
        seconds.append(time.perf_counter() - t0)
        return out

    return timed, seconds


def run(args: argparse.Namespace) -> int:
    """Print the table for the grid that ``args`` gives (the ``segue sweep`` arguments)."""
    if args.clips < 1 or args.groups < 0:
        raise InputError(f"--clips must be >= 1 and --groups >= 0, got {args.clips} and {args.groups}")
    grid = list(itertools.product(_numbers(args.steps, "--steps", int), _numbers(args.guidance, "--guidance"),
                                  guided_counts(args.guidance_steps), _numbers(args.shift, "--shift")))  # fmt: skip
    pipe = load(args.ckpt)
    d = pipe.config.defaults
    clips, groups = held_out_set(d, args.clips, args.groups, args.split)
    print(f"model {args.ckpt or 'built-in'}; {args.split} split, {args.clips} clips, {args.groups} groups; "
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
    return 0
