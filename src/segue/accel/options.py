"""Speed and memory choices in one dataclass: ``SpeedOptions``, checked when made.

``segue.load(path, device, speed=SpeedOptions(...))`` (and ``segue generate``'s flags) hand it to
``segue.loader.build_pipeline``, which decides the memory profile, builds, and applies the options in the
one order they compose (its module docstring lists it). On CPU nothing changes by default: the run is the
reference's arithmetic. ``exact=True`` keeps that on GPU too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

CACHE_METHODS = ("teacache", "magcache")


@dataclass(frozen=True)
class SpeedOptions:
    memory: str = "auto"  # a key of segue.placement.profiles.PROFILES, or "auto"
    attention: str = "auto"  # a key of segue.accel.attention.BACKENDS, or "auto"
    fuse: bool | None = None  # fused QKV + fp32 RoPE; None: on CUDA unless exact
    cfg_batch: bool | None = None  # None: on CUDA with the "gpu" profile when it still fits
    compile: bool = False
    step_cache: str | None = None  # "teacache" or "magcache" (lossy)
    cache_threshold: float | None = None
    cache_calibration: str | None = None  # JSON from segue calibrate-cache
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale)
    text_encoder_cpu: bool = False
    exact: bool = False  # the reference's arithmetic: SDPA default, unfused, two CFG passes

    def __post_init__(self) -> None:
        from ..placement.profiles import PROFILES
        from .attention import BACKENDS

        if self.memory not in ("auto", *PROFILES):
            raise InputError(f"unknown memory profile {self.memory!r}; choose one of: auto, {', '.join(PROFILES)}")
        if self.attention not in ("auto", *BACKENDS):
            raise InputError(
                f"unknown attention backend {self.attention!r}; choose one of: auto, {', '.join(BACKENDS)}"
            )
        if self.step_cache is not None and self.step_cache not in CACHE_METHODS:
            raise InputError(f"unknown step cache {self.step_cache!r}; choose one of: {', '.join(CACHE_METHODS)}")
        if self.cache_threshold is not None and self.cache_threshold < 0:
            raise InputError(f"cache threshold must be >= 0, got {self.cache_threshold}")
        if (self.cache_threshold is not None or self.cache_calibration) and self.step_cache is None:
            raise InputError("a cache threshold or calibration was given without a step cache (--step-cache)")
        if self.loras:
            from ..lora import check_lora_file

            for path, _ in self.loras:
                check_lora_file(path)  # whole and with LoRA names, from its header: before any model loads
        if self.cache_calibration is not None and not Path(self.cache_calibration).is_file():
            raise InputError(f"cache calibration file {self.cache_calibration} does not exist")

    @classmethod
    def from_args(cls, args: Any) -> SpeedOptions:
        """The options of a command line's speed and memory flags (``segue generate``, ``story``, ``worker``)."""
        return cls(
            memory=args.memory, attention=args.attention, cfg_batch=args.cfg_batch, compile=args.compile,
            step_cache=args.step_cache, cache_threshold=args.cache_threshold, cache_calibration=args.cache_calibration,
            loras=tuple(parse_lora(x) for x in args.lora), text_encoder_cpu=args.text_encoder_cpu, exact=args.exact,
        )  # fmt: skip


def parse_lora(text: str) -> tuple[str, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (file, scale)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).is_file():
        try:
            return path, float(scale)
        except ValueError:
            raise InputError(f"LoRA scale in {text!r} must be a number (FILE:SCALE)") from None
    return text, 1.0
