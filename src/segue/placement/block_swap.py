"""Block swap: a module list's blocks (the DiT's) stream through a few device buffers, block by block.

Blocks ``0 .. resident-1`` are moved to the device for good. Every other block is packed into one
CPU buffer (pinned with CUDA) and its parameters point into it between calls. The device holds
``prefetch + 1`` slots, each one block's bytes. A forward pre-hook on block i makes sure its bytes
are in a slot, points its tensors there (no allocation, no copy on the compute stream), and starts
copying the next ``prefetch`` blocks (wrapping around to the first swapped block, for the next
forward) into the other slots. A forward post-hook points the block back at its CPU copy and marks
its slot free. The device holds at most ``resident + prefetch + 1`` blocks' bytes (the running one
and the prefetched ones), and at most ``resident + 1`` blocks have their parameters pointing at
device memory (the resident ones and the running one).

CUDA: copies run on a side stream, ``non_blocking`` from pinned memory, so they overlap the
previous block's compute. Per slot two events order the two streams: ``ready`` (recorded on the
copy stream after the copy; the compute stream waits on it before the block's kernels) and
``free`` (recorded on the compute stream after the block that used the slot; the copy stream waits
on it before overwriting the slot). The host never blocks. One copy per block. On another device
(CPU) the same code runs with plain synchronous copies and no streams.

``segue.placement.apply`` applies it in the profiles with ``block_swap`` (block-swap, low).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .profiles import DEFAULT_PREFETCH, DEFAULT_RESIDENT
from .tensors import module_tensors, nbytes, place, want_pin

__all__ = ["BlockSwap"]

_ALIGN = 256  # byte alignment of each tensor inside a packed block buffer


# ---------------------------------------------------------------------------------------------
# Packed blocks.


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _view(buf: Tensor, offset: int, like: Tensor) -> Tensor:
    """The bytes ``buf[offset:]`` seen as a tensor of ``like``'s dtype and shape."""
    return buf[offset : offset + nbytes(like)].view(like.dtype).view(like.shape)


@dataclass
class _Swapped:
    """One swapped block: its tensors, their offsets in a packed buffer, and its CPU home buffer."""

    index: int
    tensors: list[Tensor]
    offsets: list[int]
    home: Tensor  # uint8 [nbytes], pinned with CUDA
    home_views: list[Tensor]
    slot_views: dict[int, list[Tensor]] = field(default_factory=dict)


