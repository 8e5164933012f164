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


def test_a_vae_run_folder_is_read_at_its_ema_on_the_base_config(tiny_base, tmp_path):
    from segue.bundle import read_bundle_weights

    name, vae = vr.load_vae(tiny_base)
    assert name == tiny_base.name
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in read_bundle_weights(tiny_base)["vae"].items()}
    run = tmp_path / "vae"
    run.mkdir()
    torch.save({"vae": state}, run / "ema.pt")
    name, trained = vr.load_vae(run, tiny_base)
    assert name == f"{run} (EMA, final)"
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in state.items())
