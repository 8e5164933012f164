"""Sequence parallelism for the Wan DiT (Ulysses, ring, and both: USP), applied from outside the model.

``apply_sequence_parallel(dit, state)`` hooks an unchanged ``WanDiT`` so that its blocks run on this
rank's chunk of the token sequence:

- a pre-hook on ``blocks[0]`` zero-pads the tokens [B, L, C] to a multiple of ``sp_size`` and keeps
  the ``sp_rank``-th contiguous chunk [B, L/sp, C];
- a pre-hook on every block swaps the RoPE table for the matching chunk (padded with ones, the
  identity rotation, as the reference pads it);
- every ``self_attn.attention`` becomes a distributed attention: Ulysses all-to-all over
  ``ulysses_group`` (sequence chunks -> head groups), ring attention over ``ring_group`` (k/v blocks
  passed around with send/recv, blocks merged by their log-sum-exp in fp32), all-to-all back;
- a forward hook on ``blocks[-1]`` all-gathers the chunks over ``sp_group`` and strips the padding,
  so the head and unpatchify see the whole sequence.

Cross-attention, FFN and modulation act per token and run on the local chunk as they are.

Padding. The padded tokens sit at the end of the global sequence, so in every k/v block the real
keys are a prefix: by default the padded keys are cut off before the softmax (the same as masking
them, with no mask tensor), and the result equals the single-process run. The reference's
distributed run (xDiT USP) does not mask them: its zero-padded tokens take part in self-attention
and change the output whenever L is not a multiple of sp_size. ``ParallelConfig.reference_padding``
reproduces that (the padding length is the same as the reference's: the next multiple of sp_size).

Numerics: q/k/v are cast to the attention dtype (as the single-device path does) before they are
sent; ring blocks are merged in fp32. Inference only: the collectives carry no autograd.

``comm_stats()`` reports the bytes this rank sent to other ranks since ``reset_comm_stats()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from ..dist import ParallelState
from ..errors import InputError
from ..models.dit import AttentionFn, WanDiT

# Bytes sent by this rank to other ranks, per kind of communication.
_SENT: dict[str, int] = {"all_to_all": 0, "ring": 0, "all_gather": 0}

# Largest score matrix (elements) the fp32 fallback of the partial attention builds at once.
_SCORE_BUDGET = 1 << 26


def comm_stats() -> dict[str, int]:
    """Bytes this rank sent since the last reset: per kind and ``total``."""
    return {**_SENT, "total": sum(_SENT.values())}


def reset_comm_stats() -> None:
    for key in _SENT:
        _SENT[key] = 0


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------------
# Communication helpers.


def _all_to_all(x: Tensor, group: ProcessGroup) -> Tensor:
    """Slice i of dim 0 goes to group rank i; returns what every rank sent us, in rank order."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    n = dist.get_world_size(group)
    _SENT["all_to_all"] += _nbytes(x) * (n - 1) // n
    return out


