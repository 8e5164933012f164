"""A short VAE training run from a bundle's VAE, scored as it goes: what a setting does to the round trip of
flat colours and photos, in minutes rather than the hours of a recipe's VAE phase.

    python -m bench.vae_short_run --steps 1500 --lr 1e-3                  # first frames only
    python -m bench.vae_short_run --steps 1500 --lr 1e-3 --clips 4        # and 4 five-frame clips a step
    python -m bench.vae_short_run --steps 600 --frozen-encoder            # the decoder alone
    python -m bench.vae_short_run --state FILE --photo-crops --photos pypi+debian --lr 2e-5   # a skeleton start

Each step trains on ``--frames`` single frames (32x32 crops of frames of broad training clips,
``segue.data.broad``) plus 4 flat colour fields of random colours, all through the first-frame path (a
first keyframe is encoded and decoded alone), and on ``--clips`` five-frame 32x32 crops of broad clips
(the causal chunk path that a last keyframe takes): MSE of the decode of the posterior mean, AdamW at
``--lr`` with the gradient clipped to norm 1, EMA 0.99. Every ``--every`` steps the EMA is scored at 64x64:
flat colours (5^3 over the gamut) and held-out and training photos as one frame (``vae_roundtrip``), and
held-out photos as a 5-frame still clip, whose last frame is decoded through the chunk path.
``--state`` starts from a saved VAE state (``{"vae": state_dict}``, e.g. ``bench.vae_skeleton``'s) on the
bundle's config; ``--photo-crops`` draws the single frames from the training photos themselves
(``data.photo_crops.PhotoCrops``: Lanczos-resized, three quarters recoloured, a fifth flat fields);
``--photos`` picks the photo collections trained on and scored.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from bench.vae_roundtrip import fitted_photo, flat_colours, load_vae, round_trip, scores
from segue.data.broad import BroadVideos
from segue.data.photo_crops import PhotoCrops
from segue.data.photos import COLLECTIONS, photo_names
from segue.evaluate import psnr
from segue.io import atomic_torch_save
from segue.loader import DEFAULT_MODEL
from segue.train.vae_loss import freeze_encoder, round_trip_error

CROP = 32


def crops(ds: BroadVideos, rng: np.random.Generator, n: int, frames: int) -> torch.Tensor:
    """``n`` random CROPxCROP crops of ``frames`` consecutive frames (ending at a clip's last frame when
    ``frames`` > 1; any frame when 1) of random broad clips: [n, 3, frames, CROP, CROP] in [-1, 1]."""
    out = []
    for _ in range(n):
        video = ds[int(rng.integers(len(ds)))]["video"]  # [3, F, H, W]
        f = int(rng.integers(video.shape[1])) if frames == 1 else video.shape[1] - frames
        y, x = (int(v) for v in rng.integers(0, video.shape[2] - CROP + 1, 2))
        out.append(video[:, f : f + frames, y : y + CROP, x : x + CROP])
    return torch.stack(out)


def flat_fields(g: torch.Generator, n: int) -> torch.Tensor:
    """``n`` one-frame fields of uniformly random colours: [n, 3, 1, CROP, CROP] in [-1, 1]."""
    return (torch.rand(n, 3, 1, 1, 1, generator=g) * 2 - 1).expand(n, 3, 1, CROP, CROP).clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the bundle whose VAE starts the run")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--frames", type=int, default=12, help="single frames a step (plus 4 flat fields)")
    ap.add_argument("--clips", type=int, default=0, help="five-frame clips a step")
    ap.add_argument("--frozen-encoder", action="store_true", help="train the decoder alone")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="write the final EMA as {'vae': state_dict} here (a new file)")
    ap.add_argument("--state", type=Path, help="start from this saved VAE state ({'vae': state_dict})")
    ap.add_argument("--photo-crops", action="store_true", help="single frames from the training photos")
    ap.add_argument("--photos", choices=tuple(COLLECTIONS), default="pypi")
    args = ap.parse_args()
    if args.save and args.save.exists():
        raise SystemExit(f"{args.save} exists; give a new file")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    _, vae = load_vae(args.model)
    if args.state:
        vae.load_state_dict(torch.load(args.state, weights_only=True)["vae"])
    vae.train()
    ema = copy.deepcopy(vae).eval().requires_grad_(False)
    if args.frozen_encoder:
        freeze_encoder(vae)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ds = BroadVideos("train", length=100_000, frames=9, size=(64, 64), photos=args.photos)
    rng, g = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    photo_crops = None
    if args.photo_crops:
        photo_crops = PhotoCrops(args.photos, size=CROP, flat=0.2, recolour=0.75, seed=args.seed)
    sets = {"flat": flat_colours(5, 64)}
    for split in ("heldout", "train"):
        sets[split] = np.stack([fitted_photo(n, 64) for n in photo_names(split, args.photos)])
    print("| step | flat colours PSNR / ΔE | held-out photos PSNR / ΔE | training photos PSNR / ΔE | "
          "held-out, last of a 5-frame still clip | s |")  # fmt: skip
    print("|---:|---|---|---|---:|---:|")
    start = time.time()
    for step in range(1, args.steps + 1):
        if photo_crops is None:
            x = torch.cat([crops(ds, rng, args.frames, 1), flat_fields(g, 4)])
        else:
            n = args.frames + 4  # as many as the broad frames and flat fields otherwise, a fifth flat
            x = photo_crops.batch(step - 1, n)[:, :, None]
        loss = round_trip_error(vae, x)
        if args.clips:
            loss = loss + round_trip_error(vae, crops(ds, rng, args.clips, 5))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), vae.parameters()):
                pe.lerp_(p, 0.01)
        if step % args.every == 0 or step == args.steps:
            cells = [f"{m:.2f} / {de:.2f}" for m, _, de in (scores(ema, sets[k]) for k in ("flat", "heldout", "train"))]
            last = np.mean([psnr(a, b) for a, b in zip(round_trip(ema, sets["heldout"], frames=5), sets["heldout"])])
            print(f"| {step} | {' | '.join(cells)} | {last:.2f} | {time.time() - start:.0f} |", flush=True)
    if args.save:  # the format ``--state`` reads; whole or not at all
        atomic_torch_save(args.save, {"vae": ema.state_dict()})


if __name__ == "__main__":
    main()
