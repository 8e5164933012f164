"""Estimated device memory of one generation under each memory profile (``profiles.PROFILES``), on any machine.

``estimate_memory(config, profile, frames, height, width)`` gives the device bytes of each phase and the
peak; ``memory_table()`` lists them for every profile; ``segue.placement.apply.pick_profile`` ("auto") compares
the peaks with the free GPU memory.

Estimated peak device memory for FLF2V-14B at 1280x720, 81 frames (75,600 tokens), bf16 DiT, CFG as
two passes, default options (``memory_table()``; decimal GB):

| profile    | weights on device | DiT activations | VAE encode | VAE decode | text encode | peak    | CPU RAM |
|------------|-------------------|-----------------|------------|------------|-------------|---------|---------|
| gpu        | 46.3 GB           | 16.6 GB         | 15.3 GB    | 18.8 GB    | 0.3 GB      | 65.1 GB | 0.0 GB  |
| offload    | 33.2 GB           | 16.6 GB         | 15.8 GB    | 19.3 GB    | 11.6 GB     | 52.5 GB | 13.1 GB |
| block-swap | 2.5 GB            | 16.6 GB         | 15.8 GB    | 10.2 GB    | 11.6 GB     | 19.1 GB | 45.4 GB |
| fp8        | 17.0 GB           | 16.6 GB         | 15.8 GB    | 19.3 GB    | 11.6 GB     | 36.4 GB | 13.1 GB |
| low        | 1.7 GB            | 16.6 GB         | 15.8 GB    | 10.2 GB    | 0.0 GB      | 18.3 GB | 29.3 GB |

The phases do not overlap: peak = weights on device + the largest phase (a phase's column counts
the weights it brings in: umT5 11.4 GB, CLIP 1.3 GB, VAE 0.5 GB). The DiT activations are one
forward (its float64 RoPE temporaries are the largest part) plus the sampling loop's latents; with
``fp8`` the fp8 matmul's quantized activations stay below that peak. None of these figures is a GPU
measurement; the CUDA caching allocator adds fragmentation and kernels their workspaces on top.

How the estimates are made: weights are exact byte counts of meta-device builds. Activation peaks
run the real forward code (DiT forward, ``WanVAE.encode``, ``WanVAE.decode`` / ``tiled_decode``) on
meta tensors under a dispatch mode that adds up every tensor storage created and still referenced
(``trace_peak``); attention is counted as a flash-style kernel (output only, no L x L matrix), and
kernel workspaces (cuDNN, cuBLAS) and allocator fragmentation are not included. On CPU the same
counter on real tensors gives the same numbers for the tiny model (tests/test_offload.py).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config import ModelConfig
from . import profiles
from .profiles import DEFAULT_BAND_ROWS, DEFAULT_PREFETCH, DEFAULT_RESIDENT, Profile
from .tensors import module_tensors, weight_bytes
from .tiled_vae import decoder_halo, tiled_decode

__all__ = ["LiveBytes", "estimate_memory", "memory_table", "trace_peak"]


# ---------------------------------------------------------------------------------------------
# Memory accounting by tracing: run code on meta (or real) tensors and add up live storages.


class LiveBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode while they are referenced.

    ``peak`` is the largest total seen. Storages of ``ignore`` (weights, inputs made outside) are
    not counted. A storage is released when the last tensor made in the mode that uses it dies.
    """

    def __init__(self, ignore: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.ignore = {t.untyped_storage()._cdata for t in ignore}
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors referencing it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.ignore or storage.nbytes() == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]


