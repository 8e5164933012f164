"""Speed and memory choices in one dataclass, applied to a checkpoint in the order the transforms compose.

``segue.load(path, device, speed=SpeedOptions(...))`` (and ``segue generate``'s flags) end here:

1. memory profile chosen ("auto": the first profile whose estimate fits the free GPU memory) before any
   weight is read, so a 14B checkpoint for a 24 GB GPU is read into CPU memory, never onto the GPU whole;
2. LoRAs merged into the weights (before anything repacks them);
3. fused QKV + fp32 RoPE (lossless; on by default on CUDA);
4. the memory profile (offload, block swap, tiled VAE decode, fp8 weights; segue.offload);
5. attention kernel ("auto": the fastest lossless one on this GPU; SDPA's default on CPU);
6. CFG as one batch of two (on CUDA when the "gpu" profile still fits with it);
7. regional torch.compile; 8. step cache (lossy, opt-in).

On CPU nothing changes by default: the run is the reference's arithmetic. ``exact=True`` keeps that on GPU too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

log = logging.getLogger("segue")

CACHE_METHODS = ("teacache", "magcache")


@dataclass(frozen=True)
class SpeedOptions:
    memory: str = "auto"  # a key of segue.offload.PROFILES, or "auto"
    attention: str = "auto"  # a key of segue.accel.attention.BACKENDS, or "auto"
    fuse: bool | None = None  # fused QKV + fp32 RoPE; None: on CUDA unless exact
    cfg_batch: bool | None = None  # None: on CUDA with the "gpu" profile when it still fits
    compile: bool = False
    step_cache: str | None = None  # "teacache" or "magcache" (lossy)
    cache_threshold: float | None = None
    cache_calibration: str | None = None  # JSON from bench/calibrate_cache.py
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale)
    text_encoder_cpu: bool = False
    exact: bool = False  # the reference's arithmetic: SDPA default, unfused, two CFG passes

    def __post_init__(self) -> None:
        from ..offload import PROFILES
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


def parse_lora(text: str) -> tuple[str, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (file, scale)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).is_file():
        try:
            return path, float(scale)
        except ValueError:
            raise InputError(f"LoRA scale in {text!r} must be a number (FILE:SCALE)") from None
    return text, 1.0


def build_pipeline(plan, device: torch.device, dtype: torch.dtype, speed: SpeedOptions, started: float | None = None):
    """A Pipeline from a checkpoint plan with ``speed`` applied (see the module docstring for the order)."""
    from ..loader import build_components
    from ..offload import apply_profile, choose_profile, pick_profile

    cuda = device.type == "cuda"
    lossless = cuda and not speed.exact
    profile = speed.memory
    if profile == "auto":
        profile = pick_profile(plan.config, device, dtype) if cuda else "gpu"
    applied = [f"memory {profile}"]
    # Anything but "gpu" is read into CPU memory and moved by the profile (never whole onto the GPU).
    pipe = build_components(plan, device if profile == "gpu" else torch.device("cpu"), dtype, started)

    if speed.loras:
        from ..lora import load_lora

        for path, scale in speed.loras:
            load_lora(pipe.dit, path, scale)
            applied.append(f"LoRA {Path(path).name} x{scale:g}")
    if speed.fuse or (speed.fuse is None and lossless):
        from .fuse import fast_rope, fuse_qkv

        fuse_qkv(pipe.dit)
        fast_rope(pipe.dit)
        applied.append("fused QKV + fp32 RoPE")
    apply_profile(pipe, profile, device=device, text_encoder_on_cpu=speed.text_encoder_cpu or None)

    from .attention import best_backend, set_attention_backend

    backend = speed.attention
    if backend == "auto":
        backend = best_backend(device, dtype) if lossless else "sdpa"
    set_attention_backend(pipe.dit, backend)
    applied.append(f"attention {backend}")

    batch = speed.cfg_batch
    if batch is None:
        batch = False
        if lossless and profile == "gpu":
            pipe.cfg_batch = True  # what the estimate should assume
            batch = choose_profile(pipe) == "gpu"
    pipe.cfg_batch = bool(batch)
    if batch:
        applied.append("CFG batch of two")
    if speed.compile:
        from .compile import compile_blocks

        compile_blocks(pipe.dit)
        applied.append("regional compile")
    if speed.step_cache is not None:
        from .cache import apply_step_cache

        apply_step_cache(pipe, speed.step_cache, speed.cache_threshold, speed.cache_calibration)
        applied.append(f"step cache {speed.step_cache}")
    pipe.applied = applied
    log.info("speed: %s", ", ".join(applied))
    return pipe
