"""The flow loss of bundles on finished latent caches, with the same clips and the same draws for every bundle.

    python bench/flow_loss.py BUNDLE [BUNDLE ...] --cache DIR [--cache DIR ...] [--clips 480]
        [--sigma-min 0.5] [--mode first_last] [--seed 1000]

Each row is a bundle, each column a cache (a run's ``latents`` folder: the clips that run trained on, or a window
no run has seen). A clip's noise, noise level and timestep come from ``--seed`` + its position, so two bundles
are scored on identical draws and their difference is the models', not the sampling's. ``--sigma-min`` 0.5
scores only the noise levels the shipped 3-step sampler uses (what ``default-r17`` onwards train on). The
relative column compares each bundle with the first one on the last cache.

A cache holds latents of one VAE: a bundle whose VAE differs from the one that built a cache is refused (its
DiT would be scored on another latent space). docs/training.md, session 23, has the tables this made.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

import segue
from segue.errors import InputError
from segue.train.flow import MODES
from segue.train.latents import CachedClips, CachedFLF2VObjective, vae_fingerprint

BATCH = 16


@torch.no_grad()
def bundle_loss(parts: dict[str, torch.nn.Module], data: CachedClips, clips: int, objective, seed: int) -> float:
    """Mean flow loss over clips 0..clips-1 of ``data``; clip i's draws come from seed + i."""
    total = 0.0
    for start in range(0, clips, BATCH):
        idx = range(start, min(clips, start + BATCH))
        batch = {**default_collate([data[i] for i in idx]), "seed": torch.tensor([seed + i for i in idx])}
        total += float(objective(parts, batch)) * len(idx)
    return total / clips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--cache", action="append", type=Path, required=True, help="a finished latent cache folder")
    ap.add_argument("--clips", type=int, default=480, help="the first N clips of each cache")
    ap.add_argument("--sigma-min", type=float, default=0.5)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--mode", default="first_last", choices=sorted(MODES))
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.clips < 1 or not 0 <= args.sigma_min < 1:
        ap.error(f"need --clips >= 1 and 0 <= --sigma-min < 1, got {args.clips} and {args.sigma_min}")
    try:
        caches = {c: CachedClips(c) for c in args.cache}
    except InputError as e:
        sys.exit(f"flow_loss: {e}")
    for c, data in caches.items():
        if len(data) < args.clips:
            sys.exit(f"flow_loss: {c} holds {len(data)} clips, --clips asks for {args.clips}")
        if args.mode not in data.modes:
            sys.exit(f"flow_loss: {c} has no {args.mode!r} latents; it has {', '.join(data.modes)}")
    objective = CachedFLF2VObjective(shift=args.shift, modes={args.mode: 1.0}, sigma_min=args.sigma_min)
    names = [c.parent.name if c.name == "latents" else c.name for c in caches]
    print(f"| bundle | {' | '.join(names)} | vs first |")
    print("|---|" + "---:|" * (len(names) + 1))
    first = None
    for b in args.bundles:
        t0 = time.perf_counter()
        try:
            pipe = segue.load(b, dtype="float32")
        except InputError as e:
            sys.exit(f"flow_loss: {e}")
        fp = vae_fingerprint(pipe.vae)
        for c, data in caches.items():
            if data.config["vae"] != fp:
                sys.exit(f"flow_loss: {c} was built by another VAE than {b}'s; its latents are not this model's")
        parts = {"dit": pipe.dit.eval(), "text": pipe.text_encoder.eval(), "image": pipe.image_encoder.eval()}
        losses = [bundle_loss(parts, data, args.clips, objective, args.seed) for data in caches.values()]
        first = losses[-1] if first is None else first
        cells = " | ".join(f"{x:.4f}" for x in losses)
        print(f"| {b.parent.name if b.stem == 'model' else b.stem} | {cells} | {losses[-1] / first - 1:+.1%} |")
        print(f"{b}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
