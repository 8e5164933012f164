"""Generation settings: every setting of ``Pipeline.generate`` checked for type and range in one place.

Pure (no torch, no numpy, no weights): the CLI checks a command here before it imports torch or loads a model, and
``Pipeline.generate`` calls the same functions before any model work, so the Python API and the CLI give the
same one-line ``InputError`` naming the argument and what is allowed. Two stages:

1. ``check_request``: types and the ranges that hold for every model (an int prompt, ``frames="9"``,
   ``seed=1.5``, a NaN guidance are refused here);
2. ``resolve_settings``: the model's defaults filled in, then what this model can do (its frame and size
   steps, its position table) and the memory the decoded clip alone would need.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from .config import ModelConfig

SOLVERS = ("unipc", "dpm++", "euler", "lcm")  # what segue.sampling.solvers.make_solver builds
MAX_STEPS = 1000  # the flow schedule's training grid has 1000 timesteps; more steps repeat them
MAX_GUIDANCE = 50.0  # far past where guidance saturates the picture (the references use 1 to 6)
MAX_SHIFT = 100.0  # the references use 1 to 17


def arg_name(name: str, flags: bool) -> str:
    """``guidance_steps`` as the API names it, or ``--guidance-steps`` as the CLI does."""
    return "--" + name.replace("_", "-") if flags else name


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, str) else f"str {value!r}"


def _int(name: str, value: Any, lo: int, hi: int | None, flags: bool, hint: str = "") -> int:
    n = arg_name(name, flags)
    allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{n} must be {allowed}{hint}, got {_kind(value)}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        raise InputError(f"{n} must be {allowed}{hint}, got {v}")
    return v


def _real(name: str, value: Any, lo: float, hi: float, flags: bool, lo_open: bool = False) -> float:
    n = arg_name(name, flags)
    allowed = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{n} must be {allowed}, got {_kind(value)}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        raise InputError(f"{n} must be {allowed}, got {v:g}")
    return v


@dataclass(frozen=True)
class Request:
    """The settings of one generation as asked, types and model-free ranges checked; None: the model's."""

    prompt: str = ""
    negative_prompt: str | None = None
    frames: int | None = None
    max_area: int | None = None
    size: tuple[int, int] | None = None  # (width, height)
    steps: int | None = None
    shift: float | None = None
    guidance: float | None = None
    solver: str | None = None
    seed: int = 0
    guidance_steps: int | None = None


def check_request(
    prompt: Any = "",
    negative_prompt: Any = None,
    frames: Any = None,
    max_area: Any = None,
    size: Any = None,
    steps: Any = None,
    shift: Any = None,
    guidance: Any = None,
    solver: Any = None,
    seed: Any = 0,
    guidance_steps: Any = None,
    flags: bool = False,
) -> Request:
    """Check every setting's type and the ranges any model has; ``flags`` names them as CLI flags."""
    for name, value, optional in (("prompt", prompt, False), ("negative_prompt", negative_prompt, True)):
        if not isinstance(value, str) and not (optional and value is None):
            raise InputError(f"{arg_name(name, flags)} must be a string, got {_kind(value)}")
    if frames is not None:
        frames = check_frames(_int("frames", frames, 1, None, flags), 4, flags)
    if max_area is not None:
        max_area = _int("max_area", max_area, 1, None, flags, " (pixels)")
    if size is not None:
        if max_area is not None:
            raise InputError(f"give {arg_name('size', flags)} or {arg_name('max_area', flags)}, not both")
        size = _size_pair(size, flags)
    if steps is not None:
        steps = _int("steps", steps, 1, MAX_STEPS, flags)
    if shift is not None:
        shift = _real("shift", shift, 0.0, MAX_SHIFT, flags, lo_open=True)
    if guidance is not None:
        guidance = _real("guidance", guidance, 0.0, MAX_GUIDANCE, flags)
    if solver is not None and solver not in SOLVERS:
        raise InputError(
            f"unknown solver {solver!r} ({arg_name('solver', flags)}); choose one of: {', '.join(SOLVERS)}"
        )
    seed = _int("seed", seed, 0, 2**63 - 1, flags)
    if guidance_steps is not None:
        guidance_steps = _int("guidance_steps", guidance_steps, 1, MAX_STEPS, flags)
    return Request(
        prompt, negative_prompt, frames, max_area, size, steps, shift, guidance, solver, seed, guidance_steps
    )


def _size_pair(size: Any, flags: bool) -> tuple[int, int]:
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
        raise InputError(f"{arg_name('size', flags)} must be (width, height), two integers, got {_kind(size)}")
    return _int("size", size[0], 1, None, flags, " (width)"), _int("size", size[1], 1, None, flags, " (height)")


