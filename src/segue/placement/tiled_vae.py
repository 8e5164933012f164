"""VAE decoding in bands of latent rows, in one process, with memory bounded by the band height.

Same result as ``WanVAE.decode`` (exact up to float rounding: convolutions on a band see the same
numbers, only the kernels' summation order may differ), built from the decoder's own modules:

1. The *low* part (``conv1`` and the middle block, at latent resolution) runs on whole frames, one
   latent frame at a time with its time cache, as ``decode`` does. It must see whole frames: the
   middle ``AttentionBlock`` mixes every pixel of a frame. It is cheap, and its output for all
   frames is kept ([B, 4*dim, T, h, w]: 0.46 GB at 720p, 81 frames).
2. The *high* part (the upsampling stages and the head, where almost all memory goes) runs band by
   band. A band of ``band_rows`` latent rows is decoded from its rows plus ``halo`` rows on each side
   (``decoder_halo``: every 3x3 convolution widens the rows an output row depends on by one row at
   its resolution, an upsampler halves that count going down). The halo rows come out wrong near the
   cut (zero padding where the full decode sees the neighbour's rows) and are cropped; the band's
   own rows are those of the full decode. Each band runs all latent frames with its own time cache
   before the next band starts, so only one band's cache is ever alive: an error at the band's cut
   does not spread further through the cache, since cached rows feed the same rows one chunk later.

Parallel decoding (``segue.parallel.vae``) exchanges halo rows before every convolution instead;
one process cannot do that without holding every band at once, so it recomputes the halo rows.
The price is compute: a band computes ``band_rows + 2 * halo`` rows (13 latent rows of halo for the
Wan2.1 VAE) in the high part; ``band_overhead`` gives the factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..models.vae import AttentionBlock, CausalConv3d, Decoder, FeatureCache, Resample, ResidualBlock, WanVAE

__all__ = ["band_overhead", "decoder_halo", "tiled_decode"]


def _conv_rows(conv: nn.Module) -> int:
    """Rows one side of an output row that a convolution reads (its height padding, stride 1)."""
    if isinstance(conv, CausalConv3d):
        return conv.space_pad[2]
    if isinstance(conv, nn.Conv2d):
        if conv.stride != (1, 1):
            raise TypeError(f"unexpected strided conv in the decoder: {conv!r}")
        return int(conv.padding[0])
    raise TypeError(f"unexpected row-mixing module in the decoder: {conv!r}")


def _high_modules(decoder: Decoder) -> list[nn.Module]:
    """The decoder's modules after the middle block, in forward order."""
    return [*decoder.upsamples, decoder.head[2]]


def decoder_halo(decoder: Decoder) -> int:
    """Latent rows each side of a band that the high part of ``decoder`` needs for exact band rows.

    Walks the high part backwards from the output: a convolution adds its padding rows at its own
    resolution; a 2x upsampler's output row r reads input row r // 2, so n rows become ceil(n / 2).
    """
    need = 0
    for m in reversed(_high_modules(decoder)):
        if isinstance(m, ResidualBlock):
            need += sum(_conv_rows(c) for c in m.residual if isinstance(c, CausalConv3d))
        elif isinstance(m, Resample):
            if not m.mode.startswith("up"):
                raise TypeError(f"unexpected resampler in the decoder: {m.mode}")
            need = math.ceil((need + _conv_rows(m.resample[1])) / 2)  # time_conv mixes no rows
        elif isinstance(m, (CausalConv3d, nn.Conv2d)):
            need += _conv_rows(m)
        elif isinstance(m, AttentionBlock):
            raise TypeError("an attention block after the middle block cannot be decoded in bands")
        else:
            raise TypeError(f"unexpected module in the decoder: {type(m).__name__}")
    return need


def band_overhead(h: int, band_rows: int, halo: int) -> float:
    """Rows the high part computes in bands, over the ``h`` rows of one whole-frame pass."""
    total = 0
    for r0 in range(0, h, band_rows):
        r1 = min(h, r0 + band_rows)
        total += min(h, r1 + halo) - max(0, r0 - halo)
    return total / h


def _low(decoder: Decoder, x: Tensor, cache: FeatureCache) -> Tensor:
    # x: [B, z, 1, h, w] -> [B, C, 1, h, w]; Decoder.forward up to the upsampling stages
    x = decoder.conv1(x, cache)
    res1, attn, res2 = decoder.middle
    return res2(attn(res1(x, cache)), cache)


def _high(decoder: Decoder, x: Tensor, cache: FeatureCache) -> Tensor:
    # x: [B, C, 1, h_band, w] -> [B, 3, t, 8 h_band, 8w]; the rest of Decoder.forward
    for block in decoder.upsamples:
        x = block(x, cache)
    norm, act, conv = decoder.head
    return conv(act(norm(x)), cache)


@torch.no_grad()
def tiled_decode(
    vae: WanVAE,
    z: Tensor,
    band_rows: int,
    normalized: bool = True,
    clamp: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """``vae.decode(z, normalized, clamp)`` computed in bands of ``band_rows`` latent rows.

    z: latents [B, z, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w] float32. The last band may be
    shorter. ``progress(i, n)`` is called after each (band, latent frame) pair, n = bands * T.
    A band at least as tall as the latent decodes whole frames (still in two parts).
    """
    cfg = vae.cfg
    if z.ndim != 5 or z.shape[1] != cfg.z_dim:
        raise InputError(f"latents must be [B, {cfg.z_dim}, T, h, w], got shape {tuple(z.shape)}")
    if band_rows < 1:
        raise InputError(f"band_rows must be at least 1, got {band_rows}")
    if normalized:
        mean, inv_std = vae.latent_stats(z.device)
        x = z / inv_std + mean  # as WanVAE.decode
    else:
        x = z
    x = vae.conv2(x.to(vae.conv2.weight.dtype))  # [B, z, T, h, w]
    b, _, n, h, w = x.shape
    sf, tf = cfg.spatial_factor, cfg.temporal_factor
    dec = vae.decoder
    halo = decoder_halo(dec)

    # 1. whole frames through the low part, one latent frame at a time (its own time cache)
    cache = FeatureCache()
    lows = []
    for i in range(n):
        cache.start_chunk()
        lows.append(_low(dec, x[:, :, i : i + 1], cache))
    cache.reset()
    low = torch.cat(lows, dim=2)  # [B, C, T, h, w]
    del lows, x

    # 2. band by band through the high part, each band over all frames with a fresh time cache
    video = torch.empty(b, 3, 1 + tf * (n - 1), sf * h, sf * w, dtype=torch.float32, device=low.device)
    bands = range(0, h, band_rows)
    done, total = 0, len(bands) * n
    for r0 in bands:
        r1 = min(h, r0 + band_rows)
        e0, e1 = max(0, r0 - halo), min(h, r1 + halo)  # the band with its halo, clipped to the image
        cache = FeatureCache()
        f = 0
        for i in range(n):
            cache.start_chunk()
            out = _high(dec, low[:, :, i : i + 1, e0:e1], cache)  # [B, 3, t, sf (e1 - e0), sf w]
            t = out.shape[2]
            video[:, :, f : f + t, sf * r0 : sf * r1] = out[:, :, :, sf * (r0 - e0) : sf * (r1 - e0)]
            f += t
            done += 1
            if progress is not None:
                progress(done, total)
        cache.reset()
        if f != video.shape[2]:
            raise RuntimeError(f"decoder produced {f} frames, expected {video.shape[2]}")
    return video.clamp_(-1.0, 1.0) if clamp else video
