"""Single frames beside the VAE's clips: drawn from (seed, index), crops of one broad clip's frames or flat
fields, each encoded and decoded alone in every VAE objective."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from segue.config import VAEConfig
from segue.models.vae import WanVAE
from segue.train.anchored_vae import AnchoredVAEObjective
from segue.train.phases import WithStills, train_vae_run
from segue.train.recipe import load_recipe
from segue.train.vae_loss import DecoderObjective, VAEObjective, freeze_encoder, stills_error


class Coded(torch.utils.data.Dataset):
    """Clips whose every pixel says where it is: (clip, frame, row, column) in four channels' worth of
    values, so a crop can be traced back. ``video`` [3, F, H, W]."""

    def __init__(self, n: int = 50, frames: int = 5, size: tuple[int, int] = (16, 16)) -> None:
        self.n, self.frames, self.size = n, frames, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        f, h, w = self.frames, *self.size
        grid = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
        video = torch.stack([g.float() for g in grid]) + 1000.0 * index  # [3, F, H, W]
        return {"video": video}


def _where(still: torch.Tensor) -> tuple[int, int, int, int]:
    """(clip, frame, top, left) of a ``Coded`` crop [3, 1, h, w]."""
    clip = int(still[0, 0, 0, 0]) // 1000
    f, top, left = (int(v) - 1000 * clip for v in still[:, 0, 0, 0])
    return clip, f, top, left


def _clips(n: int = 20) -> list[dict]:
    return [{"video": torch.full((3, 5, 8, 8), float(i))} for i in range(n)]


def test_stills_are_crops_of_one_broad_clip_or_flat_fields_drawn_from_seed_and_index():
    broad = Coded()
    data = WithStills(_clips(), broad, n=4, flat=0.0, size=(8, 8), seed=3)
    item = data[5]
    assert torch.equal(item["video"], _clips()[5]["video"]) and item["stills"].shape == (4, 3, 1, 8, 8)
    places = [_where(s) for s in item["stills"]]
    assert len({p[0] for p in places}) == 1  # one clip rendered per item
    for s, (clip, f, top, left) in zip(item["stills"], places):
        assert torch.equal(s, broad[clip]["video"][:, f : f + 1, top : top + 8, left : left + 8])
    assert torch.equal(data[5]["stills"], item["stills"])  # a resumed run sees the same frames
    assert not torch.equal(data[6]["stills"], item["stills"])
    assert not torch.equal(WithStills(_clips(), broad, 4, 0.0, (8, 8), seed=4)[5]["stills"], item["stills"])
    # every frame and place comes up
    seen = {_where(s)[1:] for i in range(20) for s in data[i]["stills"]}
    assert {f for f, _, _ in seen} == set(range(5)) and {t for _, t, _ in seen} == set(range(9))

    flat = WithStills(_clips(), broad, n=4, flat=1.0, size=(8, 8), seed=3)[5]["stills"]
    assert (flat == flat[:, :, :, :1, :1]).all() and flat.abs().max() <= 1.0  # flat colours in [-1, 1]
    stills = torch.cat([WithStills(_clips(), broad, 4, 0.25, (8, 8))[i]["stills"] for i in range(20)])
    flat_share = float((stills.amax((2, 3, 4)) == stills.amin((2, 3, 4))).all(1).float().mean())
    assert 0.15 < flat_share < 0.35  # of 80 draws at 0.25
    with pytest.raises(ValueError, match="inside frames"):
        WithStills(_clips(), broad, 4, 0.25, (32, 8))


def test_a_share_of_clips_is_replaced_by_their_first_still_held_still_and_not_anchored():
    broad = Coded()
    clips = [{"video": torch.full((3, 5, 8, 8), float(i)), "anchor": True} for i in range(40)]
    plain = WithStills(clips, broad, n=2, flat=0.0, size=(8, 8), seed=3)
    held = WithStills(clips, broad, n=2, flat=0.0, size=(8, 8), seed=3, held=0.5)
    replaced = 0
    for i in range(40):
        a, b = plain[i], held[i]
        assert torch.equal(a["stills"], b["stills"])  # the held share draws apart: the same single frames
        if torch.equal(a["video"], b["video"]):
            assert b["anchor"] is True
            continue
        replaced += 1
        assert b["video"].shape == (3, 5, 8, 8) and b["anchor"] is False
        assert all(torch.equal(b["video"][:, f : f + 1], b["stills"][0]) for f in range(5))
    assert 10 <= replaced <= 30  # of 40 at 0.5
    assert all(torch.equal(held[i]["video"], held[i]["video"]) for i in range(5))
    with pytest.raises(ValueError, match="held in"):
        WithStills(clips, broad, 2, 0.0, (8, 8), held=1.5)


def _vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(VAEConfig(dim=4, z_dim=4, latent_mean=(0.0,) * 4, latent_std=(0.5,) * 4))


def test_each_still_is_encoded_and_decoded_alone():
    vae = _vae().eval()
    stills = torch.rand(2, 3, 3, 1, 16, 16) * 2 - 1  # [B, n, 3, 1, H, W]
    with torch.no_grad():
        alone = [
            (vae.decode(vae.encode(s[None], normalize=False), normalized=False, clamp=False) - s[None]).square().mean()
            for s in stills.flatten(0, 1)
        ]
        err = stills_error(vae, stills)
        assert float(err) == pytest.approx(float(torch.stack(alone).mean()), rel=1e-5)
        assert float(stills_error(vae, stills, "l1")) != pytest.approx(float(err))
        assert float(stills_error(vae, None)) == 0.0


@pytest.mark.parametrize("objective", ["anchored", "whole", "decoder"])
def test_every_vae_objective_adds_the_stills_and_trains_what_it_trains_on_them(objective):
    vae = _vae()
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    stills = torch.rand(2, 2, 3, 1, 16, 16) * 2 - 1
    seeds = torch.tensor([1, 2])  # the whole VAE's posterior noise, the same with and without stills
    obj = {
        "anchored": AnchoredVAEObjective(copy.deepcopy(vae)),
        "whole": VAEObjective(recon="mse"),
        "decoder": DecoderObjective("mse"),
    }[objective]
    if objective == "decoder":
        freeze_encoder(vae)
    batch = {"video": video, "anchor": torch.tensor([True, False]), "seed": seeds}
    plain = obj({"vae": vae}, batch)
    both = obj({"vae": vae}, {**batch, "stills": stills})
    with torch.no_grad():
        assert float(both - plain) == pytest.approx(float(stills_error(vae, stills)), rel=1e-4)
    vae.zero_grad()
    # the stills alone: gradient reaches the decoder, and the encoder only where it trains
    (both - plain).backward()
    assert vae.decoder.head[2].weight.grad.abs().sum() > 0
    encoder_grad = vae.conv1.weight.grad
    assert (encoder_grad is None) == (objective == "decoder")


def test_a_vae_phase_with_stills_trains_the_same_with_its_clips_rendered_in_a_worker(tmp_path):
    clips = replace(load_recipe(Path(__file__).parent / "data" / "tiny.toml").vae, broad=0.5, stills=2, recon="mse")
    cfg = VAEConfig(dim=4, z_dim=4, latent_mean=(0.0,) * 4, latent_std=(0.5,) * 4)
    state = _vae().state_dict()
    emas = []
    for workers in (0, 1):
        run = train_vae_run(clips, cfg, state, tmp_path / f"w{workers}", steps=2, lr=1e-3, seed=0,
                            decoder_only=False, anchor_weight=1.0, workers=workers)  # fmt: skip
        emas.append(torch.load(run / "ema.pt", weights_only=True)["vae"])
    assert emas[0].keys() == emas[1].keys()
    assert all(torch.equal(emas[0][k], emas[1][k]) for k in emas[0])
    assert any(not torch.equal(emas[0][k], state[k]) for k in state)  # it trained
