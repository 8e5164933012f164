"""Storyboards on the built-in model, against rendered ground truth: carry, loops, colour matching.

    python bench/storyboard.py                       # all three tables (about 15 min on 2 idle CPU cores)
    python bench/storyboard.py --part carry --paths 8 --carry 0,1,5

carry: held-out synthetic paths (test split seeds) through 3 keyframes at frames 0, 16, 32 of one rendered
33-frame clip, the shape moving at constant speed (linear easing, no camera, steady light), so the truth
has no change of velocity at the keyframes. Each path is rendered as a story of two 17-frame shots with
``carry = K`` for each K. Columns: jerk at the join (|velocity after - velocity before| of the tracked
shape at the shared keyframe, px/frame; the truth's is 0; solid shapes, which the colour tracker finds)
next to the same measure inside the shots,
seam ratio (report), keyframe PSNR and mean CIEDE2000 (report; the middle keyframe is the join), and the
PSNR of every film frame against the truth.

loop: one-keyframe loops (A -> A) of 17 frames from the first frames of held-out clips, with the middle
keyframe from a first-frame-only pass (what ``segue story`` does) against plain A -> A generation: how far
the film gets from A (max over frames of the mean absolute difference, 8-bit levels) and how far the
tracked shape travels (max distance from its place in A, px).

color: the keyframe CIEDE2000 of the carry-0 films before and after ``--color-match``, and the number of
pixels colour matching changes on the ground-truth films (no drift: it must change none).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import segue
from segue.data.synthetic import SPLIT_OFFSETS, caption, render_scene, sample_scene
from segue.evaluate import psnr, track_object
from segue.story.color import delta_e
from segue.story.film import match_film, plan_story
from segue.story.schema import load_story

SHOT = 17
BASE_SEED = SPLIT_OFFSETS["test"] + 31_000  # held out: the test split, past the evaluation's clips


def ground_truth(seed: int, keyframes: int = 3):
    """A clip through ``keyframes`` keyframes (every SHOT - 1 frames) at constant speed; (frames, colours, prompt)."""
    frames = (SHOT - 1) * (keyframes - 1) + 1
    for attempt in range(50):
        path = ("straight", "wave", "arc_over")[(seed + attempt) % 3]
        scene = sample_scene(seed + attempt * 7919, frames=frames, size=(64, 64), path=path, camera=False)
        # solid shapes: the colour tracker finds them in every frame
        main = dataclasses.replace(scene.main, easing="linear", turns=0.0, scale=(1.0, 1.0), texture="solid")
        if main.path == "bounce":
            continue
        scene = dataclasses.replace(scene, main=main, second=None, times=(scene.times[0],) * 2,
                                    seasons=(scene.seasons[0],) * 2)  # fmt: skip
        clip = render_scene(scene)
        if np.linalg.norm(clip.track[-1] - clip.track[0]) > 20:  # a visible journey
            return clip.frames, clip.object_colors, caption(scene)
    raise RuntimeError(f"no suitable scene near seed {seed}")


def velocity_change(track: np.ndarray, at: int) -> float:
    """|v(at -> at+1) - v(at-1 -> at)| in px/frame; NaN if the shape is lost around ``at``."""
    return float(np.linalg.norm((track[at + 1] - track[at]) - (track[at] - track[at - 1])))


def story_of(frames: np.ndarray, prompt: str, carry: int, keyframes: int = 3) -> dict:
    kf = [{"image": frames[i * (SHOT - 1)]} for i in range(keyframes)]
    return {"settings": {"carry": carry, "frames": SHOT, "seed": 0}, "keyframes": kf,
            "shots": [{"prompt": prompt} for _ in range(keyframes - 1)]}  # fmt: skip


def part_carry(pipe, paths: int, carries: list[int], cache: Path) -> dict[int, list]:
    rows: dict[int, list] = {k: [] for k in carries}
    films = {}
    for p in range(paths):
        truth, colors, prompt = ground_truth(BASE_SEED + p)
        true_track = track_object(truth, colors)
        for k in carries:
            t0 = time.perf_counter()
            video = pipe.story(story_of(truth, prompt, k), cache_dir=cache)
            r = video.info["report"]
            track = track_object(video.frames, colors)
            join = r["joins"][0]["frame"]
            inside = [velocity_change(track, t) for t in range(1, len(track) - 1) if t != join]
            rows[k].append({
                "jerk": velocity_change(track, join), "jerk_inside": float(np.nanmean(inside)),
                "jerk_truth": velocity_change(true_track, join), "seam": r["joins"][0]["seam_ratio"],
                "kf_psnr": float(np.mean([x["psnr"] for x in r["keyframes"]])),
                "kf_de": float(np.mean([x["delta_e"] for x in r["keyframes"]])),
                "join_psnr": r["keyframes"][1]["psnr"], "psnr": psnr(video.frames, truth),
            })  # fmt: skip
            films[(p, k)] = (video, truth)
            print(f"  path {p} carry {k}: {time.perf_counter() - t0:.1f}s jerk {rows[k][-1]['jerk']:.2f} "
                  f"seam {rows[k][-1]['seam']:.2f}", file=sys.stderr)  # fmt: skip
    print("\n## carry: joins on held-out 3-keyframe paths (two 17-frame shots, built-in model)\n")
    print("| carry | jerk at join (px/frame) | jerk inside shots | truth at join | seam ratio | keyframe PSNR (dB) "
          "| keyframe ΔE00 | join keyframe PSNR | film PSNR vs truth |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for k, rs in rows.items():
        m = {key: float(np.nanmean([r[key] for r in rs])) for key in rs[0]}
        print(f"| {k} | {m['jerk']:.3f} | {m['jerk_inside']:.3f} | {m['jerk_truth']:.3f} | {m['seam']:.3f} | "
              f"{m['kf_psnr']:.2f} | {m['kf_de']:.3f} | {m['join_psnr']:.2f} | {m['psnr']:.2f} |")  # fmt: skip
    print(f"\n{paths} paths, seeds {BASE_SEED}..{BASE_SEED + paths - 1} of the test split; means over paths.")
    return films


def part_color(pipe, films: dict) -> None:
    before, after, untouched, pixels = [], [], 0, 0
    for (_, k), (video, truth) in films.items():
        if k != min(key for _, key in films):
            continue
        story = load_story(story_of(truth, "", 0))
        plans, _ = plan_story(pipe, story)
        kfs = [x["frame"] for x in video.info["report"]["keyframes"]]
        fixed = match_film(video.frames, story, plans, kfs, True)
        for i, pos in enumerate(kfs):
            target = truth[i * (SHOT - 1)]
            before.append(delta_e(video.frames[pos], target))
            after.append(delta_e(fixed[pos], target))
        same = match_film(truth, story, plans, kfs, True)
        untouched += int((same != truth).any(axis=-1).sum())
        pixels += truth.shape[0] * truth.shape[1] * truth.shape[2]
    print("\n## colour match: keyframe CIEDE2000 of the carry-0 films\n")
    print("| | before | after |\n|---|---|---|")
    print(f"| mean ΔE00 at keyframes | {np.mean(before):.3f} | {np.mean(after):.3f} |")
    print(f"| max ΔE00 at keyframes | {np.max(before):.3f} | {np.max(after):.3f} |")
    print(f"\nOn the ground-truth films (no drift) colour matching changed {untouched} of {pixels} pixels.")


def part_loop(pipe, clips: int) -> None:
    rows = []
    for c in range(clips):
        truth, colors, prompt = ground_truth(BASE_SEED + 100 + c)
        a = truth[0]
        video = pipe.story({"loop": True, "keyframes": [{"image": a}], "shots": [{"prompt": prompt, "frames": SHOT}]})
        plain = pipe.generate(_pil(a), _pil(a), prompt, frames=SHOT, seed=0).frames
        row = []
        for frames in (video.frames, plain):
            away = float(np.abs(frames.astype(float) - a).mean(axis=(1, 2, 3)).max())
            track = track_object(frames, colors[0], tol=90)
            found = track[~np.isnan(track).any(axis=1)]  # frames where the shape was found
            travel = float(np.linalg.norm(found - found[0], axis=-1).max()) if len(found) else float("nan")
            row += [away, travel]
        rows.append(row)
    m = np.nanmean(np.array(rows), axis=0)
    print("\n## one-keyframe loops (A -> A, 17 frames, built-in model)\n")
    print("| | max mean |frame - A| (8-bit) | max travel of the shape (px) |\n|---|---|---|")
    print(f"| loop with the middle keyframe (segue story) | {m[0]:.2f} | {m[1]:.2f} |")
    print(f"| plain A -> A | {m[2]:.2f} | {m[3]:.2f} |")
    print(f"\n{clips} clips, first frames of seeds {BASE_SEED + 100}..{BASE_SEED + 99 + clips}; means.")


def _pil(a: np.ndarray):
    from PIL import Image

    return Image.fromarray(a)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "carry", "loop"), default="all")
    p.add_argument("--paths", type=int, default=8)
    p.add_argument("--carry", default="0,1,5")
    p.add_argument("--loops", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared, busy machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = segue.load()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "carry"):
            films = part_carry(pipe, args.paths, [int(x) for x in args.carry.split(",")], Path(tmp))
            part_color(pipe, films)
        if args.part in ("all", "loop"):
            part_loop(pipe, args.loops)


if __name__ == "__main__":
    main()
