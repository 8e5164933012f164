"""Rectified-flow training of the Wan DiT, with the FLF2V conditioning built as at inference.

The model learns the velocity of the straight path ``x_t = (1 - sigma) * x0 + sigma * noise``:
``v = noise - x0``, so that ``x0 = x_t - sigma * v`` as the solvers assume. It sees the timestep
``t = 1000 * sigma``; sigma is drawn uniformly and then time-shifted as Wan's schedules are.

Conditioning: the DiT gets ``y = cat(mask, latent of the conditioning video)`` where the conditioning
video keeps the given pixel frames and is zero elsewhere, and the mask marks those frames folded four
per latent frame (``segue.recipe.frame_mask``/``conditioning_video`` at inference). Training draws,
per sample, which frames are given: first and last (FLF2V), first only (I2V), none, or a random
subset. CLIP sees the first and the last given frame (the first twice when only one is given, as
inference does for I2V on an FLF2V model), zeros when none is given.

Randomness is per sample: ``FLF2VObjective`` draws the mode, sigma, noise and dropped captions of
sample ``i`` from a generator seeded with ``batch["seed"][i]`` (the trainer derives it from the run
seed and the sample's position in the data stream), so the same sample gets the same draws however
the batch is split over ranks, and a resumed run repeats them exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError

MODES = ("first_last", "first", "none", "random_subset")
NUM_TRAIN_TIMESTEPS = 1000

# ---------------------------------------------------------------------------------------------
# The objective.


def sample_sigmas(
    n: int, shift: float = 1.0, generator: torch.Generator | None = None, sigma_min: float = 0.0
) -> Tensor:
    """[n] float32 noise levels: u ~ U(0, 1), then Wan's shift ``shift*u / (1 + (shift-1)*u)``.

    ``sigma_min`` > 0 cuts the distribution below it (the same shifted density, renormalised): u is drawn
    from [u_min, 1], u_min the shift's inverse at ``sigma_min``, from the same single random number, so 0
    gives exactly the plain draw. A few-step sampler never asks the model below its last noise level."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if not 0.0 <= sigma_min < 1.0:
        raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
    u_min = sigma_min / (shift - (shift - 1) * sigma_min)
    u = u_min + (1 - u_min) * torch.rand(n, generator=generator, dtype=torch.float64)  # u_min 0: exactly U(0, 1)
    return (shift * u / (1 + (shift - 1) * u)).float()


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    """[B] (or scalar) -> [B, 1, 1, ...] broadcasting against ``like``."""
    sigma = sigma.to(device=like.device, dtype=torch.float32)
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def flow_targets(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v): the noised sample ``(1 - sigma) x0 + sigma noise`` and the velocity ``noise - x0``."""
    s = _per_sample(sigma, x0)
    x_t = (1 - s) * x0.float() + s * noise.float()
    return x_t, noise.float() - x0.float()


def dit_loss(
    dit: nn.Module,
    x0: Tensor,
    y: Tensor | None,
    context: Tensor,
    clip: Tensor | None,
    sigma: Tensor,
    noise: Tensor,
    weight: Tensor | None = None,
) -> Tensor:
    """Mean squared error (fp32) between the DiT's velocity at (x_t, 1000 sigma) and ``noise - x0``;
    with ``weight`` (broadcast to [B, z, T, h, w]) the weighted mean ``sum(w e^2) / sum(w)``."""
    x_t, v = flow_targets(x0, noise, sigma)
    t = sigma.to(x_t.device, torch.float32).reshape(-1) * NUM_TRAIN_TIMESTEPS  # [B]
    pred = dit(x_t, t, context, clip, y)  # [B, z, T, h, w]
    if weight is None:
        return F.mse_loss(pred.float(), v)
    w = weight.float().expand_as(v)
    return (w * (pred.float() - v) ** 2).sum() / w.sum()


# ---------------------------------------------------------------------------------------------
# Conditioning: which frames are given, the mask, the conditioning video.


def given_frames(mode: str, frames: int, generator: torch.Generator | None = None) -> Tensor:
    """Bool [frames]: the pixel frames a sample of this mode is given."""
    given = torch.zeros(frames, dtype=torch.bool)
    if mode == "first_last":
        given[[0, frames - 1]] = True
    elif mode == "first":
        given[0] = True
    elif mode == "random_subset":
        # between one and all frames, each subset size equally likely
        k = int(torch.randint(1, frames + 1, (1,), generator=generator))
        given[torch.randperm(frames, generator=generator)[:k]] = True
    elif mode != "none":
        raise InputError(f"unknown conditioning mode {mode!r}; known: {', '.join(MODES)}")
    return given


def fold_time(x: Tensor, temporal: int = 4) -> Tensor:
    """Per-frame values [F, ...] -> [T_lat, temporal, ...] as the causal VAE folds frames: the first frame
    repeated ``temporal`` times is latent 0, then ``temporal`` frames a latent."""
    frames = x.shape[0]
    if (frames - 1) % temporal:
        raise InputError(f"{frames} frames is not {temporal}n+1")
    x = torch.cat([x[:1].expand(temporal - 1, *x.shape[1:]), x])  # [F + temporal - 1, ...]
    return x.view(-1, temporal, *x.shape[1:])


def mask_from_given(given: Tensor, lat_h: int, lat_w: int, temporal: int = 4) -> Tensor:
    """Mask [4, T_lat, lat_h, lat_w] of given pixel frames (bool [F]), folded ``temporal`` per latent.

    The same fold as ``segue.recipe.frame_mask``, for any set of given frames."""
    m = fold_time(given.float(), temporal).t()  # [temporal, T_lat]
    lat_t = m.shape[1]
    return m[:, :, None, None].expand(temporal, lat_t, lat_h, lat_w).contiguous()


def conditioning_from_given(
    video_latent_fn: Callable[[Tensor], Tensor], video: Tensor, given: Tensor, temporal: int = 4, spatial: int = 8
) -> Tensor:
    """y [B, 4 + z, T_lat, h, w] for videos [B, 3, F, H, W] and given frames bool [B, F]: the mask, then
    the latent of the video with the given frames kept and zeros elsewhere."""
    b, _, frames, height, width = video.shape
    if tuple(given.shape) != (b, frames):
        raise InputError(f"given frames {tuple(given.shape)} do not match videos {tuple(video.shape)}")
    lat_h, lat_w = height // spatial, width // spatial
    masks = torch.stack([mask_from_given(g, lat_h, lat_w, temporal) for g in given.cpu()])  # [B, 4, T, h, w]
    keep = given.to(video.device)[:, None, :, None, None]  # [B, 1, F, 1, 1]
    cond = torch.where(keep, video, torch.zeros((), dtype=video.dtype, device=video.device))  # [B, 3, F, H, W]
    latent = video_latent_fn(cond)  # [B, z, T, h, w]
    return torch.cat([masks.to(latent.device), latent.float()], dim=1)


def conditioning_for_training(
    video_latent_fn: Callable[[Tensor], Tensor],
    video: Tensor,
    mode: Sequence[str],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    temporal: int = 4,
    spatial: int = 8,
) -> Tensor:
    """y [B, 4 + z, T_lat, h, w] for videos [B, 3, F, H, W] in [-1, 1] and one mode per sample.

    ``video_latent_fn`` maps a conditioning video batch to its (normalised) latent, e.g. ``vae.encode``.
    ``generator`` (one, or one per sample) draws the random subsets.
    """
    b, frames = video.shape[0], video.shape[2]
    if len(mode) != b:
        raise InputError(f"{len(mode)} modes for a batch of {b}")
    gens = list(generator) if isinstance(generator, Sequence) else [generator] * b
    given = torch.stack([given_frames(m, frames, g) for m, g in zip(mode, gens)])  # [B, F]
    return conditioning_from_given(video_latent_fn, video, given, temporal, spatial)


def clip_frames(video: Tensor, given: Tensor, count: int = 2) -> Tensor:
    """[count, 3, H, W] frames CLIP sees for one video [3, F, H, W]: the first and the last given frame
    (the first twice when only one is given, as inference does), or the first alone when count is 1."""
    idx = given.nonzero().flatten().tolist()
    pick = [idx[0], idx[-1]][:count]
    return video[:, pick].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Encoders with gradients (they are trained jointly with the DiT).


def _encode(encoder: nn.Module, arg: Any) -> Any:
    """Call ``encoder.encode``; with gradients when the encoder has trainable weights.

    The encoders' ``encode`` is an inference method under ``torch.no_grad``; for joint training we call
    the undecorated function, which is otherwise the very same preprocessing and forward."""
    if any(p.requires_grad for p in encoder.parameters()) and torch.is_grad_enabled():
        return inspect.unwrap(type(encoder).encode)(encoder, arg)
    return encoder.encode(arg)


def set_dropout(module: nn.Module, p: float) -> int:
    """Set every dropout in ``module`` to rate ``p``: the ``nn.Dropout`` layers and the float ``dropout`` rates
    that attention layers apply to their weights (from outside the model: the encoders keep their configs);
    returns how many were set. A jointly trained encoder is in train mode, so its config's dropout
    would otherwise apply there, and never at inference."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p, n = p, n + 1
        elif isinstance(getattr(m, "dropout", None), float):  # a rate on the attention weights (UMT5Attention)
            m.dropout, n = p, n + 1
    return n


