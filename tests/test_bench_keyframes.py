"""bench.vae_roundtrip's pieces on a tiny random VAE: the gamut grid and the scores of a round trip."""

from __future__ import annotations

import numpy as np
import torch

from bench import broad_vae
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


def test_broad_vae_trains_the_vae_and_records_the_trained_size(tmp_path, capsys, tiny_base):
    from segue.bundle import read_bundle_lineage, read_bundle_metadata, read_bundle_weights

    src = tiny_base
    run = tmp_path / "run"
    args = [str(src), "--out", str(run), "--steps", "2", "--frames", "5", "--size", "32", "--crop", "16",
            "--clips", "12", "--synthetic-start", "0", "--warmup", "0"]  # fmt: skip
    assert broad_vae.main(args) == 0
    cfg, _ = read_bundle_metadata(run / "model.safetensors")
    assert cfg.defaults.trained_frames == 5 and cfg.defaults.trained_size == (32, 32)
    old, new = read_bundle_weights(src), read_bundle_weights(run / "model.safetensors")
    assert all(torch.equal(old["dit"][k], new["dit"][k]) for k in old["dit"])  # only the VAE trained
    assert any(not torch.equal(old["vae"][k], new["vae"][k]) for k in old["vae"])
    assert read_bundle_lineage(run / "model.safetensors")[-1]["run"] == "broad-vae"
