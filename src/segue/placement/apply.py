"""Apply a memory profile to a loaded pipeline, undo it, and pick one ("auto") from the free GPU memory.

``apply_profile(pipe, name)`` rearranges a loaded Pipeline by the ``Profile`` of that name
(``segue.placement.profiles``); the model code is untouched (method wrappers, module hooks,
``Tensor.data`` swaps). Each trait of the profile is one step below, in this order:

1. text encoder, image encoder, VAE: on the device, or offloaded around their ``encode``/``decode``
   calls (``ComponentOffload``); the VAE's ``decode`` in row bands under ``tiled_decode``; umT5 on the
   CPU under ``text_encoder_on_cpu``;
2. the DiT: fp8 block weights where they are now (before anything moves them), then placed on the
   device, or its blocks streamed through a few device slots (``BlockSwap``).

"auto" picks the first profile of ``AUTO_ORDER`` whose estimated peak at the model's default size
fits the free GPU memory (``segue.placement.estimate``). Every lossless profile gives the same video
as "gpu", bit for bit. Undo with ``remove_profile``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import InputError
from . import profiles
from .block_swap import BlockSwap
from .estimate import estimate_memory
from .offload import ComponentOffload, patch_method
from .profiles import AUTO_ORDER, DEFAULT_BAND_ROWS, DEFAULT_PREFETCH, DEFAULT_RESIDENT, Profile
from .tensors import module_tensors, nbytes, place, resolve_device
from .tiled_vae import tiled_decode

log = logging.getLogger("segue")

__all__ = ["apply_profile", "choose_profile", "current_profile", "pick_profile", "remove_profile"]

_HEADROOM = 0.9  # "auto": use at most this share of the available memory


# ---------------------------------------------------------------------------------------------
# What is applied to a pipeline, and undoing it.


@dataclass
class _Applied:
    name: str
    undo: list[Callable[[torch.device], None]]  # each takes where the weights should end up
    offloads: dict[str, ComponentOffload] = field(default_factory=dict)
    swap: BlockSwap | None = None
    fp8: bool = False


_APPLIED: weakref.WeakKeyDictionary[Any, _Applied] = weakref.WeakKeyDictionary()


def current_profile(pipe: Any) -> str:
    """The profile applied to ``pipe`` ("gpu" when none was)."""
    state = _APPLIED.get(pipe)
    return state.name if state is not None else "gpu"


def _undo(pipe: Any, to: torch.device) -> None:
    """Remove the wrappers and hooks of the applied profile; its offloaded weights go to ``to``."""
    state = _APPLIED.pop(pipe, None)
    if state is not None:
        for undo in reversed(state.undo):
            undo(to)


def remove_profile(pipe: Any) -> None:
    """Undo ``apply_profile``: wrappers and hooks removed, every weight on the pipeline's device.
    fp8 weights stay fp8 (quantizing is not undone)."""
    _undo(pipe, pipe.device)
    for module in _components(pipe).values():
        place(module_tensors(module), pipe.device)


def _components(pipe: Any) -> dict[str, nn.Module]:
    comps = {"dit": pipe.dit, "vae": pipe.vae, "text": pipe.text_encoder, "image": pipe.image_encoder}
    return {k: m for k, m in comps.items() if isinstance(m, nn.Module)}


# ---------------------------------------------------------------------------------------------
# "auto": the first profile that fits.


def _default_size(cfg: ModelConfig) -> tuple[int, int, int]:
    """(frames, height, width) of a run at the model's defaults with a 16:9 landscape frame."""
    from ..settings import fit_latent_size

    s, p = cfg.vae.spatial_factor, cfg.dit.patch_size[1]
    lat_h, lat_w = fit_latent_size(9, 16, cfg.defaults.max_area, s, p)
    return cfg.defaults.frames, lat_h * s, lat_w * s


