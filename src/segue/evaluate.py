"""Evaluation: does a keyframe-to-video model beat a crossfade, keep its keyframes, and follow its caption?

Conventions used throughout:
- Videos are [F, H, W, 3], uint8 or float in [0, 255] (numpy or torch); frames [H, W, 3] (or [H, W]).
- PSNR has peak 255. Over a frame range it uses the MSE pooled over the range (one signal), so one
  identical frame does not turn the score into +inf.
- SSIM is the standard Gaussian-window SSIM (11x11, sigma 1.5, K1=0.01, K2=0.03, "valid" region) on
  luminance Y = 0.299 R + 0.587 G + 0.114 B (BT.601). Frames smaller than 11 px use the largest odd
  window that fits, with sigma scaled alike. Over a range it is the mean of per-frame values.
- Object tracks are (x, y) = (column, row) in pixel-index coordinates: pixel [i, j] has centre (j, i).
- A clip is a mapping or object with ``frames``, ``caption``, ``path``, ``track``, ``object_color``, and
  optionally ``object_colors`` (the object's colour per frame as rendered, which the tracker then uses); an
  ambiguous group is a sequence of clips (or has ``clips``) sharing first/last frames, paths differing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputError
from .io import atomic_path

GenerateFn = Callable[[np.ndarray, np.ndarray, str, int], np.ndarray]

PEAK = 255.0
LUMA = np.array([0.299, 0.587, 0.114])
# Targets of the issue; reported as pass/fail, never raised.
ENDPOINT_PSNR_DB = 28.0
INBETWEEN_GAIN_DB = 3.0
CAPTION_COMPLIANCE = 0.8
# Contact sheet layout (pixels).
SHEET_GAP = 4
SHEET_LABEL_W = 72
SHEET_ROWS = ("true", "crossfade", "model")


# ---------------------------------------------------------------------------------------------
# Image metrics.


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)  # numpy, or a torch tensor


def _as_float(x: Any) -> np.ndarray:
    return _as_array(x).astype(np.float64)


def _check_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{what}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else float(10.0 * math.log10(PEAK**2 / mse))


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB between two frames (any matching shape), peak 255; +inf when identical."""
    a, b = _as_float(a), _as_float(b)
    _check_same(a, b, "psnr")
    return _psnr_from_mse(float(np.mean((a - b) ** 2)))


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ LUMA if x.ndim == 3 else x  # [H, W, 3] -> [H, W]


def _gaussian(win: int, sigma: float) -> np.ndarray:
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [H, W] with the 1-D kernel g: [H-w+1, W-w+1]."""
    w = len(g)
    x = np.lib.stride_tricks.sliding_window_view(x, w, axis=0) @ g  # [H-w+1, W]
    return np.lib.stride_tricks.sliding_window_view(x, w, axis=1) @ g  # [H-w+1, W-w+1]


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM of two frames [H, W, 3] or [H, W] on luminance (see module docstring); 1.0 when identical."""
    a, b = _as_float(a), _as_float(b)
    _check_same(a, b, "ssim")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise InputError(f"ssim: expected a frame [H, W, 3] or [H, W], got shape {tuple(a.shape)}")
    if np.array_equal(a, b):
        return 1.0
    x, y = _luma(a), _luma(b)
    win = min(11, *x.shape)
    win -= 1 - win % 2  # odd
    g = _gaussian(win, 1.5 * win / 11)
    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    vx = _filter_valid(x * x, g) - mx * mx
    vy = _filter_valid(y * y, g) - my * my
    cxy = _filter_valid(x * y, g) - mx * my
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return float(np.mean(num / den))


def _frame_range(a: np.ndarray, b: np.ndarray, start: int, stop: int | None, what: str) -> range:
    _check_same(a, b, what)
    if a.ndim != 4:
        raise InputError(f"{what}: expected videos [F, H, W, 3], got shape {tuple(a.shape)}")
    idx = range(len(a))[start:stop]
    if len(idx) == 0:
        raise InputError(f"{what}: empty frame range [{start}:{stop}] of a {len(a)}-frame video")
    return idx


def video_psnr(a: Any, b: Any, start: int = 0, stop: int | None = None) -> float:
    """PSNR over frames [start:stop] of two videos, from the MSE pooled over the range."""
    a, b = _as_float(a), _as_float(b)
    idx = _frame_range(a, b, start, stop, "video_psnr")
    return _psnr_from_mse(float(np.mean((a[idx.start : idx.stop] - b[idx.start : idx.stop]) ** 2)))


