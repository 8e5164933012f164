"""A VAE started from its skeleton: the 2-D first-frame path set into a ``WanVAE`` gives the skeleton's output
on first frames and still clips; photo crops are a function of their index; a continuation can start its
VAE there."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import segue
from segue.bundle import read_bundle_metadata, read_bundle_weights
from segue.config import VAEConfig
from segue.data.photo_crops import PhotoCrops
from segue.errors import InputError
from segue.loader import DEFAULT_MODEL
from segue.models.vae import WanVAE
from segue.train.continuation import continue_from_bundle
from segue.train.recipe import load_recipe, parse_recipe
from segue.train.skeleton import Skeleton, SkeletonObjective, embed, skeleton_vae_state, train_skeleton

TINY = load_recipe(Path(__file__).parent / "data" / "tiny.toml")
BUILTIN = read_bundle_metadata(DEFAULT_MODEL)[0].vae  # dim 16, (1, 2, 4), time down twice, decoder width 24
FOUR_LEVELS = VAEConfig(dim=4, dim_mult=(1, 2, 4, 4), temporal_downsample=(False, True, True))


def _skeleton_and_vae(cfg: VAEConfig) -> tuple[Skeleton, WanVAE]:
    torch.manual_seed(0)
    sk = Skeleton(cfg).eval()
    with torch.no_grad():
        for m in sk.modules():  # norms away from their initial ones, so a missed gamma shows
            if hasattr(m, "gamma"):
                m.gamma.uniform_(0.5, 1.5)
    vae = WanVAE(cfg).eval()
    embed(sk, vae)
    return sk, vae


@pytest.mark.parametrize("cfg", [BUILTIN, FOUR_LEVELS], ids=["builtin", "four-levels"])
def test_the_vae_gives_the_skeletons_first_frame(cfg):
    sk, vae = _skeleton_and_vae(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x[:, :, None], normalize=False)  # [2, z, 1, h, w]
        y = vae.decode(z, normalized=False, clamp=False)[:, :, 0]
        assert torch.allclose(z[:, :, 0], sk.encoder(x), atol=1e-4)
        assert torch.allclose(y, sk(x), atol=1e-4)
        moments = vae.encode_moments(x[:, :, None])
    assert torch.all(moments[:, cfg.z_dim :] == -8.0)  # a narrow posterior


def test_every_skeleton_layer_has_a_place_in_the_vae():
    sk = Skeleton(BUILTIN)
    vae_names = dict(WanVAE(BUILTIN).named_modules())
    weighted = {n for n, m in sk.named_modules() if isinstance(m, torch.nn.Conv2d) or hasattr(m, "gamma")}
    assert weighted == set(sk.places)
    assert all(place in vae_names for place in sk.places.values())
    # the built-in layout: 3 encoder convs with strides or widths changing, 2 decoder upsampling convs
    assert sum(".shortcut" in p for p in sk.places.values()) == 2
    assert sum("resample" in p for p in sk.places.values()) == 4
    with pytest.raises(ValueError, match="different configs"):
        embed(sk, WanVAE(FOUR_LEVELS))


def test_a_still_clip_decodes_every_frame_as_its_first():
    sk, vae = _skeleton_and_vae(BUILTIN)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        clip = vae.decode(vae.encode(x[:, :, None].expand(-1, -1, 9, -1, -1), normalize=False), normalized=False,
                          clamp=False)  # fmt: skip
        first = sk(x)
    assert clip.shape[2] == 9
    for f in range(9):
        assert torch.allclose(clip[:, :, f], first, atol=1e-4), f


def test_a_chunks_latent_is_the_code_of_its_frames_mean():
    sk, vae = _skeleton_and_vae(BUILTIN)
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1  # the first frame, then one chunk of four
    with torch.no_grad():
        z = vae.encode(clip, normalize=False)  # [1, z, 2, 8, 8]
        assert torch.allclose(z[:, :, 1], sk.encoder(clip[:, :, 1:].mean(2)), atol=1e-4)


def test_photo_crops_are_a_function_of_their_index():
    a, b = PhotoCrops("pypi", size=16, seed=1), PhotoCrops("pypi", size=16, seed=1)
    items = [a[i]["image"] for i in range(40)]
    assert all(torch.equal(items[i], b[i]["image"]) for i in (0, 7, 39))
    assert not torch.equal(items[0], PhotoCrops("pypi", size=16, seed=2)[0]["image"])
    assert all(x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 for x in items)
    flat = [x for x in items if torch.equal(x, x[:, :1, :1].expand_as(x))]
    assert 2 <= len(flat) <= 20  # a fifth of them, more or less
    assert all(not torch.equal(x, x[:, :1, :1].expand_as(x)) for x in (PhotoCrops("pypi", 16, flat=0.0)[i]["image"]
                                                                       for i in range(10)))  # fmt: skip
    with pytest.raises(IndexError):
        a[len(a)]
    with pytest.raises(ValueError, match="size"):
        PhotoCrops("pypi", size=100)


def test_the_skeleton_learns_and_a_finished_run_is_kept(tmp_path):
    cfg = replace(BUILTIN, dim=4, decoder_dim=4)
    kw = dict(steps=30, lr=3e-3, detail_weight=4.0, photos="pypi", recolour=0.75, seed=0, batch_size=4)
    train_skeleton(cfg, tmp_path / "run", **kw)
    ema = torch.load(tmp_path / "run" / "ema.pt", weights_only=True)["skeleton"]
    torch.manual_seed(0)
    start, trained = Skeleton(cfg), Skeleton(cfg)  # the run's init (its seed), and its EMA weights
    trained.load_state_dict(ema)
    x = PhotoCrops("pypi", size=32, seed=5).batch(0, 16)
    objective = SkeletonObjective(4.0)
    with torch.no_grad():
        assert objective({"skeleton": trained}, {"image": x}) < 0.8 * objective({"skeleton": start}, {"image": x})
    train_skeleton(cfg, tmp_path / "run", **kw)  # finished: resumes at its end and trains no more
    again = torch.load(tmp_path / "run" / "ema.pt", weights_only=True)["skeleton"]
    assert all(torch.equal(ema[k], again[k]) for k in ema)
    state = skeleton_vae_state(cfg, ema)
    assert state.keys() == WanVAE(cfg).state_dict().keys()
    torch.manual_seed(123)  # the init of what the skeleton leaves does not follow torch's global random state
    assert all(torch.equal(state[k], v) for k, v in skeleton_vae_state(cfg, ema).items())


def test_the_objective_weighs_neighbouring_differences():
    sk = Skeleton(replace(BUILTIN, dim=4, decoder_dim=4))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        err = sk(x) - x
        plain, weighted = (
            SkeletonObjective(0.0)({"skeleton": sk}, {"image": x}),
            SkeletonObjective(4.0)({"skeleton": sk}, {"image": x}),
        )
    assert torch.allclose(plain, err.square().mean())
    detail = err.diff(dim=-1).square().mean() + err.diff(dim=-2).square().mean()
    assert torch.allclose(weighted, plain + 4.0 * detail)
    with pytest.raises(ValueError):
        SkeletonObjective(-1.0)


def test_a_continuation_can_start_its_vae_from_the_skeleton(tiny_base, tmp_path):
    c = replace(TINY.continuations[0], name="sk", vae_start="skeleton", skeleton_steps=2, decoder_steps=0)
    new = continue_from_bundle(tiny_base, c, TINY.vae, tmp_path / "run")
    run = tmp_path / "run" / "vae-skeleton"
    assert json.loads((run / "done").read_text()) == {"steps": 2}
    # no VAE phase: the bundle's VAE is the skeleton set into it (stored at float16)
    cfg = segue.load(new).config.vae
    expected = skeleton_vae_state(cfg, torch.load(run / "ema.pt", weights_only=True)["skeleton"], seed=c.vae_seed)
    shipped = read_bundle_weights(new)["vae"]
    assert all(torch.allclose(shipped[k].float(), expected[k], atol=1e-3, rtol=1e-3) for k in expected)
    assert cfg.latent_mean != segue.load(tiny_base).config.vae.latent_mean  # measured again
    record = json.loads((tmp_path / "run" / "continuation.json").read_text())
    assert record["phase_steps"]["skeleton"] == 2


def test_a_skeleton_start_is_checked():
    base = TINY.continuations[0]
    with pytest.raises(ValueError, match="vae_start must be"):
        replace(base, vae_start="random")
    with pytest.raises(ValueError, match="leaves that latent space"):
        replace(base, vae_start="skeleton", vae_steps=1, vae_anchor=1.0)
    with pytest.raises(ValueError, match="skeleton_steps > 0"):
        replace(base, vae_start="skeleton", skeleton_steps=0)
    with pytest.raises(ValueError, match="must learn it"):
        replace(base, vae_start="skeleton", stage=replace(base.stage, steps=0))
    text = (
        (Path(__file__).parent / "data" / "tiny.toml")
        .read_text()
        .replace('name = "next"', 'name = "next"\nvae_start = "scratch"')
    )
    with pytest.raises(InputError, match="vae_start"):
        parse_recipe(text, "tiny.toml")
