"""Where the in-between error is: the moving objects or the scenery, for the model, the crossfade and the VAE.

    python bench/inbetween_breakdown.py [BUNDLE] [--clips 8] [--split test] [--steps N --guidance G --shift S]

On held-out clips at the bundle's native size it generates each clip with the bundle's defaults (or the
given settings), and splits the in-between frames' pixels (frames 1..F-2) into *object* pixels (those the
moving shapes touch: the clip rendered with and without its objects differs there) and *scenery* (the
rest). It prints one markdown row per video source:

- PSNR over all in-between pixels (what ``segue eval`` reports, pooled over the clips here);
- PSNR over object pixels and over scenery pixels alone;
- "object fixed": the PSNR if the object pixels had no error (scenery error only), and "scenery fixed"
  the other way round: how many dB each part stands between the source and a perfect video.

The VAE row encodes and decodes the true clip: the bound a perfect DiT would reach.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from segue.data.synthetic import SyntheticVideos, object_mask
from segue.evaluate import PEAK, crossfade, held_out_set, pipeline_generate_fn
from segue.loader import load


def _db(sq_err_sum: float, count: float) -> float:
    return math.inf if sq_err_sum == 0 else 10 * math.log10(PEAK**2 / (sq_err_sum / count))


def vae_roundtrip(pipe, truth: np.ndarray) -> np.ndarray:
    """The true clip [F, H, W, 3] uint8 encoded and decoded by the pipeline's VAE, as uint8."""
    video = torch.from_numpy(truth).permute(3, 0, 1, 2).float()[None] / 127.5 - 1.0  # [1, 3, F, H, W]
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(video.to(pipe.device)))[0].float().cpu()  # [3, F, H, W]
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0).numpy().astype(np.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=None, help="a segue bundle (default: the built-in one)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    pipe = load(args.bundle)
    d = pipe.config.defaults
    clips, _ = held_out_set(d, args.clips, 0, args.split)
    # the same items as a dataset, for their scenes (held_out_set's clips are its plain clips)
    scenes = SyntheticVideos(args.split, args.clips, d.frames, clips[0].frames.shape[1:3], ambiguous_fraction=0.0)
    generate = pipeline_generate_fn(pipe, steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed)
    # per source: squared error sums over object pixels, scenery pixels; pixel counts shared by all sources
    sums = {name: np.zeros(2) for name in ("model", "crossfade", "VAE")}
    counts = np.zeros(2)
    for i, clip in enumerate(clips):
        truth = clip.frames  # [F, H, W, 3] uint8
        f = len(truth)
        scene = scenes.scene(i)
        if scene.seed != clip.meta["seed"]:
            raise SystemExit(f"clip {i}: scene seed {scene.seed} is not the clip's {clip.meta['seed']}")
        mask = object_mask(scene)[1:-1]  # [F-2, H, W]
        videos = {
            "model": generate(truth[0], truth[-1], clip.caption, f),
            "crossfade": crossfade(truth[0], truth[-1], f),
            "VAE": vae_roundtrip(pipe, truth),
        }
        for name, video in videos.items():
            err = ((video[1:-1].astype(np.float64) - truth[1:-1]) ** 2).sum(axis=-1)  # [F-2, H, W]
            sums[name] += [err[mask].sum(), err[~mask].sum()]
        counts += [3 * mask.sum(), 3 * (~mask).sum()]
        print(f"[breakdown] clip {i + 1}/{len(clips)}", file=sys.stderr, flush=True)

    total = counts.sum()
    print(f"bundle {args.bundle or 'built-in'}; {args.split} split, {args.clips} clips of {d.frames} frames; "
          f"object pixels {100 * counts[0] / total:.1f}% of the in-between frames\n")  # fmt: skip
    print("| source | in-between PSNR | object pixels | scenery pixels | object fixed | scenery fixed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (obj, bg) in sums.items():
        row = (_db(obj + bg, total), _db(obj, counts[0]), _db(bg, counts[1]), _db(bg, total), _db(obj, total))
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