def _seq_to_heads(x: Tensor, group: ProcessGroup, u: int) -> Tensor:
    """Ulysses forward: [B, Lc, n, d] (own chunk, all heads) -> [B, U*Lc, n/U, d] (U chunks, own heads)."""
    b, lc, n, d = x.shape
    x = x.reshape(b, lc, u, n // u, d).permute(2, 0, 1, 3, 4)  # [U, B, Lc, n/U, d]
    x = _all_to_all(x, group)  # [U (source = sequence chunk), B, Lc, n/U, d]
    return x.permute(1, 0, 2, 3, 4).reshape(b, u * lc, n // u, d)


def _heads_to_seq(x: Tensor, group: ProcessGroup, u: int) -> Tensor:
    """Ulysses backward: [B, U*Lc, n/U, d] -> [B, Lc, n, d]."""
    b, lb, h, d = x.shape
    x = x.reshape(b, u, lb // u, h, d).transpose(0, 1)  # [U (destination chunk), B, Lc, n/U, d]
    x = _all_to_all(x, group)  # [U (source = head group), B, Lc, n/U, d]
    return x.permute(1, 2, 0, 3, 4).reshape(b, lb // u, u * h, d)


def _ring_shift(x: Tensor, group: ProcessGroup) -> tuple[Tensor, list[dist.Work]]:
    """Start sending x to the next ring rank and receiving the previous rank's block (same shape)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    recv = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    _SENT["ring"] += _nbytes(x)
    return recv, dist.batch_isend_irecv(ops)


def _all_gather_seq(x: Tensor, group: ProcessGroup) -> Tensor:
    """[B, Lc, C] chunks of every group rank -> [B, size*Lc, C], in rank order."""
    x = x.contiguous()
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    _SENT["all_gather"] += _nbytes(x) * (size - 1)
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------
# Attention pieces.


def _partial_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """[B, n, Lq, d] x [B, n, Lk, d] -> (out [B, n, Lq, d] fp32, log-sum-exp [B, n, Lq] fp32)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        # The flash kernel returns the log-sum-exp that public SDPA hides.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out.float(), lse.float()
    scale = q.shape[-1] ** -0.5
    kt, vf = k.float().transpose(-1, -2), v.float()  # [B, n, d, Lk], [B, n, Lk, d]
    rows = max(1, _SCORE_BUDGET // (q.shape[0] * q.shape[1] * k.shape[2]))  # bounds the score memory
    outs, lses = [], []
    for qc in q.float().split(rows, dim=2):
        s = torch.matmul(qc, kt) * scale  # [B, n, rows, Lk]
        lse = torch.logsumexp(s, dim=-1)  # [B, n, rows]
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _merge(acc: tuple[Tensor, Tensor] | None, part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Online-softmax combination of two partial results over disjoint key sets (fp32)."""
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)  # [B, n, Lq]
    return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None], lse


def _ring_attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup, keep: list[int]) -> Tensor:
    """q, k, v [B, n, Lb, d], this ring rank's blocks -> [B, n, Lb, d] fp32 over all ring ranks' keys.

    ``keep[r]``: how many leading keys of ring rank r's block are real (the rest is padding).
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    kv = torch.stack([k, v])  # [2, B, n, Lb, d]: one message per step
    acc = None
    for step in range(size):
        pending = _ring_shift(kv, group) if step + 1 < size else None  # overlaps with the compute below
        src = (rank - step) % size  # the ring rank whose k/v block we hold now
        if keep[src] > 0:
            acc = _merge(acc, _partial_attention(q, kv[0, :, :, : keep[src]], kv[1, :, :, : keep[src]]))
        if pending is not None:
            kv, works = pending
            for work in works:
                work.wait()
    assert acc is not None  # block 0 always holds real keys
    return acc[0]


# ---------------------------------------------------------------------------------------------
# Applying it to the DiT.


@dataclass
class _Context:
    """What the hooks of one forward share: the true length and the local RoPE chunk."""

    state: ParallelState
    seq_len: int = 0  # L, the unpadded token count
    chunk: int = 0  # Lc = ceil(L / sp) tokens per rank
    freqs_full: Tensor | None = None  # the table the DiT passed in (identity-cached)
    freqs_local: Tensor | None = None  # [Lc, 1, head_dim/2]

    def local_freqs(self, freqs: Tensor) -> Tensor:
        if freqs is not self.freqs_full:
            pad = self.chunk * self.state.sp_size - freqs.shape[0]
            ones = freqs.new_ones(pad, *freqs.shape[1:])  # identity rotation for padded tokens
            start = self.state.sp_rank * self.chunk
            self.freqs_full = freqs
            self.freqs_local = torch.cat([freqs, ones])[start : start + self.chunk]
        assert self.freqs_local is not None
        return self.freqs_local


@dataclass
class _Applied:
    handles: list[RemovableHandle] = field(default_factory=list)
    attention: list[AttentionFn] = field(default_factory=list)  # the original per block


def _make_attention(ctx: _Context) -> AttentionFn:
    st = ctx.state
    ulysses, ring, mask = st.config.ulysses, st.config.ring, not st.config.reference_padding

    def attention(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
        # q, k, v [B, Lc, n, d] -> [B, Lc, n*d] fp32
        q, k, v = (x.to(dtype) for x in (q, k, v))
        if ulysses > 1:
            q, k, v = (_seq_to_heads(x, st.ulysses_group, ulysses) for x in (q, k, v))  # [B, Lb, n/U, d]
        lb = q.shape[1]  # block of ring rank r: global tokens [r*Lb, (r+1)*Lb)
        keep = [min(max(ctx.seq_len - r * lb, 0), lb) if mask else lb for r in range(ring)]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, n/U, Lb, d]
        if ring > 1:
            out = _ring_attention(q, k, v, st.ring_group, keep).to(dtype)
        else:
            out = F.scaled_dot_product_attention(q, k[:, :, : keep[0]], v[:, :, : keep[0]])
        out = out.transpose(1, 2)  # [B, Lb, n/U, d]
        if ulysses > 1:
            out = _heads_to_seq(out, st.ulysses_group, ulysses)  # [B, Lc, n, d]
        return out.flatten(2).float()

    return attention


def apply_sequence_parallel(dit: WanDiT, state: ParallelState) -> WanDiT:
    """Split the DiT's token sequence over ``state.sp_group`` (see the module docstring); in place.

    A no-op when sp_size is 1. Applying again replaces the previous setup.
    """
    pc = state.config
    if dit.cfg.num_heads % pc.ulysses:
        raise InputError(f"the DiT's num_heads {dit.cfg.num_heads} is not divisible by the Ulysses degree {pc.ulysses}")
    remove_sequence_parallel(dit)
    if state.sp_size == 1:
        return dit
    needed = {"sp_group": True, "ulysses_group": pc.ulysses > 1, "ring_group": pc.ring > 1}
    missing = [name for name, need in needed.items() if need and getattr(state, name) is None]
    if missing:
        raise InputError(f"sequence parallel needs the process groups {missing}: build the state with init_parallel")

    ctx = _Context(state)
    applied = _Applied()
    blocks = list(dit.blocks)

    def shard(module: torch.nn.Module, args: tuple) -> tuple:
        x, *rest = args  # x [B, L, C]
        sp = state.sp_size
        ctx.seq_len = x.shape[1]
        ctx.chunk = -(-ctx.seq_len // sp)
        x = F.pad(x, (0, 0, 0, ctx.chunk * sp - ctx.seq_len))  # [B, Lc*sp, C], zeros at the end
        return (x.narrow(1, state.sp_rank * ctx.chunk, ctx.chunk), *rest)  # [B, Lc, C]

    def swap_freqs(module: torch.nn.Module, args: tuple) -> tuple:
        x, e0, freqs, *rest = args
        return (x, e0, ctx.local_freqs(freqs), *rest)

    def gather(module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
        ctx.freqs_full = ctx.freqs_local = None  # free the tables between forwards
        full = _all_gather_seq(out, state.sp_group)  # [B, Lc*sp, C]
        return full[:, : ctx.seq_len].contiguous()  # [B, L, C]

    applied.handles.append(blocks[0].register_forward_pre_hook(shard))
    attention = _make_attention(ctx)
    for block in blocks:
        applied.handles.append(block.register_forward_pre_hook(swap_freqs))
        applied.attention.append(block.self_attn.attention)
        block.self_attn.attention = attention
    applied.handles.append(blocks[-1].register_forward_hook(gather))
    dit._segue_sequence_parallel = applied
    return dit


def remove_sequence_parallel(dit: WanDiT) -> WanDiT:
    """Undo ``apply_sequence_parallel``: hooks removed, original attention functions back."""
    applied: _Applied | None = dit.__dict__.pop("_segue_sequence_parallel", None)
    if applied is None:
        return dit
    for handle in applied.handles:
        handle.remove()
    for block, fn in zip(dit.blocks, applied.attention, strict=True):
        block.self_attn.attention = fn
    return dit
