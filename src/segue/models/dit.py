"""Wan2.1 DiT denoiser (the reference ``WanModel``: t2v, i2v and flf2v variants).

Parameter names are the official checkpoint names (SPEC section 3), so an official state dict loads
as is. Which variant this is follows from the config alone: with ``image_dim`` set there is an image
branch (``img_emb`` and the ``k_img``/``v_img`` cross-attention), with ``image_pos_len`` set the
FLF2V position table ``img_emb.emb_pos`` is added to the CLIP tokens of the first and last frames.

Numerics follow the reference run under bf16 autocast: the residual stream, time embedding,
modulation, norms and head are fp32; each Linear/Conv runs in its own weight's dtype (its input is
cast to it); RoPE is float64 complex math. ``apply_dtype_policy`` puts the weights in that layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DiTConfig
from ..errors import InputError

# Eps of the image-embedding LayerNorms: torch's default in the reference, not the config's eps.
_IMG_LN_EPS = 1e-5


class Linear(nn.Linear):
    """Linear that casts its input to its weight's dtype (what autocast does for the reference)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


class Conv3d(nn.Conv3d):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (returns fp32) whatever the input or weight dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """RMS norm over the whole last dim (all heads together), normalised in fp32, then the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # The reference casts back to the input dtype before the (fp32) weight multiplies.
        return normed.to(x.dtype) * self.weight


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine, in fp32 (norm1, norm2 and the head norm have no weights)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """[B] timesteps -> [B, dim] float64, cos half first then sin half."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(pos, freqs)  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """How the head_dim/2 rotation pairs are shared by (time, height, width): 22/21/21 for 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_table(head_dim: int, max_len: int, device: torch.device) -> Tensor:
    """Unit complex rotations [max_len, head_dim/2] (complex128), three axes side by side."""
    parts = []
    for pairs in rope_split(head_dim):
        d = 2 * pairs
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64, device=device).div(d))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv)
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate ADJACENT element pairs of x [B, L, n, d] by freqs [L, 1, d/2]; float64 math, fp32 out."""
    out = []
    for xi in x:  # one sample at a time bounds the float64 temporaries, as the reference does
        xc = torch.view_as_complex(xi.to(torch.float64).reshape(*xi.shape[:-1], -1, 2))  # [L, n, d/2]
        out.append(torch.view_as_real(xc * freqs).flatten(2).float())  # [L, n, d]
    return torch.stack(out)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, Lq, n, d] x [B, Lk, n, d] -> [B, Lq, n*d] fp32, softmax scale 1/sqrt(d), no mask."""
    q, k, v = (u.to(dtype).transpose(1, 2) for u in (q, k, v))  # [B, n, L, d]
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).float()


AttentionFn = Callable[[Tensor, Tensor, Tensor, torch.dtype], Tensor]


class SelfAttention(nn.Module):
    # ``attention`` is the one seam for parallelism: segue.parallel swaps in a sequence-parallel
    # function (Ulysses/ring) from outside; on one device it is plain SDPA.
    attention: AttentionFn

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.attention = sdpa_attention
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, freqs: Tensor) -> Tensor:
        n = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(2, (n, -1))  # [B, L, n, d]
        k = self.norm_k(self.k(x)).unflatten(2, (n, -1))
        v = self.v(x).unflatten(2, (n, -1))
        out = self.attention(apply_rope(q, freqs), apply_rope(k, freqs), v, self.o.weight.dtype)
        return self.o(out)  # [B, L, C]