class BlockSwap:
    """Stream ``blocks`` through ``prefetch + 1`` device slots; the first ``resident`` stay on ``device``.

    Inference only (``Tensor.data`` swaps under autograd would leave gradients in the wrong place).
    Host memory: torch rounds each pinned allocation up to a power of two (a 0.82 GB bf16 block of
    the 14B model takes 1 GiB) unless ``PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:64``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        resident: int = DEFAULT_RESIDENT,
        prefetch: int = DEFAULT_PREFETCH,
        pin: bool | None = None,
    ) -> None:
        if resident < 0 or prefetch < 0:
            raise InputError(f"resident and prefetch must be >= 0, got {resident} and {prefetch}")
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.resident = min(resident, len(self.blocks))
        self.prefetch = prefetch
        self.cuda = self.device.type == "cuda"
        pin = want_pin(self.device, pin)
        for block in self.blocks[: self.resident]:
            place(module_tensors(block), self.device)
        self.swapped: list[_Swapped] = []
        for i, block in enumerate(self.blocks[self.resident :], start=self.resident):
            self.swapped.append(self._pack(i, block, pin))
        self._position = {s.index: p for p, s in enumerate(self.swapped)}
        n_slots = min(prefetch + 1, len(self.swapped))
        size = max((s.home.numel() for s in self.swapped), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self.owner: list[int | None] = [None] * n_slots  # swapped position held by each slot
        self._next_slot = 0
        self.running: int | None = None  # block index inside its forward
        self.copies = 0  # host-to-device block copies made
        self.max_on_device = 0  # high-water mark of blocks with device weights (resident included)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in self.slots]
            self.free = [torch.cuda.Event() for _ in self.slots]
        self._hooks = []
        for s in self.swapped:
            block = self.blocks[s.index]
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._enter, s.index)))
            self._hooks.append(block.register_forward_hook(functools.partial(self._leave, s.index), always_call=True))

    @staticmethod
    def _pack(index: int, block: nn.Module, pin: bool) -> _Swapped:
        tensors = module_tensors(block)
        offsets, total = [], 0
        for t in tensors:
            if type(t) not in (Tensor, nn.Parameter) or t.layout != torch.strided or t.is_meta:
                raise TypeError(f"block {index}: cannot swap a {type(t).__name__} ({t.layout}, {t.device})")
            offsets.append(total)
            total = _align(total + nbytes(t))
        home = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        views = []
        for t, off in zip(tensors, offsets):
            v = _view(home, off, t)
            v.copy_(t.detach())
            t.data = v
            views.append(v)
        return _Swapped(index, tensors, offsets, home, views)

    # -- bookkeeping ---------------------------------------------------------------------------
    def on_device(self) -> list[int]:
        """Indices of the blocks whose weights are in device memory now (resident, slots)."""
        held = {self.swapped[p].index for p in self.owner if p is not None}
        return sorted(set(range(self.resident)) | held)

    def _slot_of(self, pos: int) -> int | None:
        return self.owner.index(pos) if pos in self.owner else None

    def _fetch(self, pos: int, protect: set[int]) -> int:
        """Make sure swapped block ``pos`` is in a slot (copy it if not); never evict ``protect``."""
        slot = self._slot_of(pos)
        if slot is not None:
            return slot
        for _ in range(len(self.slots)):  # round robin over the slots, skipping protected owners
            slot = self._next_slot
            self._next_slot = (self._next_slot + 1) % len(self.slots)
            if self.owner[slot] not in protect:
                break
        else:
            raise RuntimeError("block swap: no free slot (more blocks protected than slots)")
        s = self.swapped[pos]
        dst = self.slots[slot][: s.home.numel()]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])  # the slot's previous block is done
                dst.copy_(s.home, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            dst.copy_(s.home)
        self.owner[slot] = pos
        self.copies += 1
        return slot

    # -- hooks ---------------------------------------------------------------------------------
    def _enter(self, index: int, module: nn.Module, args: Any) -> None:
        pos = self._position[index]
        slot = self._fetch(pos, protect=set())
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        s = self.swapped[pos]
        views = s.slot_views.get(slot)
        if views is None:
            views = s.slot_views[slot] = [_view(self.slots[slot], off, t) for t, off in zip(s.tensors, s.offsets)]
        for t, v in zip(s.tensors, views):
            t.data = v
        self.running = index
        protect = {pos}
        for j in range(1, self.prefetch + 1):
            nxt = (pos + j) % len(self.swapped)
            self._fetch(nxt, protect)
            protect.add(nxt)
        self.max_on_device = max(self.max_on_device, len(self.on_device()))

    def _leave(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        pos = self._position[index]
        s = self.swapped[pos]
        slot = self._slot_of(pos)
        if self.cuda and slot is not None:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        for t, v in zip(s.tensors, s.home_views):
            t.data = v
        self.running = None

    # -- teardown ------------------------------------------------------------------------------
    def remove(self, to: torch.device | str | None = None) -> None:
        """Remove the hooks, free the slots and put every block's weights on ``to`` (default: device)."""
        to = self.device if to is None else torch.device(to)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for s in self.swapped:
            for t, v in zip(s.tensors, s.home_views):
                t.data = v.clone() if to.type == "cpu" else v.to(to)
        for block in self.blocks[: self.resident]:
            place(module_tensors(block), to)
        self.swapped, self.slots, self.owner = [], [], []
