"""``segue.load``: a checkpoint folder in either layout -> a ready Pipeline on one device.

With ``speed`` (``segue.accel.options.SpeedOptions``), ``build_pipeline`` reads top to bottom:

1. decide the memory profile ("auto": the first whose estimate fits the free GPU memory) before any
   weight is read, so a 14B checkpoint for a 24 GB GPU is read into CPU memory, never onto the GPU whole;
2. build the components (on the device for "gpu", in CPU memory for every other profile);
3. apply the transforms in the one order they compose: LoRAs merged into the weights (before anything
   repacks them), fused QKV + fp32 RoPE (lossless; on by default on CUDA), the memory profile
   (``segue.placement.apply``), the attention kernel ("auto": the fastest lossless one on this GPU; SDPA's
   default on CPU), the CFG strategy (one batch of two on CUDA when the "gpu" profile still fits with it),
   regional torch.compile, the step cache (lossy, opt-in).

On CPU nothing changes by default: the run is the reference's arithmetic. ``exact=True`` keeps that on GPU too.
Nothing below this module imports it.
"""

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
from .placement.tensors import resolve_device, resolve_dtype
from .weights import check_keys

if TYPE_CHECKING:
    from .accel.options import SpeedOptions

log = logging.getLogger("segue")

# The built-in default model (a segue bundle), shipped inside the package once trained.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default.safetensors"


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


# ---------------------------------------------------------------------------------------------
# With speed options: decide the placement, build, then apply the transforms.


def build_pipeline(
    plan: CheckpointPlan, device: torch.device, dtype: torch.dtype, speed: SpeedOptions, started: float | None = None
) -> Pipeline:
    """A Pipeline from a checkpoint plan with ``speed`` applied (see the module docstring for the order).
    ``started``: as for ``build_components``."""
    from .placement.apply import apply_profile

    lossless = device.type == "cuda" and not speed.exact  # the lossless GPU options are on by default
    profile = _decide_profile(speed, plan, device, dtype)
    # Anything but "gpu" is read into CPU memory and moved by the profile (never whole onto the GPU).
    pipe = build_components(plan, device if profile == "gpu" else torch.device("cpu"), dtype, started)
    applied = [f"memory {profile}"]
    applied += _merge_loras(pipe, speed.loras)
    if speed.fuse or (speed.fuse is None and lossless):
        applied.append(_fuse(pipe))
    apply_profile(pipe, profile, device=device, text_encoder_on_cpu=speed.text_encoder_cpu or None)
    applied.append(_set_attention(pipe, speed.attention, lossless, dtype))
    pipe.cfg_batch = _cfg_batch(pipe, speed.cfg_batch, lossless and profile == "gpu")
    if pipe.cfg_batch:
        applied.append("CFG batch of two")
    if speed.compile:
        from .accel.compile import compile_blocks

        compile_blocks(pipe.dit)
        applied.append("regional compile")
    if speed.step_cache is not None:
        from .accel.cache import apply_step_cache

        apply_step_cache(pipe, speed.step_cache, speed.cache_threshold, speed.cache_calibration)
        applied.append(f"step cache {speed.step_cache}")
    pipe.applied = applied
    log.info("speed: %s", ", ".join(applied))
    return pipe


def _decide_profile(speed: SpeedOptions, plan: CheckpointPlan, device: torch.device, dtype: torch.dtype) -> str:
    """The memory profile's name, before any weight is read: as asked, or "auto" from the free GPU memory."""
    if speed.memory != "auto":
        return speed.memory
    if device.type != "cuda":
        return "gpu"
    from .placement.apply import pick_profile

    return pick_profile(plan.config, device, dtype)


def _merge_loras(pipe: Pipeline, loras: tuple[tuple[str, float], ...]) -> list[str]:
    from .lora import load_lora

    for path, scale in loras:
        load_lora(pipe.dit, path, scale)
    return [f"LoRA {Path(path).name} x{scale:g}" for path, scale in loras]


def _fuse(pipe: Pipeline) -> str:
    from .accel.fuse import fast_rope, fuse_qkv

    fuse_qkv(pipe.dit)
    fast_rope(pipe.dit)
    return "fused QKV + fp32 RoPE"


def _set_attention(pipe: Pipeline, backend: str, lossless: bool, dtype: torch.dtype) -> str:
    from .accel.attention import best_backend, set_attention_backend

    if backend == "auto":
        backend = best_backend(pipe.device, dtype) if lossless else "sdpa"
    set_attention_backend(pipe.dit, backend)
    return f"attention {backend}"


def _cfg_batch(pipe: Pipeline, asked: bool | None, may_default: bool) -> bool:
    """CFG as one batch of two: as asked; by default only where the "gpu" profile still fits with it."""
    if asked is not None:
        return asked
    if not may_default:
        return False
    from .placement.apply import choose_profile

    return choose_profile(pipe, cfg_batch=True) == "gpu"
