"""bench.vae_skeleton: a 2-D skeleton set into a VAE of the built-in layout gives the skeleton's output, on
a first frame and on every frame of a still clip."""

from __future__ import annotations

import torch

from bench.vae_skeleton import Skeleton, embed
from segue.bundle import read_bundle_metadata
from segue.loader import DEFAULT_MODEL
from segue.models.vae import WanVAE


def _skeleton_and_vae() -> tuple[Skeleton, WanVAE]:
    torch.manual_seed(0)
    cfg, _ = read_bundle_metadata(DEFAULT_MODEL)
    sk = Skeleton(cfg.vae.z_dim).eval()
    with torch.no_grad():
        for m in sk.modules():  # norms away from their initial ones, so a missed gamma shows
            if hasattr(m, "gamma"):
                m.gamma.uniform_(0.5, 1.5)
    vae = WanVAE(cfg.vae).eval()
    embed(sk, vae)
    return sk, vae


def test_vae_gives_the_skeletons_first_frame():
    sk, vae = _skeleton_and_vae()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x[:, :, None], normalize=False)  # [2, z, 1, 8, 8]
        y = vae.decode(z, normalized=False, clamp=False)[:, :, 0]
        assert torch.allclose(z[:, :, 0], sk.encoder(x), atol=1e-4)
        assert torch.allclose(y, sk(x), atol=1e-4)
        moments = vae.encode_moments(x[:, :, None])
    assert torch.all(moments[:, vae.cfg.z_dim :] == -8.0)  # a narrow posterior


def test_still_clip_decodes_every_frame_as_its_first():
    sk, vae = _skeleton_and_vae()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        clip = vae.decode(vae.encode(x[:, :, None].expand(-1, -1, 9, -1, -1), normalize=False), normalized=False,
                          clamp=False)  # fmt: skip
        first = sk(x)
    assert clip.shape[2] == 9
    for f in range(9):
        assert torch.allclose(clip[:, :, f], first, atol=1e-4), f


def test_a_chunks_latent_is_the_code_of_its_frames_mean():
    sk, vae = _skeleton_and_vae()
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1  # the first frame, then one chunk of four
    with torch.no_grad():
        z = vae.encode(clip, normalize=False)  # [1, z, 2, 8, 8]
        assert torch.allclose(z[:, :, 1], sk.encoder(clip[:, :, 1:].mean(2)), atol=1e-4)
