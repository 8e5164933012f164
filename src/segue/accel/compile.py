"""Regional torch.compile of the Wan DiT: each Block's forward compiled, everything else eager.

The blocks are identical, so dynamo traces one graph and every block reuses it (their parameters are
graph inputs), which keeps compile time to one block's. Inside a block inductor fuses the norms,
modulation, RoPE, gated residuals and GELU around the matmuls and attention.

Only ``block.forward`` is compiled, not the module call: forward hooks and pre-hooks (sequence
parallel's sharding, FSDP's unsharding) stay eager and keep working. Sequence parallel's
collectives inside the attention function are traced or graph-broken by dynamo; use
``fullgraph=False`` there.

RoPE: the model's float64 complex rotation has no inductor code generation (it falls back to eager
kernels). By default ``compile_blocks`` first applies ``fast_rope`` (fp32 real arithmetic, relative
error ~1e-7; ``rope="fp64"`` keeps float64 real math) and hands each compiled block the real
(cos, sin) table, converted once per grid outside the graph, so no complex tensor enters it.
``rope=None`` leaves the RoPE as it is.

Numerics: inductor reorders and fuses elementwise work (and may use FMA), so outputs equal eager
within fp32 rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..models.dit import WanDiT
from .fuse import ROPE_PRECISIONS, AccelSelfAttention, fast_rope


class _CompiledForward:
    """A block's compiled forward behind an eager step that swaps complex RoPE for its real table."""

    def __init__(self, block: nn.Module, compiled: Callable[..., Tensor]) -> None:
        self.block = block
        self.compiled = compiled

    def __call__(self, x: Tensor, e0: Tensor, freqs: Tensor, text: Tensor, image: Tensor | None) -> Tensor:
        attn = self.block.self_attn
        if freqs.is_complex() and isinstance(attn, AccelSelfAttention) and attn.rope is not None:
            freqs = attn.rope(freqs)  # [L, 1, d/2, 2] real, cached per grid
        # Sequence parallel hands the first block a strided slice: a copy here avoids a recompile per layout.
        return self.compiled(x.contiguous(), e0, freqs, text, image)


def compile_blocks(
    dit: WanDiT,
    mode: str | None = None,
    dynamic: bool | None = False,
    fullgraph: bool = False,
    backend: str | Callable = "inductor",
    rope: str | None = "fp32",
    options: dict[str, Any] | None = None,
) -> WanDiT:
    """Compile each block's forward with ``torch.compile(mode, dynamic, fullgraph, backend, options)``.

    ``rope``: "fp32" or "fp64" applies ``fast_rope`` with that precision first; None keeps the
    current RoPE. Applying again recompiles with the new settings. Compilation happens on the
    first forward (once per new input shape with ``dynamic=False``). In place; returns the DiT.
    """
    if rope is not None:
        if rope not in ROPE_PRECISIONS:
            raise InputError(f"rope must be one of {ROPE_PRECISIONS} or None, got {rope!r}")
        fast_rope(dit, rope)
    uncompile_blocks(dit)
    for block in dit.blocks:
        compiled = torch.compile(
            block.forward, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend, options=options
        )
        block.forward = _CompiledForward(block, compiled)  # an instance attribute shadowing Block.forward
    return dit


def uncompile_blocks(dit: WanDiT) -> WanDiT:
    """Back to eager block forwards (RoPE and other swaps stay as they are); in place."""
    for block in dit.blocks:
        if isinstance(block.__dict__.get("forward"), _CompiledForward):
            del block.__dict__["forward"]
    return dit


def is_compiled(dit: WanDiT) -> bool:
    return any(isinstance(block.__dict__.get("forward"), _CompiledForward) for block in dit.blocks)
