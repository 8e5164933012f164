"""Does a trained DiT use its keyframes? x0 error per latent frame on cached training clips.

    python bench/dit_copy.py runs/default [--stage stage2-flf] [--clips 2]

For each clip (first_last conditioning, its caption and CLIP frames as in training) and noise level
sigma, the DiT's velocity gives x0_hat = x_t - sigma * v. The first latent frame is given exactly by the
conditioning latent, so a DiT that uses it has a small relative error there at every sigma; one that
ignores it has an error near 1 at high sigma. Also prints how much v changes when y is zeroed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segue.bundle import read_bundle_metadata
from segue.config import ModelConfig
from segue.models.dit import WanDiT
from segue.models.encoders import ImageEncoder, TextEncoder
from segue.tokenizer import load_tokenizer
from segue.train.flow import encode_captions, encode_clip_frames
from segue.train.latents import CachedClips, cached_clip_frames
from segue.train.recipe import load_ema


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--stage", default="stage2-flf")
    p.add_argument("--clips", type=int, default=2)
    args = p.parse_args()
    bundle = args.run / "model.safetensors"
    if bundle.is_file():
        cfg, _ = read_bundle_metadata(bundle)
    else:  # a run still training: the preset's config (the DiT does not use the latent statistics)
        cfg = ModelConfig.from_dict(json.loads((args.run / "preset.json").read_text())["model"])
    dit = WanDiT(cfg.dit).eval()
    text = TextEncoder(cfg.text, load_tokenizer(args.run / "tokenizer")).eval()
    image = ImageEncoder(cfg.image).eval()
    for name, module in (("dit", dit), ("text", text), ("image", image)):
        module.load_state_dict(load_ema(args.run / args.stage, name))
    cache = CachedClips(args.run / "latents", temporal=cfg.vae.temporal_factor)
    g = torch.Generator().manual_seed(0)
    print("| clip | sigma | x0 rel. error per latent frame | v change with y zeroed |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for i in range(args.clips):
            item = cache[i]
            x0 = item["x0"][None]  # [1, z, T, h, w]
            y = torch.cat([item["mask"]["first_last"], item["cond"]["first_last"]])[None]
            ctx = encode_captions(text, [item["caption"]], cfg.dit.text_len)
            frames = cached_clip_frames(item["frames"][None], ["first_last"], 2)
            clip = encode_clip_frames(image, frames, torch.tensor([True]))
            noise = torch.randn(x0.shape, generator=g)
            for s in (0.95, 0.7, 0.4, 0.1):
                xt = (1 - s) * x0 + s * noise
                t = torch.tensor([s * 1000.0])
                v = dit(xt, t, ctx, clip, y)
                err = ((xt - s * v - x0).pow(2).mean(dim=(1, 3, 4)) / x0.pow(2).mean(dim=(1, 3, 4))).sqrt()[0]
                v0 = dit(xt, t, ctx, clip, torch.zeros_like(y))
                change = ((v - v0).norm() / v.norm()).item()
                print(f"| {i} | {s} | {' '.join(f'{e:.2f}' for e in err.tolist())} | {change:.2f} |")


if __name__ == "__main__":
    main()
