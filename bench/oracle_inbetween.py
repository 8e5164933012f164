"""How well could any model draw the in-between frames? The posterior mean of the data, by Monte Carlo.

    python bench/oracle_inbetween.py [--clips 32] [--split test] [--samples 64] [--bundle FILE] [--eval FILE]
                                     [--seed 0]

Given the first and last frames and the caption, a clip of the procedural data is fixed except for what the
generator draws and neither shows: the easing of the main and second shapes (smooth or linear), the height of
an arc, zigzag or wave, a wave's number of periods, a bounce's hop heights, a circle's radius, and the sense
of a spin. For each held-out clip (the in-between set of ``segue eval``) this draws ``--samples`` scenes that
keep everything else of the true scene and redraw those from the generator's own ranges, keeps the draws
whose first and last frames equal the true ones (a spin's sense can show in the last frame), and averages
their frames: the mean under (an approximation of) the posterior, which is the prediction with the least
squared error any model could make from the same inputs. Its PSNR against the true clip is what an ideal
model would score on ``segue eval``'s in-between metric; the approximation (uniform draws where the generator's
other draws make some values likelier) can only lower it, so the true ceiling is at least this high.

A second prediction is scored beside the mean: one of the kept draws other than the true scene, a sample of
the posterior, which is what a sampler that knew the data perfectly would give on one seed. Its expected
squared error is twice the mean's, but ``segue eval`` averages PSNR in dB over clips, and a draw that happens
to take the true clip's unseen values (its easing, say) is nearly exact: on that average a draw can score
above the mean.

It prints one markdown table: per path and in all, the crossfade's, the posterior mean's, one draw's and, given
``--bundle``, the posterior mean passed through that bundle's VAE (what a perfect DiT could at most give
through that decoder, roughly), and given ``--eval`` (a ``segue eval`` eval.json of the same split), the
model's own in-between PSNR on the same clips, with the mean PSNR over clips as ``segue eval`` takes it; a clip whose
posterior is one video (a bounce without hops, say) scores inf, counted as ``CAP`` dB. Progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from inbetween_breakdown import vae_roundtrip  # this folder's: the VAE's encode and decode of a uint8 clip

from segue.data.synthetic import (
    AMP_RANGE,
    CYCLES,
    EASINGS,
    HOP_DECAY,
    HOP_RANGE,
    LOOP_RADIUS_RANGE,
    TURNS,
    Mover,
    Scene,
    SyntheticVideos,
    mover_margin,
    render_frames,
    to_uint8,
)
from segue.evaluate import crossfade, video_psnr

SPIN = tuple(t for t in TURNS if abs(t) >= 0.5)  # the generator's turns that the caption calls "spinning"
SLOW = tuple(t for t in TURNS if abs(t) < 0.5)  # "turning slowly"
CAP = 50.0  # dB: a clip predicted exactly counts this much in the mean (8-bit rounding alone gives about 59)


def redraw_mover(m: Mover, scene: Scene, rng: np.random.Generator) -> Mover:
    """``m`` with what neither its keyframes nor its caption show drawn again from the generator's ranges."""
    (h, w), floor_y = scene.size, scene.floor_y
    ext = mover_margin(m.radius, m.scale)
    changes: dict = {"easing": str(rng.choice(EASINGS))}
    if m.turns:
        changes["turns"] = float(rng.choice(SPIN if abs(m.turns) >= 0.5 else SLOW))
    if m.path in ("arc_over", "arc_under", "zigzag", "wave") and m.amp >= AMP_RANGE[0] * h - 1e-6:
        ys = (m.p0[1], m.p1[1])
        for _ in range(100):  # the height must leave both endpoints inside the band the generator drew them in
            amp = float(rng.uniform(*AMP_RANGE)) * h
            if all(ext + amp <= y <= floor_y - ext - amp for y in ys):
                changes["amp"] = amp
                break
    if m.path in ("zigzag", "wave"):
        changes["cycles"] = float(rng.choice(CYCLES))
    if m.path == "bounce" and m.hops:
        room = floor_y - 2 * ext
        changes["hops"] = tuple(float(rng.uniform(*HOP_RANGE) * room * HOP_DECAY**j) for j in range(len(m.hops)))
    if m.path in ("circle_cw", "circle_ccw"):
        u = np.array([np.cos(m.loop_angle), np.sin(m.loop_angle)])  # from the frame's centre through p0
        cap = (floor_y - 2 * ext) / 2 - 0.5
        for _ in range(100):
            lr = min(float(rng.uniform(*LOOP_RADIUS_RANGE)) * min(h, w), cap)
            cx, cy = np.array(m.p0) - lr * u
            if ext + lr <= cx <= w - ext - lr and ext + lr <= cy <= floor_y - ext - lr:
                changes["loop_radius"] = lr
                break
    return dataclasses.replace(m, **changes)


