"""Self-attention kernels for the Wan DiT, swapped in from outside through ``SelfAttention.attention``.

Every kernel has the model's signature: ``(q, k, v [B, L, n, d], dtype) -> [B, L, n*d] fp32``, softmax
scale 1/sqrt(d), no mask. Cross-attention is not touched (its 512/514 keys make it a small share of
the FLOPs; it keeps the model's default SDPA).

Kernels (``BACKENDS``):

- ``sdpa``: torch's default dispatch, the model's own function.
- ``flash``, ``cudnn``, ``efficient``, ``math``: the same SDPA call restricted to one torch backend
  with ``torch.nn.attention.sdpa_kernel``. ``flash`` (FlashAttention-2) and ``cudnn`` need CUDA and
  fp16/bf16; ``efficient`` needs CUDA; ``math`` runs anywhere (the slow reference).
- ``fa3``: FlashAttention 3 (``flash_attn_interface.flash_attn_func``), Hopper GPUs, fp16/bf16.
- ``sage``: SageAttention (``sageattention.sageattn``): int8 QK^T and fp8 PV, so LOSSY.

All but ``sage`` compute the same softmax attention; they differ only in summation order and in how
the softmax is blocked, i.e. within rounding of the attention dtype.

Sequence parallel (``segue.parallel.sequence``) installs its own distributed attention, which calls
SDPA on the local blocks. Apply it FIRST: ``set_attention_backend`` then runs that distributed
function under the chosen SDPA backend (Ulysses; the ring path merges partial results with its own
kernel). ``fa3`` and ``sage`` cannot be put under it without a seam in sequence.py and are refused.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import InputError
from ..models.dit import AttentionFn, WanDiT
from ..models.dit import sdpa_attention as _sdpa

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The kernels.


class _Restricted:
    """An attention function run with SDPA limited to one torch backend (a picklable callable).

    ``inner`` is the function that calls SDPA: the model's own, or sequence parallel's distributed one.
    """

    def __init__(self, name: str, backend: SDPBackend, inner: AttentionFn = _sdpa) -> None:
        self.name, self.backend, self.inner = name, backend, inner

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
        try:
            with sdpa_kernel(self.backend):
                return self.inner(q, k, v, dtype)
        except RuntimeError as err:
            if "No available kernel" not in str(err) and "No viable backend" not in str(err):
                raise
            raise InputError(
                f"attention backend {self.name!r} cannot run q {tuple(q.shape)} in {dtype} on {q.device}: "
                f"it needs {_NEEDS[self.name]}"
            ) from err


def _fa3(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """FlashAttention 3 takes [B, L, n, d] as is (no transposes)."""
    if dtype not in _HALF:
        raise InputError(f"attention backend 'fa3' takes fp16/bf16, the attention dtype is {dtype}")
    fa3 = _import("flash_attn_interface", "install flash-attn 3 (flash_attn_interface)")
    out = fa3.flash_attn_func(q.to(dtype), k.to(dtype), v.to(dtype))
    if isinstance(out, tuple):  # older releases also return the log-sum-exp
        out = out[0]
    return out.flatten(2).float()  # [B, L, n*d]


def _sage(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """SageAttention (quantised QK^T and PV: lossy), layout NHD = [B, L, n, d]."""
    if dtype not in _HALF:
        raise InputError(f"attention backend 'sage' takes fp16/bf16, the attention dtype is {dtype}")
    sage = _import("sageattention", "install SageAttention (pip install sageattention)")
    out = sage.sageattn(q.to(dtype), k.to(dtype), v.to(dtype), tensor_layout="NHD", is_causal=False)
    return out.flatten(2).float()  # [B, L, n*d]


@functools.cache
def _import_cached(module: str) -> ModuleType:
    return importlib.import_module(module)


def _import(module: str, hint: str) -> ModuleType:
    try:
        return _import_cached(module)
    except ImportError as err:
        raise InputError(f"{hint}: cannot import {module} ({err})") from err


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    lossless: bool  # False: an approximation of softmax attention beyond the dtype's rounding
    sdp: SDPBackend | None = None  # the torch SDPA backend it restricts to, if any


_NEEDS = {
    "flash": "a CUDA GPU of compute capability 8.0+ and fp16/bf16 inputs (torch's FlashAttention-2 kernel)",
    "cudnn": "a CUDA GPU of compute capability 8.0+ with cuDNN 9 and fp16/bf16 inputs",
    "efficient": "a CUDA GPU (torch's memory-efficient kernel)",
    "math": "nothing (runs on any device)",
}

BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("sdpa", _sdpa, lossless=True),
    "flash": Backend("flash", _Restricted("flash", SDPBackend.FLASH_ATTENTION), True, SDPBackend.FLASH_ATTENTION),
    "cudnn": Backend("cudnn", _Restricted("cudnn", SDPBackend.CUDNN_ATTENTION), True, SDPBackend.CUDNN_ATTENTION),
    "efficient": Backend(
        "efficient", _Restricted("efficient", SDPBackend.EFFICIENT_ATTENTION), True, SDPBackend.EFFICIENT_ATTENTION
    ),
    "math": Backend("math", _Restricted("math", SDPBackend.MATH), True, SDPBackend.MATH),
    "fa3": Backend("fa3", _fa3, lossless=True),
    "sage": Backend("sage", _sage, lossless=False),
}


# ---------------------------------------------------------------------------------------------
# What runs where.


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _probe(name: str, device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run the kernel once on small inputs; None when it works, else why not."""
    q = torch.randn(1, 256, 2, head_dim, device=device, dtype=dtype)
    try:
        BACKENDS[name].fn(q, q, q, dtype)
    except (InputError, RuntimeError) as err:
        return f"{name} failed a {dtype} probe on {device}: {str(err).splitlines()[0][:200]}"
    return None


