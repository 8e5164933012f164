"""The README's example (examples/clip19-*.png, a black dotted triangle) through bundles: endpoint PSNR and
ΔE against the keyframes as the pipeline fits them, and the mean RGB of the triangle's pixels (the dark
pixels of the fitted keyframe) in the first and last frames beside the keyframe's own.

    python bench/readme_example.py A.safetensors [B.safetensors ...] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segue.colordiff import delta_e
from segue.evaluate import psnr
from segue.loader import load
from segue.pairs import fitted_keyframes

ROOT = Path(__file__).resolve().parent.parent
FIRST, LAST = ROOT / "examples" / "clip19-first.png", ROOT / "examples" / "clip19-last.png"
PROMPT = "the black dotted triangle moves to the right in an arc over the top turning slowly while day turns into dusk"
DARK = 150  # a fitted keyframe's pixel with r + g + b below this is the triangle's


def rgb(x: np.ndarray) -> str:
    return "(" + ", ".join(str(int(round(v))) for v in x) + ")"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    first, last = Image.open(FIRST).convert("RGB"), Image.open(LAST).convert("RGB")
    print("| bundle | seed | first PSNR / ΔE | last PSNR / ΔE | triangle RGB: first frame (key) | last frame (key) |")
    print("|---|---:|---|---|---|---|")
    for path in args.bundles:
        pipe = load(path)
        for seed in (int(s) for s in args.seeds.split(",")):
            video = pipe.generate(first, last, PROMPT, seed=seed).frames  # [F, H, W, 3]
            keys = fitted_keyframes(first, last, video.shape[1], video.shape[2])
            cells = []
            for frame, key in ((video[0], keys[0]), (video[-1], keys[1])):
                m = key.astype(int).sum(-1) < DARK
                cells.append(f"{rgb(frame[m].mean(0))} ({rgb(key[m].mean(0))})")
            print(f"| {path.name} | {seed} | {psnr(video[0], keys[0]):.2f} / {delta_e(video[0], keys[0]):.2f} | "
                  f"{psnr(video[-1], keys[1]):.2f} / {delta_e(video[-1], keys[1]):.2f} | {cells[0]} | {cells[1]} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
