"""A built-in-shaped VAE whose first-frame path is a fitted code: the VAE's skeleton trained in 2-D, then
set into a ``WanVAE`` exactly.

    python -m bench.vae_skeleton --steps 6000 --out skeleton.pt     # about 7 minutes on one thread

The skeleton is the VAE with every residual branch and attention at zero: its encoder's convs and strides,
the 1x1 shortcuts where the width changes, the heads' RMS norm and SiLU, its decoder's nearest upsampling
and convs. On one frame a causal conv sees only its last time tap, so the skeleton is a 2-D network,
cheap to train (``bench.vae_linear_bound``'s crops and loss: MSE plus ``--grad-weight`` times the MSE of
the error's differences between neighbouring pixels). ``embed`` then writes it into the last time tap of
the VAE's convs, zeroes the residual branches' last convs and the attention projections, sets the time
downsamplers to average each pair of frames and the time upsamplers to repeat each frame, and gives the
posterior a log-variance of -8: the VAE then decodes a still clip's every chunk as its first frame.
Prints the skeleton's and the VAE's round trip (first frame and last of a 17-frame still clip), the largest
difference between the two, and writes ``{"vae": state_dict}`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.vae_linear_bound import PhotoCrops, apply, loss_of, quality
from bench.vae_roundtrip import fitted_photo, flat_colours, round_trip
from segue.bundle import read_bundle_metadata
from segue.data.photos import photo_names
from segue.io import atomic_torch_save
from segue.loader import DEFAULT_MODEL
from segue.models.vae import NearestUpsample2x, RMSNorm, WanVAE


class Skeleton(nn.Module):
    """The built-in VAE's first-frame path without residual branches: [B, 3, H, W] -> [B, 3, H, W]."""

    def __init__(self, z_dim: int = 16) -> None:
        super().__init__()
        pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), pad, nn.Conv2d(16, 16, 3, 2), nn.Conv2d(16, 32, 1),
            pad, nn.Conv2d(32, 32, 3, 2), nn.Conv2d(32, 64, 1),
            RMSNorm(64, spatial_dims=2), nn.SiLU(), nn.Conv2d(64, z_dim, 3, padding=1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv2d(z_dim, 96, 3, padding=1), NearestUpsample2x(), nn.Conv2d(96, 48, 3, padding=1),
            NearestUpsample2x(), nn.Conv2d(48, 24, 3, padding=1),
            RMSNorm(24, spatial_dims=2), nn.SiLU(), nn.Conv2d(24, 3, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def _last_tap(conv: nn.Module, src: nn.Conv2d) -> None:
    conv.weight.zero_()
    conv.weight[:, :, -1] = src.weight
    conv.bias.copy_(src.bias)


def _eye(conv: nn.Module, taps: tuple[int, ...], value: float, repeat: int = 1) -> None:
    """``conv`` (a time conv [C*repeat, C, 3, 1, 1]): each output copy of channel c reads c at ``taps``."""
    conv.weight.zero_()
    conv.bias.zero_()
    c = conv.weight.shape[1]
    for r in range(repeat):
        for t in taps:
            conv.weight[r * c + torch.arange(c), torch.arange(c), t] = value


@torch.no_grad()
def embed(sk: Skeleton, vae: WanVAE, logvar: float = -8.0) -> None:
    """Write ``sk`` into ``vae`` (the built-in layout: dim 16, dim_mult (1, 2, 4), decoder width 24)."""
    e, d = sk.encoder, sk.decoder
    z = vae.cfg.z_dim
    for name, m in vae.named_modules():
        if name.endswith(("residual.6", ".proj")):
            m.weight.zero_()
            m.bias.zero_()
    enc, ds = vae.encoder, vae.encoder.downsamples
    _last_tap(enc.conv1, e[0])
    for i, src in ((2, e[2]), (5, e[5])):
        ds[i].resample[1].weight.copy_(src.weight)
        ds[i].resample[1].bias.copy_(src.bias)
        _eye(ds[i].time_conv, (1, 2), 0.5)  # [last of the previous pair, a, b] -> (a + b) / 2
    for i, src in ((3, e[3]), (6, e[6])):
        ds[i].shortcut.weight.copy_(src.weight[:, :, None])
        ds[i].shortcut.bias.copy_(src.bias)
    norm, _, head = enc.head
    norm.gamma.copy_(e[7].gamma[:, None])
    head.weight.zero_()
    head.weight[:z, :, -1] = e[9].weight
    head.bias[:z] = e[9].bias
    head.bias[z:] = logvar
    for conv, n in ((vae.conv1, 2 * z), (vae.conv2, z)):
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[torch.arange(n), torch.arange(n)] = 1.0
    dec, ups = vae.decoder, vae.decoder.upsamples
    _last_tap(dec.conv1, d[0])
    for i, src in ((3, d[2]), (7, d[4])):
        ups[i].resample[1].weight.copy_(src.weight)
        ups[i].resample[1].bias.copy_(src.bias)
        _eye(ups[i].time_conv, (2,), 1.0, repeat=2)  # each frame twice
    norm, _, head = dec.head
    norm.gamma.copy_(d[5].gamma[:, None])
    head.weight.zero_()
    head.weight[:, :, -1] = d[7].weight
    head.bias.copy_(d[7].bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--grad-weight", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="where the VAE's state dict goes (a new file)")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new file")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg, _ = read_bundle_metadata(DEFAULT_MODEL)
    train = photo_names("train", "pypi+debian")
    crops = PhotoCrops(train, args.seed)
    sk = Skeleton(cfg.vae.z_dim)
    opt = torch.optim.Adam(sk.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    for _ in range(args.steps):
        x = crops(16)
        loss = loss_of(sk(x), x, args.grad_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    sk.eval()
    vae = WanVAE(cfg.vae).eval()
    embed(sk, vae)
    sets = {
        "flat colours": flat_colours(5, 64),
        "held-out photos": np.stack([fitted_photo(n, 64) for n in photo_names("heldout", "pypi+debian")]),
        "training photos": np.stack([fitted_photo(n, 64) for n in train]),
    }
    x = torch.from_numpy(sets["held-out photos"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x[:, :, None], normalize=False), normalized=False, clamp=False)[:, :, 0]
        gap = (y - sk(x)).abs().max().item()
    print(f"largest difference between the skeleton and the VAE on held-out photos: {gap:.2e}")
    print(f"| {args.steps} steps, grad weight {args.grad_weight:g} | {' | '.join(sets)} |")
    print("|---|---|---|---|")
    print(f"| skeleton | {' | '.join(quality(apply(sk, v), v) for v in sets.values())} |")
    for frames in (1, 17):
        cells = " | ".join(quality(round_trip(vae, v, frames=frames), v) for v in sets.values())
        print(f"| VAE, {'first frame' if frames == 1 else 'last of a 17-frame still clip'} | {cells} |")
    atomic_torch_save(args.out, {"vae": vae.state_dict()})


if __name__ == "__main__":
    main()
