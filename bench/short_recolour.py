"""A short single-frame VAE run from a run folder's EMA with a share ``--aug`` of its broad frames recoloured
(channels reordered, hue rotated, saturation, gains, gamma), scored every ``--every`` steps (first frame):

    python -m bench.short_recolour --start RUN/broad/vae --aug 0.75
    python -m bench.short_recolour --start RUN/broad/vae --aug 0
"""

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.vae_roundtrip import fitted_photo, flat_colours, load_vae, scores
from bench.vae_short_run import crops, flat_fields, round_trip_loss
from segue.data.broad import BroadVideos
from segue.data.photos import photo_names

ap = argparse.ArgumentParser()
ap.add_argument("--aug", type=float, default=0.0)
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--start", required=True, help="a VAE run folder (its latest checkpoint's EMA)")
a = ap.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)


def colour_aug(x, g, p):
    """Random hue rotation, saturation, channel order, per-channel gain and gamma, per item: x [n,3,F,H,W] in [-1,1]."""
    out = []
    k = torch.ones(3) / math.sqrt(3)
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    for v in x:
        if torch.rand((), generator=g) >= p:
            out.append(v)
            continue
        u = (v + 1) / 2
        u = u[torch.randperm(3, generator=g)]
        th = float(torch.rand((), generator=g)) * 2 * math.pi
        R = torch.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K
        s = 0.4 + 1.4 * float(torch.rand((), generator=g))
        grey = u.mean(0, keepdim=True)
        c = torch.einsum("ij,j...->i...", R, u - grey) * s
        gains = 0.6 + 0.8 * torch.rand(3, generator=g)
        u = ((grey + c).clamp(0, 1) * gains.view(3, 1, 1, 1)).clamp(0, 1)
        u = u.pow(math.exp(float(torch.rand((), generator=g)) * 0.8 - 0.4))
        out.append(u * 2 - 1)
    return torch.stack(out)


_, vae = load_vae(Path(a.start))
vae.train()
ema = copy.deepcopy(vae).eval().requires_grad_(False)
opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
ds = BroadVideos("train", length=100_000, frames=9, size=(64, 64))
rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
ga = torch.Generator().manual_seed(1)
sets = {"flat": flat_colours(5, 64)}
for split in ("heldout", "train"):
    sets[split] = np.stack([fitted_photo(n, 64) for n in photo_names(split)])
c = [f"{m:.2f}/{de:.2f}" for m, _, de in (scores(ema, sets[k]) for k in ("flat", "heldout", "train"))]
print(0, " ".join(c), flush=True)
t0 = time.time()
for step in range(1, a.steps + 1):
    x = torch.cat([colour_aug(crops(ds, rng, 12, 1), ga, a.aug), flat_fields(g, 4)])
    loss = round_trip_loss(vae, x, False)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), vae.parameters()):
            pe.lerp_(p, 0.01)
    if step % a.every == 0:
        c = [f"{m:.2f}/{de:.2f}" for m, _, de in (scores(ema, sets[k]) for k in ("flat", "heldout", "train"))]
        print(step, " ".join(c), f"{time.time() - t0:.0f}s", flush=True)
