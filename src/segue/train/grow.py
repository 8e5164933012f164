"""Growing trained models without changing what they compute: a recipe grows the model between its stages.

Deeper DiT. A Wan block adds three residual branches to its input: gated self-attention, cross-attention and a gated
FFN. With the last linear layer of each branch (``self_attn.o``, ``cross_attn.o``, ``ffn.2``) at zero the
block is the identity, so inserting such a block anywhere leaves the DiT's output exactly as it was, and
training goes on from the same function with more capacity. The new block starts as a copy of the block it
follows (its projections into the branches already read that depth's features); gradients reach the zeroed
output layers at once and, through them, the rest of the block.

Pure key mapping on a ``blocks.{i}.*`` state dict, so it serves a bundle's weights before the model is built.

Wider VAE decoder. Every channel the wider decoder adds starts at zero: the weights and bias that write it
are zero, while the weights that read it are random. A zero channel adds nothing to what reads it, and the
RMS norms see the same vector length, so only their ``sqrt(C)`` factor changes (undone in their gammas), as
does the attention's ``1/sqrt(C)`` (undone in its query). The output is the same to rounding; the random
read weights pass gradients into the zeroed write weights at the first step, so the new channels learn.
The encoder is untouched, so the latent space (and the DiT trained on it) stays exactly as it was.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..config import DiTConfig, VAEConfig
from ..models.vae import WanVAE

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


def _channel_index(name: str, axis: int, old: int, new: int) -> torch.Tensor:
    """Where the ``old`` channels along ``axis`` of decoder tensor ``name`` sit among ``new``: at the start of
    each group (``to_qkv`` writes [q, k, v], an upsampler's ``time_conv`` two frames' channels)."""
    groups = 3 if "to_qkv" in name and axis == 0 else 2 if "time_conv" in name and axis == 0 else 1
    if old % groups or new % groups or new < old:
        raise ValueError(f"decoder tensor {name}: cannot widen axis {axis} from {old} to {new}")
    og, ng = old // groups, new // groups
    return torch.cat([torch.arange(og) + k * ng for k in range(groups)])


def widen_decoder(
    cfg: VAEConfig, state: dict[str, torch.Tensor], width: int, seed: int = 0
) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """A VAE config and state dict whose decoder has base width ``width`` (``decoder_dim``), computing what
    ``state`` computes (to fp32 rounding); encoder keys are kept as they are."""
    old_w = cfg.decoder_width
    if width < old_w:
        raise ValueError(f"decoder width {width} is below the current {old_w}: widening only")
    wide = replace(cfg, decoder_dim=None if width == cfg.dim else width)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAE(wide).state_dict().items()}
    if set(shapes) != set(state):
        missing, extra = sorted(set(shapes) - set(state))[:5], sorted(set(state) - set(shapes))[:5]
        raise ValueError(f"VAE state dict keys do not fit {cfg}: missing {missing}, unexpected {extra}")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, old in state.items():
        shape = shapes[key]
        if tuple(old.shape) == shape:
            out[key] = old
            continue
        x = old.float()
        idx = [_channel_index(key, a, x.shape[a], shape[a]) for a in range(min(2, x.ndim))]
        if key.endswith("gamma"):  # RMSNorm: normalize(x) * sqrt(C) * gamma, the new channels read zero
            t = torch.full(shape, (x.shape[0] / shape[0]) ** 0.5)
            t[idx[0]] = x * t[idx[0]]
        elif x.ndim == 1:  # a bias: the new channels are written as zero
            t = torch.zeros(shape)
            t[idx[0]] = x
        else:  # a conv weight [out, in, ...]: zero rows for new outputs, random columns for new inputs
            fan_in = shape[1] * (x[0, 0].numel())
            t = torch.zeros(shape)
            t[idx[0]] = torch.randn((len(idx[0]), *shape[1:]), generator=g) / fan_in**0.5
            t[idx[0][:, None], idx[1][None, :]] = x
        if ".to_qkv." in key:  # the attention scales q.k by 1/sqrt(C): the query makes up the new C
            c_old, c_new = x.shape[0] // 3, shape[0] // 3
            t[:c_new] *= (c_new / c_old) ** 0.5
        out[key] = t.to(old.dtype)
    return wide, out