class _FlashAttention(TorchFunctionMode):
    """Counts ``scaled_dot_product_attention`` as a fused kernel: its output, no L x L scores."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        return func(*args, **kwargs)


def trace_peak(fn: Callable[[], Any], ignore: Iterable[Tensor] = ()) -> int:
    """Peak bytes of the tensors ``fn`` creates and holds (its result included), attention counted
    as a flash-style kernel. Works on meta tensors (shapes only, no compute)."""
    with torch.no_grad(), _FlashAttention(), LiveBytes(ignore) as counter:
        fn()
    return counter.peak


# ---------------------------------------------------------------------------------------------
# Meta-device builds and the per-phase estimates.


@functools.lru_cache(maxsize=8)
def _meta_dit(cfg: Any, dtype: torch.dtype, fp8_matmul: bool | None, fp8: bool) -> nn.Module:
    """The DiT on meta in the run dtype; with ``fp8`` its blocks quantized as a profile does."""
    from ..models.dit import WanDiT, apply_dtype_policy

    with torch.device("meta"):
        dit = apply_dtype_policy(WanDiT(cfg), dtype)
    if fp8:
        from ..accel.fp8 import quantize_fp8

        # a profile that lets the GPU pick takes the fp8-matmul path there: trace that path on meta
        quantize_fp8(dit, scaled_mm=True if fp8_matmul is None else fp8_matmul)
    return dit.eval()


def _profile_dit(cfg: Any, dtype: torch.dtype, profile: Profile) -> nn.Module:
    return _meta_dit(cfg, dtype, profile.fp8_matmul, profile.fp8)


@functools.lru_cache(maxsize=4)
def _meta_vae(cfg: Any) -> nn.Module:
    from ..models.vae import WanVAE

    with torch.device("meta"):
        return WanVAE(cfg).eval()


def _latent_shape(cfg: ModelConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    s = cfg.vae.spatial_factor
    return (frames - 1) // cfg.vae.temporal_factor + 1, height // s, width // s


@functools.lru_cache(maxsize=32)
def _dit_activations(
    cfg: ModelConfig, frames: int, height: int, width: int, dtype: torch.dtype, batch: int, profile: Profile
) -> int:
    """Trace of one DiT forward (batch 2 = CFG as one batch) on meta, inputs included."""
    dit = _profile_dit(cfg.dit, dtype, profile)
    t, h, w = _latent_shape(cfg, frames, height, width)
    d = cfg.dit

    def run() -> None:
        with torch.device("meta"):
            x = torch.empty(batch, d.out_dim, t, h, w)
            y = torch.empty(batch, d.in_dim - d.out_dim, t, h, w) if d.image_dim is not None else None
            clip = None
            if cfg.image is not None and d.image_dim is not None:
                n_img = d.image_pos_len or cfg.image.num_tokens
                clip = torch.empty(batch, n_img, d.image_dim)
            context = torch.empty(batch, d.text_len, d.text_dim)
            dit(x, torch.empty(1), context, clip, y)

    return trace_peak(run, module_tensors(dit))


@functools.lru_cache(maxsize=32)
def _vae_trace(cfg: ModelConfig, frames: int, height: int, width: int, mode: str) -> int:
    """Trace of the pipeline's VAE encode (of the conditioning video) or whole-frame decode, on meta."""
    vae = _meta_vae(cfg.vae)
    t, h, w = _latent_shape(cfg, frames, height, width)

    def run() -> None:
        with torch.device("meta"):
            if mode == "encode":
                vae.encode(torch.empty(1, 3, frames, height, width))
            else:
                vae.decode(torch.empty(1, cfg.vae.z_dim, t, h, w))

    return trace_peak(run, module_tensors(vae))


def _tiled_buffers(cfg: ModelConfig, t: int, h: int, w: int) -> int:
    """Bytes held through ``tiled_decode``'s band loop: the video, the low part's output, the latent."""
    v = cfg.vae
    video = 3 * (1 + v.temporal_factor * (t - 1)) * (v.spatial_factor**2 * h * w) * 4
    low = v.decoder_width * v.dim_mult[-1] * t * h * w * 4  # the decoder's widest stage
    return video + low + v.z_dim * t * h * w * 4


@functools.lru_cache(maxsize=32)
def _tiled_trace(cfg: ModelConfig, frames: int, height: int, width: int, band_rows: int) -> int:
    """Peak of ``tiled_decode``: its two buffers at full size plus the tallest band's own working set.

    The band loop is the peak, and a band's working set depends only on its rows with halo (a fresh
    time cache per band, steady after two latent frames), so one band of that height is traced over
    3 latent frames instead of every band over every frame (tests/test_offload.py checks this
    against full traces)."""
    vae = _meta_vae(cfg.vae)
    t, h, w = _latent_shape(cfg, frames, height, width)
    halo = decoder_halo(vae.decoder)  # type: ignore[arg-type]
    rows = max(min(h, r0 + band_rows + halo) - max(0, r0 - halo) for r0 in range(0, h, band_rows))
    t_probe = min(t, 3)

    def run() -> None:
        with torch.device("meta"):
            tiled_decode(vae, torch.empty(1, cfg.vae.z_dim, t_probe, rows, w), rows)  # type: ignore[arg-type]

    band = trace_peak(run, module_tensors(vae)) - _tiled_buffers(cfg, t_probe, rows, w)
    return _tiled_buffers(cfg, t, h, w) + band


@functools.lru_cache(maxsize=4)
def _param_counts(cfg: ModelConfig) -> dict[str, int]:
    from ..parallel.cost import param_counts

    return param_counts(cfg)


def _encoder_activations(cfg: ModelConfig) -> tuple[int, int]:
    """Rough activation bytes of the text encoder (one prompt) and CLIP (two frames): small next to
    their weights. Hidden states and FFN in 2 bytes, attention scores and position bias in fp32."""
    tx = cfg.text
    text = tx.text_len * (8 * tx.d_model + 2 * tx.d_ff) * 2 + 3 * tx.num_heads * tx.text_len**2 * 4
    image = 0
    if cfg.image is not None:
        im, n = cfg.image, 2 * cfg.image.num_tokens
        image = n * (8 * im.hidden_size + 2 * im.intermediate_size) * 2 + 3 * 2 * im.num_heads * im.num_tokens**2 * 4
        image += 2 * 3 * im.image_size**2 * 4  # the preprocessed frames
    return text, image


