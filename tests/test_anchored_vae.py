"""The anchored VAE objective: the anchor term is zero on the anchor itself and pulls a moved encoder back."""

from __future__ import annotations

import copy

import pytest
import torch

from segue.config import VAEConfig
from segue.models.vae import WanVAE
from segue.train.anchored_vae import AnchoredVAEObjective


def _vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(VAEConfig(dim=4, z_dim=4, latent_mean=(0.0,) * 4, latent_std=(0.5,) * 4))


def test_anchor_term_is_zero_on_the_anchor_and_measured_in_normalised_units():
    vae = _vae()
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    obj = AnchoredVAEObjective(copy.deepcopy(vae), anchor_weight=3.0)
    parts = obj.parts(vae, video, torch.tensor([True, False]))
    assert float(parts["anchor"]) == pytest.approx(0.0, abs=1e-10)  # a batch of 1 vs 2: last bits only
    assert float(parts["loss"]) == pytest.approx(float(parts["recon"] + 1e-6 * parts["kl"]), rel=1e-6)
    with torch.no_grad():
        vae.conv1.bias[:4] += 0.1  # the encoder's mean moves by 0.1 raw = 0.2 normalised (std 0.5)
    moved = obj.parts(vae, video, torch.tensor([True, False]))
    assert float(moved["anchor"]) == pytest.approx(0.04, rel=1e-4)
    assert float(obj.parts(vae, video, torch.tensor([False, False]))["anchor"]) == 0.0  # nothing anchored
    assert float(obj.parts(vae, video, None)["anchor"]) == 0.0


def test_gradient_reaches_the_encoder_and_not_the_anchor():
    vae = _vae()
    anchor = copy.deepcopy(vae)
    with torch.no_grad():
        vae.conv1.bias[:4] += 0.1
    obj = AnchoredVAEObjective(anchor, anchor_weight=1.0, endpoint_weight=2.0)
    loss = obj({"vae": vae}, {"video": torch.rand(2, 3, 5, 16, 16) * 2 - 1, "anchor": torch.tensor([True, True])})
    loss.backward()
    assert vae.conv1.bias.grad[:4].abs().sum() > 0 and vae.decoder is not None
    assert all(p.grad is None for p in anchor.parameters())
    with pytest.raises(ValueError, match="endpoint_weight"):
        AnchoredVAEObjective(anchor, endpoint_weight=0)