def video_ssim(a: Any, b: Any, start: int = 0, stop: int | None = None) -> float:
    """Mean per-frame SSIM over frames [start:stop] of two videos."""
    a, b = _as_float(a), _as_float(b)
    idx = _frame_range(a, b, start, stop, "video_ssim")
    return float(np.mean([ssim(a[i], b[i]) for i in idx]))


# ---------------------------------------------------------------------------------------------
# Baseline and per-clip scores.


def crossfade(first: Any, last: Any, frames: int) -> np.ndarray:
    """The linear blend baseline: frame i = (1 - t) first + t last with t = i / (frames - 1); uint8."""
    a, b = _as_float(first), _as_float(last)
    _check_same(a, b, "crossfade")
    if frames < 2:
        raise InputError(f"crossfade: frames must be >= 2, got {frames}")
    t = (np.arange(frames) / (frames - 1)).reshape(-1, *([1] * a.ndim))  # [F, 1, 1, 1]
    return np.clip(np.rint((1 - t) * a + t * b), 0, 255).astype(np.uint8)  # [F, H, W, 3]


def endpoint_fidelity(video: Any, first: Any, last: Any) -> dict[str, float]:
    """PSNR of output frame 0 vs ``first`` and of frame -1 vs ``last``."""
    v = _as_float(video)
    return {"first_psnr": psnr(v[0], first), "last_psnr": psnr(v[-1], last)}


def inbetween_accuracy(video: Any, truth: Any) -> dict[str, float]:
    """PSNR and SSIM of the middle frames 1..F-2 (the generated ones) against the true frames."""
    v, t = _as_float(video), _as_float(truth)
    if len(t) < 3:
        raise InputError(f"inbetween_accuracy: need at least 3 frames, got {len(t)}")
    return {"psnr": video_psnr(v, t, 1, -1), "ssim": video_ssim(v, t, 1, -1)}


# ---------------------------------------------------------------------------------------------
# Object tracking and path compliance.


def _frame_colors(color: Any, frames: int) -> np.ndarray:
    """One RGB colour, or one per frame, as [F, 3]."""
    c = np.asarray(color, dtype=np.float64)
    if c.shape == (3,):
        return np.broadcast_to(c, (frames, 3))
    if c.shape != (frames, 3):
        raise InputError(f"track_object: color must be one RGB triple or one per frame [{frames}, 3], "
                         f"got shape {tuple(c.shape)}")  # fmt: skip
    return c


def track_object(video: Any, color: Any, tol: float = 60.0, min_pixels: int = 1) -> np.ndarray:
    """Centroid (x, y) per frame of the pixels whose RGB Euclidean distance to ``color`` is <= ``tol``.

    ``color`` is one RGB triple or one per frame ([F, 3]: the object's colour under each frame's light).
    A plain RGB distance tolerates the small hue/brightness drift of generated frames while rejecting
    background and half-blended ghosts. Frames with fewer than ``min_pixels`` matches give NaN. [F, 2]
    """
    v = _as_array(video)
    v = v[None] if v.ndim == 3 else v
    if v.ndim != 4 or v.shape[-1] != 3:
        raise InputError(f"track_object: expected a video [F, H, W, 3], got shape {tuple(v.shape)}")
    cs = _frame_colors(color, len(v))  # [F, 3]
    mask = np.stack([np.linalg.norm(f.astype(np.float64) - c, axis=-1) <= tol for f, c in zip(v, cs)])  # [F, H, W]
    count = mask.sum(axis=(1, 2))  # [F]
    with np.errstate(invalid="ignore", divide="ignore"):  # empty frames: 0 / 0, overwritten below
        x = (mask.sum(axis=1) @ np.arange(v.shape[2])) / count  # pixel counts per column, weighted by column
        y = (mask.sum(axis=2) @ np.arange(v.shape[1])) / count
    out = np.stack([x, y], axis=-1)  # [F, 2]
    out[count < max(min_pixels, 1)] = np.nan
    return out


def _resample(track: np.ndarray, frames: int) -> np.ndarray:
    """Linear resampling of a [T, 2] track to [frames, 2] (tracks and videos may differ in length)."""
    src, dst = np.linspace(0, 1, len(track)), np.linspace(0, 1, frames)
    return np.stack([np.interp(dst, src, track[:, k]) for k in range(2)], axis=-1)


def path_distances(video: Any, candidates: Sequence[Any], color: Any, tol: float = 60.0) -> list[float]:
    """Mean distance (px) between the tracked object and each candidate track over frames 1..F-2,
    skipping frames where the object is not found; NaN for every candidate if it is never found."""
    tracked = track_object(video, color, tol)  # [F, 2]
    f = len(tracked)
    mid = slice(1, f - 1) if f >= 3 else slice(0, f)
    out = []
    for cand in candidates:
        c = _resample(np.asarray(cand, dtype=np.float64).reshape(-1, 2), f)
        d = np.linalg.norm(tracked[mid] - c[mid], axis=-1)
        d = d[~np.isnan(d)]
        out.append(float(d.mean()) if len(d) else math.nan)
    return out