def _run_dtype(pipe: Any) -> torch.dtype:
    dtypes = [p.dtype for p in pipe.dit.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    return dtypes[0] if dtypes else torch.float32


def choose_profile(pipe: Any, cfg_batch: bool | None = None, **kwargs: Any) -> str:
    """The first of ``AUTO_ORDER`` whose estimated peak at the model's default size fits the free
    memory of the pipeline's GPU (plus what the pipeline already holds there); "gpu" off CUDA.
    ``cfg_batch``: estimate CFG as one batch of two (default: as the pipeline runs it)."""
    dev = pipe.device
    if dev.type != "cuda":
        return "gpu"
    held = sum(nbytes(t) for m in _components(pipe).values() for t in module_tensors(m) if t.device == dev)
    if cfg_batch is None:
        cfg_batch = bool(getattr(pipe, "cfg_batch", False))
    return pick_profile(pipe.config, dev, _run_dtype(pipe), held=held, cfg_batch=cfg_batch, **kwargs)


def pick_profile(
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    held: int = 0,
    cfg_batch: bool = False,
    free: int | None = None,
    **kwargs: Any,
) -> str:
    """``choose_profile`` before any weights are loaded: from the config, the device's free memory
    (or ``free`` bytes) plus ``held`` bytes the run may reuse. "gpu" off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda" and free is None:
        return "gpu"
    if free is None:
        free, _ = torch.cuda.mem_get_info(dev)
    budget = (free + held) * _HEADROOM
    frames, height, width = _default_size(config)
    tried = []
    for name in AUTO_ORDER:
        est = estimate_memory(config, name, frames, height, width, dtype=dtype, cfg_batch=cfg_batch, **kwargs)
        peak = est["peak"]
        tried.append(f"{name} {peak / 1e9:.1f} GB")
        if peak <= budget:
            log.info("memory profile auto: %.1f GB usable on %s; %s -> %s", budget / 1e9, dev, ", ".join(tried), name)
            return name
    log.warning("memory profile auto: no profile fits %.1f GB (%s); using %s", budget / 1e9, ", ".join(tried), name)
    return name


# ---------------------------------------------------------------------------------------------
# Applying a profile.


def _tiled(vae: nn.Module, band_rows: int) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    def make(_plain: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def decode(
            z: Tensor, normalized: bool = True, clamp: bool = True, progress: Callable[[int, int], None] | None = None
        ) -> Tensor:
            return tiled_decode(vae, z, band_rows, normalized=normalized, clamp=clamp, progress=progress)  # type: ignore[arg-type]

        return decode

    return make


@dataclass
class _Options:
    """``apply_profile``'s keyword options, resolved for the profile."""

    resident: int
    prefetch: int
    band_rows: int
    text_on_cpu: bool
    pin: bool | None


def _place_encoders_and_vae(pipe: Any, profile: Profile, opts: _Options, state: _Applied) -> None:
    """The encoders and the VAE: on the device, on the CPU (umT5), or offloaded around their entry points."""
    comps = _components(pipe)
    for key, methods in (("text", ("encode",)), ("image", ("encode",)), ("vae", ("encode", "decode"))):
        module = comps.get(key)
        if module is None:
            continue
        if key == "text" and opts.text_on_cpu:
            place(module_tensors(module), torch.device("cpu"))  # runs on the CPU; the pipeline moves its output
        elif not profile.offload:
            place(module_tensors(module), pipe.device)
        else:
            if key == "vae" and profile.tiled_decode:
                untile = patch_method(module, "decode", _tiled(module, opts.band_rows))  # the offload wraps it
                state.undo.append(lambda _to, untile=untile: untile())
            off = ComponentOffload(module, pipe.device, methods, opts.pin)
            state.offloads[key] = off
            state.undo.append(off.remove)


def _place_dit(dit: nn.Module, device: torch.device, profile: Profile, opts: _Options, state: _Applied) -> None:
    """The DiT: fp8 where it is now (before anything moves it to the device), then placed or swapped."""
    if profile.fp8:
        from ..accel.fp8 import quantize_fp8

        quantize_fp8(dit, scaled_mm=profile.fp8_matmul)
        state.fp8 = True
    if profile.block_swap:
        in_blocks = {id(t) for t in module_tensors(dit.blocks)}
        place([t for t in module_tensors(dit) if id(t) not in in_blocks], device)
        swap = BlockSwap(dit.blocks, device, resident=opts.resident, prefetch=opts.prefetch, pin=opts.pin)  # type: ignore[arg-type]
        state.swap = swap
        state.undo.append(swap.remove)
    else:
        place(module_tensors(dit), device)


def _resolve(pipe: Any, name: str, band_rows: int, device: torch.device | str | None, **kwargs: Any) -> Profile:
    """Check the arguments, set the compute device, and turn "auto" into a profile."""
    if name != "auto" and name not in profiles.PROFILES:
        known = ("auto", *profiles.PROFILES)
        raise InputError(f"unknown memory profile {name!r}; choose one of: {', '.join(known)}")
    if band_rows < 1:
        raise InputError(f"band_rows must be at least 1, got {band_rows}")
    if device is not None:
        pipe.device = resolve_device(device)
    if name == "auto":
        name = choose_profile(pipe, band_rows=band_rows, **kwargs)
    ps = getattr(pipe, "parallel", None)
    if name != "gpu" and ps is not None and ps.world_size > 1:
        raise InputError(f"memory profile {name!r} is for one-GPU runs; a parallel run saves memory with --fsdp")
    return profiles.get(name)


def apply_profile(
    pipe: Any,
    name: str = "auto",
    *,
    resident: int = DEFAULT_RESIDENT,
    prefetch: int = DEFAULT_PREFETCH,
    band_rows: int = DEFAULT_BAND_ROWS,
    text_encoder_on_cpu: bool | None = None,
    pin: bool | None = None,
    device: torch.device | str | None = None,
) -> str:
    """Arrange ``pipe``'s weights by the memory profile ``name`` (a key of ``PROFILES`` or "auto")
    and return the profile applied. A profile applied before is undone first (fp8 stays).

    ``device``: the compute device to use from now on (sets ``pipe.device``; default: keep it).
    Works from wherever the weights are: a pipeline loaded onto the CPU and given ``device="cuda"``
    never holds more on the GPU than the profile says (load with ``dtype="bf16"`` then).
    ``resident``/``prefetch``: block swap (see ``BlockSwap``); ``band_rows``: latent rows per VAE
    band; ``text_encoder_on_cpu``: run umT5 on the CPU (default: as the profile says); ``pin``: pinned
    CPU copies (default: when the device is CUDA).
    """
    profile = _resolve(pipe, name, band_rows, device, resident=resident, prefetch=prefetch)
    text_on_cpu = profile.text_encoder_on_cpu if text_encoder_on_cpu is None else text_encoder_on_cpu
    opts = _Options(resident, prefetch, band_rows, text_on_cpu, pin)
    _undo(pipe, torch.device("cpu"))  # a previous profile's offloaded weights stay on the CPU: no spike on the device
    state = _Applied(profile.name, [])
    _place_encoders_and_vae(pipe, profile, opts, state)
    _place_dit(pipe.dit, pipe.device, profile, opts, state)
    if profile.name != "gpu":
        _APPLIED[pipe] = state
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()  # give the freed device copies back for the next user to see
    elif profile.name != "gpu":
        log.info("memory profile %s on %s saves no memory (it is meant for a GPU)", profile.name, pipe.device)
    log.info("memory profile %s: %s", profile.name, profile.description)
    return profile.name
