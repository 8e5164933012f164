"""The report of a film or a clip: keyframe fidelity, seams at the joins, colour drift (valid JSON).

```
{"frames", "fps", "width", "height", "seconds", "settings", "model",
 "shots": [{"index", "frames", "reused", "seconds", "keyframes": [i, j]}],
 "keyframes": [{"index", "frame", "psnr", "delta_e"}],
 "joins": [{"frame", "seam_ratio"}],
 "drift": [per frame: CIEDE2000 between its mean colour and the nearest keyframe's]}
```

Each keyframe's PSNR and mean CIEDE2000 compare the input keyframe fitted to the output size (scaled to
cover, centre-cropped) with the output frame it lands on. A join's seam ratio is the mean absolute change
from the join frame to the next (where the film passes from one shot's frames to the next shot's) over
the median frame-to-frame change inside the shots: about 1 is seamless, much more is a visible jump.
For a loop, the join at frame 0 is the change from the last frame back to the first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..evaluate import psnr
from ..io import atomic_write_text
from ..recipe import fit_last_frame, image_to_tensor, to_uint8
from .color import delta_e, mean_color_delta_e

# PSNR of identical frames is infinite; JSON has no Infinity, so it is capped here (and said so in docs).
PSNR_CAP = 100.0


def fit_keyframe(image: Image.Image, height: int, width: int) -> np.ndarray:
    """The input keyframe fitted to the output size: uint8 [H, W, 3] (unchanged when sizes match)."""
    if image.size == (width, height):
        return np.asarray(image, dtype=np.uint8)
    return to_uint8(fit_last_frame(image_to_tensor(image), height, width)[:, None])[0]  # [H, W, 3]


def frame_steps(frames: np.ndarray) -> np.ndarray:
    """[T-1]: mean absolute change from each frame to the next, in 8-bit levels."""
    f = torch.from_numpy(np.asarray(frames)).float()
    return (f[1:] - f[:-1]).abs().mean(dim=(1, 2, 3)).numpy().astype(np.float64)


def seam_ratios(frames: np.ndarray, joins: list[int], loop: bool = False) -> list[float | None]:
    """Seam ratio of each join frame j: the step j -> j+1 (for a loop's join at 0, the last frame -> 0)."""
    steps = frame_steps(np.concatenate([frames, frames[:1]]) if loop else frames)  # a loop's last step wraps
    at = [len(steps) - 1 if loop and j == 0 else j for j in joins]
    inside = np.delete(steps, at)
    median = float(np.median(inside)) if len(inside) else 0.0
    return [_finite(float(steps[i]) / median) if median > 0 else None for i in at]


def keyframe_scores(output: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, capped at PSNR_CAP; mean CIEDE2000) of one output frame against its input keyframe."""
    return min(psnr(output, target), PSNR_CAP), delta_e(output, target)


def drift(frames: np.ndarray, keyframe_frames: list[int], targets: list[np.ndarray], loop: bool = False) -> list[float]:
    """Per frame: CIEDE2000 between its mean colour and that of the nearest keyframe (input, fitted)."""
    n = len(frames)
    places = list(keyframe_frames) + ([n] if loop else [])  # a loop's keyframe 0 also waits at the end
    refs = list(range(len(targets))) + ([0] if loop else [])
    nearest = [refs[int(np.argmin([abs(t - p) for p in places]))] for t in range(n)]
    out = np.zeros(n)
    for k, target in enumerate(targets):
        idx = [t for t in range(n) if nearest[t] == k]
        if idx:
            out[idx] = mean_color_delta_e(frames[idx], target)
    return [round(_finite(float(x)), 4) for x in out]


def build_report(
    frames: np.ndarray,
    fps: int,
    keyframes: list[Image.Image],
    keyframe_frames: list[int],
    shots: list[dict[str, Any]],
    joins: list[int],
    settings: dict[str, Any],
    model: dict[str, Any],
    seconds: float,
    loop: bool = False,
) -> dict[str, Any]:
    """The report dict of a film (a clip is a film of one shot)."""
    t, h, w, _ = frames.shape
    targets = [fit_keyframe(k, h, w) for k in keyframes]
    kf = []
    for i, (pos, target) in enumerate(zip(keyframe_frames, targets)):
        p, de = keyframe_scores(frames[pos], target)
        kf.append({"index": i, "frame": pos, "psnr": round(p, 3), "delta_e": round(de, 4)})
    ratios = seam_ratios(frames, joins, loop)
    report = {
        "frames": t, "fps": fps, "width": w, "height": h, "seconds": round(seconds, 3), "settings": settings,
        "model": model, "shots": shots, "keyframes": kf,
        "joins": [{"frame": j, "seam_ratio": None if r is None else round(r, 4)} for j, r in zip(joins, ratios)],
        "drift": drift(frames, keyframe_frames, targets, loop),
    }  # fmt: skip
    return jsonable(report)


def clip_report(pipe: Any, video: Any, first: Any, last: Any | None) -> dict[str, Any]:
    """The report of one ``Pipeline.generate`` clip: a film of one shot, no joins."""
    from ..media import load_image
    from .cache import weights_identity

    keyframes = [load_image(first, "first frame")] + ([load_image(last, "last frame")] if last is not None else [])
    t = len(video.frames)
    settings = dict(video.info.get("settings", {}))
    seconds = float(sum(video.info.get("seconds", {}).values()))
    shots = [{"index": 0, "frames": t, "reused": False, "seconds": round(seconds, 3),
              "keyframes": [0, 1 if last is not None else None]}]  # fmt: skip
    model = {"name": pipe.config.name, "source": pipe.source, "identity": weights_identity(pipe),
             "speed": list(pipe.applied)}  # fmt: skip
    return build_report(video.frames, video.fps, keyframes, [0, t - 1][: len(keyframes)], shots, [], settings, model,
                        seconds)  # fmt: skip


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def jsonable(x: Any) -> Any:
    """Plain JSON values: tuples to lists, numpy scalars to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return _finite(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as strict JSON (no NaN or Infinity), atomically."""
    dest = Path(path)
    return atomic_write_text(dest, json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
