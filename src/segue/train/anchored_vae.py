"""The whole VAE trained on new data while the latents of the old data stay where a trained DiT expects them.

A VAE trained on a narrow palette encodes colours outside it into latents its decoder cannot tell apart
(the built-in model's encoder, probed linearly, gives back flat colours at 36/255 RMSE), so a decoder alone
cannot fix it: the encoder must train too. That moves the latent space under the DiT. ``AnchoredVAEObjective``
keeps it still where the DiT learned it: on the items marked ``anchor`` (the old data), the encoder's mean is
pulled towards a frozen copy's (``anchor_weight``), while every item trains the reconstruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .vae_loss import LOGVAR_RANGE, endpoint_weighted, kl_divergence, stills_error


@dataclass
class AnchoredVAEObjective:
    """Loss of one batch for ``segue.train.Trainer``: per-frame MSE of ``decode(encode(video))`` (the first and
    last frames ``endpoint_weight`` times) + ``kl_weight`` * KL + ``anchor_weight`` * the mean squared distance
    of the encoder's mean from ``anchor``'s (a frozen VAE) on the batch's ``anchor`` items (bool [B]; none
    without the key). The latent is the posterior mean: what generation encodes and decodes."""

    anchor: nn.Module
    anchor_weight: float = 1.0
    endpoint_weight: float = 1.0
    kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        if self.anchor_weight < 0 or not self.endpoint_weight > 0 or self.kl_weight < 0:
            raise ValueError(f"need anchor_weight >= 0, endpoint_weight > 0, kl_weight >= 0; got "
                             f"{self.anchor_weight}, {self.endpoint_weight}, {self.kl_weight}")  # fmt: skip
        self.anchor.eval().requires_grad_(False)

    def parts(self, vae: nn.Module, video: Tensor, anchored: Tensor | None, stills: Tensor | None = None
              ) -> dict[str, Tensor]:  # fmt: skip
        """The loss's terms for ``video`` [B, 3, F, H, W] in [-1, 1]: 'recon', 'kl', 'anchor' (0 when no item is
        anchored), 'stills' (``vae_loss.stills_error`` of ``stills`` [B, n, 3, 1, H, W]; 0 without) and 'loss'."""
        z_dim = vae.cfg.z_dim
        moments = vae.encode_moments(video).float()  # [B, 2z, T, h, w]
        mu, logvar = moments[:, :z_dim], moments[:, z_dim:].clamp(*LOGVAR_RANGE)
        out = vae.decode(mu, normalized=False, clamp=False)  # [B, 3, F, H, W]
        recon = endpoint_weighted((out - video.float()).square(), self.endpoint_weight)
        kl = kl_divergence(mu, logvar)
        anchor_term = mu.new_zeros(())
        if anchored is not None and bool(anchored.any()):
            sel = anchored.to(video.device).bool()
            with torch.no_grad():
                old = self.anchor.encode(video[sel], normalize=False).float()  # [b, z, T, h, w]
            std = torch.tensor(vae.cfg.latent_std, device=mu.device).view(1, -1, 1, 1, 1)  # the DiT's units
            anchor_term = ((mu[sel] - old) / std).square().mean()
        still = stills_error(vae, stills)
        loss = recon + self.kl_weight * kl + self.anchor_weight * anchor_term + still
        return {"recon": recon, "kl": kl, "anchor": anchor_term, "stills": still, "loss": loss}

    def __call__(self, parts: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> Tensor:
        vae = parts["vae"]
        video = batch["video"].to(vae.conv1.weight.device)
        return self.parts(vae, video, batch.get("anchor"), batch.get("stills"))["loss"]
