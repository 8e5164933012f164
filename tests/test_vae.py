"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, causality, sizes, errors, key layouts."""

from __future__ import annotations

import math

import diffusers  # noqa: E402  (the parity oracle; a hard dependency of the tests)
import pytest
import torch

from segue.adapters.vae import (
    config_from_diffusers,
    config_from_shapes,
    config_to_diffusers,
    diffusers_to_native,
    native_to_diffusers,
)
from segue.config import REGISTRY, VAEConfig
from segue.errors import InputError
from segue.models.vae import FeatureCache, WanVAE
from segue.weights import load_into

TINY = REGISTRY["tiny-flf2v"].vae


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomise(model: torch.nn.Module) -> None:
    """Every parameter random (gammas and the zero-initialised attention proj included)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:  # bias
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


@pytest.fixture(scope="module")
def pair() -> tuple[WanVAE, torch.nn.Module]:
    torch.manual_seed(0)
    ours = WanVAE(TINY).eval()
    randomise(ours)
    theirs = diffusers.AutoencoderKLWan.from_config(config_to_diffusers(TINY)).eval()
    theirs.load_state_dict(native_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


def video(frames: int, h: int = 32, w: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("frames", [9, 13])
def test_parity_with_diffusers(pair, frames: int, monkeypatch) -> None:
    ours, theirs = pair
    x = video(frames)
    with torch.no_grad():
        mu = ours.encode(x, normalize=False)
        ref_mu = theirs.encode(x).latent_dist.mode()
        assert mu.shape == (1, 16, (frames - 1) // 4 + 1, 4, 6)
        assert rel_err(mu, ref_mu) < 1e-5

        # normalisation is ours alone (diffusers leaves it to the pipeline): (mu - mean) / std
        mean = torch.tensor(TINY.latent_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(TINY.latent_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(ours.encode(x), (ref_mu - mean) / std, rtol=1e-5, atol=1e-5)

        z = torch.randn(mu.shape, generator=torch.Generator().manual_seed(2))
        ref_clamped = theirs.decode(z).sample
        monkeypatch.setattr(torch, "clamp", lambda t, min=None, max=None: t)  # noqa: A002
        ref_raw = theirs.decode(z).sample
        monkeypatch.undo()
        raw = ours.decode(z, normalized=False, clamp=False)
        clamped = ours.decode(z, normalized=False)
    assert raw.shape == (1, 3, frames, 32, 48) and raw.dtype == torch.float32
    assert raw.abs().max() > 1.0  # the clamp matters here
    assert rel_err(raw, ref_raw) < 1e-5
    assert rel_err(clamped, ref_clamped) < 1e-5
    assert clamped.abs().max() <= 1.0


def test_parity_of_the_default_models_vae_shape() -> None:
    """The built-in model's 4x-space VAE (two downsamples, both temporal) is the same architecture."""
    from segue.train.recipe import load_recipe

    cfg = load_recipe("default").model.config().vae
    assert cfg.spatial_factor == 4 and cfg.temporal_factor == 4
    torch.manual_seed(0)
    ours = WanVAE(cfg).eval()
    randomise(ours)
    theirs = diffusers.AutoencoderKLWan.from_config(config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(native_to_diffusers(ours.state_dict()), strict=True)
    x = video(9, 16, 24)
    with torch.no_grad():
        mu, ref_mu = ours.encode(x, normalize=False), theirs.encode(x).latent_dist.mode()
        assert mu.shape == (1, cfg.z_dim, 3, 4, 6)
        assert rel_err(mu, ref_mu) < 1e-5
        z = torch.randn(mu.shape, generator=torch.Generator().manual_seed(2))
        out, ref = ours.decode(z, normalized=False), theirs.decode(z).sample
    assert out.shape == (1, 3, 9, 16, 24)
    assert rel_err(out, ref) < 1e-5


def test_parity_of_a_wider_decoder_with_diffusers_decoder_base_dim() -> None:
    """``decoder_dim`` is diffusers' ``decoder_base_dim``: the same weights decode the same video."""
    from dataclasses import replace

    cfg = replace(TINY, decoder_dim=12)
    torch.manual_seed(0)
    ours = WanVAE(cfg).eval()
    randomise(ours)
    assert ours.decoder.conv1.weight.shape[0] == 12 * TINY.dim_mult[-1] != TINY.dim * TINY.dim_mult[-1]
    theirs = diffusers.AutoencoderKLWan.from_config(config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(native_to_diffusers(ours.state_dict()), strict=True)
    x = video(5)
    with torch.no_grad():
        assert rel_err(ours.encode(x, normalize=False), theirs.encode(x).latent_dist.mode()) < 1e-5
        z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(2))
        assert rel_err(ours.decode(z, normalized=False), theirs.decode(z).sample) < 1e-5
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}
    assert config_from_shapes(shapes) == cfg
    assert config_to_diffusers(TINY)["decoder_base_dim"] is None  # a Wan2.1 checkpoint's config
    assert config_from_diffusers({**config_to_diffusers(TINY), "decoder_base_dim": TINY.dim}) == TINY
    with pytest.raises(ValueError, match="decoder_dim must be positive"):
        replace(TINY, decoder_dim=0)