class CrossAttention(nn.Module):
    """Text cross-attention, plus an image branch (own k/v, same queries) when image_dim is set."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        if cfg.image_dim is not None:
            self.k_img = Linear(dim, dim)
            self.v_img = Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        else:
            self.k_img = self.v_img = self.norm_k_img = None

    def forward(self, x: Tensor, text: Tensor, image: Tensor | None) -> Tensor:
        n, dtype = self.num_heads, self.o.weight.dtype
        q = self.norm_q(self.q(x)).unflatten(2, (n, -1))  # [B, L, n, d]
        k = self.norm_k(self.k(text)).unflatten(2, (n, -1))  # [B, text_len, n, d]
        v = self.v(text).unflatten(2, (n, -1))
        out = sdpa_attention(q, k, v, dtype)  # [B, L, C]
        if self.k_img is not None:
            if image is None:
                raise InputError("this DiT has an image branch: clip features are required")
            k_img = self.norm_k_img(self.k_img(image)).unflatten(2, (n, -1))  # [B, N_img, n, d]
            v_img = self.v_img(image).unflatten(2, (n, -1))
            out = out + sdpa_attention(q, k_img, v_img, dtype)
        return self.o(out)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        # in place: on the meta device an out-of-place division runs PyTorch's Python reference, which
        # imports torch._dynamo (seconds, and a compile-cache folder in TMPDIR); the values are the same
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim).div_(cfg.dim**0.5))
        self.self_attn = SelfAttention(cfg)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(
            Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, cfg.dim)
        )

    def forward(self, x: Tensor, e0: Tensor, freqs: Tensor, text: Tensor, image: Tensor | None) -> Tensor:
        # x [B, L, C] fp32, e0 [B, 6, C] fp32
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e0).chunk(6, dim=1)
        y = self.self_attn(_layer_norm(x, self.eps) * (1 + scale) + shift, freqs)
        x = x + y.float() * gate
        x = x + self.cross_attn(self.norm3(x), text, image).float()  # no gate on cross-attention
        y = self.ffn(_layer_norm(x, self.eps) * (1 + c_scale) + c_shift)
        return x + y.float() * c_gate


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim).div_(cfg.dim**0.5))  # in place: see Block

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # x [B, L, C], e [B, C]: the head modulates with e, not the projected e0
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return self.head(_layer_norm(x, self.eps) * (1 + scale) + shift).float()  # [B, L, out*prod(p)]


class ImageEmbedding(nn.Module):
    """CLIP tokens -> context tokens: LayerNorm, Linear, exact GELU, Linear, LayerNorm."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        assert cfg.image_dim is not None
        d = cfg.image_dim
        self.proj = nn.Sequential(
            FP32LayerNorm(d, eps=_IMG_LN_EPS),
            Linear(d, d),
            nn.GELU(),
            Linear(d, cfg.dim),
            FP32LayerNorm(cfg.dim, eps=_IMG_LN_EPS),
        )
        if cfg.image_pos_len is not None:
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.image_pos_len, d))
        else:
            self.emb_pos = None

    def forward(self, clip: Tensor) -> Tensor:
        # clip [B, N_img, image_dim] (or [2B, 257, image_dim] for FLF2V: regrouped per sample)
        if self.emb_pos is not None:
            n_pos = self.emb_pos.shape[1]
            if clip.numel() % (n_pos * clip.shape[-1]):
                raise InputError(f"clip features {tuple(clip.shape)} do not hold {n_pos} tokens per sample")
            clip = clip.reshape(-1, n_pos, clip.shape[-1]).float() + self.emb_pos.float()
        return self.proj(clip)  # [B, N_img, dim] fp32


@dataclass
class Embedded:
    """The blocks' inputs (``WanDiT.embed``), handed to the blocks runner."""

    tokens: Tensor | None  # [B, L, C] fp32 (forward takes it out, so it is freed block by block)
    e: Tensor  # [B, C] time embedding (the head's modulation)
    e0: Tensor  # [B, 6, C] the blocks' modulation
    freqs: Tensor  # [L, 1, head_dim/2] RoPE rotations
    text: Tensor  # [B, text_len, C]
    image: Tensor | None  # [B, N_img, C]
    grid: tuple[int, int, int, int]  # (B, f, h, w) token grid


# How the blocks run: ``runner(dit, emb, step) -> tokens`` [B, L, C] fp32, from ``emb.tokens`` (which the
# runner takes out of ``emb``). ``step`` is whatever the caller passed to ``forward`` (the sampling loop's
# segue.sampling.guidance.StepContext).
BlocksRunner = Callable[["WanDiT", Embedded, Any], Tensor]


