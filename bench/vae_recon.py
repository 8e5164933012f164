"""Reconstruction quality of a trained VAE on held-out procedural clips (a bound on endpoint PSNR).

    python bench/vae_recon.py runs/default [--clips 16] [--weights vae-decoder]

Reads the run's preset (preset.json) and the VAE's EMA weights (vae/ema.pt, or WEIGHTS/ema.pt), encodes and decodes
held-out 17-frame clips at the first stage's size and prints PSNR per frame position and overall.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from segue.config import ModelConfig
from segue.data.synthetic import SyntheticVideos
from segue.evaluate import psnr
from segue.models.vae import WanVAE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--weights", default="vae", help="the run's folder with the VAE's ema.pt")
    args = p.parse_args()
    preset = json.loads((args.run / "preset.json").read_text())
    vae = WanVAE(ModelConfig.from_dict(preset["model"]).vae).eval()
    vae.load_state_dict(torch.load(args.run / args.weights / "ema.pt", map_location="cpu", weights_only=True)["vae"])
    stage = preset["stages"][0]
    data = SyntheticVideos("test", length=args.clips, frames=stage["frames"], size=tuple(stage["size"]))
    per_frame: list[list[float]] = []
    with torch.no_grad():
        for i in range(args.clips):
            video = data[i]["video"][None]  # [1, 3, F, H, W]
            rec = vae.decode(vae.encode(video, normalize=False), normalized=False)
            a = ((video[0] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 3, 0).numpy()
            b = ((rec[0] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 3, 0).numpy()
            per_frame.append([psnr(x, y) for x, y in zip(a, b)])
    arr = np.array(per_frame)
    print(f"VAE reconstruction, {args.clips} held-out clips of {stage['frames']} frames at {stage['size']}:")
    print("| frame | " + " | ".join(str(i) for i in range(arr.shape[1])) + " |")
    print("|---|" + "---|" * arr.shape[1])
    print("| PSNR dB | " + " | ".join(f"{v:.1f}" for v in arr.mean(0)) + " |")
    print(f"mean {arr.mean():.2f} dB, first frame {arr[:, 0].mean():.2f} dB, last frame {arr[:, -1].mean():.2f} dB")


if __name__ == "__main__":
    main()
