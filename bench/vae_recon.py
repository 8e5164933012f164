"""Reconstruction quality of a trained VAE on held-out procedural clips (a bound on endpoint PSNR).

    python bench/vae_recon.py runs/default [--clips 16] [--weights vae-decoder]
    python bench/vae_recon.py --bundle src/segue/assets/default.safetensors [--clips 16] [--vae-run DIR]

Reads the run's preset (preset.json) and the VAE's EMA weights (vae/ema.pt, or WEIGHTS/ema.pt), encodes and decodes
held-out 17-frame clips at the first stage's size and prints PSNR per frame position and overall. With
--bundle: the bundle's VAE, on clips of the bundle's native frame count and size; with --vae-run DIR too, the
VAE weights of a VAE run folder instead (its ema.pt, or while it trains its latest checkpoint's EMA).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from segue.bundle import read_bundle_metadata, read_bundle_weights
from segue.config import ModelConfig
from segue.data.synthetic import SyntheticVideos
from segue.evaluate import psnr
from segue.models.vae import WanVAE
from segue.train.recipe import load_ema
from segue.train.trainer import latest_ema


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?")
    p.add_argument("--bundle", type=Path, default=None, help="a segue bundle instead of a run folder")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--split", default="test", choices=("val", "test"), help="val to choose, test to report")
    p.add_argument("--weights", default="vae", help="the run's folder with the VAE's ema.pt")
    p.add_argument("--vae-run", type=Path, default=None, help="with --bundle: VAE weights from this run folder")
    args = p.parse_args()
    if (args.run is None) == (args.bundle is None):
        p.error("give a run folder or --bundle FILE")
    if args.bundle is not None:
        config, _ = read_bundle_metadata(args.bundle)
        vae = WanVAE(config.vae).eval()
        if args.vae_run is None:
            vae.load_state_dict(read_bundle_weights(args.bundle)["vae"])
        else:
            step, ema = latest_ema(args.vae_run)
            vae.load_state_dict(ema["vae"])
            print(f"VAE weights: {args.vae_run} at step {step if step is not None else 'final'}")
        side = int(round(math.sqrt(config.defaults.max_area)))
        frames, size = config.defaults.frames, (side, side)
    else:
        preset = json.loads((args.run / "preset.json").read_text())
        vae = WanVAE(ModelConfig.from_dict(preset["model"]).vae).eval()
        vae.load_state_dict(load_ema(args.run / args.weights, "vae"))
        frames, size = preset["stages"][0]["frames"], tuple(preset["stages"][0]["size"])
    data = SyntheticVideos(args.split, length=args.clips, frames=frames, size=size)
    per_frame: list[list[float]] = []
    with torch.no_grad():
        for i in range(args.clips):
            video = data[i]["video"][None]  # [1, 3, F, H, W]
            rec = vae.decode(vae.encode(video, normalize=False), normalized=False)
            a = ((video[0] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 3, 0).numpy()
            b = ((rec[0] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 3, 0).numpy()
            per_frame.append([psnr(x, y) for x, y in zip(a, b)])
    arr = np.array(per_frame)
    print(f"VAE reconstruction, {args.clips} {args.split} clips of {frames} frames at {list(size)}:")
    print("| frame | " + " | ".join(str(i) for i in range(arr.shape[1])) + " |")
    print("|---|" + "---|" * arr.shape[1])
    print("| PSNR dB | " + " | ".join(f"{v:.1f}" for v in arr.mean(0)) + " |")
    print(f"mean {arr.mean():.2f} dB, first frame {arr[:, 0].mean():.2f} dB, last frame {arr[:, -1].mean():.2f} dB")


if __name__ == "__main__":
    main()
