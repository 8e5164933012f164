"""One job on a loaded pipeline: a clip through ``Pipeline.generate`` or a storyboard through ``Pipeline.story``,
then its outputs written into the attempt's own folder, each file under a temporary name renamed when whole.

Outputs: ``video.mp4``, ``thumbnail.png`` (the middle frame), ``frames.zip`` (every frame as PNG, stored
uncompressed: PNG already is) and ``report.json`` (the storyboard report: keyframe PSNR and CIEDE2000, seams,
drift). ``Progress`` turns the pipeline's ``progress(step, total)`` into queue writes: step, percent, ETA, the
shot being rendered, and the seconds of the sampling steps alone (for the seconds-per-step metric).
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_path
from ..media import load_image
from ..pipeline import Pipeline
from ..story.color import color_match
from ..story.film import plan_story
from ..story.report import clip_report, fit_keyframe, write_report
from ..story.schema import load_story
from .jobs import REPORT_FILE, Job, JobFiles, progress_percent


class JobLost(Exception):
    """The job is no longer this worker's (cancelled, deleted, or re-claimed after its lease expired)."""


class Progress:
    """The pipeline's progress callback for one job: writes each step to the queue through ``write`` (which
    says whether the job is still held) and raises JobLost, stopping the run at that step, when it is not."""

    def __init__(self, write: Callable[[int, int, int, float | None, int | None], bool], lost: Any,
                 shot_steps: list[int] | None = None, min_interval: float = 0.05) -> None:  # fmt: skip
        self.write, self.lost = write, lost
        self.bounds = np.cumsum(shot_steps).tolist() if shot_steps else None
        self.min_interval = min_interval
        self.start: float | None = None
        self.last_step, self.last_time, self.last_write = -1, 0.0, 0.0
        self.sampling_s, self.sampled = 0.0, 0  # time and count of single sampling steps

    def shot(self, step: int, total: int) -> int | None:
        if self.bounds is None:
            return None
        return next((i for i, b in enumerate(self.bounds) if step < b), len(self.bounds) - 1)

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        if self.last_step >= 0 and step == self.last_step + 1:
            self.sampling_s += now - self.last_time
            self.sampled += 1
        self.last_step, self.last_time = step, now
        if self.lost.is_set():
            raise JobLost
        if now - self.last_write < self.min_interval and 0 < step < total:
            return
        self.last_write = now
        eta = (now - self.start) / step * (total - step) if step else None
        if not self.write(step, total, progress_percent(step, total), eta, self.shot(step, total)):
            self.lost.set()
            raise JobLost


def render(pipe: Pipeline, job: Job, files: JobFiles, out: Path, cache_dir: Path, progress: Progress) -> dict[str, Any]:
    """Render ``job`` into the folder ``out`` (which exists); its report."""
    spec = job.spec["render"]
    if job.kind == "story":
        story = dict(spec["story"])
        story["keyframes"] = [{"image": load_image(files.input(kf["image"]), f"keyframes[{i}] image")}
                              for i, kf in enumerate(story["keyframes"])]  # fmt: skip
        loaded = load_story(story)
        plans, _ = plan_story(pipe, loaded)
        progress.bounds = np.cumsum([p.settings.steps * (2 if p.middle else 1) for p in plans]).tolist()
        video = pipe.story(loaded, cache_dir=cache_dir, progress=progress, color_match=spec["color_match"])
        report = video.info["report"]
    else:
        first = files.input(spec["first"])
        last = files.input(spec["last"]) if spec["last"] else None
        video = pipe.generate(
            first, last, spec["prompt"], negative_prompt=spec["negative_prompt"], frames=spec["frames"],
            size=tuple(spec["size"]), steps=spec["steps"], shift=spec["shift"], guidance=spec["guidance"],
            solver=spec["solver"], seed=spec["seed"], guidance_steps=spec["guidance_steps"], progress=progress,
        )  # fmt: skip
        if spec["color_match"]:
            video.frames = match_clip(video.frames, load_image(first), None if last is None else load_image(last))
        report = clip_report(pipe, video, first, last)
    if progress.lost.is_set():
        raise JobLost
    write_outputs(video.frames, video.fps, report, out)
    return report


def match_clip(frames: np.ndarray, first: Image.Image, last: Image.Image | None) -> np.ndarray:
    """A clip's colours anchored at its keyframes (at the first alone when it has no last keyframe)."""
    _, h, w, _ = frames.shape
    target_first = fit_keyframe(first, h, w)
    target_last = fit_keyframe(last, h, w) if last is not None else target_first
    out_last = frames[-1] if last is not None else frames[0]
    return color_match(frames, 0, len(frames) - 1, frames[0], out_last, target_first, target_last)


def write_outputs(frames: np.ndarray, fps: int, report: dict[str, Any], out: Path) -> None:
    from ..media import write_video

    write_video(frames, out / "video.mp4", fps)
    with atomic_path(out / "thumbnail.png") as tmp:
        Image.fromarray(frames[len(frames) // 2]).save(tmp, format="PNG")
    with atomic_path(out / "frames.zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for i, frame in enumerate(frames):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            zf.writestr(f"{i:05d}.png", buf.getvalue())
    write_report(report, out / REPORT_FILE)