def path_compliance(video: Any, candidates: Sequence[Any], color: Any, tol: float = 60.0) -> int:
    """Index of the candidate track the video's object follows most closely; -1 if it is never found."""
    return _nearest(path_distances(video, candidates, color, tol))


def _nearest(distances: Sequence[float]) -> int:
    d = np.asarray(distances, dtype=np.float64)
    return -1 if len(d) == 0 or np.all(np.isnan(d)) else int(np.nanargmin(d))


def _correct(r: Any) -> bool:
    if isinstance(r, Mapping):
        return bool(r["correct"])
    return bool(r[0] == r[1]) if isinstance(r, tuple | list) else bool(r)


def caption_compliance(results: Iterable[Any]) -> float:
    """Fraction correct. Items are bools, (predicted, expected) pairs or dicts with a ``correct`` key."""
    ok = [_correct(r) for r in results]
    return float(np.mean(ok)) if ok else math.nan


# ---------------------------------------------------------------------------------------------
# Contact sheet.


def contact_sheet(rows: Sequence[np.ndarray], labels: Sequence[str], every: int, scale: int = 1) -> np.ndarray:
    """Grid of videos [F, H, W, 3] (one per row), frames 0, k, 2k, ... (plus the last) as columns.

    Size: height = n_rows * (H * scale + GAP) + GAP, width = LABEL_W + n_cols * (W * scale + GAP) + GAP.
    """
    f, h, w = rows[0].shape[:3]
    cols = sheet_columns(f, every)
    ch, cw = h * scale, w * scale
    sheet_h = len(rows) * (ch + SHEET_GAP) + SHEET_GAP
    sheet_w = SHEET_LABEL_W + len(cols) * (cw + SHEET_GAP) + SHEET_GAP
    sheet = np.full((sheet_h, sheet_w, 3), 255, np.uint8)  # white gaps
    for r, video in enumerate(rows):
        video = np.clip(_as_float(video), 0, 255).astype(np.uint8)
        for c, i in enumerate(cols):
            if i >= len(video) or video.shape[1:3] != (h, w):
                continue  # a malformed output leaves a blank cell rather than breaking the sheet
            cell = video[i].repeat(scale, 0).repeat(scale, 1)  # nearest-neighbour upscale
            y0, x0 = SHEET_GAP + r * (ch + SHEET_GAP), SHEET_LABEL_W + SHEET_GAP + c * (cw + SHEET_GAP)
            sheet[y0 : y0 + ch, x0 : x0 + cw] = cell
    im = Image.fromarray(sheet)
    draw = ImageDraw.Draw(im)
    for r, label in enumerate(labels):
        draw.text((4, SHEET_GAP + r * (ch + SHEET_GAP) + 2), label[:12], fill=(0, 0, 0))
    return np.asarray(im)


def sheet_columns(frames: int, every: int) -> list[int]:
    """Frame indices shown in a contact sheet: every ``every``-th frame, always ending on the last."""
    cols = list(range(0, frames, max(every, 1)))
    return cols if cols[-1] == frames - 1 else [*cols, frames - 1]


# ---------------------------------------------------------------------------------------------
# Driver.


_REQUIRED = object()


def _field(clip: Any, name: str, default: Any = _REQUIRED) -> Any:
    """A clip's field, from a mapping or an object; ``default`` where given and the clip has no such field."""
    if default is _REQUIRED:
        return clip[name] if isinstance(clip, Mapping) else getattr(clip, name)
    return clip.get(name, default) if isinstance(clip, Mapping) else getattr(clip, name, default)


def object_colors(clip: Any) -> Any:
    """What the tracker looks for in a clip: the main object's colour per frame as rendered (under each
    frame's light) where the clip records it, else its one nominal colour."""
    per_frame = _field(clip, "object_colors", None)
    return _field(clip, "object_color") if per_frame is None else per_frame


def _group_clips(group: Any) -> list[Any]:
    return list(group["clips"] if isinstance(group, Mapping) else getattr(group, "clips", group))


