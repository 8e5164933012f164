"""bench.vae_roundtrip's models and scores: a saved state loads as the bundle it came from; moving clips are
scored at their first, in-between and last frames."""

from __future__ import annotations

import torch

from bench.vae_roundtrip import PSNR_CAP, load_vae, moving_clips, moving_scores
from segue.bundle import read_bundle_weights
from segue.loader import DEFAULT_MODEL


def test_a_saved_state_loads_as_the_bundle_it_came_from(tmp_path):
    path = tmp_path / "vae.pt"
    torch.save({"vae": read_bundle_weights(DEFAULT_MODEL)["vae"]}, path)
    name, saved = load_vae(path)
    _, bundled = load_vae(DEFAULT_MODEL)
    assert name == "vae.pt"
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), bundled.state_dict().values()))


class _Exact:
    """A round trip that changes nothing, and one that darkens the last frame alone."""

    def __init__(self, last_shift: float = 0.0) -> None:
        self.last_shift = last_shift

    def encode(self, x, normalize=True):
        return x

    def decode(self, z, normalized=True):
        z = z.clone()
        z[:, :, -1] -= self.last_shift
        return z


def test_moving_clips_are_scored_frame_by_frame():
    clips = moving_clips(2, 32, "pypi")
    assert set(clips) == {"moving synthetic test clips", "moving broad held-out clips"}
    video = clips["moving synthetic test clips"]
    assert video.shape == (2, 3, 17, 32, 32)
    assert not torch.equal(video[:, :, 0], video[:, :, -1])  # they move
    assert moving_scores(_Exact(), video) == (PSNR_CAP, PSNR_CAP, PSNR_CAP)
    first, mid, last = moving_scores(_Exact(0.2), video)
    assert first == mid == PSNR_CAP and 15 < last < 30
