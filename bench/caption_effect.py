"""How much the caption moves a bundle's video, on ambiguous groups (same keyframes, different paths).

    python bench/caption_effect.py [BUNDLE] [--groups 16] [--split val] [--steps 3]

Caption compliance (``segue eval``) is a yes/no per caption on a few dozen captions. This measures the text's
hold continuously. For each ambiguous group, every member's caption is run on the same keyframes and seed.
In the middle frames (1 .. F-2), the script then measures two things:

- spread: the RMS pixel difference between two members' videos, over pairs, divided by the same
  between their true clips. At 0 the caption changes nothing; at 1 it moves the video as far as the
  paths differ.
- own closer: the share of (video i, other member j) where video i is nearer to true clip i than to
  true clip j in RMS. A pixel-space version of compliance, with no tracker.

It prints one markdown table row (stdout), then the spread ratio by pair of paths (e.g. circle_ccw / circle_cw:
whether the circle's sense comes from the word), pooled over the groups that hold that pair. ``--steps 1`` gives
the model's one-step prediction from pure noise, its conditional mean: how far the word moves what the model
expects, before any later step commits to one path. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

from segue.data.synthetic import ambiguous_groups
from segue.evaluate import pipeline_generate_fn
from segue.loader import load


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def group_effect(videos: list[np.ndarray], truths: list[np.ndarray]) -> tuple[float, float, int, int]:
    """(model spread, true spread, own-closer count, comparisons) of one group's middle frames.

    ``videos`` and ``truths`` are [F, H, W, 3] arrays, member i's generated and true clip."""
    mid = slice(1, len(truths[0]) - 1)
    v, t = [x[mid] for x in videos], [x[mid] for x in truths]
    pairs = list(itertools.combinations(range(len(v)), 2))
    spread_model = float(np.mean([_rms(v[i], v[j]) for i, j in pairs]))
    spread_true = float(np.mean([_rms(t[i], t[j]) for i, j in pairs]))
    own = sum(_rms(v[i], t[i]) < _rms(v[i], t[j]) for i in range(len(v)) for j in range(len(v)) if j != i)
    return spread_model, spread_true, own, len(v) * (len(v) - 1)


def pair_spreads(
    videos: list[np.ndarray], truths: list[np.ndarray], paths: list[str]
) -> dict[str, tuple[float, float]]:
    """{"path_a / path_b": (model RMS, true RMS)} for every pair of a group's members, the names sorted; the
    middle frames only, as ``group_effect``."""
    mid = slice(1, len(truths[0]) - 1)
    out = {}
    for i, j in itertools.combinations(range(len(videos)), 2):
        a, b = sorted((paths[i], paths[j]))
        out[f"{a} / {b}"] = (_rms(videos[i][mid], videos[j][mid]), _rms(truths[i][mid], truths[j][mid]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="a segue bundle (default: the built-in one)")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.groups < 1:
        p.error(f"--groups must be >= 1, got {args.groups}")

    pipe = load(args.bundle)
    d = pipe.config.defaults
    steps = d.steps if args.steps is None else args.steps
    guidance = d.guidance if args.guidance is None else args.guidance
    side = int(round(np.sqrt(d.max_area)))
    generate = pipeline_generate_fn(pipe, steps=steps, guidance=guidance, seed=args.seed)
    t0 = time.perf_counter()
    spreads_m, spreads_t, own, total = [], [], 0, 0
    by_pair: dict[str, list[tuple[float, float]]] = {}
    for k, group in enumerate(ambiguous_groups(args.groups, d.frames, (side, side), args.split)):
        truths = [np.asarray(c.frames) for c in group]
        videos = [np.asarray(generate(t[0], t[-1], c.caption, len(t))) for c, t in zip(group, truths)]
        sm, st, o, n = group_effect(videos, truths)
        spreads_m.append(sm)
        spreads_t.append(st)
        own, total = own + o, total + n
        for name, mt in pair_spreads(videos, truths, [c.path for c in group]).items():
            by_pair.setdefault(name, []).append(mt)
        print(f"[caption_effect] group {k + 1}/{args.groups}  {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    ratio = float(np.mean(spreads_m) / np.mean(spreads_t))
    print(f"bundle {args.bundle or 'built-in'}; {args.split} split, {args.groups} groups; steps {steps}, "
          f"guidance {guidance:g}\n")  # fmt: skip
    print("| spread model (RMS) | spread true (RMS) | ratio | own closer |")
    print("|---:|---:|---:|---:|")
    print(f"| {np.mean(spreads_m):.2f} | {np.mean(spreads_t):.2f} | {ratio:.3f} | {own / total:.3f} ({own}/{total}) |")
    print("\n| paths | groups | ratio |")
    print("|---|---:|---:|")
    for name in sorted(by_pair):
        m, t = np.array(by_pair[name]).T
        print(f"| {name} | {len(m)} | {m.mean() / t.mean():.3f} |")


if __name__ == "__main__":
    main()
