"""Spatially parallel VAE decoding: the latent is split into bands of rows, one band per rank.

Exact, not approximate tiling: every rank runs the unchanged decoder (``WanVAE.decode``: one latent
frame at a time, its own ``FeatureCache``) on its band, with three module instances patched for the
duration of the call so that a band computes exactly the rows the full decode computes:

- 3x3 convs (``CausalConv3d`` with spatial padding, the upsamplers' ``Conv2d``) take ``k // 2``
  halo rows from the neighbouring bands instead of zero padding on the inner band borders; the
  outermost bands keep the zeros at the image border. The time cache stays per band: it holds the
  band's own rows, which is exactly what the full decode caches for them.
- ``AttentionBlock`` (the middle block, at latent resolution) gathers the keys and values of the
  whole frame from all ranks and attends with its own queries.
- Everything else is per pixel or per row (RMS norms over channels, SiLU, 1x1 and time-only convs,
  nearest-exact 2x upsampling, whose output row i reads input row i // 2).

At the end the bands are gathered into the full video. ``COMM`` counts the bytes each rank sends.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..dist import ParallelState
from ..errors import InputError
from ..models.vae import AttentionBlock, CausalConv3d, FeatureCache, Resample, WanVAE

__all__ = ["COMM", "CommCounter", "parallel_decode", "split_rows", "spatial_parallel"]


class CommCounter:
    """Bytes this rank has sent (a tensor sent to n ranks counts n times); ``reset()`` zeroes it."""

    def __init__(self) -> None:
        self.bytes = 0

    def add(self, t: Tensor, copies: int = 1) -> None:
        self.bytes += t.numel() * t.element_size() * copies

    def reset(self) -> None:
        self.bytes = 0


COMM = CommCounter()


def split_rows(h: int, n: int) -> list[int]:
    """Rows per band when ``h`` rows go to ``n`` ranks: as even as possible, the first bands larger."""
    if h < n:
        raise InputError(f"latent height {h} is smaller than the {n} ranks of the VAE group: every rank needs a row")
    base, extra = divmod(h, n)
    return [base + (i < extra) for i in range(n)]


@dataclass(frozen=True)
class _Band:
    """This rank's band: group, index, and the latent rows of every band (to size gathers)."""

    group: ProcessGroup | None
    index: int
    rows: list[int]

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def is_top(self) -> bool:
        return self.index == 0

    @property
    def is_bottom(self) -> bool:
        return self.index == self.size - 1

    def heights(self, local: int) -> list[int]:
        """Band heights at the resolution where this band has ``local`` rows (2x per upsampler)."""
        scale = local // self.rows[self.index]
        return [r * scale for r in self.rows]


def _halo(x: Tensor, p: int, band: _Band) -> Tensor:
    """[..., H, W] -> [..., p + H + p, W] with the neighbours' edge rows; zeros at the image border."""
    if x.shape[-2] < p:
        raise RuntimeError(f"band of {x.shape[-2]} rows is thinner than the halo of {p} rows")
    x = x.contiguous()
    top = torch.zeros_like(x[..., :p, :])  # stays zero on the top band (the image border)
    bottom = torch.zeros_like(x[..., :p, :])
    ops = []
    if not band.is_top:
        up = band.index - 1
        ops += [dist.isend(x[..., :p, :].contiguous(), group=band.group, group_dst=up)]
        ops += [dist.irecv(top, group=band.group, group_src=up)]
        COMM.add(top)
    if not band.is_bottom:
        down = band.index + 1
        ops += [dist.isend(x[..., -p:, :].contiguous(), group=band.group, group_dst=down)]
        ops += [dist.irecv(bottom, group=band.group, group_src=down)]
        COMM.add(bottom)
    for op in ops:
        op.wait()
    return torch.cat([top, x, bottom], dim=-2)


def _gather_rows(x: Tensor, band: _Band, dst: int | None = None) -> Tensor | None:
    """Concatenate the bands' [..., H_i, W] along H: on every rank (``dst`` None) or on rank ``dst``
    of the group (others get None). Uneven bands are padded to the tallest, then trimmed."""
    heights = band.heights(x.shape[-2])
    tallest = max(heights)
    padded = F.pad(x, (0, 0, 0, tallest - x.shape[-2])).contiguous()  # [..., H_max, W]
    parts = [torch.empty_like(padded) for _ in heights]
    if dst is None:
        dist.all_gather(parts, padded, group=band.group)
        COMM.add(padded, band.size - 1)
    else:
        mine = band.index == dst
        dist.gather(padded, parts if mine else None, group=band.group, group_dst=dst)
        COMM.add(padded, 0 if mine else 1)
        if not mine:
            return None
    return torch.cat([p[..., :hi, :] for p, hi in zip(parts, heights)], dim=-2)