def encode_captions(text_encoder: nn.Module, captions: Sequence[str], text_len: int) -> Tensor:
    """[B, L, d] context: each caption's trimmed features zero-padded to the longest (the DiT pads to
    ``text_len`` with zeros as well, so this is what inference feeds it)."""
    feats = _encode(text_encoder, list(captions))  # B x [L_i, d]
    longest = min(max(f.shape[0] for f in feats), text_len)
    return torch.stack([F.pad(f[:longest], (0, 0, 0, longest - f.shape[0])) for f in feats])


# ---------------------------------------------------------------------------------------------
# The whole FLF2V training step's loss, as a Trainer loss function.


@dataclass
class FLF2VObjective:
    """Loss of one batch for ``segue.train.Trainer``: ``objective(parts, batch) -> scalar``.

    ``parts["dit"]`` is the DiT; ``parts["text"]``/``parts["image"]`` (TextEncoder/ImageEncoder), when
    present, are trained jointly, otherwise the frozen ``text_encoder``/``image_encoder`` given here are
    used. The VAE is frozen. ``batch`` holds ``video`` [B, 3, F, H, W] in [-1, 1], ``caption`` (B str) and
    ``seed`` (int64 [B], per-sample randomness; drawn from torch's RNG when absent).
    """

    vae: nn.Module
    text_encoder: nn.Module | None = None
    image_encoder: nn.Module | None = None
    shift: float = 3.0
    modes: Mapping[str, float] = field(default_factory=lambda: {"first_last": 1.0})
    caption_dropout: float = 0.0
    # noise levels below this are never drawn (``sample_sigmas``); 0: Wan's whole shifted range
    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min < 1.0:
            raise InputError(f"sigma_min must be in [0, 1), got {self.sigma_min}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or min(self.modes.values()) < 0 or sum(self.modes.values()) <= 0:
            raise InputError(f"modes must map some of {', '.join(MODES)} to non-negative weights, got {self.modes}")

    def draw_mode(self, g: torch.Generator) -> str:
        names = list(self.modes)
        w = torch.tensor([self.modes[n] for n in names], dtype=torch.float64)
        return names[int(torch.multinomial(w, 1, generator=g))]

    def draws(self, seeds: Tensor | None, b: int, frames: int) -> SampleDraws:
        """Per-sample draws of a batch of ``b`` clips of ``frames`` frames, except the noise (drawn last,
        from ``gens``, once the latent shape is known). Seeds None: drawn from torch's RNG."""
        if seeds is None:
            seeds = torch.randint(0, 2**62, (b,))
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # the order of draws per sample is fixed: mode, subset, sigma, caption drop, noise
        modes = [self.draw_mode(g) for g in gens]
        given = [given_frames(m, frames, g) for m, g in zip(modes, gens)]
        sigma = torch.cat([sample_sigmas(1, self.shift, g, self.sigma_min) for g in gens])  # [B]
        drop = [bool(torch.rand(1, generator=g) < self.caption_dropout) for g in gens]
        return SampleDraws(gens, modes, given, sigma, drop)

    def context(self, parts: Mapping[str, nn.Module], batch: Mapping[str, Any], drop: list[bool]) -> Tensor:
        """[B, L, d] text context: the (jointly trained or frozen) text encoder on the captions, with the
        dropped ones empty; ``batch["context"]`` when there is no text encoder."""
        dit = parts["dit"]
        device = next(dit.parameters()).device
        text_encoder = parts.get("text", self.text_encoder)
        if text_encoder is None:
            return batch["context"].to(device)
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        return encode_captions(text_encoder, captions, dit.cfg.text_len).to(device)

    def __call__(self, parts: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> Tensor:
        dit = parts["dit"]
        device = next(dit.parameters()).device
        video = batch["video"].to(device)  # [B, 3, F, H, W]
        b, frames = video.shape[0], video.shape[2]
        d = self.draws(batch.get("seed"), b, frames)

        with torch.no_grad():
            x0 = self.vae.encode(video)  # [B, z, T, h, w]
            y = None
            if dit.cfg.image_dim is not None:
                tf, sf = self.vae.cfg.temporal_factor, self.vae.cfg.spatial_factor
                y = conditioning_from_given(self.vae.encode, video, torch.stack(d.given), tf, sf)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in d.gens]).to(device)

        context = self.context(parts, batch, d.drop)
        image_encoder = parts.get("image", self.image_encoder)
        clip = None
        if y is not None:
            clip = self.clip_features(image_encoder, video, d.given, dit.cfg.image_pos_len is not None)
            clip = batch["clip"].to(device) if clip is None else clip
        return dit_loss(dit, x0, y, context, clip, d.sigma, noise)

    @staticmethod
    def clip_features(encoder: nn.Module | None, video: Tensor, given: list[Tensor], two: bool) -> Tensor | None:
        """[B, count*N, D] CLIP tokens per sample (count 2 for FLF2V), zeros where no frame is given.

        The encoder runs on every sample (the first frame stands in where none is given, its features
        then zeroed), so it is used, and gets a gradient, whatever modes a batch drew."""
        if encoder is None:
            return None
        count = 2 if two else 1
        first = torch.zeros_like(given[0])
        first[0] = True
        frames = torch.cat([clip_frames(v, g if g.any() else first, count) for v, g in zip(video, given)])
        shown = torch.tensor([bool(g.any()) for g in given])
        return encode_clip_frames(encoder, frames, shown)


@dataclass
class SampleDraws:
    """One batch's per-sample draws (``FLF2VObjective.draws``): generators (for the noise, drawn last),
    modes, given frames bool [F] each, sigma [B] and caption drops."""

    gens: list[torch.Generator]
    modes: list[str]
    given: list[Tensor]
    sigma: Tensor
    drop: list[bool]


def encode_clip_frames(encoder: nn.Module, frames: Tensor, shown: Tensor) -> Tensor:
    """[B, count*N, D] CLIP tokens of frames [B*count, 3, H, W] in [-1, 1], zeroed where ``shown`` (bool
    [B]) is False."""
    b = shown.shape[0]
    feats = _encode(encoder, frames).float()  # [B*count, N, D]
    feats = feats.reshape(b, -1, feats.shape[-1])  # [B, count*N, D]
    return feats * shown.to(device=feats.device, dtype=feats.dtype)[:, None, None]