def held_out_set(defaults: Any, clips: int, groups: int, split: str = "test") -> tuple[list[Any], list[Any]]:
    """``clips`` procedural clips and ``groups`` ambiguous groups of ``split`` at a model's native frame count and
    size (its ``GenerationDefaults``): what ``segue eval`` and ``bench/sampling_sweep.py`` score."""
    from .data.synthetic import SyntheticVideos, ambiguous_groups

    side = int(round(defaults.max_area**0.5))
    data = SyntheticVideos(split, length=clips, frames=defaults.frames, size=(side, side), ambiguous_fraction=0.0)
    return [data.clip(i) for i in range(clips)], ambiguous_groups(groups, defaults.frames, (side, side), split)


def pipeline_generate_fn(pipe: Any, **settings: Any) -> GenerateFn:
    """A ``generate_fn`` for ``evaluate_model`` from a pipeline: keyframes at their own size, ``settings``
    (steps, guidance, guidance_steps, shift, seed; None keeps the model's default) passed to ``pipe.generate``."""

    def generate(first: np.ndarray, last: np.ndarray, caption: str, frames: int) -> np.ndarray:
        h, w = first.shape[:2]
        video = pipe.generate(Image.fromarray(first), Image.fromarray(last), caption, frames=frames, size=(w, h),
                              **settings)  # fmt: skip
        return video.frames

    return generate