def why_unavailable(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str | None:
    """None when backend ``name`` can run on ``device`` (in ``dtype``, default bf16 on CUDA), else the reason."""
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if name in ("sdpa", "math"):
        return None
    if name in ("flash", "cudnn", "efficient") and not cuda:
        return f"attention backend {name!r} needs {_NEEDS[name]}; this device is {device}"
    if name == "fa3":
        if not _has_module("flash_attn_interface"):
            return "install flash-attn 3 (flash_attn_interface) for attention backend 'fa3'"
        if not cuda or torch.cuda.get_device_capability(device)[0] != 9:
            return f"attention backend 'fa3' needs a Hopper GPU (compute capability 9.x); this device is {device}"
    if name == "sage":
        if not _has_module("sageattention"):
            return "install SageAttention (pip install sageattention) for attention backend 'sage'"
        if not cuda:
            return f"attention backend 'sage' needs a CUDA GPU; this device is {device}"
    if not cuda:
        return None
    return _probe(name, str(device), dtype or torch.bfloat16, 128)  # head dim 128 as in Wan


def available_backends(device: torch.device | str) -> dict[str, str]:
    """Every backend name -> "available" or why it cannot run on ``device`` (CUDA: probed in bf16)."""
    return {name: why_unavailable(name, device) or "available" for name in BACKENDS}


def best_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The fastest lossless backend that works: fa3 on Hopper when installed, then cudnn/flash, else sdpa.

    On Hopper cuDNN's fused attention is tried before FlashAttention-2, on older GPUs after it. fp32
    (and CPU) get ``sdpa``: torch's own dispatch already picks the best fp32 kernel there.
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in _HALF:
        return "sdpa"
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    order = ("fa3", "cudnn", "flash") if hopper else ("flash", "cudnn")
    for name in order:
        if why_unavailable(name, device, dtype) is None:
            return name
    return "sdpa"


# ---------------------------------------------------------------------------------------------
# Applying one to a DiT.


def _device_of(dit: WanDiT) -> torch.device:
    p = next(dit.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def set_attention_backend(dit: WanDiT, name: str, check: bool = True) -> None:
    """Make every block's self-attention use backend ``name`` (``"sdpa"`` restores the default).

    ``check`` refuses (InputError, with the reason) a backend that cannot run on the DiT's device in
    its attention dtype (on CUDA a small probe call).
    With sequence parallel applied, the SDPA backends restrict the kernel its distributed attention
    calls; fa3 and sage are refused there.
    """
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    device = _device_of(dit)
    if check and device.type != "meta":
        dtype = dit.blocks[0].self_attn.o.weight.dtype  # what attention runs in (the model casts to it)
        reason = why_unavailable(name, device, dtype if device.type == "cuda" else None)
        if reason is not None:
            raise InputError(reason)
    backend = BACKENDS[name]
    sequence_parallel = "_segue_sequence_parallel" in dit.__dict__
    for block in dit.blocks:
        current = block.self_attn.attention
        if sequence_parallel:
            base: Callable = current.inner if isinstance(current, _Restricted) else current
            if backend.sdp is None and name != "sdpa":
                raise InputError(
                    f"attention backend {name!r} cannot run under sequence parallel: its local attention is "
                    "torch SDPA; choose one of sdpa, flash, cudnn, efficient, math"
                )
            block.self_attn.attention = base if backend.sdp is None else _Restricted(name, backend.sdp, base)
        else:
            block.self_attn.attention = backend.fn


def attention_backend(dit: WanDiT) -> str:
    """The name of the backend the DiT's self-attention uses ("custom" for an unknown function)."""
    fn = dit.blocks[0].self_attn.attention
    if isinstance(fn, _Restricted):
        return fn.name
    for name, backend in BACKENDS.items():
        if fn is backend.fn:
            return name
    return "custom"
