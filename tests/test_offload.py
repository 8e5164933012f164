"""Memory profiles: offloaded and block-swapped generation equal the plain one, the swap's device bound,
banded VAE decoding equals the whole decode with less memory, and the memory estimates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import segue
import segue.placement.apply as placing
import segue.placement.estimate as estimating
import segue.placement.tiled_vae as tiled_vae
from segue.config import get_config
from segue.errors import InputError
from segue.models.dit import WanDiT
from segue.models.vae import WanVAE
from segue.placement.apply import apply_profile, current_profile, remove_profile
from segue.placement.block_swap import BlockSwap
from segue.placement.estimate import estimate_memory, trace_peak
from segue.placement.profiles import PROFILES
from segue.placement.tiled_vae import decoder_halo, tiled_decode
from segue.testing import randomize_

TINY = get_config("tiny-flf2v")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny convolutions: a second thread only adds synchronisation (10x slower on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_vae() -> WanVAE:
    torch.manual_seed(0)
    return randomize_(WanVAE(TINY.vae), seed=7).eval()


def make_latent(b: int, t: int, h: int, w: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * h + w)
    return torch.randn(b, TINY.vae.z_dim, t, h, w, generator=g).to(device)


# -- banded VAE decode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "bands"),
    [((1, 20, 6), (7, 64)), ((2, 29, 4), (5,))],  # uneven last bands; 64 >= h: one band
)
def test_tiled_decode_equals_decode(shape: tuple[int, int, int], bands: tuple[int, ...]) -> None:
    vae = make_vae()
    b, h, w = shape
    z = make_latent(b, 3, h, w)
    with torch.no_grad():
        ref = vae.decode(z, clamp=False)
        assert ref.abs().max() > 1  # so the unclamped comparison covers values the clamp would hide
        for band_rows in bands:
            calls: list[tuple[int, int]] = []
            got = tiled_decode(vae, z, band_rows, clamp=False, progress=lambda i, n, c=calls: c.append((i, n)))
            assert got.shape == ref.shape
            diff = (got - ref).abs().max().item()
            assert diff <= 1e-6, f"band_rows {band_rows}: max abs diff {diff:.3g}"  # bit-identical on CPU
            n = -(-h // band_rows) * 3
            assert calls == [(i, n) for i in range(1, n + 1)]
        clamped = tiled_decode(vae, z, bands[0])
        assert torch.equal(clamped, ref.clamp(-1, 1))


def test_halo_is_exactly_what_the_decoder_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    vae = make_vae()
    # 3x3 convs: 6 per stage at latent scale, 1/2 + 3 at scale 2, 1/4 + 3/2 at 4, 1/8 + 3/4 + 1/8 at 8
    assert decoder_halo(vae.decoder) == 13
    assert tiled_vae.band_overhead(90, 16, 13) == pytest.approx((29 + 3 * 42 + 39 + 23) / 90)
    z = make_latent(1, 2, 33, 4)
    with torch.no_grad():
        ref = vae.decode(z, clamp=False)
        monkeypatch.setattr(tiled_vae, "decoder_halo", lambda d: 12)
        short = tiled_decode(vae, z, 4, clamp=False)
    assert (short - ref).abs().max() > 0  # one halo row fewer and the band edges change


def test_tiled_decode_bounds_memory() -> None:
    """Peak bytes of live tensors on CPU: real tensors and the meta trace agree, and banding cuts it."""
    vae = make_vae()
    weights = list(vae.parameters())
    z = make_latent(1, 2, 64, 4)
    with torch.no_grad():
        full = trace_peak(lambda: vae.decode(z), weights)
        tiled = trace_peak(lambda: tiled_decode(vae, z, 8), weights)
    meta_vae = estimating._meta_vae(TINY.vae)
    zm = torch.empty(z.shape, device="meta")
    assert trace_peak(lambda: meta_vae.decode(zm), list(meta_vae.parameters())) == full
    assert trace_peak(lambda: tiled_decode(meta_vae, zm, 8), list(meta_vae.parameters())) == tiled
    video = 3 * 5 * 512 * 32 * 4
    assert video < tiled < 0.6 * full, (tiled, full)
    # the estimator's shortcut (one band over 3 latent frames, buffers scaled) equals a full trace
    t, h, w, band = 4, 30, 4, 6
    est = estimating._tiled_trace(TINY, 1 + 4 * (t - 1), 8 * h, 8 * w, band)
    shape = (1, TINY.vae.z_dim, t, h, w)
    assert est == trace_peak(
        lambda: tiled_decode(meta_vae, torch.empty(shape, device="meta"), band), meta_vae.parameters()
    )


# -- block swap -------------------------------------------------------------------------------------


def make_dit(layers: int = 5) -> WanDiT:
    torch.manual_seed(0)
    return randomize_(WanDiT(replace(TINY.dit, num_layers=layers)), seed=1).eval()


def dit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    y = torch.randn(1, 20, 2, 4, 6, generator=g)
    context = torch.randn(1, 7, TINY.dit.text_dim, generator=g)
    clip = torch.randn(1, 2 * 257, TINY.dit.image_dim, generator=g)
    return x, torch.tensor([700.0]), context, clip, y


def _where(t: torch.Tensor, swap: BlockSwap, index: int) -> str:
    """'slot' (device copy), 'home' (its CPU buffer) or 'other' (a resident or unswapped tensor)."""
    ptr = t.untyped_storage().data_ptr()
    for slot in swap.slots:
        if slot.data_ptr() <= ptr < slot.data_ptr() + slot.numel():
            return "slot"
    for s in swap.swapped:
        if s.index == index and s.home.data_ptr() <= ptr < s.home.data_ptr() + s.home.numel():
            return "home"
    return "other"


@pytest.mark.parametrize(("resident", "prefetch"), [(0, 1), (1, 1), (2, 0), (0, 3), (5, 1)])
def test_block_swap_is_exact_and_bounded(resident: int, prefetch: int) -> None:
    dit = make_dit()
    inputs = dit_inputs()
    with torch.no_grad():
        ref = dit(*inputs)
        swap = BlockSwap(dit.blocks, "cpu", resident=resident, prefetch=prefetch)
        n_swapped = 5 - min(resident, 5)
        assert len(swap.slots) == min(prefetch + 1, n_swapped)
        if swap.slots:
            assert swap.slots[0].numel() == max(s.home.numel() for s in swap.swapped)

        # probe: at every Linear inside a block, which blocks have their weights in device memory
        seen: list[tuple[int, list[int], int]] = []

        def probe(i: int) -> None:
            materialised = [
                j for j, b in enumerate(dit.blocks) if j < resident or _where(b.ffn[0].weight, swap, j) == "slot"
            ]
            seen.append((i, materialised, len(swap.on_device())))

        handles = [
            m.register_forward_pre_hook(lambda *_, i=i: probe(i))
            for i, b in enumerate(dit.blocks)
            for m in b.modules()
            if isinstance(m, nn.Linear)
        ]
        outs = [dit(*inputs), dit(*inputs)]  # the second runs on the wrapped-around prefetch
        for h in handles:
            h.remove()
    for out in outs:
        assert torch.equal(out, ref)
    assert seen and all(i in mat for i, mat, _ in seen), "a block ran without its device copy"
    assert max(len(mat) for _, mat, _ in seen) <= resident + 1
    assert max(n for *_, n in seen) <= resident + prefetch + 1
    assert swap.max_on_device <= resident + prefetch + 1
    if n_swapped > len(swap.slots):
        assert swap.copies >= 2 * n_swapped  # every forward streams the blocks again
    for s in swap.swapped:  # between forwards every swapped block rests in its CPU buffer
        assert all(_where(t, swap, s.index) == "home" for t in s.tensors)

    swap.remove()
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in dit.blocks)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in dit.blocks.parameters())
    with torch.no_grad():
        assert torch.equal(dit(*inputs), ref)


def test_block_swap_recovers_from_an_error() -> None:
    dit = make_dit(4)
    inputs = dit_inputs()
    with torch.no_grad():
        ref = dit(*inputs)
        swap = BlockSwap(dit.blocks, "cpu", resident=0, prefetch=1)

        def boom(*_: object) -> None:
            raise KeyError("boom")

        h = dit.blocks[2].cross_attn.register_forward_pre_hook(boom)
        with pytest.raises(KeyError):
            dit(*inputs)
        h.remove()
        assert swap.running is None
        assert all(_where(t, swap, s.index) == "home" for s in swap.swapped for t in s.tensors)
        assert torch.equal(dit(*inputs), ref)
        swap.remove()


# -- profiles on a pipeline -------------------------------------------------------------------------


def generate(pipe: segue.Pipeline, frames_dir: Path) -> segue.Video:
    return pipe.generate(frames_dir / "first.png", frames_dir / "last.png", "a ball", frames=5, steps=2, seed=3)


def test_offload_and_block_swap_give_the_same_video(
    official_ckpt: Path, frames_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = segue.load(official_ckpt)
    ref = generate(pipe, frames_dir)
    text = pipe.text_encoder
    during: list[bool] = []  # text encoder weights away from their CPU home while it runs?
    probe = text.model.register_forward_pre_hook(
        lambda *_: during.append(
            text.model.shared.weight.data_ptr() != placing._APPLIED[pipe].offloads["text"].home[0].data_ptr()
        )
    )
    tiled_calls = []
    monkeypatch.setattr(placing, "tiled_decode", lambda *a, **k: tiled_calls.append(a[2]) or tiled_decode(*a, **k))

    for name, kwargs in (("offload", {}), ("block-swap", {"band_rows": 2, "prefetch": 0})):
        assert apply_profile(pipe, name, **kwargs) == name
        assert current_profile(pipe) == name
        state = placing._APPLIED[pipe]
        video = generate(pipe, frames_dir)
        assert np.array_equal(video.frames, ref.frames), name
        assert torch.equal(video.latent, ref.latent), name
        assert {k: o.loads for k, o in state.offloads.items()} == {"text": 2, "image": 1, "vae": 2}
        assert not any(o.loaded for o in state.offloads.values())
        home = state.offloads["text"].home
        assert all(t.data_ptr() == h.data_ptr() for t, h in zip(state.offloads["text"].tensors, home))
    assert during == [True] * 4
    assert tiled_calls == [2]  # block-swap decoded in bands of 2 latent rows (the latent has 6)
    assert state.swap is not None and state.swap.copies > 2 * len(pipe.dit.blocks)

    probe.remove()
    remove_profile(pipe)
    assert current_profile(pipe) == "gpu"
    for m in (pipe.text_encoder, pipe.image_encoder, pipe.vae):
        assert "encode" not in m.__dict__ and "decode" not in m.__dict__
    assert all(not b._forward_pre_hooks for b in pipe.dit.blocks)
    assert np.array_equal(generate(pipe, frames_dir).frames, ref.frames)


def test_low_profile_runs_fp8_blocks_and_text_on_cpu(official_ckpt: Path, frames_dir: Path) -> None:
    from segue.accel.fp8 import FP8Linear

    pipe = segue.load(official_ckpt)
    ref = generate(pipe, frames_dir)
    assert apply_profile(pipe, "low", band_rows=4) == "low"
    state = placing._APPLIED[pipe]
    assert state.swap is not None and "text" not in state.offloads and "encode" not in pipe.text_encoder.__dict__
    assert all(isinstance(b.ffn[0], FP8Linear) for b in pipe.dit.blocks)
    video = generate(pipe, frames_dir)
    rel = ((video.latent - ref.latent).norm() / ref.latent.norm()).item()
    assert 0 < rel < 0.05  # fp8 weights: close to the bf16/fp32 run, not equal


def test_unknown_profile_and_auto_on_cpu(official_ckpt: Path) -> None:
    pipe = segue.load(official_ckpt)
    with pytest.raises(InputError, match="'nope'; choose one of: auto, gpu, offload, block-swap, fp8, low"):
        apply_profile(pipe, "nope")
    assert apply_profile(pipe, "auto") == "gpu"  # nothing to save on the CPU
    assert current_profile(pipe) == "gpu" and "encode" not in pipe.text_encoder.__dict__
    with pytest.raises(InputError, match="unknown memory profile"):
        estimate_memory(TINY, "fast", 9, 48, 80)


def test_auto_picks_the_fastest_profile_that_fits(official_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = segue.load(official_ckpt)
    pipe = SimpleNamespace(
        device=torch.device("cuda"), config=TINY, dit=real.dit, vae=real.vae, text_encoder=None, image_encoder=None
    )
    frames, height, width = placing._default_size(TINY)
    assert (frames, height, width) == (9, 48, 80)
    peaks = {p: estimate_memory(TINY, p, frames, height, width, dtype=torch.float32)["peak"] for p in PROFILES}
    for free, want in ((peaks["gpu"] * 2, "gpu"), (peaks["offload"] / 0.9 + 1, "offload"), (1, "low")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_, f=free: (int(f), 10**12))
        assert placing.choose_profile(pipe) == want


# -- estimates --------------------------------------------------------------------------------------


def test_memory_estimates_for_14b() -> None:
    cfg = get_config("flf2v-14b")
    est = {p: estimate_memory(cfg, p, 81, 720, 1280) for p in PROFILES}
    order = ["gpu", "offload", "block-swap", "low"]
    peaks = [est[p]["peak"] for p in order]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), peaks
    assert est["block-swap"]["peak"] <= 24e9
    # bf16 DiT weights are about 2 bytes x 16.4e9 parameters; the swap keeps 2 blocks of 40 on the device
    assert 32e9 < est["offload"]["weights"] < 34e9
    assert est["block-swap"]["weights"] < 0.1 * est["offload"]["weights"]
    assert est["block-swap"]["vae_decode"] < 0.6 * est["offload"]["vae_decode"]
    assert est["fp8"]["weights"] < 0.55 * est["offload"]["weights"]
    assert est["low"]["text_encode"] == 0 and est["low"]["weights"] < est["block-swap"]["weights"]


def test_dit_trace_on_meta_equals_trace_on_cpu() -> None:
    """The activation estimate traces meta tensors; CPU tensors through the same code give the same bytes."""
    dit = make_dit(2)
    inputs = dit_inputs()
    with torch.no_grad():
        real = trace_peak(lambda: dit(*inputs), list(dit.parameters()))
    with torch.device("meta"):
        meta_dit = WanDiT(replace(TINY.dit, num_layers=2))
    meta_inputs = [t.to("meta") for t in inputs]
    assert trace_peak(lambda: meta_dit(*meta_inputs), list(meta_dit.parameters())) == real
    assert real > sum(t.numel() * 4 for t in inputs)
