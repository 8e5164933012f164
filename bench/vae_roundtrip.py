"""The VAE's round trip of bundles at the native size: flat colour fields over the RGB gamut (black and white
included) and the photos of each split, as PSNR and mean CIEDE2000 (a colour cast shows in ΔE).

    python bench/vae_roundtrip.py A.safetensors [B.safetensors ...] [--levels 5] [--size 64]
    python bench/vae_roundtrip.py runs/broad/broad/vae [--base BUNDLE]   # a VAE run while it trains
    python bench/vae_roundtrip.py A.safetensors --linear 16              # beside a linear code of 4x4 patches
    python bench/vae_roundtrip.py A.safetensors --frames 17              # and the last frame of still clips
    python bench/vae_roundtrip.py A.safetensors --moving 16              # and moving clips, frame by frame

A folder is a VAE phase's run folder: its final or latest checkpoint's EMA weights, on the VAE config of
``--base`` (the built-in model by default); a ``.pt`` file a saved ``{"vae": state_dict}`` on that config.

Flat colours: every (r, g, b) on a grid of ``--levels`` values per channel from 0 to 255, as one still frame
of --size pixels (the path a first keyframe takes). Photos: each photo's centre square fitted to --size
(Lanczos), one frame; ``heldout`` photos are never drawn for training (segue.data.photos). ``--frames N``
adds rows for the last frame of each image held still for N frames (the causal chunk path a last keyframe
takes). ``--moving N``: N moving clips of 17 frames of the synthetic test split and N broad clips of the
held-out photos, scored at their first, in-between and last frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segue.bundle import read_bundle_metadata, read_bundle_weights
from segue.colordiff import delta_e
from segue.data.broad import BroadVideos
from segue.data.photos import COLLECTIONS, load_photo, photo_names
from segue.data.synthetic import SyntheticVideos
from segue.evaluate import psnr
from segue.loader import DEFAULT_MODEL
from segue.models.vae import WanVAE
from segue.train.checkpoints import latest_ema

PSNR_CAP = 60.0  # an exact round trip counts as 60 dB in the means


def load_vae(path: Path, base: Path = DEFAULT_MODEL) -> tuple[str, WanVAE]:
    """(a name for the table, the VAE) of a bundle, of a VAE run folder or of a saved ``{"vae": state_dict}``
    (``.pt``, as ``bench.vae_skeleton --out`` writes) on ``base``'s config."""
    cfg, _ = read_bundle_metadata(base if path.is_dir() or path.suffix == ".pt" else path)
    vae = WanVAE(cfg.vae)
    if path.suffix == ".pt":
        vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["vae"])
        return path.name, vae.eval()
    if path.is_dir():
        step, ema = latest_ema(path)
        vae.load_state_dict(ema["vae"])
        return f"{path} (EMA, {'final' if step is None else f'step {step}'})", vae.eval()
    vae.load_state_dict(read_bundle_weights(path)["vae"])
    return path.name, vae.eval()


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """Images or videos [N, 3, ...] in [-1, 1] as rounded 8-bit values, channels last: uint8 [N, ..., 3]."""
    return ((x + 1) * 127.5).round().clamp(0, 255).byte().movedim(1, -1).numpy()


@torch.no_grad()
def round_trip(vae: WanVAE, images: np.ndarray, batch: int = 16, frames: int = 1) -> np.ndarray:
    """decode(encode(x)) of uint8 images [N, H, W, 3], each a still clip of ``frames`` (1: the first-frame
    path), its last frame: uint8 [N, H, W, 3]."""
    outs = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s : s + batch]).permute(0, 3, 1, 2)[:, :, None].float() / 127.5 - 1
        x = x.expand(-1, -1, frames, -1, -1)  # [b, 3, frames, H, W]
        y = vae.decode(vae.encode(x, normalize=False), normalized=False)  # [b, 3, frames, H, W]
        outs.append(as_uint8(y[:, :, -1]))
    return np.concatenate(outs)


def flat_colours(levels: int, size: int) -> np.ndarray:
    lv = np.linspace(0, 255, levels).round()
    cols = np.array([[r, g, b] for r in lv for g in lv for b in lv], dtype=np.uint8)
    return np.broadcast_to(cols[:, None, None], (len(cols), size, size, 3)).copy()


def fitted_photo(name: str, size: int) -> np.ndarray:
    img = load_photo(name)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = Image.fromarray(np.ascontiguousarray(img[top : top + s, left : left + s]))
    return np.asarray(sq.resize((size, size), Image.Resampling.LANCZOS))


def scores(vae: WanVAE, images: np.ndarray) -> tuple[float, float, float]:
    """(mean PSNR capped at PSNR_CAP, min PSNR, mean ΔE) of the round trip of ``images``."""
    return quality(round_trip(vae, images), images)


def quality(out: np.ndarray, images: np.ndarray) -> tuple[float, float, float]:
    """(mean PSNR capped at PSNR_CAP, min PSNR, mean ΔE) of ``out`` against ``images``, uint8 [N, H, W, 3]."""
    ps = [psnr(a, b) for a, b in zip(out, images)]
    return (
        float(np.mean(np.minimum(ps, PSNR_CAP))),
        float(np.min(ps)),
        float(np.mean([delta_e(a, b) for a, b in zip(out, images)])),
    )


