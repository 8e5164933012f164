"""Deepening a trained DiT without changing what it computes: the built-in model grows between sessions.

A Wan block adds three residual branches to its input: gated self-attention, cross-attention and a gated
FFN. With the last linear layer of each branch (``self_attn.o``, ``cross_attn.o``, ``ffn.2``) at zero the
block is the identity, so inserting such a block anywhere leaves the DiT's output exactly as it was, and
training goes on from the same function with more capacity. The new block starts as a copy of the block it
follows (its projections into the branches already read that depth's features); gradients reach the zeroed
output layers at once and, through them, the rest of the block.

Pure key mapping on a ``blocks.{i}.*`` state dict, so it serves a bundle's weights before the model is built.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..config import DiTConfig

# the last linear layer of each residual branch of a Block: zero weight and bias make the branch add nothing
BRANCH_OUTPUTS = ("self_attn.o.", "cross_attn.o.", "ffn.2.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def deepened(cfg: DiTConfig, after: tuple[int, ...]) -> DiTConfig:
    """The config of ``cfg`` with a new block behind each source block in ``after`` (distinct, increasing)."""
    if list(after) != sorted(set(after)) or any(not 0 <= i < cfg.num_layers for i in after):
        raise ValueError(f"blocks to insert after must be distinct increasing indices in 0..{cfg.num_layers - 1}, "
                         f"got {list(after)}")  # fmt: skip
    return replace(cfg, num_layers=cfg.num_layers + len(after))


def insert_identity_blocks(
    cfg: DiTConfig, state: dict[str, torch.Tensor], after: tuple[int, ...]
) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """A DiT config and state dict with a new identity block behind each source block in ``after``.

    Blocks are renumbered in order; every non-block key is kept as it is. The result computes what the
    source computes (exactly in fp32: the new blocks add zeros).
    """
    grown = deepened(cfg, after)
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m is None:
            out[key] = value
        else:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if sorted(blocks) != list(range(cfg.num_layers)):
        raise ValueError(f"state dict has blocks {sorted(blocks)}, config says {cfg.num_layers} layers")
    new_index = 0
    for i in range(cfg.num_layers):
        for name, value in blocks[i].items():
            out[f"blocks.{new_index}.{name}"] = value
        new_index += 1
        if i in after:
            for name, value in blocks[i].items():
                zero = name.startswith(BRANCH_OUTPUTS)
                out[f"blocks.{new_index}.{name}"] = torch.zeros_like(value) if zero else value.clone()
            new_index += 1
    return grown, out
