"""Render a story into one film: each shot through ``Pipeline.generate`` with its given frames, cached by content.

Shot i runs from keyframe i to keyframe i+1 (a loop's last shot back to keyframe 0). The keyframe between
two shots appears once, so an open film has sum(frames) - (shots - 1) frames and a loop sum(frames) - shots
(its last frame is not a repeat of its first, so it plays seamlessly on repeat).

With ``carry = K`` a shot is also given the film's last K frames (ending on the shared keyframe as the shot
before rendered it) at its first K positions: its window starts K - 1 frames early and is K - 1 frames
longer, so motion goes on through the keyframe; the carried frames are not repeated in the film. A loop's
last shot is given the film's first K frames at its end as well. A shot whose two keyframes are the same
image (a one-keyframe loop) would come out still: it first runs a first-frame-only pass and is given that
pass's middle frame as a middle keyframe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import InputError
from ..video import Video
from .cache import ShotCache, pixels_digest, shot_key, weights_identity
from .color import color_match
from .report import build_report, fit_keyframe
from .schema import Shot, Story, load_story

if TYPE_CHECKING:  # the pipeline imports this module lazily for Pipeline.story
    from ..pipeline import Pipeline, Progress

log = logging.getLogger("segue")

GENERATE_ARGS = ("frames", "steps", "shift", "guidance", "solver", "seed", "guidance_steps", "negative_prompt")


@dataclass
class ShotPlan:
    shot: Shot
    settings: Any  # the resolved GenerationSettings of the shot's window
    frames: int  # the shot's own frames (keyframe to keyframe)
    carry: int  # frames given from the film before it (0: none)
    lead: int  # window frames before its first keyframe
    tail: int  # window frames after its last keyframe (a loop's last shot with carry)
    middle: bool  # same keyframe at both ends: a middle keyframe from a first-frame-only pass
    negative: str


def plan_story(pipe: Pipeline, story: Story) -> tuple[list[ShotPlan], tuple[int, int]]:
    """Resolve and check every shot's settings before anything renders; the film's (width, height)."""
    n = len(story.shots)
    first = story.keyframes[0]
    base = story.shots[0].settings
    s0 = _resolve(pipe, first, base, base.get("frames"), base.get("size"), base.get("max_area"), story.where)
    size = (s0.width, s0.height)
    plans, film_len = [], 0
    for shot in story.shots:
        what = f"{story.where}: shots[{shot.index}]"
        st = shot.settings
        frames = st.get("frames") or pipe.config.defaults.frames
        carry = shot.carry if shot.index > 0 else 0
        if carry > film_len:
            raise InputError(f"{what}: carry = {carry} needs {carry} frames before the shot; the film has {film_len}")
        lead = carry - 1 if carry else 0
        tail = lead if story.loop and shot.index == n - 1 and carry else 0
        if tail and carry > _shot_film_frames(frames, 0, n, story.loop):
            raise InputError(f"{what}: carry = {carry} is longer than the first shot")
        s = _resolve(pipe, first, st, frames + lead + tail, size, None, what)
        same = pixels_digest(story.keyframes[shot.start]) == pixels_digest(story.keyframes[shot.end])
        negative = st.get("negative_prompt") or pipe.config.defaults.negative_prompt
        plans.append(ShotPlan(shot, s, frames, carry, lead, tail, same and not carry, negative))
        film_len += _shot_film_frames(frames, shot.index, n, story.loop)
    return plans, size


def _shot_film_frames(frames: int, index: int, shots: int, loop: bool) -> int:
    return frames - (1 if index > 0 else 0) - (1 if loop and index == shots - 1 else 0)


def _resolve(pipe: Pipeline, first: Image.Image, st: dict[str, Any], frames, size, max_area, what: str):
    try:
        return pipe.resolve(
            (first.height, first.width), frames, max_area, size, st.get("steps"), st.get("shift"),
            st.get("guidance"), st.get("solver"), st.get("seed", 0), st.get("guidance_steps"), has_last=True,
        )  # fmt: skip
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


def render_story(
    pipe: Pipeline,
    story: Story | dict[str, Any] | str | Path,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    color_match_all: bool = False,
) -> Video | None:
    """Render ``story`` (a Story, dict or TOML/JSON path) and return the film; ``info["report"]`` holds its
    report. ``cache_dir``: the shot cache (None: no cache). In a parallel run every rank calls this;
    rank 0 gets the Video, the others None."""
    t_start = time.perf_counter()
    story = story if isinstance(story, Story) else load_story(story)
    plans, (width, height) = plan_story(pipe, story)
    cache = ShotCache(cache_dir)
    identity = weights_identity(pipe)
    kf_fitted = [_fit_image(k, story.keyframes[0].size) for k in story.keyframes]  # one size for every shot
    total = sum(p.settings.steps * (2 if p.middle else 1) for p in plans)
    done = 0

    film: list[np.ndarray] = []
    keyframe_frames = [0]
    shots_report, joins = [], []
    n = len(plans)
    for plan in plans:
        shot, s, t0 = plan.shot, plan.settings, time.perf_counter()
        given = {p: film[len(film) - plan.carry + p] for p in range(plan.carry)}
        for p in range(plan.tail + 1 if plan.tail else 0):  # a loop's last shot ends on the film's first frames
            given[plan.lead + plan.frames - 1 + p] = film[p]
        # the last keyframe goes in as given: generate fits it to the first's size (as `segue generate` does)
        first, last = kf_fitted[shot.start], story.keyframes[shot.end]
        parts = {
            "model": identity, "runtime": _runtime(pipe), "first": pixels_digest(first), "last": pixels_digest(last),
            "given": {str(p): pixels_digest(f) for p, f in sorted(given.items())}, "prompt": shot.prompt,
            "negative_prompt": plan.negative, "settings": dict(s.__dict__), "middle": plan.middle,
        }  # fmt: skip
        key = shot_key(parts)
        window = _shared(pipe, cache.get(key) if _is_main(pipe) else None)
        reused = window is not None
        steps = s.steps * (2 if plan.middle else 1)
        if reused:
            log.info("shot %d/%d: reused from the cache (%s)", shot.index + 1, n, key[:12])
        else:
            log.info("shot %d/%d: %d frames, %s", shot.index + 1, n, s.frames, shot.prompt[:60] or "(no prompt)")

            def step(i: int, total_i: int, base: int = done) -> None:
                if progress is not None:
                    progress(base + i, total)

            window = _render_shot(pipe, plan, first, last, given, step)
            if _is_main(pipe):
                cache.put(key, window, {"shot": shot.index, "prompt": shot.prompt})
        done += steps
        if progress is not None:
            progress(done, total)
        start = plan.lead + (1 if shot.index > 0 else 0)
        stop = plan.lead + plan.frames - (1 if story.loop and shot.index == n - 1 else 0)
        film.extend(window[start:stop])
        if not (story.loop and shot.index == n - 1):
            keyframe_frames.append(len(film) - 1)
        seconds = round(time.perf_counter() - t0, 3)
        shots_report.append({"index": shot.index, "frames": plan.frames, "reused": reused, "seconds": seconds,
                             "keyframes": [shot.start, shot.end]})  # fmt: skip
    joins = ([0] if story.loop else []) + keyframe_frames[1 : len(story.keyframes) - (0 if story.loop else 1)]
    if not _is_main(pipe):
        return None
    frames = np.stack(film)
    if color_match_all or any(p.shot.color_match for p in plans):
        frames = match_film(frames, story, plans, keyframe_frames, color_match_all)
    fps = pipe.config.defaults.fps
    settings = {"loop": story.loop, "size": [width, height], "shots": [_shot_settings(p) for p in plans]}
    model = {"name": pipe.config.name, "source": pipe.source, "identity": identity, "speed": list(pipe.applied)}
    report = build_report(frames, fps, story.keyframes, keyframe_frames, shots_report, joins, settings, model,
                          time.perf_counter() - t_start, story.loop)  # fmt: skip
    inputs = tuple((str(p), f"keyframes[{i}] image") for i, p in enumerate(story.inputs))
    if story.where != "story":
        inputs += ((story.where, "story file"),)
    return Video(frames, fps, None, {"report": report, "settings": settings, "speed": list(pipe.applied)}, inputs)


def _render_shot(
    pipe: Pipeline, plan: ShotPlan, first: Image.Image, last: Image.Image, given: dict[int, np.ndarray], step
) -> np.ndarray:
    s = plan.settings
    kw = {"prompt": plan.shot.prompt, "negative_prompt": plan.negative, "frames": s.frames, "size": (s.width, s.height),
          "steps": s.steps, "shift": s.shift, "guidance": s.guidance, "solver": s.solver, "seed": s.seed,
          "guidance_steps": s.guidance_steps}  # fmt: skip
    offset = 0
    if plan.middle:  # a first-frame-only pass decides where the motion goes; its middle frame is given
        lone = pipe.generate(first, None, progress=step, **kw)
        mid = lone.frames[s.frames // 2] if lone is not None else None
        given = {**given, s.frames // 2: _shared(pipe, mid)}
        offset = s.steps
    video = pipe.generate(first, last, given=given or None, progress=lambda i, k: step(offset + i, k), **kw)
    return _shared(pipe, None if video is None else video.frames)


def _fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Keyframes of another size are fitted (cover, centre crop) to the first keyframe's size."""
    if image.size == size:
        return image
    return Image.fromarray(fit_keyframe(image, size[1], size[0]))