def moving_clips(n: int, size: int, photos: str) -> dict[str, torch.Tensor]:
    """``n`` moving 17-frame clips [n, 3, 17, size, size] of the synthetic test split and of broad clips of the
    held-out photos, by name."""
    synthetic = SyntheticVideos("test", length=n, frames=17, size=(size, size))
    broad = BroadVideos("heldout", length=n, frames=17, size=(size, size), photos=photos)
    return {name: torch.stack([d[i]["video"] for i in range(n)]) for name, d in
            (("moving synthetic test clips", synthetic), ("moving broad held-out clips", broad))}  # fmt: skip


@torch.no_grad()
def moving_scores(vae: WanVAE, clips: torch.Tensor, batch: int = 8) -> tuple[float, float, float]:
    """Mean PSNR of the round trip of ``clips`` [N, 3, F, H, W] at their first frame, their in-between frames
    and their last frame (8-bit frames; the last keyframe is decoded through the causal chunk path)."""
    per_frame = []  # [N, F]
    for s in range(0, len(clips), batch):
        x = clips[s : s + batch]
        y = vae.decode(vae.encode(x, normalize=False), normalized=False)
        a, b = as_uint8(y), as_uint8(x)
        per_frame += [[min(psnr(fa, fb), PSNR_CAP) for fa, fb in zip(ca, cb)] for ca, cb in zip(a, b)]
    ps = np.array(per_frame)
    return float(ps[:, 0].mean()), float(ps[:, 1:-1].mean()), float(ps[:, -1].mean())


def linear_code(train: np.ndarray, components: int, patch: int = 4):
    """A linear code of ``patch`` x ``patch`` RGB patches with ``components`` values each (PCA fitted on the
    images ``train`` [N, H, W, 3]): a baseline for the first-frame path, which keeps z_dim values per patch.
    Returns the round trip, uint8 [N, H, W, 3] -> uint8 [N, H, W, 3]."""

    def patches(images: np.ndarray) -> np.ndarray:
        n, h, w, c = images.shape
        grid = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
        return grid.reshape(-1, patch * patch * c).astype(np.float64)

    x = patches(train)
    mean = x.mean(0)
    basis = np.linalg.svd(x - mean, full_matrices=False)[2][:components]  # [K, patch*patch*3]

    def round_trip(images: np.ndarray) -> np.ndarray:
        n, h, w, c = images.shape
        y = (patches(images) - mean) @ basis.T @ basis + mean
        y = y.reshape(n, h // patch, w // patch, patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
        return np.clip(y, 0, 255).round().astype(np.uint8)

    return round_trip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="bundles, or VAE run folders")
    ap.add_argument("--base", type=Path, default=DEFAULT_MODEL, help="the bundle whose VAE config a run folder uses")
    ap.add_argument("--levels", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--linear", type=int, metavar="K", help="also a linear code of 4x4 patches with K values, fitted "
                    "on the training photos (z_dim values: the first-frame path's budget)")  # fmt: skip
    ap.add_argument("--frames", type=int, metavar="N", help="also the last frame of N-frame still clips (N = 4k+1)")
    ap.add_argument("--photos", choices=tuple(COLLECTIONS), default="pypi",
                    help="the photo collections scored (pypi+debian: the Debian packages' photos too)")  # fmt: skip
    ap.add_argument("--moving", type=int, metavar="N", help="also N moving 17-frame clips of the synthetic test "
                    "split and N of held-out broad clips: first, in-between and last frames' PSNR")  # fmt: skip
    args = ap.parse_args()
    if args.frames is not None and (args.frames < 1 or args.frames % 4 != 1):
        ap.error(f"--frames must be 4k+1 (1, 5, 9, 17, ...), got {args.frames}")
    torch.set_num_threads(1)
    sets = {f"flat colours ({args.levels}^3)": flat_colours(args.levels, args.size)}
    tag = "" if args.photos == "pypi" else f" ({args.photos})"
    for split in ("heldout", "train"):
        names = photo_names(split, args.photos)
        sets[f"{split} photos{tag}"] = np.stack([fitted_photo(n, args.size) for n in names])
    moving = moving_clips(args.moving, args.size, args.photos) if args.moving else {}
    print("| bundle | images | PSNR mean | PSNR min | ΔE mean |")
    print("|---|---|---:|---:|---:|")
    if args.linear:
        code = linear_code(sets[f"train photos{tag}"], args.linear)
        for name, images in sets.items():
            mean, low, de = quality(code(images), images)
            print(f"| linear code, {args.linear} per 4x4 patch | {name} | {mean:.2f} | {low:.2f} | {de:.2f} |")
    for path in args.models:
        label, vae = load_vae(path, args.base)
        for name, images in sets.items():
            mean, low, de = scores(vae, images)
            print(f"| {label} | {name} | {mean:.2f} | {low:.2f} | {de:.2f} |", flush=True)
            if args.frames:
                mean, low, de = quality(round_trip(vae, images, frames=args.frames), images)
                print(f"| {label} | {name}, last of {args.frames} | {mean:.2f} | {low:.2f} | {de:.2f} |", flush=True)
        for name, clips in moving.items():
            first, mid, last = moving_scores(vae, clips)
            print(f"| {label} | {name}: first / in-between / last frames | {first:.2f} / {mid:.2f} / {last:.2f} | "
                  "- | - |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
