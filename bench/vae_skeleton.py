"""A built-in-shaped VAE whose first-frame path is a fitted code: the VAE's skeleton trained in 2-D, then
set into a ``WanVAE`` exactly (``segue.train.skeleton``, the start of the ``keyframes`` recipe's VAE).

    python -m bench.vae_skeleton --steps 6000 --run DIR [--out skeleton.pt]   # minutes on one thread

Trains the skeleton into ``--run`` (``train_skeleton``: photo crops of the training photos, a fifth flat
colour fields, three quarters of the photos recoloured; MSE plus ``--detail-weight`` times the MSE of the
error's differences between neighbouring pixels; Adam at 1e-3, cosine to 0; resumes from the folder's
checkpoints), sets its EMA weights into a VAE of the built-in layout and prints the skeleton's and the
VAE's round trip (first frame, and last frame of a 17-frame still clip) of flat colours, held-out and
training photos at 64x64, with the largest difference between the two. ``--out``: also writes
``{"vae": state_dict}`` there (a new file, renamed when whole), the format ``bench.vae_short_run --state``
reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.vae_linear_bound import apply, quality
from bench.vae_roundtrip import fitted_photo, flat_colours, round_trip
from segue.bundle import read_bundle_metadata
from segue.data.photos import COLLECTIONS, photo_names
from segue.io import atomic_torch_save
from segue.loader import DEFAULT_MODEL
from segue.models.vae import WanVAE
from segue.train.phases import load_ema
from segue.train.skeleton import Skeleton, skeleton_vae_state, train_skeleton


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--detail-weight", type=float, default=4.0)
    ap.add_argument("--photos", choices=tuple(COLLECTIONS), default="pypi+debian")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", type=Path, required=True, help="the skeleton's run folder (resumes)")
    ap.add_argument("--out", type=Path, help="also write the VAE's state dict here (a new file)")
    args = ap.parse_args()
    if args.out is not None and args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new file")
    torch.set_num_threads(1)
    cfg, _ = read_bundle_metadata(DEFAULT_MODEL)
    train_skeleton(cfg.vae, args.run, steps=args.steps, lr=1e-3, detail_weight=args.detail_weight,
                   photos=args.photos, recolour=0.75, seed=args.seed)  # fmt: skip
    sk = Skeleton(cfg.vae).eval()
    sk.load_state_dict(load_ema(args.run, "skeleton"))
    vae = WanVAE(cfg.vae).eval()
    vae.load_state_dict(skeleton_vae_state(cfg.vae, sk.state_dict()))
    sets = {
        "flat colours": flat_colours(5, 64),
        "held-out photos": np.stack([fitted_photo(n, 64) for n in photo_names("heldout", args.photos)]),
        "training photos": np.stack([fitted_photo(n, 64) for n in photo_names("train", args.photos)]),
    }
    x = torch.from_numpy(sets["held-out photos"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x[:, :, None], normalize=False), normalized=False, clamp=False)[:, :, 0]
        gap = (y - sk(x)).abs().max().item()
    print(f"largest difference between the skeleton and the VAE on held-out photos: {gap:.2e}")
    print(f"| {args.steps} steps, detail weight {args.detail_weight:g} | {' | '.join(sets)} |")
    print("|---|---|---|---|")
    print(f"| skeleton | {' | '.join(quality(apply(sk, v), v) for v in sets.values())} |")
    for frames in (1, 17):
        cells = " | ".join(quality(round_trip(vae, v, frames=frames), v) for v in sets.values())
        print(f"| VAE, {'first frame' if frames == 1 else 'last of a 17-frame still clip'} | {cells} |")
    if args.out is not None:
        atomic_torch_save(args.out, {"vae": vae.state_dict()})


if __name__ == "__main__":
    main()
