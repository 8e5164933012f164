"""Closed-form costs of one generation: tokens, FLOPs, memory per GPU and bytes communicated.

Used by ``bench/parallel.py`` and docs/parallel.md. Every figure is a formula over the model config,
so it holds for the 14B model without running it. Activation memory is an upper-bound estimate of
one block's live tensors (flash-style attention, no L^2 matrix); weights are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ModelConfig

GB = 1e9


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of the four components, from meta-device builds (no memory)."""
    from ..models.dit import WanDiT
    from ..models.encoders import ImageEncoder, TextEncoder
    from ..models.vae import WanVAE
    from ..weights import count_parameters

    with torch.device("meta"):
        counts = {
            "dit": count_parameters(WanDiT(cfg.dit)),
            "vae": count_parameters(WanVAE(cfg.vae)),
            "t5": count_parameters(TextEncoder(cfg.text, tokenizer=None).model),
            "clip": count_parameters(ImageEncoder(cfg.image).model) if cfg.image is not None else 0,
        }
    return counts


def tokens(cfg: ModelConfig, frames: int, height: int, width: int) -> int:
    pt, ph, pw = cfg.dit.patch_size
    lat_t = (frames - 1) // cfg.vae.temporal_factor + 1
    s = cfg.vae.spatial_factor
    return math.ceil(lat_t / pt) * (height // s // ph) * (width // s // pw)


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one DiT block (matrices + biases + norms + modulation)."""
    d, f = cfg.dit.dim, cfg.dit.ffn_dim
    attn_mats = 4 + (2 if cfg.dit.image_dim is not None else 0) + 4  # self q,k,v,o; k_img,v_img; cross q,k,v,o
    linear = attn_mats * (d * d + d) + (d * f + f) + (f * d + d)
    norms = 2 * d + 2 * d + (d if cfg.dit.image_dim is not None else 0) + 2 * d  # qk norms x2, norm3, k_img norm
    return linear + norms + 6 * d


def dit_flops(cfg: ModelConfig, n_tokens: int) -> dict[str, float]:
    """FLOPs of one DiT forward: matmuls of the blocks over the tokens, and self-attention (QK^T, PV)."""
    d, f, layers = cfg.dit.dim, cfg.dit.ffn_dim, cfg.dit.num_layers
    per_token_macs = 4 * d * d + 2 * d * d + 2 * d * f  # self q,k,v,o; cross q,o; ffn (cross k/v: context only)
    linear = 2 * per_token_macs * n_tokens * layers
    attention = 4 * n_tokens * n_tokens * d * layers
    return {"linear": linear, "attention": attention, "total": linear + attention}


@dataclass(frozen=True)
class Layout:
    """A parallel layout on ``n`` GPUs: sequence degree ``sp`` (ulysses*ring), cfg halves, fsdp."""

    n: int
    ulysses: int = 1
    ring: int = 1
    cfg: bool = False
    fsdp: bool = False

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring


def memory_per_gpu(
    cfg: ModelConfig, n_tokens: int, lay: Layout, weight_bytes: int = 2, t5_on_gpu: bool = True
) -> dict[str, float]:
    """Bytes per GPU: DiT weights (sharded with FSDP, plus two gathered blocks in flight), the text
    encoder (sharded the same way), CLIP + VAE, and one block's activations for the local tokens."""
    counts = param_counts(cfg)
    block = block_params(cfg) * weight_bytes
    dit = counts["dit"] * weight_bytes
    if lay.fsdp:
        dit = dit / lay.n + 2 * block
    t5 = counts["t5"] * 2 / (lay.n if lay.fsdp else 1) if t5_on_gpu else 0.0  # bf16, as the reference
    clip = counts["clip"] * 2  # fp16
    vae = counts["vae"] * 4  # fp32
    local = math.ceil(n_tokens / lay.sp)
    d, f = cfg.dit.dim, cfg.dit.ffn_dim
    # residual fp32 + normed input fp32 + q,k,v,out in the run dtype + ffn hidden and its GELU
    acts = local * (4 * d + 4 * d + 4 * d * weight_bytes + 2 * f * weight_bytes)
    total = dit + t5 + clip + vae + acts
    return {"dit": dit, "t5": t5, "clip": clip, "vae": vae, "activations": acts, "total": total}


def comm_per_step(cfg: ModelConfig, n_tokens: int, lay: Layout, act_bytes: int = 2, weight_bytes: int = 2) -> dict:
    """Bytes each rank sends per sampling step (both CFG passes), by mechanism."""
    d, layers = cfg.dit.dim, cfg.dit.num_layers
    passes = 1 if lay.cfg else 2  # forwards per rank per step
    local = math.ceil(n_tokens / lay.sp)
    u, r = lay.ulysses, lay.ring
    # Ulysses: q, k, v in and the output back; each rank keeps 1/u of what it holds.
    ulysses = passes * layers * 4 * local * d * act_bytes * (u - 1) / u
    # Ring: k and v blocks of the (ulysses-gathered) chunk travel r-1 hops.
    ring = passes * layers * 2 * (r - 1) * local * u * (d // u) * act_bytes if r > 1 else 0.0
    lat = cfg.vae.z_dim * ((n_tokens * math.prod(cfg.dit.patch_size)) * 4)
    cfg_bytes = lat if lay.cfg else 0.0  # one all-gather of the velocity
    gather = passes * local * cfg.dit.dim * 4 * (lay.sp - 1) if lay.sp > 1 else 0.0  # tokens before the head
    fsdp = passes * cfg.dit.num_layers * block_params(cfg) * weight_bytes * (lay.n - 1) / lay.n if lay.fsdp else 0.0
    total = ulysses + ring + cfg_bytes + gather + fsdp
    return {"ulysses": ulysses, "ring": ring, "cfg": cfg_bytes, "gather": gather, "fsdp": fsdp, "total": total}


def ulysses_layer_volume(cfg: ModelConfig, n_tokens: int, degree: int, act_bytes: int = 2) -> float:
    """Bytes one rank sends in the four all-to-alls of one self-attention layer."""
    local = math.ceil(n_tokens / degree)
    return 4 * local * cfg.dit.dim * act_bytes * (degree - 1) / degree
