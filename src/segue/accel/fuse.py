"""Lossless rewrites of the DiT's self-attention, swapped in per block from outside the model.

``fuse_qkv(dit)``: q, k and v become one Linear dim -> 3*dim (the three weights concatenated), one
matmul instead of three over the same input; the RMSNorms, RoPE and attention are unchanged. Each
output element is the same dot product; only the GEMM's blocking may round differently.

``fast_rope(dit)``: RoPE as rotations of adjacent pairs in fp32 real arithmetic,
``(a, b) -> (a cos - b sin, a sin + b cos)``, with cos/sin tables taken once per token grid from the
model's float64 table, instead of a float64 complex product per block. Measured against the float64
path on fp32 inputs: relative error 4e-8 on the rotated q/k and 1.6e-7 at the output of the tiny test
DiT (fp32 rounding of the table and of three ops, instead of one rounding of the float64 result).
``fast_rope(dit, precision="fp64")`` keeps float64 math in real arithmetic (torch.compile friendly,
equal to the complex path after rounding to fp32).

Both swap ``block.self_attn`` for an ``AccelSelfAttention`` that shares the original's ``o`` and norm
modules and its ``attention`` function (a backend or sequence parallel set before or after carries over).

State dict: after ``fuse_qkv`` the keys are ``...self_attn.qkv.{weight,bias}`` instead of q/k/v, so
the checkpoint layout differs: it is NOT meant to be saved or loaded. ``unfuse_qkv`` puts the original
modules back with bit-identical q/k/v weights (restored from the fused tensor, so on its current
device). Fuse before FSDP sharding, torch.compile or weight quantisation, and undo in reverse order.
``fast_rope`` alone keeps the official keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..models.dit import Linear, SelfAttention, WanDiT, apply_rope

ROPE_PRECISIONS = ("fp32", "fp64")


# ---------------------------------------------------------------------------------------------
# RoPE in real arithmetic.


def rope_cos_sin(freqs: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Complex rotations [L, 1, d/2] -> real table [L, 1, d/2, 2] of (cos, sin) in ``dtype``."""
    return torch.view_as_real(freqs).to(dtype)


def rotate_pairs(x: Tensor, table: Tensor) -> Tensor:
    """Rotate ADJACENT pairs of x [B, L, n, d] by table [L, 1, d/2, 2] (cos, sin), in the table's dtype.

    (a, b) -> (a cos - b sin, a sin + b cos), the complex product written out; fp32 out.
    """
    cos, sin = table.unbind(-1)  # [L, 1, d/2]
    a, b = x.to(table.dtype).unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, n, d/2] each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).float()  # [B, L, n, d]


class RopeTables:
    """The (cos, sin) table of the last RoPE grid seen, shared by all blocks of one DiT.

    Converted once per grid (the grid table itself is cached by ``_GridCache``). A real table passed
    in is used as is: ``compile_blocks`` converts outside the compiled region so that no complex
    tensor enters the graph. Under torch.compile of a larger region the conversion is traced instead
    (a view and a cast), so compiled code does not depend on this Python-side cache.
    """

    def __init__(self, precision: str) -> None:
        if precision not in ROPE_PRECISIONS:
            raise InputError(f"RoPE precision must be one of {ROPE_PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.dtype = torch.float32 if precision == "fp32" else torch.float64
        self._key: Tensor | None = None
        self._table: Tensor | None = None

    def __call__(self, freqs: Tensor) -> Tensor:
        """freqs [L, 1, d/2] complex (or an already converted table) -> [L, 1, d/2, 2] real."""
        if not freqs.is_complex():
            return freqs
        if torch.compiler.is_compiling():
            return rope_cos_sin(freqs, self.dtype)
        if freqs is not self._key or self._table is None:
            self._key, self._table = freqs, rope_cos_sin(freqs, self.dtype)
        return self._table

    def rotate(self, x: Tensor, freqs: Tensor) -> Tensor:
        table = self(freqs)
        if table.dtype == torch.float32 or torch.compiler.is_compiling():
            return rotate_pairs(x, table)
        # float64 in eager: one sample at a time bounds the temporaries, as the model does
        return torch.stack([rotate_pairs(xi[None], table)[0] for xi in x])


class _GridCache:
    """Wraps ``WanDiT._rope``: the same table object while the token grid stays the same."""

    def __init__(self, rope: Callable[[int, int, int, torch.device], Tensor]) -> None:
        self.rope = rope
        self.key: tuple | None = None
        self.table: Tensor | None = None

    def __call__(self, f: int, h: int, w: int, device: torch.device) -> Tensor:
        key = (f, h, w, torch.device(device))
        if key != self.key or self.table is None:
            self.key, self.table = key, self.rope(f, h, w, device)
        return self.table


# ---------------------------------------------------------------------------------------------
# The swapped self-attention.


class AccelSelfAttention(nn.Module):
    """``SelfAttention`` with q/k/v optionally fused into ``qkv`` and RoPE optionally from cos/sin tables."""

    def __init__(self, original: SelfAttention) -> None:
        super().__init__()
        self.num_heads = original.num_heads
        self.attention = original.attention
        self.q, self.k, self.v, self.o = original.q, original.k, original.v, original.o  # shared modules
        self.qkv: Linear | None = None
        self.norm_q, self.norm_k = original.norm_q, original.norm_k
        self.rope: RopeTables | None = None  # None: the model's float64 complex RoPE
        # Not a submodule: keeps the state dict to the modules that compute.
        self.__dict__["original"] = original

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    def forward(self, x: Tensor, freqs: Tensor) -> Tensor:
        # x [B, L, C]; freqs [L, 1, d/2] complex128 (or its real table [L, 1, d/2, 2] with fast RoPE)
        n = self.num_heads
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, L, C] each
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = self.norm_q(q).unflatten(2, (n, -1))  # [B, L, n, d]
        k = self.norm_k(k).unflatten(2, (n, -1))
        v = v.unflatten(2, (n, -1))
        if self.rope is not None:
            q, k = self.rope.rotate(q, freqs), self.rope.rotate(k, freqs)
        else:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = self.attention(q, k, v, self.o.weight.dtype)  # [B, L, C] fp32
        return self.o(out)


