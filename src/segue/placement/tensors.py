"""Where a tensor lives: the run device and dtype, a module's tensors, their bytes, and moving them.

Every helper here moves tensors with ``Tensor.data`` swaps: each Parameter object (and any reference the
model or an optimiser holds) stays valid, and tied weights (umT5's embedding) stay one tensor. The memory
profiles (``segue.placement.apply``), component offload and block swap are built from these.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = [
    "home_copy",
    "module_tensors",
    "nbytes",
    "place",
    "resolve_device",
    "resolve_dtype",
    "want_pin",
    "weight_bytes",
]


def resolve_device(device: str | torch.device) -> torch.device:
    """A device name -> torch.device; CUDA only where PyTorch sees a GPU."""
    allowed = "'cpu', 'cuda', 'cuda:N' or a torch.device"
    if not isinstance(device, str | torch.device):
        raise InputError(f"device must be {allowed}, got {device!r:.60} ({type(device).__name__})")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r:.60}; allowed: {allowed}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but no CUDA GPU is available to PyTorch")
    return dev


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Run dtype of the big DiT/T5 weights: bf16 on GPU, fp32 on CPU unless told."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"dtype {dtype} is not a run dtype; choose one of: fp32, bf16, fp16 (or None)")
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r:.60}; choose one of: fp32, bf16, fp16 (or None)")
    return _DTYPES[dtype]


def module_tensors(module: nn.Module) -> list[Tensor]:
    """Unique parameters and buffers of ``module`` (by identity; tied ones once)."""
    seen: dict[int, Tensor] = {}
    for t in (*module.parameters(), *module.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def nbytes(t: Tensor) -> int:
    """Bytes of ``t``'s elements (not of its whole storage)."""
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, tied ones once."""
    return sum(nbytes(t) for t in module_tensors(module))


def place(tensors: Iterable[Tensor], device: torch.device) -> None:
    """Move each tensor to ``device`` in place (a ``Tensor.data`` swap); those already there stay."""
    for t in tensors:
        if t.device != device:
            t.data = t.data.to(device)


def want_pin(device: torch.device, pin: bool | None) -> bool:
    """Whether CPU copies meant for ``device`` are pinned: ``pin``, or by default when it is a CUDA GPU."""
    return device.type == "cuda" and torch.cuda.is_available() if pin is None else pin


def home_copy(t: Tensor, pin: bool) -> Tensor:
    """``t`` contiguous in CPU memory (pinned when asked): its resting place. A CPU tensor that is
    already so is used as it is (no copy)."""
    home = t.detach().to("cpu").contiguous()
    return home.pin_memory() if pin and not home.is_pinned() else home
