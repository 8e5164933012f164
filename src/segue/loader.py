"""``segue.load``: a checkpoint folder in either layout -> a ready Pipeline on one device."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointPlan, plan_checkpoint
from .errors import InputError
from .pipeline import Pipeline
from .weights import check_keys

if TYPE_CHECKING:
    from .accel.options import SpeedOptions

log = logging.getLogger("segue")

# The built-in default model (a segue bundle), shipped inside the package once trained.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default.safetensors"


def resolve_device(device: str | torch.device) -> torch.device:
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


def build_components(
    plan: CheckpointPlan, device: torch.device, dtype: torch.dtype, started: float | None = None
) -> Pipeline:
    """Build each component on meta, check every key, then assign tensors read one at a time. ``started``: the
    ``time.perf_counter()`` of the load call, so the logged time includes everything (imports too)."""
    t0 = time.perf_counter() if started is None else started
    from .models.dit import WanDiT, dit_param_dtype
    from .models.encoders import load_image_encoder, load_text_encoder
    from .models.vae import WanVAE

    cfg = plan.config
    with torch.device("meta"):
        dit = WanDiT(cfg.dit)
        vae = WanVAE(cfg.vae)
    check_keys(dit, plan.dit.meta_dict(), "DiT", plan.dit.origin)
    check_keys(vae, plan.vae.meta_dict(), "VAE", plan.vae.origin)
    dit.load_state_dict(plan.dit.read(device, lambda n, t: dit_param_dtype(n, dtype)), assign=True)
    vae.load_state_dict(plan.vae.read(device, lambda n, t: torch.float32), assign=True)  # the VAE runs fp32
    dit.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)

    tokenizer = plan.load_tokenizer()
    text = load_text_encoder(cfg.text, plan.text.read("cpu", lambda n, t: None), tokenizer, device, dtype)
    image = None
    if plan.image is not None and cfg.image is not None:
        # the reference runs CLIP in fp16 on GPU; fp32 wherever the run is fp32
        clip_dtype = torch.float16 if dtype != torch.float32 else torch.float32
        image = load_image_encoder(cfg.image, plan.image.read("cpu", lambda n, t: None), device, clip_dtype)
    log.info("loaded %s (%s layout) on %s in %.1fs", plan.folder, plan.layout, device, time.perf_counter() - t0)
    return Pipeline(cfg, dit, vae, text, image, device, source=str(plan.folder))


def checkpoint_plan(path: str | os.PathLike | None = None) -> CheckpointPlan:
    """What the checkpoint at ``path`` holds (layout, model config, tensor locations), read without its
    weights; the built-in model when ``path`` is None. Cheap: the CLI checks settings against it first."""
    if path is not None and (not isinstance(path, str | os.PathLike) or not str(path)):
        raise InputError(
            f"path must be a checkpoint folder or a segue .safetensors bundle (str or Path), or None for the "
            f"built-in model; got {path!r:.60}"
        )
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise InputError(
                "no checkpoint given and no built-in model is installed; pass the folder of "
                "Wan2.1-FLF2V-14B-720P (official or -diffusers layout) or a segue .safetensors bundle"
            )
        path = DEFAULT_MODEL
    return plan_checkpoint(path)


def load_plan(
    plan: CheckpointPlan,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    speed: SpeedOptions | None = None,
    started: float | None = None,
) -> Pipeline:
    """The Pipeline of an already planned checkpoint (see ``load``). ``started``: when the caller's load
    began (``time.perf_counter()``), so the logged time includes imports and planning."""
    started = time.perf_counter() if started is None else started
    from .accel.options import SpeedOptions

    if speed is not None and not isinstance(speed, SpeedOptions):
        raise InputError(
            f"speed must be a segue.accel.options.SpeedOptions (or None), got {speed!r:.60} ({type(speed).__name__})"
        )
    dev = resolve_device(device)
    run_dtype = resolve_dtype(dtype, dev)
    if speed is None:
        return build_components(plan, dev, run_dtype, started)
    from .accel.options import build_pipeline

    return build_pipeline(plan, dev, run_dtype, speed, started)


def load(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    speed: SpeedOptions | None = None,
) -> Pipeline:
    """Load a checkpoint (official or diffusers folder, or a segue .safetensors bundle; auto-detected)
    as a Pipeline. Without a path, the built-in default model. ``speed`` (segue.accel.options): memory
    profile, LoRAs, attention kernel, compile, step cache; None loads the plain reference path.
    Every argument is checked before any file is read: InputError names the argument and what is allowed."""
    started = time.perf_counter()
    from .accel.options import SpeedOptions

    if path is not None and (not isinstance(path, str | os.PathLike) or not str(path)):
        raise InputError(
            f"path must be a checkpoint folder or a segue .safetensors bundle (str or Path), or None for the "
            f"built-in model; got {path!r:.60}"
        )
    if speed is not None and not isinstance(speed, SpeedOptions):
        raise InputError(
            f"speed must be a segue.accel.options.SpeedOptions (or None), got {speed!r:.60} ({type(speed).__name__})"
        )
    resolve_dtype(dtype, resolve_device(device))  # device and dtype are checked before any file is read
    return load_plan(checkpoint_plan(path), device, dtype, speed, started)