def check_frames(frames: int, temporal: int = 4, flags: bool = False) -> int:
    if frames < 1 or (frames - 1) % temporal:
        lo = max(1, (frames - 1) // temporal * temporal + 1)
        hi = lo + temporal
        hint = f"{lo} or {hi}" if frames > 1 else f"{1 + temporal}"
        raise InputError(
            f"{arg_name('frames', flags)} must be {temporal}n+1 (5, 9, ..., 81); got {frames}, nearest valid: {hint}"
        )
    return frames


def check_size(width: int, height: int, multiple: int, flags: bool = False) -> tuple[int, int]:
    """An explicit output size must be a positive multiple of the VAE stride times the patch size."""
    bad = [f"{n}={v}" for n, v in (("width", width), ("height", height)) if v <= 0 or v % multiple]
    if bad:
        near_w, near_h = (max(multiple, round(v / multiple) * multiple) for v in (width, height))
        raise InputError(
            f"{arg_name('size', flags)} {width}x{height}: {', '.join(bad)} not divisible by {multiple} "
            f"(this model's size step; try {near_w}x{near_h})"
        )
    return width, height


def fit_latent_size(height: int, width: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Latent (h, w) of the reference: aspect of the first frame, area about max_area, patch-aligned."""
    ar = height / width
    lat_h = round(math.sqrt(max_area * ar) // stride // patch * patch)  # IEEE sqrt: as numpy's, bit for bit
    lat_w = round(math.sqrt(max_area / ar) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InputError(f"max area {max_area} is too small for a {width}x{height} frame")
    return int(lat_h), int(lat_w)


def host_memory() -> int | None:
    """Physical memory of this machine in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def clip_bytes(frames: int, height: int, width: int) -> int:
    """A lower bound of the memory one generation needs: its decoded clip as float32 [3, F, H, W] plus the
    uint8 frames [F, H, W, 3] (the VAE's activations and the DiT come on top)."""
    return frames * height * width * 3 * (4 + 1)


@dataclass
class GenerationSettings:
    frames: int
    height: int
    width: int
    steps: int
    shift: float
    guidance: float
    solver: str
    seed: int
    guidance_steps: int | None = None  # guided steps from the first; None: all

    def guidance_at(self, step: int) -> float:
        """The guidance scale of step ``step`` (0-based): 1 (no second pass) past ``guidance_steps``."""
        return self.guidance if self.guidance_steps is None or step < self.guidance_steps else 1.0


def resolve_settings(
    request: Request,
    config: ModelConfig,
    first_hw: tuple[int, int],
    has_last: bool,
    memory: int | None = None,
    flags: bool = False,
) -> GenerationSettings:
    """``request`` with the model's defaults filled in, checked against what ``config``'s model can do and,
    when ``memory`` (bytes) is given, against the memory the decoded clip alone needs. ``first_hw`` is the
    first frame's (height, width): without ``size`` the output keeps its aspect."""
    d = config.defaults
    stride, temporal = config.vae.spatial_factor, config.vae.temporal_factor
    _, patch_h, patch_w = config.dit.patch_size
    frames = check_frames(d.frames if request.frames is None else request.frames, temporal, flags)
    if has_last and frames < temporal + 1:
        raise InputError(
            f"{arg_name('frames', flags)} {frames}: a first and a last frame need at least {temporal + 1} frames"
        )
    if request.size is not None:
        w, h = check_size(request.size[0], request.size[1], stride * patch_h, flags)
    else:
        area = d.max_area if request.max_area is None else request.max_area
        lat_h, lat_w = fit_latent_size(first_hw[0], first_hw[1], area, stride, patch_h)
        h, w = lat_h * stride, lat_w * stride
    _check_fits(frames, h, w, config, memory, flags)
    return GenerationSettings(
        frames, h, w,
        d.steps if request.steps is None else request.steps,
        d.shift if request.shift is None else request.shift,
        d.guidance if request.guidance is None else request.guidance,
        d.solver if request.solver is None else request.solver,
        request.seed,
        d.guidance_steps if request.guidance_steps is None else request.guidance_steps,
    )  # fmt: skip


def _check_fits(frames: int, h: int, w: int, config: ModelConfig, memory: int | None, flags: bool) -> None:
    """The token grid must fit the DiT's position table; the decoded clip must fit in ``memory``."""
    stride, temporal = config.vae.spatial_factor, config.vae.temporal_factor
    pt, ph, pw = config.dit.patch_size
    n = config.dit.rope_max_len
    grid = ((frames - 1) // temporal + 1) // pt, h // stride // ph, w // stride // pw
    if grid[0] > n:
        raise InputError(f"{arg_name('frames', flags)} {frames}: this model covers at most "
                         f"{(n * pt - 1) * temporal + 1} frames (its position table has {n} entries)")  # fmt: skip
    if grid[1] > n or grid[2] > n:
        raise InputError(f"size {w}x{h}: this model covers at most {n * stride * pw}x{n * stride * ph} pixels "
                         f"(its position table has {n} entries per side of {stride * ph} px)")  # fmt: skip
    if memory is not None and clip_bytes(frames, h, w) > memory:
        gib = 2**30
        raise InputError(f"{frames} frames of {w}x{h} need at least {clip_bytes(frames, h, w) / gib:.1f} GiB for "
                         f"the decoded clip alone; this machine has {memory / gib:.1f} GiB: ask for fewer frames "
                         f"or a smaller size")  # fmt: skip


def check_progress(progress: Callable[[int, int], None] | None) -> None:
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a callable (step, total) or None, got {_kind(progress)}")
