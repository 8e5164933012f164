"""Memory profiles: where each component's weights live, chosen by one name and applied from outside.

``apply_profile(pipe, name)`` rearranges a loaded Pipeline; the model code is untouched (method
wrappers, module hooks, ``Tensor.data`` swaps). Profiles (``PROFILES``):

- ``gpu``: everything on the compute device (the plain pipeline).
- ``offload``: text encoder, image encoder and VAE stay in CPU memory (pinned with CUDA) and are
  copied to the device only for the duration of their ``encode`` / ``decode`` call.
- ``block-swap``: offload, plus the DiT's blocks live in pinned CPU memory and stream through a
  few device slots (``BlockSwap``), plus the VAE decodes in row bands (``segue.tiled_vae``).
- ``fp8``: offload, plus fp8 DiT block weights (``segue.accel.fp8.quantize_fp8``; lossy).
- ``low``: block swap with fp8 blocks, tiled decode, and the text encoder running on the CPU.

``auto`` picks the first of gpu, offload, block-swap, low whose estimated peak at the model's
default size fits the free GPU memory; ``fp8`` is only used when asked for. Every profile but
``fp8``/``low`` gives the same video as ``gpu``, bit for bit. Undo with ``remove_profile``.

How much device and CPU memory each profile needs, and how that is estimated: ``segue.memory``
(``estimate_memory``, ``memory_table()``, and the table for FLF2V-14B at 720p in its docstring).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .block_swap import BlockSwap, _place, _want_pin
from .config import ModelConfig
from .errors import InputError
from .memory import (
    _FP8_MATMUL,
    _FP8_PROFILES,
    _SWAP_PROFILES,
    DEFAULT_BAND_ROWS,
    DEFAULT_PREFETCH,
    DEFAULT_RESIDENT,
    LiveBytes,  # noqa: F401  (re-exported: it was defined here before segue.memory)
    _fp8_available,
    _nbytes,
    _tensors,
    estimate_memory,
    memory_table,
    trace_peak,
)
from .tiled_vae import tiled_decode

log = logging.getLogger("segue")

__all__ = [
    "PROFILES",
    "BlockSwap",
    "ComponentOffload",
    "apply_profile",
    "choose_profile",
    "current_profile",
    "estimate_memory",
    "memory_table",
    "remove_profile",
    "trace_peak",
]

PROFILES: dict[str, str] = {
    "gpu": "everything on the device",
    "offload": "text encoder, image encoder and VAE on the CPU, moved in only while they run",
    "block-swap": "offload + DiT blocks streamed from pinned CPU memory + VAE decoded in row bands",
    "fp8": "offload + fp8 DiT block weights (lossy)",
    "low": "block swap with fp8 blocks + banded VAE decode + text encoder run on the CPU (lossy)",
}
# Tried by "auto" in this order: the fastest that fits; fp8 only when nothing exact fits.
AUTO_ORDER = ("gpu", "offload", "block-swap", "low")

_HEADROOM = 0.9  # "auto": use at most this share of the available memory


# ---------------------------------------------------------------------------------------------
# Component offload (moving tensors with ``Tensor.data`` swaps: see ``segue.block_swap._place``).


def _home_copy(t: Tensor, pin: bool) -> Tensor:
    """``t`` contiguous in CPU memory (pinned when asked): its resting place. A CPU tensor that is
    already so is used as it is (no copy)."""
    home = t.detach().to("cpu").contiguous()
    return home.pin_memory() if pin and not home.is_pinned() else home


def _patch_method(obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Shadow ``obj.name`` with ``make(current)`` as an instance attribute; returns the undo."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, make(getattr(obj, name)))

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return undo


class ComponentOffload:
    """Keep ``module``'s weights in CPU memory; copy them to ``device`` around calls of ``methods``.

    Each wrapped call loads every tensor (from pinned memory, ``non_blocking``: the copies are
    ordered before the call's kernels on the current stream), runs, then points the tensors back at
    their CPU copies; the device copies are freed in stream order. Weights are read-only here (it
    is for inference), so nothing is copied back. Nested wrapped calls load once.
    """

    def __init__(
        self, module: nn.Module, device: torch.device | str, methods: Sequence[str], pin: bool | None = None
    ) -> None:
        self.module = module
        self.device = torch.device(device)
        self.tensors = _tensors(module)
        if any(t.is_meta for t in self.tensors):
            raise InputError(f"{type(module).__name__} still has meta tensors: load its weights first")
        pin = _want_pin(self.device, pin)
        self.home = [_home_copy(t, pin) for t in self.tensors]
        for t, h in zip(self.tensors, self.home):
            t.data = h
        self.depth = 0
        self.loads = 0  # how many times the weights went to the device (for tests and logs)
        self._undo = [_patch_method(module, m, self._wrap) for m in methods]

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def offloaded(*args: Any, **kwargs: Any) -> Any:
            self.load()
            try:
                return fn(*args, **kwargs)
            finally:
                self.unload()

        return offloaded

    def load(self) -> None:
        self.depth += 1
        if self.depth > 1:
            return
        self.loads += 1
        for t, h in zip(self.tensors, self.home):
            # a real copy also on a CPU "device", so that a CPU test sees the weights move
            t.data = torch.empty(h.shape, dtype=h.dtype, device=self.device).copy_(h, non_blocking=True)

    def unload(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            for t, h in zip(self.tensors, self.home):
                t.data = h

    @property
    def loaded(self) -> bool:
        return self.depth > 0

    def remove(self, to: torch.device | str) -> None:
        """Unwrap the methods and put the weights on ``to`` for good."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        to = torch.device(to)
        for t, h in zip(self.tensors, self.home):
            t.data = h.to(to, copy=True) if to.type != "cpu" or h.is_pinned() else h
        self.home = []


# ---------------------------------------------------------------------------------------------
# Profiles on a pipeline.


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
        _place(_tensors(module), pipe.device)


def _inner_dit(dit: nn.Module) -> nn.Module:
    """The WanDiT inside wrappers that keep it as their ``dit`` submodule (the step cache)."""
    while "dit" in dit._modules and "blocks" not in dit._modules:
        dit = dit._modules["dit"]  # type: ignore[assignment]
    return dit


def _components(pipe: Any) -> dict[str, nn.Module]:
    comps = {"dit": pipe.dit, "vae": pipe.vae, "text": pipe.text_encoder, "image": pipe.image_encoder}
    return {k: m for k, m in comps.items() if isinstance(m, nn.Module)}


def _default_size(cfg: ModelConfig) -> tuple[int, int, int]:
    """(frames, height, width) of a run at the model's defaults with a 16:9 landscape frame."""
    from .settings import fit_latent_size

    s, p = cfg.vae.spatial_factor, cfg.dit.patch_size[1]
    lat_h, lat_w = fit_latent_size(9, 16, cfg.defaults.max_area, s, p)
    return cfg.defaults.frames, lat_h * s, lat_w * s


def _run_dtype(pipe: Any) -> torch.dtype:
    dtypes = [p.dtype for p in pipe.dit.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    return dtypes[0] if dtypes else torch.float32


def choose_profile(pipe: Any, **kwargs: Any) -> str:
    """The first of ``AUTO_ORDER`` whose estimated peak at the model's default size fits the free
    memory of the pipeline's GPU (plus what the pipeline already holds there); "gpu" off CUDA."""
    dev = pipe.device
    if dev.type != "cuda":
        return "gpu"
    held = sum(_nbytes(t) for m in _components(pipe).values() for t in _tensors(m) if t.device == dev)
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
        if name in _FP8_PROFILES and not _fp8_available():
            continue
        est = estimate_memory(config, name, frames, height, width, dtype=dtype, cfg_batch=cfg_batch, **kwargs)
        peak = est["peak"]
        tried.append(f"{name} {peak / 1e9:.1f} GB")
        if peak <= budget:
            log.info("memory profile auto: %.1f GB usable on %s; %s -> %s", budget / 1e9, dev, ", ".join(tried), name)
            return name
    log.warning("memory profile auto: no profile fits %.1f GB (%s); using %s", budget / 1e9, ", ".join(tried), name)
    return name


def _tiled(vae: nn.Module, band_rows: int) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    def make(_plain: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def decode(
            z: Tensor, normalized: bool = True, clamp: bool = True, progress: Callable[[int, int], None] | None = None
        ) -> Tensor:
            return tiled_decode(vae, z, band_rows, normalized=normalized, clamp=clamp, progress=progress)  # type: ignore[arg-type]

        return decode

    return make


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
    band; ``text_encoder_on_cpu``: run umT5 on the CPU (default: only in "low"); ``pin``: pinned
    CPU copies (default: when the device is CUDA).
    """
    known = ("auto", *PROFILES)
    if name not in known:
        raise InputError(f"unknown memory profile {name!r}; choose one of: {', '.join(known)}")
    if band_rows < 1:
        raise InputError(f"band_rows must be at least 1, got {band_rows}")
    if device is not None:
        from .loader import resolve_device

        pipe.device = resolve_device(device)
    if name == "auto":
        name = choose_profile(pipe, resident=resident, prefetch=prefetch, band_rows=band_rows)
    ps = getattr(pipe, "parallel", None)
    if name != "gpu" and ps is not None and ps.world_size > 1:
        raise InputError(f"memory profile {name!r} is for one-GPU runs; a parallel run saves memory with --fsdp")
    if name in _FP8_PROFILES and not _fp8_available():
        raise InputError(f"memory profile {name!r} needs segue.accel.fp8, which is not installed")
    dev = pipe.device
    cpu = torch.device("cpu")
    _undo(pipe, cpu)  # a previous profile's offloaded weights stay on the CPU: no spike on the device
    state = _Applied(name, [])
    comps = _components(pipe)
    text_on_cpu = name == "low" if text_encoder_on_cpu is None else text_encoder_on_cpu

    # The encoders and the VAE: on the device, or offloaded around their entry points.
    for key, methods in (("text", ("encode",)), ("image", ("encode",)), ("vae", ("encode", "decode"))):
        module = comps.get(key)
        if module is None:
            continue
        if key == "text" and text_on_cpu:
            _place(_tensors(module), cpu)  # runs on the CPU; the pipeline moves its output over
        elif name == "gpu":
            _place(_tensors(module), dev)
        else:
            if key == "vae" and name in _SWAP_PROFILES:
                untile = _patch_method(module, "decode", _tiled(module, band_rows))  # the offload wraps it
                state.undo.append(lambda _to, untile=untile: untile())
            off = ComponentOffload(module, dev, methods, pin)
            state.offloads[key] = off
            state.undo.append(off.remove)

    # The DiT: fp8 where it is now (before anything moves it to the device), then placed or swapped.
    dit = _inner_dit(pipe.dit)
    if dit is not pipe.dit and name in _SWAP_PROFILES and resident < 1:
        # the step cache reads block 0's modulation outside the block's call: keep that block resident
        log.info("block swap under a step cache: block 0 stays on the device")
        resident = 1
    if name in _FP8_PROFILES:
        from .accel.fp8 import quantize_fp8

        quantize_fp8(dit, scaled_mm=_FP8_MATMUL[name])
        state.fp8 = True
    if name in _SWAP_PROFILES:
        in_blocks = {id(t) for t in _tensors(dit.blocks)}
        _place([t for t in _tensors(dit) if id(t) not in in_blocks], dev)
        swap = BlockSwap(dit.blocks, dev, resident=resident, prefetch=prefetch, pin=pin)
        state.swap = swap
        state.undo.append(swap.remove)
    else:
        _place(_tensors(dit), dev)

    if name != "gpu":
        _APPLIED[pipe] = state
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # give the freed device copies back for the next user to see
    elif name != "gpu":
        log.info("memory profile %s on %s saves no memory (it is meant for a GPU)", name, dev)
    log.info("memory profile %s: %s", name, PROFILES[name])
    return name