def match_film(
    frames: np.ndarray, story: Story, plans: list[ShotPlan], keyframe_frames: list[int], every: bool
) -> np.ndarray:
    """Colour-match the shots that ask for it (all with ``every``), anchored at both keyframes of each."""
    t, h, w, _ = frames.shape
    targets = [fit_keyframe(k, h, w) for k in story.keyframes]
    out = frames.copy()
    loop_ext = np.concatenate([frames, frames[:1]])  # a loop's last shot ends on frame 0 again
    for plan in plans:
        if not (every or plan.shot.color_match):
            continue
        a = keyframe_frames[plan.shot.start]
        b = t if story.loop and plan.shot.index == len(plans) - 1 else keyframe_frames[plan.shot.end]
        seg = loop_ext[a : b + 1]
        fixed = color_match(seg, 0, len(seg) - 1, seg[0], seg[-1], targets[plan.shot.start], targets[plan.shot.end])
        stop = min(b + 1, t)
        out[a:stop] = fixed[: stop - a]
    return out


def _shot_settings(plan: ShotPlan) -> dict[str, Any]:
    s = dict(plan.settings.__dict__)
    s["frames"] = plan.frames
    return {"prompt": plan.shot.prompt, **s, "window": plan.settings.frames, "carry": plan.carry,
            "color_match": plan.shot.color_match, "middle_keyframe": plan.middle}  # fmt: skip


def _runtime(pipe: Pipeline) -> dict[str, Any]:
    """What besides the weights changes the bits: the device kind, CFG batching, the parallel layout."""
    par = getattr(pipe, "parallel", None)
    return {"device": pipe.device.type, "cfg_batch": bool(getattr(pipe, "cfg_batch", False)),
            "parallel": None if par is None else repr(par.config)}  # fmt: skip


def _is_main(pipe: Pipeline) -> bool:
    par = getattr(pipe, "parallel", None)
    return par is None or par.world_size == 1 or par.is_main


def _shared(pipe: Pipeline, value: Any) -> Any:
    """``value`` as rank 0 holds it, on every rank of a parallel run (carried frames, cache hits)."""
    par = getattr(pipe, "parallel", None)
    if par is None or par.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=par.world_group)
    return box[0]
