"""How close a linear code shaped like the built-in VAE comes to photos, and how fast Adam gets there.

    python -m bench.vae_linear_bound                         # grad weights 0 and 4, 2000 steps each
    python -m bench.vae_linear_bound --steps 4000 --grad-weights 0 1 4 16

Three codes of 4x4 patches with ``z_dim`` (16) values each, the first-frame path's budget:
- ``pca``: the principal components of the training photos' patches (``vae_roundtrip.linear_code``): the
  best linear code of separate patches, found in closed form.
- ``vae-shaped``: a linear autoencoder with the built-in VAE's first-frame layout (its encoder's convs and
  strides; its decoder's 2x nearest upsampling, each followed by a 3x3 conv, and its widths), that is the
  VAE with every residual branch and attention at zero and the heads' norm and SiLU taken out.
- ``position-free``: the same encoder with a decoder that maps each latent cell's 3x3 neighbourhood to its
  own 4x4 patch (a pixel shuffle), free to treat every pixel of the patch differently.

The autoencoders train with Adam (lr 1e-3, cosine to 0) on batches of 20 of ``data.photo_crops.PhotoCrops``
(32x32 crops of the training photos, each resized so its short side is 64-192 pixels, three quarters
recoloured, flipped half the time; a fifth flat fields of random colours), on MSE plus ``grad weight``
times the MSE of the error's differences between neighbouring pixels (``vae_loss.detail_weighted_mse``: a
weight on the fine detail, which plain MSE learns last). Scores are mean PSNR / mean CIEDE2000 of the held-out photos
fitted to 64, 96 and 128 pixels and of the training photos at 64 (``--photos``, default pypi+debian).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import Tensor, nn

from bench.vae_roundtrip import as_uint8, fitted_photo, linear_code
from bench.vae_roundtrip import quality as measured
from segue.data.photo_crops import PhotoCrops
from segue.data.photos import COLLECTIONS, photo_names
from segue.models.vae import NearestUpsample2x
from segue.train.vae_loss import detail_weighted_mse

CROP = 32


class LinearCode(nn.Module):
    """[B, 3, H, W] -> [B, z, H/4, W/4] -> [B, 3, H, W], every layer linear."""

    def __init__(self, z_dim: int, decoder: str) -> None:
        super().__init__()
        pad = nn.ZeroPad2d((0, 1, 0, 1))  # the VAE's downsamplers pad right and bottom only
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), pad, nn.Conv2d(16, 16, 3, 2), nn.Conv2d(16, 32, 1),
            pad, nn.Conv2d(32, 32, 3, 2), nn.Conv2d(32, 64, 1), nn.Conv2d(64, z_dim, 3, padding=1),
        )  # fmt: skip
        if decoder == "vae-shaped":
            self.decoder = nn.Sequential(
                nn.Conv2d(z_dim, 96, 3, padding=1), NearestUpsample2x(), nn.Conv2d(96, 48, 3, padding=1),
                NearestUpsample2x(), nn.Conv2d(48, 24, 3, padding=1), nn.Conv2d(24, 3, 3, padding=1),
            )  # fmt: skip
        else:
            self.decoder = nn.Sequential(nn.Conv2d(z_dim, 48, 3, padding=1), nn.PixelShuffle(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def quality(out: np.ndarray, images: np.ndarray) -> str:
    """'mean PSNR / mean ΔE' of ``out`` against ``images`` (``vae_roundtrip.quality``), for a table cell."""
    mean, _, de = measured(out, images)
    return f"{mean:.2f} / {de:.2f}"


@torch.no_grad()
def apply(model: nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return as_uint8(model(x))


def fit(decoder: str, grad_weight: float, crops: PhotoCrops, steps: int, z_dim: int, seed: int) -> LinearCode:
    torch.manual_seed(seed)
    model = LinearCode(z_dim, decoder)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        x = crops.batch(step, 20)
        loss = detail_weighted_mse(model(x) - x, grad_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--grad-weights", type=float, nargs="+", default=[0.0, 4.0])
    ap.add_argument("--z-dim", type=int, default=16)
    ap.add_argument("--photos", choices=tuple(COLLECTIONS), default="pypi+debian")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, heldout = photo_names("train", args.photos), photo_names("heldout", args.photos)
    sets = {f"held-out at {s}": np.stack([fitted_photo(n, s) for n in heldout]) for s in (64, 96, 128)}
    sets["training at 64"] = np.stack([fitted_photo(n, 64) for n in train])
    print(f"{len(heldout)} held-out and {len(train)} training photos; PSNR / mean CIEDE2000")
    print(f"| code | grad weight | steps | {' | '.join(sets)} | s |")
    print("|---|---:|---:|" + "---|" * len(sets) + "---:|")
    pca = linear_code(sets["training at 64"], args.z_dim)
    print(f"| pca | - | - | {' | '.join(quality(pca(v), v) for v in sets.values())} | - |", flush=True)
    crops = PhotoCrops(args.photos, size=CROP, flat=0.2, recolour=0.75, seed=args.seed)
    for decoder in ("vae-shaped", "position-free"):
        for gw in args.grad_weights:
            start = time.time()
            model = fit(decoder, gw, crops, args.steps, args.z_dim, args.seed)
            cells = " | ".join(quality(apply(model, v), v) for v in sets.values())
            print(f"| {decoder} | {gw:g} | {args.steps} | {cells} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
