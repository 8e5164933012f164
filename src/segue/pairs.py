"""Keyframe fidelity on folders of keyframe pairs: ``segue eval --pairs DIR``.

A pairs folder holds one folder per pair: ``NAME/first.png``, ``NAME/last.png`` and ``NAME/prompt.txt``.
Each pair is generated with a model (or, where ``NAME/frames/`` holds a video's PNG frames such as
``segue generate --frames-dir`` writes, that video is scored as it is: a user's own output), and its first
and last frames are scored against the keyframes as the pipeline fitted them to the video's size: PSNR
and mean CIEDE2000 (a colour cast shows in ΔE where PSNR hides it). Where ``NAME/truth/`` holds the true
clip's PNG frames at the video's size and length (the held-out pairs do), the in-between frames are scored
against them beside a crossfade of the keyframes: a video that stays on the path between its keyframes
beats the crossfade; textures neither keyframe has fall below it. Results: ``pairs.json``, ``pairs.md``
and ``pairs_sheet.png`` (per pair: the fitted first keyframe, every 4th frame of the video and its last, the
fitted last keyframe).

``make_heldout_pairs`` writes the held-out pairs the built-in model is scored on: photo pairs from the
held-out photos (camera moves, lighting, a morph between two of them) and simple scenes (a saturated disc
over a flat sky), all a function of the seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .colordiff import delta_e
from .data.broad import render_broad, shape_mask
from .data.photos import photo_names
from .errors import InputError
from .evaluate import contact_sheet, crossfade, inbetween_accuracy, psnr, sheet_columns
from .media import atomic_path, load_image
from .recipe import conditioning_video, fit_last_frame, image_to_tensor

PAIR_FILES = ("first.png", "last.png", "prompt.txt")
PHOTO_KINDS = ("camera", "light", "morph")
SKIES = {
    "blue": (40, 90, 200), "dark blue": (20, 30, 90), "light blue": (150, 200, 240), "grey": (128, 128, 128),
    "white": (245, 245, 245), "black": (10, 10, 10), "green": (60, 140, 60), "orange": (230, 140, 40),
}  # fmt: skip
DISCS = {
    "red": (225, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 230), "yellow": (240, 220, 20),
    "purple": (150, 30, 200), "cyan": (20, 210, 220), "orange": (250, 130, 10), "pink": (250, 110, 180),
}  # fmt: skip
HELDOUT_SEED = 0x9A125


@dataclass(frozen=True)
class Pair:
    name: str
    first: Path
    last: Path
    prompt: str
    frames: Path | None  # a video's PNG frames to score as they are; None: generate one
    truth: Path | None = None  # the true clip's PNG frames, for the in-between frames' scores


def read_pairs(root: str | Path) -> list[Pair]:
    """The pairs of folder ``root`` in name order; a missing file or an empty folder is an InputError."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--pairs: {root} is not a folder")
    pairs = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if not d.resolve().is_relative_to(root.resolve()):
            raise InputError(f"--pairs: {d} points outside {root}")
        missing = [f for f in PAIR_FILES if not (d / f).is_file()]
        if missing:
            raise InputError(f"--pairs: {d} lacks {', '.join(missing)} (a pair needs {', '.join(PAIR_FILES)})")
        frames, truth = d / "frames", d / "truth"
        pairs.append(Pair(d.name, d / "first.png", d / "last.png", (d / "prompt.txt").read_text("utf-8").strip(),
                          frames if frames.is_dir() else None, truth if truth.is_dir() else None))  # fmt: skip
    if not pairs:
        raise InputError(f"--pairs: {root} has no pair folders (NAME/{', NAME/'.join(PAIR_FILES)})")
    return pairs


def read_frames(folder: Path) -> np.ndarray:
    """The PNG frames of ``folder`` in name order: uint8 [F, H, W, 3]."""
    files = sorted(folder.glob("*.png"))
    if len(files) < 2:
        raise InputError(f"{folder}: a video needs at least 2 PNG frames, found {len(files)}")
    frames = [np.asarray(load_image(f, "frame")) for f in files]
    if len({f.shape for f in frames}) != 1:
        raise InputError(f"{folder}: frames of different sizes")
    return np.stack(frames)


