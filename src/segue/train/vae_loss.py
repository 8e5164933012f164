"""The VAE objective: pixel reconstruction through the causal chunks, plus a KL prior on the latent.

Training runs exactly the inference code paths: ``WanVAE.encode_moments`` encodes in time chunks of
1, 4, 4, ... frames (what ``encode`` does, returning the mean and the log-variance), and ``decode``
decodes one latent frame at a time with the causal feature cache. Gradients flow through the cache, so
a chunk's loss also trains how earlier chunks are remembered. The latent is sampled with the
reparameterisation ``z = mu + exp(logvar / 2) * eps``, in the VAE's raw (unnormalised) latent space.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Clamp of the log-variance (as the usual diagonal-Gaussian posterior does): keeps exp() finite early on.
LOGVAR_RANGE = (-30.0, 20.0)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent element, averaged: 0 exactly at mu=0, logvar=0."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()


def narrow_posterior(vae: nn.Module, logvar: float = -8.0) -> None:
    """Start training with a narrow posterior: the log-variance half of ``conv1`` (the 1x1 conv on the
    encoder's moments) gets bias ``logvar`` and zero weights.

    With the default init the log-variance starts near 0, so the decoder first learns from latents under
    noise of std 1 against a mean of std ~1.5, and the encoder needs thousands of small Adam steps to
    shrink it (measured: log-variance still ~0 after 250 steps, 14 dB reconstructions). The KL weight is
    tiny, so nothing pulls it back up early on."""
    z = vae.cfg.z_dim
    with torch.no_grad():
        vae.conv1.weight[z:].zero_()
        vae.conv1.bias[z:].fill_(logvar)


def endpoint_weighted(err: Tensor, endpoint_weight: float) -> Tensor:
    """The mean of a per-pixel error [B, C, F, H, W] with the first and last frames counted
    ``endpoint_weight`` times (a weighted mean over frames): the keyframes a user gives. The first is decoded
    alone from its own latent frame, a path one frame in F trains at weight 1."""
    per_frame = err.mean(dim=(0, 1, 3, 4))  # [F]
    w = torch.ones_like(per_frame)
    w[0] = w[-1] = endpoint_weight
    return (w * per_frame).sum() / w.sum()


def detail_weighted_mse(err: Tensor, detail_weight: float) -> Tensor:
    """The MSE of an error [..., H, W] plus ``detail_weight`` times the MSE of its differences between
    neighbouring pixels (across and down). Plain MSE learns fine detail last: a linear code of the VAE's
    shape reached 25.8 dB on held-out photos in 2000 steps on MSE, 28.4 with a weight of 4 (docs/broad-data.md)."""
    loss = err.square().mean()
    if detail_weight:
        loss = loss + detail_weight * (err.diff(dim=-1).square().mean() + err.diff(dim=-2).square().mean())
    return loss


def round_trip_error(vae: nn.Module, video: Tensor, recon: str = "mse") -> Tensor:
    """The mean ``recon`` error ('l1' or 'mse') of ``decode(encoder mean)`` of ``video`` [B, 3, F, H, W]. No
    gradient reaches a frozen encoder (its parameters do not ask for one)."""
    x = video.to(vae.conv1.weight.device).float()
    err = vae.decode(vae.encode(x, normalize=False), normalized=False, clamp=False) - x
    return (err.abs() if recon == "l1" else err.square()).mean()


def stills_error(vae: nn.Module, stills: Tensor | None, recon: str = "mse") -> Tensor:
    """``round_trip_error`` of a batch's single frames (``stills`` [B, n, 3, 1, H, W]: ``phases.WithStills``),
    each encoded and decoded alone as a first keyframe is; 0 without them."""
    if stills is None:
        return vae.conv1.weight.new_zeros(())
    return round_trip_error(vae, stills.flatten(0, 1), recon)  # [B * n, 3, 1, H, W]


def vae_loss(
    vae: nn.Module,
    video: Tensor,
    kl_weight: float = 1e-6,
    recon: str = "l1",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    endpoint_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, parts) for videos [B, 3, F, H, W] in [-1, 1] (F = 4n+1).

    loss = recon(decode(z), video) + kl_weight * KL, recon 'l1' or 'mse' per pixel (mean; the first and last
    frames ``endpoint_weight`` times: ``endpoint_weighted``), z sampled from the encoder's posterior with
    ``noise`` (or drawn from ``generator``). ``parts`` holds the detached 'recon' and 'kl' terms.
    """
    if recon not in ("l1", "mse"):
        raise ValueError(f"recon must be 'l1' or 'mse', got {recon!r}")
    z_dim = vae.cfg.z_dim
    moments = vae.encode_moments(video).float()  # [B, 2z, T, h, w]
    mu, logvar = moments[:, :z_dim], moments[:, z_dim:].clamp(*LOGVAR_RANGE)
    if noise is None:
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * noise.to(mu.device, mu.dtype)  # [B, z, T, h, w]
    out = vae.decode(z, normalized=False, clamp=False)  # [B, 3, F, H, W] float32
    target = video.float()
    if endpoint_weight == 1.0:  # the plain mean, to the last bit: runs made before the weight resume unchanged
        rec = F.l1_loss(out, target) if recon == "l1" else F.mse_loss(out, target)
    else:
        err = out - target
        rec = endpoint_weighted(err.abs() if recon == "l1" else err.square(), endpoint_weight)
    kl = kl_divergence(mu, logvar)
    loss = rec + kl_weight * kl
    return loss, {"recon": rec.detach(), "kl": kl.detach()}


@dataclass
class VAEObjective:
    """Loss of one batch for ``segue.train.Trainer``: ``parts["vae"]`` on ``batch["video"]``.

    The posterior noise of sample ``i`` comes from a generator seeded with ``batch["seed"][i]`` (torch's
    RNG when absent), so it does not depend on how the batch is split over ranks."""

    kl_weight: float = 1e-6
    recon: str = "l1"
    endpoint_weight: float = 1.0  # the first and last frames' error counts this many times

    def __post_init__(self) -> None:
        if not self.endpoint_weight > 0:
            raise ValueError(f"endpoint_weight must be > 0, got {self.endpoint_weight}")

    def __call__(self, parts: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> Tensor:
        vae = parts["vae"]
        video = batch["video"].to(vae.conv1.weight.device)
        seeds = batch.get("seed")
        noise = None
        if seeds is not None:
            tf, sf, z = vae.cfg.temporal_factor, vae.cfg.spatial_factor, vae.cfg.z_dim
            shape = (z, (video.shape[2] - 1) // tf + 1, video.shape[3] // sf, video.shape[4] // sf)
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        loss, _ = vae_loss(vae, video, self.kl_weight, self.recon, noise=noise, endpoint_weight=self.endpoint_weight)
        return loss + stills_error(vae, batch.get("stills"), self.recon)


def freeze_encoder(vae: nn.Module) -> None:
    """Freeze the encoder and its moments conv (``conv1``): the latent space stays exactly as it is, so a
    DiT trained on it (or a latent cache built from it) stays valid while the decoder trains on."""
    vae.encoder.requires_grad_(False)
    vae.conv1.requires_grad_(False)


@dataclass
class DecoderObjective:
    """Decoder fine-tuning on a frozen encoder, for ``segue.train.Trainer``: ``recon`` of
    ``decode(encoder mean)`` against ``batch["video"]``, or of ``decode(batch["latent"])`` (a latent the
    model generated for that video, DiT-normalised: ``segue.train.generated``) when the batch has one.

    The decoder learns from the posterior mean, the latent it is given at generation time (the DiT is
    trained towards the mean), and no gradient reaches the encoder (see ``freeze_encoder``).

    ``endpoint_weight``: the error of the first and the last frame counts that many times (a weighted mean
    over frames). They are the keyframes a user gives, and the first is decoded alone from its own latent
    frame, a path that one frame in F trains at weight 1 (it reconstructed 1.3 dB below the rest)."""

    recon: str = "mse"
    endpoint_weight: float = 1.0
    # Shapes kept as ``anchor`` (the decoder as it started, frozen) renders them, for generated latents whose
    # batch has ``backdrop`` (the true scenery without its shapes) and ``objects`` (the true shapes' pixels):
    # where the true clip has a shape, or the anchor's decode differs from the true scenery by more than
    # ``anchor_threshold`` (a shape the DiT put somewhere, or an error too large to be the scenery's), the
    # target is the anchor's decode; elsewhere the true frame. The decoder then corrects the DiT's scenery and
    # does not learn to fade a shape whose place is uncertain (docs/training.md).
    anchor: nn.Module | None = None
    anchor_threshold: float = 0.25

    def __post_init__(self) -> None:
        if self.recon not in ("l1", "mse"):
            raise ValueError(f"recon must be 'l1' or 'mse', got {self.recon!r}")
        if not self.endpoint_weight > 0:
            raise ValueError(f"endpoint_weight must be > 0, got {self.endpoint_weight}")
        if not self.anchor_threshold > 0:
            raise ValueError(f"anchor_threshold must be > 0, got {self.anchor_threshold}")

    def target(self, latent: Tensor, video: Tensor, backdrop: Tensor, objects: Tensor) -> Tensor:
        """The frames a generated ``latent`` [B, z, T, h, w] should decode to: ``video`` [B, 3, F, H, W] on the
        scenery, the anchor's decode on the shapes (true ones in ``objects`` [B, F, H, W], or where the anchor
        shows something ``backdrop`` [B, 3, F, H, W] lacks)."""
        with torch.no_grad():
            kept = self.anchor.decode(latent, clamp=False).float()  # [B, 3, F, H, W]
        seen = (kept - backdrop).abs().amax(dim=1) > self.anchor_threshold  # [B, F, H, W]
        # one pixel around it: a shape's soft edge lies under the threshold
        seen = F.max_pool3d(seen[:, None].float(), (1, 3, 3), stride=1, padding=(0, 1, 1))[:, 0] > 0
        shape = (seen | objects.bool())[:, None]  # [B, 1, F, H, W]
        return torch.where(shape, kept, video)

    def __call__(self, parts: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> Tensor:
        vae = parts["vae"]
        video = batch["video"].to(vae.conv1.weight.device).float()
        if "latent" in batch:
            latent = batch["latent"].to(video.device)
            out = vae.decode(latent, clamp=False)  # [B, 3, F, H, W]
            if self.anchor is not None and "backdrop" in batch:
                backdrop, objects = batch["backdrop"].to(video.device), batch["objects"].to(video.device)
                video = self.target(latent, video, backdrop, objects)
        else:
            with torch.no_grad():
                mu = vae.encode(video, normalize=False)  # [B, z, T, h, w]
            out = vae.decode(mu, normalized=False, clamp=False)  # [B, 3, F, H, W]
        err = out - video
        loss = endpoint_weighted(err.abs() if self.recon == "l1" else err.square(), self.endpoint_weight)
        return loss + stills_error(vae, batch.get("stills"), self.recon)