class WanDiT(nn.Module):
    # The seam for step caching: a runner installed from outside (segue.accel.cache) decides per call
    # whether the blocks run; None runs them all (``run_blocks``). A plain attribute, not a submodule.
    blocks_runner: BlocksRunner | None = None

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), Linear(dim, dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.img_emb = ImageEmbedding(cfg) if cfg.image_dim is not None else None
        # RoPE rotations per device, built lazily on the input's device (never a meta buffer).
        self._rope_cache: dict[torch.device, Tensor] = {}

    def _rope(self, f: int, h: int, w: int, device: torch.device) -> Tensor:
        """Rotations of the (f, h, w) token grid, [f*h*w, 1, head_dim/2] complex128."""
        if max(f, h, w) > self.cfg.rope_max_len:
            raise InputError(f"token grid {(f, h, w)} exceeds the RoPE length {self.cfg.rope_max_len}")
        table = self._rope_cache.get(device)
        if table is None:
            table = rope_table(self.cfg.head_dim, self.cfg.rope_max_len, device)
            self._rope_cache[device] = table
        ft, fh, fw = table.split(rope_split(self.cfg.head_dim), dim=1)
        grid = torch.cat(
            [
                ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        )  # [f, h, w, c]
        return grid.reshape(f * h * w, 1, -1)

    def embed(
        self, x: Tensor, t: Tensor, context: Tensor, clip: Tensor | None = None, y: Tensor | None = None
    ) -> Embedded:
        """Everything before the blocks: tokens, time modulation, RoPE, text and image context."""
        cfg = self.cfg
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # [B, in_dim, T, H, W]
        b, c_in, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if c_in != cfg.in_dim:
            raise InputError(f"latent + conditioning have {c_in} channels, the DiT expects {cfg.in_dim}")
        if frames % pt or height % ph or width % pw:
            size = (frames, height, width)
            raise InputError(f"latent size {size} is not a multiple of patch {cfg.patch_size}")
        if context.shape[1] > cfg.text_len:
            raise InputError(f"text context has {context.shape[1]} tokens, at most {cfg.text_len} allowed")
        if clip is not None and self.img_emb is None:
            raise InputError("clip features given to a DiT without an image branch")
        t = t.reshape(-1)
        if t.shape[0] not in (1, b):
            raise InputError(f"{t.shape[0]} timesteps for a batch of {b}")

        # Tokens: patchify, flatten (f, h, w) -> L.
        tokens = self.patch_embedding(x)  # [B, C, f, h, w]
        f, h, w = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2).float()  # [B, L, C]
        freqs = self._rope(f, h, w, x.device)

        # Time: fp32 after a float64 sinusoid.
        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t).float()).float()  # [B, C]
        e0 = self.time_projection(e).float().unflatten(1, (6, cfg.dim))  # [B, 6, C]

        # Text, zero-padded to text_len; the padding is attended to (not masked), as in the reference.
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        text = self.text_embedding(context)  # [B, text_len, C]
        image = self.img_emb(clip) if self.img_emb is not None and clip is not None else None
        return Embedded(tokens, e, e0, freqs, text, image, (b, f, h, w))

    def unpatchify(self, tokens: Tensor, emb: Embedded) -> Tensor:
        """Head and unpatchify: [B, L, C] -> [B, out_dim, T, H, W]."""
        cfg = self.cfg
        b, f, h, w = emb.grid
        pt, ph, pw = cfg.patch_size
        out = self.head(tokens, emb.e)  # [B, L, out_dim*pt*ph*pw]
        # (f h w pt ph pw c) -> c (f pt) (h ph) (w pw)
        out = out.view(b, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_dim, f * pt, h * ph, w * pw)

    def run_blocks(self, emb: Embedded) -> Tensor:
        """Every block in order on ``emb.tokens`` [B, L, C] -> [B, L, C]."""
        tokens, emb.tokens = emb.tokens, None  # the residual stream; no second reference kept alive
        assert tokens is not None
        for block in self.blocks:
            tokens = block(tokens, emb.e0, emb.freqs, emb.text, emb.image)
        return tokens

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        clip: Tensor | None = None,
        y: Tensor | None = None,
        step: Any = None,
    ) -> Tensor:
        """x [B, out_dim, T, H, W] noisy latent, t [1] or [B] timesteps, context [B, L, text_dim], clip
        [B, N, image_dim], y [B, in_dim - out_dim, T, H, W] -> velocity [B, out_dim, T, H, W]. ``step``
        (the sampling loop's step context) only reaches the blocks runner."""
        emb = self.embed(x, t, context, clip, y)
        runner = self.blocks_runner
        tokens = self.run_blocks(emb) if runner is None else runner(self, emb, step)
        return self.unpatchify(tokens, emb)


# ---------------------------------------------------------------------------------------------
# Dtype policy: big matmul weights in the compute dtype, the small precision-critical parts fp32.

_FP32_MODULES = frozenset({"modulation", "norm_q", "norm_k", "norm3", "norm_k_img", "emb_pos"})


def dit_param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the tensor ``name`` (official name) gets when the DiT runs in ``dtype``."""
    parts = name.split(".")
    if parts[0] in ("time_embedding", "time_projection", "head"):
        return torch.float32
    if parts[0] == "img_emb" and len(parts) > 2 and parts[1] == "proj" and parts[2] in ("0", "4"):
        return torch.float32  # the image-embedding LayerNorms
    if _FP32_MODULES.intersection(parts):
        return torch.float32
    return dtype


@torch.no_grad()
def apply_dtype_policy(model: WanDiT, dtype: torch.dtype) -> WanDiT:
    """Cast each parameter in place to ``dit_param_dtype(name, dtype)``; returns the model."""
    for name, p in model.named_parameters():
        p.data = p.data.to(dit_param_dtype(name, dtype))
    return model