def _generate(generate_fn: GenerateFn, clip: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(_field(clip, "frames"))
    out = _as_array(generate_fn(truth[0], truth[-1], str(_field(clip, "caption")), len(truth)))
    if out.shape != truth.shape:
        raise InputError(f"{where}: generate_fn returned shape {out.shape}, expected {truth.shape}")
    return out, truth


def _diff(a: float, b: float) -> float:
    return 0.0 if a == b else a - b  # inf - inf is 0 here, not NaN


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


def jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan" (float() reads them back)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fmt(x: float, digits: int) -> str:
    if math.isfinite(x):
        return f"{x:.{digits}f}"
    return "exact" if x == math.inf else "n/a"  # +inf PSNR: identical frames; nan: nothing was measured


def _fmt_diff(a: float, b: float, digits: int) -> str:
    # A difference against an exact (inf) or missing (nan) score says nothing: "-inf" read like a failure.
    return f"{a - b:+.{digits}f}" if math.isfinite(a) and math.isfinite(b) else "n/a"


def _markdown(s: dict[str, Any]) -> str:
    m = s["means"]
    rows = [
        ("endpoint PSNR first (dB)", m["model_first_psnr"], m["crossfade_first_psnr"], 2),
        ("endpoint PSNR last (dB)", m["model_last_psnr"], m["crossfade_last_psnr"], 2),
        ("in-between PSNR (dB)", m["model_psnr"], m["crossfade_psnr"], 2),
        ("in-between SSIM", m["model_ssim"], m["crossfade_ssim"], 4),
        ("caption compliance", m["model_compliance"], m["crossfade_compliance"], 3),
    ]
    lines = [f"# Evaluation ({s['n_clips']} clips, {s['n_groups']} ambiguous groups)", ""]
    lines += ["| metric | model | crossfade | difference |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {_fmt(a, d)} | {_fmt(b, d)} | {_fmt_diff(a, b, d)} |" for n, a, b, d in rows]
    lines += ["", "| target | value | threshold | result |", "|---|---:|---:|---|"]
    for name, t in s["thresholds"].items():
        verdict = "pass" if t["pass"] else "FAIL"
        lines.append(f"| {name} | {_fmt(t['value'], 3)} | {t['op']} {t['target']} | {verdict} |")
    return "\n".join(lines) + "\n"


def evaluate_model(
    generate_fn: GenerateFn,
    clips: Sequence[Any],
    groups: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    tol: float = 60.0,
    sheet_clips: int = 3,
    sheet_every: int | None = None,
    sheet_scale: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Score ``generate_fn(first, last, caption, frames) -> video`` on held-out clips and ambiguous groups.

    Writes out_dir/eval.json (every number), eval.md (model vs crossfade table, targets) and
    contact_sheet.png (true / crossfade / model rows for the first ``sheet_clips`` clips), each
    atomically, and returns the summary written to eval.json (with real floats, inf included).
    ``sheet_every`` defaults to about 8 columns; ``sheet_scale`` to an upscale making cells >= 96 px.
    """
    out = Path(out_dir)

    def say(msg: str) -> None:
        if verbose:
            print(f"[eval] {msg}", file=sys.stderr, flush=True)

    per_clip, sheet_rows, sheet_labels = [], [], []
    for n, clip in enumerate(clips):
        video, truth = _generate(generate_fn, clip, f"clip {n}")
        base = crossfade(truth[0], truth[-1], len(truth))
        rec = {
            "index": n,
            "caption": str(_field(clip, "caption")),
            "frames": len(truth),
            "model_endpoint": endpoint_fidelity(video, truth[0], truth[-1]),
            "crossfade_endpoint": endpoint_fidelity(base, truth[0], truth[-1]),
            "model": inbetween_accuracy(video, truth),
            "crossfade": inbetween_accuracy(base, truth),
        }
        rec["psnr_gain_db"] = _diff(rec["model"]["psnr"], rec["crossfade"]["psnr"])
        per_clip.append(rec)
        if n < sheet_clips:
            sheet_rows += [truth, base, video]
            sheet_labels += [f"{n} {name}" for name in SHEET_ROWS]
        ends, mid = rec["model_endpoint"], (rec["model"]["psnr"], rec["crossfade"]["psnr"])
        say(
            f"clip {n + 1}/{len(clips)}: in-between {mid[0]:.2f} dB (crossfade {mid[1]:.2f}), "
            f"endpoints {ends['first_psnr']:.2f}/{ends['last_psnr']:.2f} dB"
        )

    per_group = []
    for g, group in enumerate(groups):
        members = _group_clips(group)
        tracks = [np.asarray(_field(c, "track"), dtype=np.float64) for c in members]
        results = []
        for k, clip in enumerate(members):
            video, truth = _generate(generate_fn, clip, f"group {g} caption {k}")
            color = object_colors(clip)
            base = crossfade(truth[0], truth[-1], len(truth))
            rec: dict[str, Any] = {"caption": str(_field(clip, "caption")), "path": str(_field(clip, "path"))}
            rec["expected"] = k
            for who, v in (("model", video), ("crossfade", base)):
                rec[f"{who}_distances"] = path_distances(v, tracks, color, tol)
                rec[f"{who}_predicted"] = _nearest(rec[f"{who}_distances"])
                rec[f"{who}_correct"] = rec[f"{who}_predicted"] == k
            results.append(rec)
        per_group.append({"index": g, "results": results})
        say(f"group {g + 1}/{len(groups)}: {sum(r['model_correct'] for r in results)}/{len(results)} captions followed")

    all_results = [r for grp in per_group for r in grp["results"]]

    def mean_of(key: str, sub: str) -> float:
        return _mean([c[key][sub] for c in per_clip])

    means: dict[str, float] = {}
    for who in ("model", "crossfade"):
        means[f"{who}_first_psnr"] = mean_of(f"{who}_endpoint", "first_psnr")
        means[f"{who}_last_psnr"] = mean_of(f"{who}_endpoint", "last_psnr")
        means[f"{who}_psnr"] = mean_of(who, "psnr")
        means[f"{who}_ssim"] = mean_of(who, "ssim")
        means[f"{who}_compliance"] = caption_compliance([r[f"{who}_correct"] for r in all_results])
    means["model_endpoint_psnr"] = _mean([means["model_first_psnr"], means["model_last_psnr"]])
    means["psnr_gain_db"] = _diff(means["model_psnr"], means["crossfade_psnr"])
    # NaN (nothing to measure) compares False, so an empty evaluation never passes.
    thresholds = {
        "endpoint PSNR (dB)": (means["model_endpoint_psnr"], ">=", ENDPOINT_PSNR_DB),
        "in-between gain over crossfade (dB)": (means["psnr_gain_db"], ">=", INBETWEEN_GAIN_DB),
        "caption compliance": (means["model_compliance"], ">=", CAPTION_COMPLIANCE),
    }
    summary: dict[str, Any] = {
        "n_clips": len(per_clip),
        "n_groups": len(per_group),
        "means": means,
        "thresholds": {
            k: {"value": v, "op": op, "target": t, "pass": bool(v >= t)} for k, (v, op, t) in thresholds.items()
        },
        "clips": per_clip,
        "groups": per_group,
    }
    summary["pass"] = all(t["pass"] for t in summary["thresholds"].values())

    _write_text(out / "eval.json", json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    _write_text(out / "eval.md", _markdown(summary))
    if sheet_rows:
        f, h, w = sheet_rows[0].shape[:3]
        every = sheet_every or max(1, math.ceil((f - 1) / 7))
        scale = sheet_scale or max(1, math.ceil(96 / h))
        sheet = contact_sheet(sheet_rows, sheet_labels, every, scale)
        with atomic_path(out / "contact_sheet.png") as tmp:
            Image.fromarray(sheet).save(tmp, format="PNG")
    say(
        f"done: in-between gain {means['psnr_gain_db']:.2f} dB, compliance {means['model_compliance']:.2f}, "
        f"{'pass' if summary['pass'] else 'fail'}; wrote {out}"
    )
    return summary
