"""Wan2.1 causal 3-D video VAE (4x time, 8x space), parameter names as in ``Wan2.1_VAE.pth``.

Time is causal everywhere: every 3-D conv pads only in front, so frame ``i`` of the output depends
on input frames ``<= i``. That lets the reference run the encoder on time chunks of 1, 4, 4, ...
frames and the decoder on one latent at a time, each causal conv carrying the last input frames it
saw across chunks. ``FeatureCache`` holds those frames explicitly; splitting into chunks this way
is part of the numerics (the time resamplers treat the first chunk specially), so we keep it.

Read top to bottom: FeatureCache, CausalConv3d, RMSNorm, ResidualBlock, AttentionBlock, Resample,
Encoder, Decoder, WanVAE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VAEConfig
from ..errors import InputError

# Frames of history a causal conv with time kernel 3 needs.
CACHE_T = 2


class FeatureCache:
    """Per causal conv, in call order, the last input frames it saw in the previous time chunk.

    ``start_chunk()`` rewinds the cursor before each chunk; every cached conv then takes its slot in
    the same order. ``reset()`` forgets everything (a new video).
    """

    def __init__(self) -> None:
        self._frames: list[Tensor | None] = []
        self._cursor = 0

    def reset(self) -> None:
        self._frames = []
        self._cursor = 0

    def start_chunk(self) -> None:
        self._cursor = 0

    def __len__(self) -> int:
        return len(self._frames)

    def _advance(self) -> int:
        i = self._cursor
        self._cursor += 1
        if i == len(self._frames):
            self._frames.append(None)
        return i

    def exchange(self, x: Tensor, keep: int = CACHE_T) -> Tensor | None:
        """Return the frames the current conv kept from earlier chunks (None on the first chunk) and
        keep the last ``keep`` frames of ``x`` [B, C, T, H, W] instead.

        When ``x`` is shorter than ``keep``, the newest earlier frame is put in front (the reference
        keeps "the last frame of the previous chunk" then).
        """
        i = self._advance()
        past = self._frames[i]
        kept = x[:, :, -keep:]
        if kept.shape[2] < keep and past is not None and past.shape[2] > 0:
            kept = torch.cat([past[:, :, -1:], kept], dim=2)
        # clone: a slice would keep the whole chunk's activation alive
        self._frames[i] = kept.clone()
        return past

    def select(self, rows: Tensor) -> None:
        """Keep the history of batch rows ``rows`` (int64 [B'], repeats allowed), in that order: the
        batch of the next chunk is made of those rows' continuations."""
        self._frames = [None if f is None else f.index_select(0, rows.to(f.device)) for f in self._frames]

    def skip_first(self, x: Tensor) -> bool:
        """For the time upsampler: True on its first chunk, which is not upsampled in time.

        It then keeps an empty history (zero frames), so on the next chunk its conv pads with
        zeros: the reference's 'Rep' marker. When False, the caller goes on with ``exchange``.
        """
        if self._cursor < len(self._frames):
            return False
        i = self._advance()
        self._frames[i] = x[:, :, :0]
        return True


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads ``2*p_t`` frames in front only (spatial padding as usual).

    With a cache, the frames kept from the previous chunk replace (part of) the front padding.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=padding)
        p_t, p_h, p_w = self.padding
        self.time_pad = 2 * p_t
        self.space_pad = (p_w, p_w, p_h, p_h)
        self.padding = (0, 0, 0)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        # x: [B, C, T, H, W]
        front = self.time_pad
        if cache is not None:
            past = cache.exchange(x)
            if past is not None and front > 0:
                x = torch.cat([past, x], dim=2)
                front -= past.shape[2]
        x = F.pad(x, (*self.space_pad, front, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """``normalize(x, dim=1) * sqrt(C) * gamma`` over channels; gamma is (C, 1, 1[, 1])."""

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C, ...]; low precision inputs are normalised in float32 (same result in fp32)
        y = F.normalize(x.float(), dim=1).to(x.dtype) if x.dtype != torch.float32 else F.normalize(x, dim=1)
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, conv) twice, plus a 1x1x1 shortcut when the width changes.

    Kept as a Sequential so the names are the official ``residual.{0,2,3,6}``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # dropout slot (rate 0 at inference)
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        # x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        h = self.shortcut(x)
        x = conv1(act1(norm1(x)), cache)
        x = conv2(act2(norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no time mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # starts as identity, as in the reference

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [BT, C, H, W]
        qkv = self.to_qkv(self.norm(frames))  # [BT, 3C, H, W]
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()  # [BT, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)  # [BT, 1, HW, C] each
        out = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        out = out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        out = self.proj(out)  # [BT, C, H, W]
        return out.reshape(b, t, c, h, w).transpose(1, 2) + x


class NearestUpsample2x(nn.Module):
    """2x 'nearest-exact' upsampling of [N, C, H, W], computed in float32 (bf16 lacks the kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Per-frame 2x spatial down/up-sampling, optionally with a causal 2x time resampler.

    mode: 'downsample2d', 'downsample3d' (conv with time stride 2 after the spatial step),
    'upsample2d', 'upsample3d' (a conv doubling the channels into two frames, before the spatial
    step). Spatial upsampling halves the width.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; known: {', '.join(self.MODES)}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            # pad right and bottom only, then a stride-2 conv without padding
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        # x: [B, C, T, H, W]; time is only resampled with a cache, as in the reference
        if self.mode == "upsample3d" and cache is not None and not cache.skip_first(x):
            b, c, t, h, w = x.shape
            x = self.time_conv(x, cache)  # [B, 2C, T, H, W]
            # channel halves are the two output frames of each input frame, interleaved in time
            x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # [BT, C', H', W']
        x = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)  # [B, C', T, H', W']

        if self.mode == "downsample3d" and cache is not None:
            # the first chunk (one frame) passes through; later ones see the previous last frame
            past = cache.exchange(x, keep=1)
            if past is not None:
                x = self.time_conv(torch.cat([past[:, :, -1:], x], dim=2))  # [B, C, ceil(T/2), ...]
        return x


class Encoder(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2z, T', H/8, W/8] (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < last:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        self.head = nn.Sequential(RMSNorm(d), nn.SiLU(), CausalConv3d(d, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        res1, attn, res2 = self.middle
        x = res2(attn(res1(x, cache)), cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class Decoder(nn.Module):
    """Latent [B, z, T, h, w] -> video [B, 3, T', 8h, 8w] (T' = T on the first chunk, 4T after)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_width * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        d = dims[0]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        blocks: list[nn.Module] = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halved the width
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < last:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        x = self.conv1(x, cache)
        res1, attn, res2 = self.middle
        x = res2(attn(res1(x, cache)), cache)
        for block in self.upsamples:
            x = block(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


def _shared_rows(chunk: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
    """The classes of videos with the same history (``cls`` [B]) and the same ``chunk`` [B, ...]: one
    representative row per class (int64 [U], in order of first appearance) and each video's class [B]."""
    flat = chunk.flatten(1)  # [B, N]
    # one weighted sum per row picks the candidates in one pass on the device; torch.equal decides
    ramp = torch.linspace(1.0, 2.0, flat.shape[1], device=flat.device, dtype=flat.dtype)
    sig, parent = (flat * ramp).sum(1).tolist(), cls.tolist()
    reps: list[int] = []
    candidates: dict[tuple[int, float], list[int]] = {}
    new = torch.empty_like(cls)
    for v in range(flat.shape[0]):
        same = candidates.setdefault((parent[v], sig[v]), [])
        j = next((j for j in same if torch.equal(flat[reps[j]], flat[v])), None)
        if j is None:
            j = len(reps)
            same.append(j)
            reps.append(v)
        new[v] = j
    return torch.tensor(reps, dtype=torch.long), new


class WanVAE(nn.Module):
    """The Wan2.1 VAE: ``encode`` video [B, 3, F, H, W] in [-1, 1] to latents, ``decode`` back."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder(cfg)

    def latent_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # mean and 1/std as float32 [1, z, 1, 1, 1], the reference's `scale = [mean, 1.0 / std]`
        mean = torch.tensor(self.cfg.latent_mean, dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(self.cfg.latent_std, dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise InputError(f"video must be [B, 3, F, H, W], got shape {tuple(video.shape)}")
        f, h, w = video.shape[2:]
        tf, sf = self.cfg.temporal_factor, self.cfg.spatial_factor
        if f < 1 or (f - 1) % tf:
            below = (f - 1) // tf * tf + 1
            nearest = f"{below} or {below + tf}" if below >= 1 else "1"
            raise InputError(f"video has {f} frames; the VAE needs {tf}n+1 frames (nearest: {nearest})")
        if h % sf or w % sf:
            raise InputError(f"video size {h}x{w} (HxW) must be divisible by {sf}")

    def encode(self, video: Tensor, normalize: bool = True, share_prefixes: bool = False) -> Tensor:
        """[B, 3, F, H, W] in [-1, 1], F = 4n+1 -> latent mean [B, z, (F-1)/4+1, H/8, W/8] (float32
        when normalised). No sampling: the reference conditions on the mean. ``share_prefixes``: see
        ``encode_moments``."""
        mu = self.encode_moments(video, share_prefixes)[:, : self.cfg.z_dim]  # [B, z, T, h, w]
        if not normalize:
            return mu
        mean, inv_std = self.latent_stats(mu.device)
        return (mu - mean) * inv_std

    def encode_moments(self, video: Tensor, share_prefixes: bool = False) -> Tensor:
        """[B, 3, F, H, W] -> unnormalised [B, 2z, T, h, w]: mean then log-variance (for training).

        ``share_prefixes``: videos of the batch whose frames agree up to the end of a time chunk are
        encoded once up to there (the encoder is causal, so their latents agree up to there too). The
        latent cache encodes each clip beside its conditioning videos (the first frame, then zeros), which
        share the first chunk with the clip and all but the last chunk with each other."""
        self._check_video(video)
        x = video.to(self.conv1.weight.dtype)
        tf = self.cfg.temporal_factor
        cache = FeatureCache()
        outs = []
        # share_prefixes: videos of one class have the same frames so far; the cache's row j is class j's
        cls = torch.zeros(x.shape[0], dtype=torch.long)  # [B]
        for start in range(0, x.shape[2], tf):
            cache.start_chunk()
            # chunks of 1, 4, 4, ... frames: the first frame alone
            chunk = x[:, :, :1] if start == 0 else x[:, :, start - tf + 1 : start + 1]
            if not share_prefixes:
                outs.append(self.encoder(chunk, cache))
                continue
            reps, new_cls = _shared_rows(chunk, cls)  # [U], [B]
            if not torch.equal(cls[reps], torch.arange(len(reps))):
                cache.select(cls[reps])  # each new class continues its parent class's history
            outs.append(self.encoder(chunk[reps], cache)[new_cls])  # [B, C, t, h', w']
            cls = new_cls
        cache.reset()
        return self.conv1(torch.cat(outs, dim=2))  # [B, 2z, T, h, w]

    def decode(
        self,
        z: Tensor,
        normalized: bool = True,
        clamp: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Latents [B, z, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w] float32, one latent at a time.

        ``progress(i, n)`` is called after latent frame i (1-based) of n."""
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim:
            raise InputError(f"latents must be [B, {self.cfg.z_dim}, T, h, w], got shape {tuple(z.shape)}")
        if normalized:
            mean, inv_std = self.latent_stats(z.device)
            z = z / inv_std + mean  # the reference divides by 1/std
        x = self.conv2(z.to(self.conv2.weight.dtype))
        n = x.shape[2]
        cache = FeatureCache()
        outs = []
        for i in range(n):
            cache.start_chunk()
            outs.append(self.decoder(x[:, :, i : i + 1], cache).float())
            if progress is not None:
                progress(i + 1, n)
        cache.reset()
        video = torch.cat(outs, dim=2)  # [B, 3, F, H, W]
        return video.clamp_(-1.0, 1.0) if clamp else video