def fitted_keyframes(first: Image.Image, last: Image.Image, height: int, width: int) -> np.ndarray:
    """The keyframes as the pipeline fits them to a video of (height, width): uint8 [2, H, W, 3]."""
    first_t = image_to_tensor(first)
    last_t = fit_last_frame(image_to_tensor(last), *first_t.shape[1:])
    cond = conditioning_video(first_t, last_t, 2, height, width)  # [3, 2, H, W] in [-1, 1]
    return ((cond.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


GenerateFn = Callable[[Image.Image, Image.Image, str], np.ndarray]


def score_pairs(pairs: list[Pair], generate: GenerateFn | None, out: str | Path, every: int = 4) -> dict:
    """Score every pair (generated with ``generate(first, last, prompt) -> uint8 [F, H, W, 3]``, or its own
    ``frames``) into ``out``: per pair and mean endpoint PSNR and ΔE; returns the summary written to pairs.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, labels, results = [], [], []
    for p in pairs:
        first, last = load_image(p.first, f"{p.name}/first.png"), load_image(p.last, f"{p.name}/last.png")
        if p.frames is not None:
            video = read_frames(p.frames)
        elif generate is None:
            raise InputError(f"--pairs: {p.name} has no frames/ folder and no model generates one")
        else:
            video = np.asarray(generate(first, last, p.prompt))
        keys = fitted_keyframes(first, last, video.shape[1], video.shape[2])
        r = {"name": p.name, "source": "frames" if p.frames is not None else "generated",
             "first_psnr": psnr(video[0], keys[0]), "last_psnr": psnr(video[-1], keys[1]),
             "first_delta_e": delta_e(video[0], keys[0]), "last_delta_e": delta_e(video[-1], keys[1])}  # fmt: skip
        if p.truth is not None:
            r.update(inbetween_scores(video, keys, read_frames(p.truth)))
        results.append(r)
        shown = video[sheet_columns(len(video), every)]  # frames 0, every, ..., the last
        rows.append(np.concatenate([keys[:1], shown, keys[1:]]))
        labels.append(p.name)
    means = {k: float(np.mean([min(r[k], 100.0) for r in results])) for k in results[0] if k in ENDPOINT_KEYS}
    scored = [r for r in results if "inbetween_psnr" in r]  # pairs with a true clip of the video's shape
    if scored:
        means.update({k: float(np.mean([r[k] for r in scored])) for k in INBETWEEN_KEYS})
        means["inbetween_pairs"] = len(scored)
    means["endpoint_psnr"] = (means["first_psnr"] + means["last_psnr"]) / 2
    means["endpoint_delta_e"] = (means["first_delta_e"] + means["last_delta_e"]) / 2
    summary = {"pairs": results, "means": means}
    with atomic_path(out / "pairs.json") as tmp:
        tmp.write_text(json.dumps(_finite(summary), indent=2), encoding="utf-8")
    with atomic_path(out / "pairs.md") as tmp:
        tmp.write_text(_markdown(summary), encoding="utf-8")
    if len({r.shape[1:] for r in rows}) == 1:
        sheet = contact_sheet(rows, labels, every=1, scale=2)
        with atomic_path(out / "pairs_sheet.png") as tmp:
            Image.fromarray(sheet).save(tmp, format="PNG")
    return summary


ENDPOINT_KEYS = ("first_psnr", "last_psnr", "first_delta_e", "last_delta_e")
INBETWEEN_KEYS = ("inbetween_psnr", "crossfade_psnr", "inbetween_gain")


def inbetween_scores(video: np.ndarray, keys: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The in-between frames' PSNR against the ``truth`` [F, H, W, 3], a crossfade of the fitted ``keys``'
    against it, and the gain; empty when the truth's shape is not the video's (another size or length)."""
    if truth.shape != video.shape or len(video) < 3:
        return {}
    model = inbetween_accuracy(video, truth)["psnr"]
    fade = inbetween_accuracy(crossfade(keys[0], keys[1], len(video)), truth)["psnr"]
    return {"inbetween_psnr": model, "crossfade_psnr": fade, "inbetween_gain": model - fade}


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


def _markdown(s: dict) -> str:
    lines = ["| pair | first PSNR | last PSNR | first ΔE | last ΔE | in-between PSNR | crossfade PSNR | gain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def cells(r: dict) -> str:
        ends = " | ".join(f"{r[k]:.2f}" for k in ENDPOINT_KEYS)
        between = " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in INBETWEEN_KEYS)
        return f"{ends} | {between}"

    lines += [f"| {r['name']} | {cells(r)} |" for r in s["pairs"]]
    m = s["means"]
    lines.append(f"| **mean** | {cells(m)} |")
    lines.append(f"\nendpoints: {m['endpoint_psnr']:.2f} dB, ΔE {m['endpoint_delta_e']:.2f}")
    if "inbetween_pairs" in m:
        lines.append(f"in-between ({m['inbetween_pairs']} pairs with their true clip): {m['inbetween_psnr']:.2f} dB, "
                     f"{m['inbetween_gain']:+.2f} dB over a crossfade")  # fmt: skip
    return "\n".join(lines) + "\n"


def simple_scene(seed: int, frames: int = 17, size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, str]:
    """A saturated disc crossing a flat sky: uint8 [F, H, W, 3] and its caption."""
    rng = np.random.default_rng([HELDOUT_SEED, seed, 1])
    h, w = size
    disc = list(DISCS)[int(rng.integers(len(DISCS)))]
    sky = list(SKIES)[int(rng.integers(len(SKIES)))]
    r = rng.uniform(0.12, 0.2) * min(h, w)
    y = rng.uniform(r + 2, h - r - 2)
    x0, x1 = (r + 2, w - r - 2) if rng.random() < 0.5 else (w - r - 2, r + 2)
    t = np.linspace(0, 1, frames)
    bg = np.array(SKIES[sky], dtype=np.float64)
    out = []
    for k in range(frames):
        m = shape_mask("circle", size, x0 + (x1 - x0) * t[k], y, r, 0.0)[..., None]
        out.append(bg * (1 - m) + np.array(DISCS[disc]) * m)
    video = np.clip(np.stack(out), 0, 255).round().astype(np.uint8)
    return video, f"the {disc} circle moves to the {'right' if x1 > x0 else 'left'}"


def make_heldout_pairs(root: str | Path, photos: int = 6, scenes: int = 6, seed: int = 0,
                       size: tuple[int, int] = (64, 64), frames: int = 17) -> list[str]:  # fmt: skip
    """Write ``photos`` photo pairs (held-out photos only) and ``scenes`` simple scenes into ``root`` as a pairs
    folder (the first and last frames of each clip, its caption, its frames in ``truth/``); returns the names.
    A function of ``seed``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = photo_names("heldout")
    made = []
    for i in range(photos):
        kind = PHOTO_KINDS[i % len(PHOTO_KINDS)]
        clip_seed = int(np.random.default_rng([HELDOUT_SEED, seed, i, 2]).integers(1 << 62))
        video, caption = render_broad(clip_seed, kind, names, frames, size)
        made.append(_write_pair(root / f"photo-{i:02d}-{kind}", video, caption))
    for i in range(scenes):
        video, caption = simple_scene(seed * 1000 + i, frames, size)
        made.append(_write_pair(root / f"scene-{i:02d}", video, caption))
    return made


def _write_pair(d: Path, video: np.ndarray, caption: str) -> str:
    """The pair's keyframes, caption and the true clip's frames (``truth/``) into folder ``d``."""
    (d / "truth").mkdir(parents=True, exist_ok=True)
    frames = [("first.png", video[0]), ("last.png", video[-1])]
    frames += [(f"truth/{i:05d}.png", frame) for i, frame in enumerate(video)]
    for name, frame in frames:
        with atomic_path(d / name) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
    with atomic_path(d / "prompt.txt") as tmp:
        tmp.write_text(caption + "\n", encoding="utf-8")
    return d.name