# ---------------------------------------------------------------------------------------------
# The estimate.


def estimate_memory(
    config: ModelConfig,
    profile: str,
    frames: int,
    height: int,
    width: int,
    *,
    resident: int = DEFAULT_RESIDENT,
    prefetch: int = DEFAULT_PREFETCH,
    band_rows: int = DEFAULT_BAND_ROWS,
    dtype: torch.dtype = torch.bfloat16,
    cfg_batch: bool = False,
    text_encoder_on_cpu: bool | None = None,
) -> dict[str, int]:
    """Estimated device bytes of one generation with ``profile`` (see the module docstring).

    Keys: ``weights`` (on the device all run long), ``dit_activations`` (one DiT forward plus the
    sampling loop's latents), ``vae_encode``, ``vae_decode``, ``text_encode``, ``image_encode`` (each
    phase's extra bytes, weights brought in for it included), ``peak`` (weights + the largest
    phase), ``host`` (CPU bytes holding offloaded weights). ``dtype`` is the DiT/umT5 run dtype;
    the other options are ``apply_profile``'s.
    """
    prof = profiles.get(profile)
    counts = _param_counts(config)
    wb = torch.finfo(dtype).bits // 8
    t5 = counts["t5"] * wb
    clip = counts["clip"] * (2 if dtype != torch.float32 else 4)  # CLIP runs fp16 beside a low-precision DiT
    vae = counts["vae"] * 4  # the VAE runs fp32

    dit = _profile_dit(config.dit, dtype, prof)
    block_bytes = [weight_bytes(b) for b in dit.blocks]
    dit_all = weight_bytes(dit)
    if prof.block_swap:
        on_device = min(len(block_bytes), resident + prefetch + 1)
        dit_dev = dit_all - sum(block_bytes) + sum(sorted(block_bytes)[-on_device:])
    else:
        dit_dev = dit_all

    batch = 2 if cfg_batch else 1
    acts = _dit_activations(config, frames, height, width, dtype, batch, prof)
    t, h, w = _latent_shape(config, frames, height, width)
    acts += 10 * config.vae.z_dim * t * h * w * 4  # noise, latent, y, velocities, solver history
    enc = _vae_trace(config, frames, height, width, "encode")
    if prof.tiled_decode:
        dec = _tiled_trace(config, frames, height, width, band_rows)
    else:
        dec = _vae_trace(config, frames, height, width, "decode")
    text_acts, image_acts = _encoder_activations(config)

    text_on_cpu = prof.text_encoder_on_cpu if text_encoder_on_cpu is None else text_encoder_on_cpu
    if not prof.offload:  # all resident; each phase adds only its activations
        weights = dit_dev + clip + vae + (0 if text_on_cpu else t5)
        phases = {"text_encode": text_acts, "image_encode": image_acts, "vae_encode": enc, "vae_decode": dec}
        host = t5 if text_on_cpu else 0
    else:  # the DiT (or its swap slots) resident; each phase brings its component's weights in
        weights = dit_dev
        phases = {
            "text_encode": t5 + text_acts,
            "image_encode": clip + image_acts,
            "vae_encode": vae + enc,
            "vae_decode": vae + dec,
        }
        home_blocks = sum(block_bytes[resident:]) if prof.block_swap else 0
        host = t5 + clip + vae + home_blocks
    if text_on_cpu:
        phases["text_encode"] = 0  # umT5 runs on the CPU
    out = {"weights": weights, "dit_activations": acts, **phases}
    out["peak"] = weights + max(acts, *phases.values())
    out["host"] = host
    return {k: int(v) for k, v in out.items()}


def memory_table(
    model: str = "flf2v-14b", frames: int = 81, height: int = 720, width: int = 1280, **kwargs: Any
) -> str:
    """A markdown table of ``estimate_memory`` for every profile (decimal GB)."""
    from ..config import get_config

    cfg = get_config(model)
    rows = [
        "| profile | weights on device | DiT activations | VAE encode | VAE decode | text encode | peak | CPU RAM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("weights", "dit_activations", "vae_encode", "vae_decode", "text_encode", "peak", "host")
    for name in profiles.PROFILES:
        est = estimate_memory(cfg, name, frames, height, width, **kwargs)
        rows.append(f"| {name} | " + " | ".join(f"{est[k] / 1e9:.1f} GB" for k in keys) + " |")
    return "\n".join(rows)