def _accel(block: nn.Module) -> AccelSelfAttention:
    attn = block.self_attn
    if isinstance(attn, AccelSelfAttention):
        return attn
    if type(attn) is not SelfAttention:
        raise InputError(f"block self-attention is a {type(attn).__name__}, expected the model's SelfAttention")
    block.self_attn = AccelSelfAttention(attn)
    return block.self_attn


def _maybe_restore(block: nn.Module) -> None:
    """Put the original SelfAttention back once no option is left on the swapped one."""
    attn = block.self_attn
    if isinstance(attn, AccelSelfAttention) and not attn.fused and attn.rope is None:
        original: SelfAttention = attn.original
        original.attention = attn.attention  # a backend chosen meanwhile stays chosen
        block.self_attn = original


@torch.no_grad()
def fuse_qkv(dit: WanDiT) -> WanDiT:
    """Fuse every block's q/k/v projections into one Linear (see the module docstring); in place."""
    for block in dit.blocks:
        attn = _accel(block)
        if attn.fused:
            continue
        q, k, v = attn.q, attn.k, attn.v
        weight = torch.cat([q.weight, k.weight, v.weight])  # [3C, C]
        has_bias = q.bias is not None
        with torch.device("meta"):
            qkv = Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        qkv.weight = nn.Parameter(weight, requires_grad=q.weight.requires_grad)
        if has_bias:
            qkv.bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]), requires_grad=q.bias.requires_grad)
        # The originals become views of the fused tensor: no second copy of the weights is kept.
        for lin, w in zip((q, k, v), qkv.weight.chunk(3)):
            lin.weight.data = w
        if has_bias:
            for lin, b in zip((q, k, v), qkv.bias.chunk(3)):
                lin.bias.data = b
        attn.q = attn.k = attn.v = None
        attn.qkv = qkv
    return dit


@torch.no_grad()
def unfuse_qkv(dit: WanDiT) -> WanDiT:
    """Undo ``fuse_qkv``: the original q/k/v modules and parameters, with bit-identical weights; in place."""
    for block in dit.blocks:
        attn = block.self_attn
        if not isinstance(attn, AccelSelfAttention) or attn.qkv is None:
            continue
        qkv, original = attn.qkv, attn.original
        if not isinstance(qkv, nn.Linear) or qkv.weight.shape[0] != 3 * qkv.weight.shape[1]:
            raise InputError(f"the fused qkv was replaced by a {type(qkv).__name__}: undo that before unfuse_qkv")
        lins = (original.q, original.k, original.v)
        # Own storage again (contiguous copies), on the fused tensor's current device and dtype.
        for lin, w in zip(lins, qkv.weight.chunk(3)):
            lin.weight.data = w.clone()
        if qkv.bias is not None:
            for lin, b in zip(lins, qkv.bias.chunk(3)):
                lin.bias.data = b.clone()
        attn.qkv = None
        attn.q, attn.k, attn.v = lins
        _maybe_restore(block)
    return dit


def fast_rope(dit: WanDiT, precision: str = "fp32") -> WanDiT:
    """RoPE from cos/sin tables in ``precision`` ("fp32": fast; "fp64": float64 real math); in place."""
    tables = RopeTables(precision)
    for block in dit.blocks:
        _accel(block).rope = tables
    rope = dit.__dict__.get("_rope")
    if not isinstance(rope, _GridCache):
        dit._rope = _GridCache(dit._rope)  # an instance attribute shadowing the method
    return dit


def remove_fast_rope(dit: WanDiT) -> WanDiT:
    """Back to the model's float64 complex RoPE; in place."""
    for block in dit.blocks:
        attn = block.self_attn
        if isinstance(attn, AccelSelfAttention):
            attn.rope = None
            _maybe_restore(block)
    if isinstance(dit.__dict__.get("_rope"), _GridCache):
        del dit.__dict__["_rope"]
    return dit
