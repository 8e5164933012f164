"""bench.vae_roundtrip's pieces on a tiny random VAE: the gamut grid and the scores of a round trip."""

from __future__ import annotations

import numpy as np
import torch

from bench import vae_roundtrip as vr
from segue.config import VAEConfig
from segue.models.vae import WanVAE


def test_flat_colours_span_the_gamut_and_a_round_trip_is_scored():
    cols = vr.flat_colours(3, 8)
    assert cols.shape == (27, 8, 8, 3)
    flat = {tuple(c) for c in cols[:, 0, 0]}
    assert (0, 0, 0) in flat and (255, 255, 255) in flat and (255, 0, 0) in flat
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4, z_dim=4, latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4)).eval()
    out = vr.round_trip(vae, cols[:5], batch=2)
    assert out.shape == (5, 8, 8, 3) and out.dtype == np.uint8
    mean, low, de = vr.scores(vae, cols[:5])
    assert low <= mean <= vr.PSNR_CAP and de > 0
    photo = vr.fitted_photo("chelsea", 16)
    assert photo.shape == (16, 16, 3)