def _causal_conv3d_forward(conv: CausalConv3d, band: _Band, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
    # x: [B, C, T, h_band, W]; as CausalConv3d.forward, with halo rows instead of height padding
    front = conv.time_pad
    if cache is not None:
        past = cache.exchange(x)  # the band's own rows only
        if past is not None and front > 0:
            x = torch.cat([past, x], dim=2)
            front -= past.shape[2]
    p_w, _, p_h, _ = conv.space_pad
    x = _halo(x, p_h, band)  # [B, C, T', p + h_band + p, W]; the neighbours' T' is the same
    x = F.pad(x, (p_w, p_w, 0, 0, front, 0))
    return nn.Conv3d.forward(conv, x)


def _conv2d_forward(conv: nn.Conv2d, band: _Band, x: Tensor) -> Tensor:
    # x: [N, C, h_band, W] -> [N, C', h_band, W]; the upsampler's 3x3 conv, stride 1
    p_h, p_w = conv.padding
    x = F.pad(_halo(x, p_h, band), (p_w, p_w, 0, 0))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _attention_forward(attn: AttentionBlock, band: _Band, x: Tensor) -> Tensor:
    # x: [B, C, T, h_band, W]; queries of this band, keys and values of the whole frame
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [BT, C, h, W]
    qkv = attn.to_qkv(attn.norm(frames))  # [BT, 3C, h, W]
    q, kv = qkv[:, :c], qkv[:, c:]
    kv = _gather_rows(kv, band)  # [BT, 2C, H, W]
    assert kv is not None
    q = q.reshape(b * t, 1, c, h * w).transpose(-1, -2)  # [BT, 1, hW, C]
    kv = kv.reshape(b * t, 1, 2 * c, -1).transpose(-1, -2).contiguous()  # [BT, 1, HW, 2C]
    k, v = kv.chunk(2, dim=-1)  # [BT, 1, HW, C] each
    out = F.scaled_dot_product_attention(q.contiguous(), k, v)  # [BT, 1, hW, C]
    out = out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
    out = attn.proj(out)  # [BT, C, h, W]
    return out.reshape(b, t, c, h, w).transpose(1, 2) + x


def _patches(decoder: nn.Module, band: _Band) -> Iterator[tuple[nn.Module, Callable[..., Tensor]]]:
    """(module, band forward) for every decoder module that mixes rows."""
    for m in decoder.modules():
        if isinstance(m, CausalConv3d) and m.space_pad[2] > 0:
            yield m, functools.partial(_causal_conv3d_forward, m, band)
        elif isinstance(m, AttentionBlock):
            yield m, functools.partial(_attention_forward, m, band)
        elif isinstance(m, Resample) and m.mode.startswith("up"):
            conv = m.resample[1]
            if not isinstance(conv, nn.Conv2d) or conv.stride != (1, 1):
                raise TypeError(f"unexpected upsampler conv {conv!r}")
            yield conv, functools.partial(_conv2d_forward, conv, band)


@contextmanager
def spatial_parallel(vae: WanVAE, group: ProcessGroup | None, rows: list[int]) -> Iterator[None]:
    """Within the context, ``vae.decode`` on this rank's band of latent rows (``rows[rank]`` of the
    ``sum(rows)``, bands in rank order) returns exactly those rows of the full decode. All ranks of
    ``group`` must decode together. The modules' own forwards are back on exit, also on error."""
    band = _Band(group, dist.get_rank(group), list(rows))
    if len(rows) != dist.get_world_size(group) or min(rows) < 1:
        raise InputError(f"need one band of >= 1 rows per rank of the group, got {rows}")
    patched: list[tuple[nn.Module, object]] = []
    try:
        for module, forward in _patches(vae.decoder, band):
            # an instance attribute shadows the class's forward; remember any earlier one
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def parallel_decode(
    vae: WanVAE,
    z: Tensor,
    group: ProcessGroup | None,
    normalized: bool = True,
    clamp: bool = True,
    progress: Callable[[int, int], None] | None = None,
    dst: int | None = None,
) -> Tensor | None:
    """``vae.decode(z, normalized, clamp, progress)`` split over the ranks of ``group`` by latent rows.

    Every rank passes the same full latent [B, z, T, h, w] (h >= group size) and decodes its band.
    Returns the video [B, 3, 1 + 4(T-1), 8h, 8w] on every rank (``dst`` None) or on the rank of
    ``group`` numbered ``dst`` (the others get None). Without a process group it is ``vae.decode``.
    """
    if not dist.is_available() or not dist.is_initialized():
        return vae.decode(z, normalized=normalized, clamp=clamp, progress=progress)
    if z.ndim != 5:
        raise InputError(f"latents must be [B, z, T, h, w], got shape {tuple(z.shape)}")
    n, index = dist.get_world_size(group), dist.get_rank(group)
    if dst is not None and not 0 <= dst < n:
        raise InputError(f"dst must be a rank of the VAE group (0..{n - 1}), got {dst}")
    rows = split_rows(z.shape[3], n)
    start = sum(rows[:index])
    z_band = z[:, :, :, start : start + rows[index]]  # [B, z, T, h_band, w]
    with spatial_parallel(vae, group, rows):
        video = vae.decode(z_band, normalized=normalized, clamp=clamp, progress=progress)
    # video: [B, 3, F, 8 h_band, 8w] -> all bands stacked along H
    return _gather_rows(video, _Band(group, index, rows), dst)


def video_decoder(vae: WanVAE, state: ParallelState) -> Callable[[Tensor], Tensor | None]:
    """The pipeline's decode step in a parallel run (``Pipeline.video_decoder``): split over every rank
    by latent rows (``ParallelConfig.vae``), or whole on rank 0; the video lands on rank 0, None elsewhere."""
    if state.config.vae:
        return functools.partial(parallel_decode, vae, group=state.world_group, dst=0)

    def on_main(z: Tensor) -> Tensor | None:
        return vae.decode(z) if state.is_main else None

    return on_main