def test_normalised_round_trip_of_latents(pair) -> None:
    ours, _ = pair
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(TINY.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY.latent_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        a = ours.decode(z, normalized=True, clamp=False)
        b = ours.decode(z * std + mean, normalized=False, clamp=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_causality(pair) -> None:
    ours, _ = pair
    x = video(9)
    with torch.no_grad():
        short, full = ours.encode(x[:, :, :5]), ours.encode(x)
        torch.testing.assert_close(short, full[:, :, :2], rtol=1e-6, atol=1e-6)
        # and the future does matter
        assert (full[:, :, 2] - ours.encode(video(9, seed=5))[:, :, 2]).abs().max() > 1e-3

        z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(4))
        short, full = ours.decode(z[:, :, :2], clamp=False), ours.decode(z, clamp=False)
    assert short.shape[2] == 5 and full.shape[2] == 9
    torch.testing.assert_close(short, full[:, :, :5], rtol=1e-6, atol=1e-6)


def test_shared_prefixes_encode_once_with_the_same_latents(pair) -> None:
    """The latent cache's batch: two clips, each with its first-last and first-only conditioning videos
    (zeros between), and a repeat. Frames equal up to a chunk's end are encoded once up to there."""
    ours, _ = pair
    clips = torch.cat([video(9, seed=2), video(9, seed=3)])  # [2, 3, 9, H, W]
    first_last, first = clips.clone(), clips.clone()
    first_last[:, :, 1:-1] = 0
    first[:, :, 1:] = 0
    batch = torch.cat([clips, first_last, first, clips[:1]])  # [7, 3, 9, H, W]
    rows: list[int] = []
    hook = ours.encoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            plain = ours.encode(batch)
            n_plain = len(rows)
            shared = ours.encode(batch, share_prefixes=True)
    finally:
        hook.remove()
    # chunks of 1, 4, 4 frames: 7 rows each plainly; shared, the two first frames, then the two clips and
    # the two zero continuations, then all but the repeat
    assert rows[:n_plain] == [7, 7, 7] and rows[n_plain:] == [2, 4, 6]
    assert rel_err(shared, plain) < 1e-5
    assert torch.equal(shared[6], shared[0])


def test_repeat_calls_and_progress(pair) -> None:
    ours, _ = pair
    x = video(5)
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        assert torch.equal(ours.encode(x), ours.encode(x))
        z = torch.randn(1, 16, 4, 4, 6, generator=torch.Generator().manual_seed(6))
        out1 = ours.decode(z, progress=lambda i, n: calls.append((i, n)))
        out2 = ours.decode(z)
    assert torch.equal(out1, out2)
    assert out1.shape == (1, 3, 1 + 4 * 3, 32, 48)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_feature_cache_rules() -> None:
    cache = FeatureCache()
    a = torch.arange(3.0).view(1, 1, 3, 1, 1)
    assert cache.exchange(a[:, :, :1]) is None  # first chunk: no past
    cache.start_chunk()
    past = cache.exchange(a[:, :, 1:2])  # one new frame: keeps the previous last frame too
    assert past.flatten().tolist() == [0.0]
    cache.start_chunk()
    assert cache.exchange(a[:, :, 2:]).flatten().tolist() == [0.0, 1.0]
    cache.reset()
    assert len(cache) == 0
    assert cache.skip_first(a) and len(cache) == 1
    cache.start_chunk()
    assert not cache.skip_first(a)
    assert cache.exchange(a[:, :, :1]).shape[2] == 0  # empty history: zeros stand in for it


def test_full_size_on_meta_and_config_from_shapes() -> None:
    with torch.device("meta"):
        full = WanVAE(VAEConfig())
    assert sum(p.numel() for p in full.parameters()) == 126_892_531
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert config_from_shapes(shapes) == VAEConfig()
    assert "encoder.middle.1.norm.gamma" in shapes and shapes["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)

    with torch.device("meta"):
        tiny = WanVAE(TINY)
    tiny_shapes = {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    assert config_from_shapes(tiny_shapes) == TINY

    other = VAEConfig(dim=4, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, False))
    with torch.device("meta"):
        other_shapes = {k: tuple(v.shape) for k, v in WanVAE(other).state_dict().items()}
    assert config_from_shapes(other_shapes) == other

    broken = dict(shapes)
    broken["decoder.head.2.weight"] = (3, 96, 3, 3, 1)
    with pytest.raises(ValueError, match="decoder.head.2.weight"):
        config_from_shapes(broken)
    del broken["encoder.downsamples.1.residual.6.weight"]
    with pytest.raises(ValueError, match="encoder.downsamples.1.residual.6.weight"):
        config_from_shapes(broken)


def test_loads_on_meta(pair) -> None:
    ours, _ = pair
    with torch.device("meta"):
        fresh = WanVAE(TINY)
    load_into(fresh, ours.state_dict(), "vae")
    x = video(5)
    with torch.no_grad():
        assert torch.equal(fresh.encode(x), ours.encode(x))


def test_input_errors(pair) -> None:
    ours, _ = pair
    with pytest.raises(InputError, match=r"8 frames.*5 or 9"):
        ours.encode(video(8))
    with pytest.raises(InputError, match="36x48"):
        ours.encode(video(5, h=36))
    with pytest.raises(InputError, match="divisible by 8"):
        ours.encode(video(5, w=44))
    with pytest.raises(InputError, match="latents"):
        ours.decode(torch.zeros(1, 4, 2, 4, 6))


def test_key_mapping_round_trip() -> None:
    for cfg in (VAEConfig(), TINY):
        with torch.device("meta"):
            native = {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}
            ref = diffusers.AutoencoderKLWan.from_config(config_to_diffusers(cfg))
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert native_to_diffusers(native) == theirs  # every key, same shapes
        assert diffusers_to_native(theirs) == native
    # spot checks of SPEC section 6
    mapped = native_to_diffusers(native)
    assert mapped.keys() >= {
        "decoder.up_blocks.0.upsamplers.0.time_conv.weight",
        "decoder.up_blocks.3.resnets.2.conv2.weight",
        "encoder.mid_block.attentions.0.to_qkv.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
    }


def test_diffusers_config_round_trip() -> None:
    for cfg in (VAEConfig(), TINY):
        assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    with pytest.raises(ValueError, match="is_residual"):
        config_from_diffusers({**config_to_diffusers(TINY), "is_residual": True})