def posterior_mean(scene: Scene, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
    """The mean [F, H, W, 3] float frames of ``samples`` redrawn scenes whose keyframes equal the scene's,
    how many draws were kept (the true scene is always one of them), and one kept draw other than the true
    scene (a sample of the posterior, what a perfect sampler could give; the true frames if none was kept)."""
    truth = render_frames(scene)
    total, kept, draw = truth.astype(np.float64), 1, None
    for _ in range(samples - 1):
        second = None if scene.second is None else redraw_mover(scene.second, scene, rng)
        alt = dataclasses.replace(scene, main=redraw_mover(scene.main, scene, rng), second=second)
        frames = render_frames(alt)
        if np.abs(frames[[0, -1]] - truth[[0, -1]]).max() > 0.5:
            continue  # its keyframes differ, so the inputs rule it out
        total += frames
        kept += 1
        draw = frames if draw is None else draw
    return total / kept, kept, truth if draw is None else draw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bundle", default=None, help="also score the posterior mean through this bundle's VAE")
    p.add_argument("--eval", default=None, help="a segue eval.json of the same split: the model's PSNR per path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.clips < 1 or args.samples < 1:
        p.error("--clips and --samples must be at least 1")
    model = None
    if args.eval is not None:
        model = {c["index"]: float(c["model"]["psnr"]) for c in json.loads(Path(args.eval).read_text())["clips"]}
        if not set(range(args.clips)) <= set(model):
            p.error(f"{args.eval} scores clips {sorted(model)}, not all of 0..{args.clips - 1}")
    pipe = None
    if args.bundle is not None:
        from segue.loader import load

        pipe = load(args.bundle)
    data = SyntheticVideos(args.split, args.clips, args.frames, (args.size, args.size), ambiguous_fraction=0.0)
    rng = np.random.default_rng(args.seed)
    rows: dict[str, list[list[float]]] = defaultdict(list)
    for i in range(args.clips):
        scene, clip = data.scene(i), data.clip(i)
        truth = clip.frames  # [F, H, W, 3] uint8
        mean, kept, draw = posterior_mean(scene, args.samples, rng)
        oracle = to_uint8(mean)
        fade = crossfade(truth[0], truth[-1], len(truth))
        scores = [video_psnr(fade, truth, 1, -1), video_psnr(oracle, truth, 1, -1),
                  video_psnr(to_uint8(draw), truth, 1, -1)]  # fmt: skip
        if pipe is not None:
            scores.append(video_psnr(vae_roundtrip(pipe, oracle), truth, 1, -1))
        if model is not None:
            scores.append(model[i])
        for key in (clip.path, "all"):
            rows[key].append([min(x, CAP) for x in scores])
        print(f"[oracle] clip {i + 1}/{args.clips} {clip.path}: kept {kept}/{args.samples}, "
              + " ".join(f"{s:.2f}" for s in scores), file=sys.stderr, flush=True)  # fmt: skip
    head = "| path | clips | crossfade (dB) | posterior mean (dB) | gain | one posterior draw (dB) |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if pipe is not None:
        head, sep = head + " through the VAE (dB) |", sep + "---:|"
    if model is not None:
        head, sep = head + " the model (dB) |", sep + "---:|"
    print(head)
    print(sep)
    for key in sorted(rows, key=lambda k: (k == "all", k)):
        s = np.array(rows[key])  # [clips, sources]
        m = s.mean(axis=0)
        cells = [key, str(len(s)), f"{m[0]:.2f}", f"{m[1]:.2f}", f"{m[1] - m[0]:+.2f}"]
        cells += [f"{x:.2f}" for x in m[2:]]  # one draw, then through the VAE and the model when asked
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
