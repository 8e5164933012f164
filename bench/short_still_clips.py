"""A short VAE run from a run folder's EMA: single frames as ``bench.vae_short_run`` plus ``--still`` clips a
step held still for ``--frames`` frames (one of them a flat field), scored on the first frame and on the last
of a 17-frame still clip (the path a last keyframe takes):

    python -m bench.short_still_clips --start RUN/broad/vae --still 4 --steps 200
"""

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from bench.vae_roundtrip import fitted_photo, flat_colours, load_vae, quality, round_trip
from bench.vae_short_run import crops, flat_fields, round_trip_loss
from segue.data.broad import BroadVideos
from segue.data.photos import photo_names

ap = argparse.ArgumentParser()
ap.add_argument("--start", required=True, help="a VAE run folder (its latest checkpoint's EMA)")
ap.add_argument("--still", type=int, default=4)
ap.add_argument("--moving", type=int, default=0)
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--frames", type=int, default=17)
a = ap.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
_, vae = load_vae(Path(a.start))
vae.train()
ema = copy.deepcopy(vae).eval().requires_grad_(False)
opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
ds = BroadVideos("train", length=100_000, frames=17, size=(64, 64), recolour=0.75)
rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
sets = {"flat": flat_colours(5, 64)}
for split in ("heldout", "train"):
    sets[split] = np.stack([fitted_photo(n, 64) for n in photo_names(split)])


def report(step, t0):
    cells = []
    for k in ("flat", "heldout", "train"):
        m1, _, d1 = quality(round_trip(ema, sets[k]), sets[k])
        m, _, d = quality(round_trip(ema, sets[k], frames=17), sets[k])
        cells.append(f"{k} {m1:.2f}/{d1:.2f} last {m:.2f}/{d:.2f}")
    print(step, " | ".join(cells), f"{time.time() - t0:.0f}s", flush=True)


t0 = time.time()
report(0, t0)
for step in range(1, a.steps + 1):
    s = torch.cat([crops(ds, rng, 12, 1), flat_fields(g, 4)])
    loss = round_trip_loss(vae, s, False)
    if a.still:
        base = torch.cat([crops(ds, rng, a.still - 1, 1), flat_fields(g, 1)])  # [n,3,1,32,32]
        loss = loss + round_trip_loss(vae, base.expand(-1, -1, a.frames, -1, -1).contiguous(), False)
    if a.moving:
        loss = loss + round_trip_loss(vae, crops(ds, rng, a.moving, a.frames), False)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), vae.parameters()):
            pe.lerp_(p, 0.01)
    if step % a.every == 0:
        report(step, t0)
