"""Lossless speed options (segue.accel: attention kernels, fused QKV, fast RoPE, regional compile; CFG as
one batch) against the plain DiT forward and the two-pass pipeline, on a tiny FLF2V DiT at fp32."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import segue
from segue.accel.attention import (
    BACKENDS,
    attention_backend,
    available_backends,
    best_backend,
    set_attention_backend,
)
from segue.accel.compile import compile_blocks, is_compiled, uncompile_blocks
from segue.accel.fuse import AccelSelfAttention, fast_rope, fuse_qkv, remove_fast_rope, rotate_pairs, unfuse_qkv
from segue.config import REGISTRY
from segue.errors import InputError
from segue.models.dit import SelfAttention, WanDiT, apply_rope, sdpa_attention
from segue.pipeline import Pipeline
from segue.sampling.guidance import Conditioning, StepContext
from segue.testing import randomize_

TOL = 1e-5
CFG = REGISTRY["tiny-flf2v"].dit  # dim 32, 2 heads of 16, 2 blocks, image branch with the FLF2V table


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_dit(cfg=CFG) -> WanDiT:
    torch.manual_seed(0)
    return randomize_(WanDiT(cfg), seed=1).eval()


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(1, 16, 3, 6, 8, generator=g),  # 3 x 3 x 4 = 36 tokens
        "t": torch.tensor([640]),
        "context": torch.randn(1, 7, CFG.text_dim, generator=g),
        "clip": torch.randn(2, 257, CFG.image_dim, generator=g),  # the two frames' CLIP tokens
        "y": torch.randn(1, 20, 3, 6, 8, generator=g),
    }


@pytest.fixture(scope="module")
def plain() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    inputs = make_inputs()
    with torch.no_grad():
        return inputs, make_dit()(**inputs)


def forward(dit: WanDiT, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return dit(**inputs)


# -- attention kernels ------------------------------------------------------------------------------


def test_attention_kernels_match_softmax_attention():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 40, 2, 16, generator=g) for _ in range(3))
    s = torch.einsum("blnd,bmnd->bnlm", q.double(), k.double()) / 4.0
    ref = torch.einsum("bnlm,bmnd->blnd", s.softmax(-1), v.double()).flatten(2)
    for name in ("sdpa", "math"):
        out = BACKENDS[name].fn(q, k, v, torch.float32)
        assert out.shape == (2, 40, 32) and out.dtype == torch.float32
        err = rel(out, ref)
        print(f"attention {name}: rel err vs float64 softmax {err:.1e}")
        assert err < 1e-6


def test_math_backend_matches_plain_dit(plain):
    inputs, ref = plain
    dit = make_dit()
    set_attention_backend(dit, "math")
    assert attention_backend(dit) == "math"
    assert all(b.cross_attn is not None for b in dit.blocks)  # cross-attention untouched
    err = rel(forward(dit, inputs), ref)
    print(f"math backend vs sdpa: rel err {err:.1e}")
    assert err < TOL
    set_attention_backend(dit, "sdpa")
    assert all(b.self_attn.attention is sdpa_attention for b in dit.blocks)
    assert torch.equal(forward(dit, inputs), ref)


def test_backend_availability_and_errors_on_cpu():
    avail = available_backends("cpu")
    assert set(avail) == set(BACKENDS)
    assert avail["sdpa"] == avail["math"] == "available"
    for name in ("flash", "cudnn", "efficient"):
        assert name in avail[name] and "CUDA" in avail[name]
    assert best_backend("cpu", torch.float32) == "sdpa"
    assert best_backend("cpu", torch.bfloat16) == "sdpa"
    assert not BACKENDS["sage"].lossless
    assert all(b.lossless for n, b in BACKENDS.items() if n != "sage")

    dit = make_dit()
    for name in ("flash", "cudnn", "efficient"):
        with pytest.raises(InputError, match=rf"'{name}' needs a CUDA GPU"):
            set_attention_backend(dit, name)
    if importlib.util.find_spec("flash_attn_interface") is None:
        with pytest.raises(InputError, match=r"install flash-attn 3 \(flash_attn_interface\)"):
            set_attention_backend(dit, "fa3")
    if importlib.util.find_spec("sageattention") is None:
        with pytest.raises(InputError, match="install SageAttention"):
            set_attention_backend(dit, "sage")
    with pytest.raises(InputError, match="unknown attention backend 'xformers'; choose one of: sdpa, flash"):
        set_attention_backend(dit, "xformers")
    assert attention_backend(dit) == "sdpa"  # refused choices changed nothing
    # the kernels themselves refuse a dtype they cannot take, naming the backend
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(InputError, match="'fa3' takes fp16/bf16"):
        BACKENDS["fa3"].fn(q, q, q, torch.float32)


def test_backend_composes_with_sequence_parallel_attention():
    """With sequence parallel applied (its own attention function per block), an SDPA backend wraps
    that function instead of replacing it, "sdpa" unwraps it, and fa3/sage are refused."""
    dit = make_dit()
    calls = []

    def distributed(q, k, v, dtype):
        calls.append(torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled())
        return sdpa_attention(q, k, v, dtype)

    for block in dit.blocks:
        block.self_attn.attention = distributed
    dit._segue_sequence_parallel = object()  # what apply_sequence_parallel leaves on the DiT
    set_attention_backend(dit, "math")
    assert attention_backend(dit) == "math"
    q = torch.randn(1, 4, 2, 16)
    dit.blocks[0].self_attn.attention(q, q, q, torch.float32)
    assert calls == [True]  # ran SP's function, under the math-only SDPA restriction
    set_attention_backend(dit, "sdpa")
    assert dit.blocks[0].self_attn.attention is distributed
    with pytest.raises(InputError, match="'sage' cannot run under sequence parallel"):
        set_attention_backend(dit, "sage", check=False)


# -- fused QKV and fast RoPE ------------------------------------------------------------------------


def test_fuse_qkv_parity_and_unfuse_restores_bit_identical_state(plain):
    inputs, ref = plain
    dit = make_dit()
    sd0 = {k: v.clone() for k, v in dit.state_dict().items()}
    q_weight = dit.blocks[0].self_attn.q.weight
    originals = [b.self_attn for b in dit.blocks]

    fuse_qkv(dit)
    keys = dit.state_dict().keys()
    assert "blocks.0.self_attn.qkv.weight" in keys and "blocks.0.self_attn.q.weight" not in keys
    assert dit.blocks[1].self_attn.qkv.weight.shape == (3 * CFG.dim, CFG.dim)
    n_params = sum(p.numel() for p in dit.parameters())
    assert n_params == sum(v.numel() for v in sd0.values())  # no second copy of q/k/v registered
    err = rel(forward(dit, inputs), ref)
    print(f"fused qkv vs plain: rel err {err:.1e}")
    assert err < TOL

    set_attention_backend(dit, "math")  # chosen while fused: survives unfuse
    unfuse_qkv(dit)
    assert [b.self_attn for b in dit.blocks] == originals and type(originals[0]) is SelfAttention
    assert dit.blocks[0].self_attn.q.weight is q_weight  # the same Parameter objects
    sd1 = dit.state_dict()
    assert list(sd1) == list(sd0)
    assert all(torch.equal(sd1[k], sd0[k]) and sd1[k].dtype == sd0[k].dtype for k in sd0)
    assert all(sd1[k].is_contiguous() for k in sd1)
    assert attention_backend(dit) == "math"


def test_fast_rope_error_vs_float64_complex():
    dit = make_dit()
    freqs = dit._rope(3, 5, 7, torch.device("cpu"))  # [105, 1, 8] complex128
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 105, 2, 16, generator=g) * 3
    exact = apply_rope(x, freqs)  # float64 math, fp32 out
    table32 = torch.view_as_real(freqs).float()
    table64 = torch.view_as_real(freqs)
    err32, err64 = rel(rotate_pairs(x, table32), exact), rel(rotate_pairs(x, table64), exact)
    print(f"fast RoPE vs float64 complex: fp32 rel err {err32:.1e}, fp64 rel err {err64:.1e}")
    assert 0 < err32 < 3e-7
    assert err64 < 1e-9  # equal after rounding to fp32, up to the odd tie


def test_fast_rope_parity_grid_cache_and_removal(plain):
    inputs, ref = plain
    dit = make_dit()
    fast_rope(dit)
    out = forward(dit, inputs)
    tables = dit.blocks[0].self_attn.rope
    assert tables is dit.blocks[1].self_attn.rope  # one table per DiT, not per block
    first = tables._table
    forward(dit, inputs)
    assert tables._table is first  # same grid: converted once
    err = rel(out, ref)
    print(f"fast RoPE (fp32) DiT vs plain: rel err {err:.1e}")
    assert 0 < err < TOL
    assert list(dit.state_dict()) == list(make_dit().state_dict())  # official keys kept
    fast_rope(dit, "fp64")
    assert rel(forward(dit, inputs), ref) < 1e-9
    remove_fast_rope(dit)
    assert type(dit.blocks[0].self_attn) is SelfAttention and "_rope" not in dit.__dict__
    assert torch.equal(forward(dit, inputs), ref)
    with pytest.raises(InputError, match="RoPE precision"):
        fast_rope(dit, "bf16")


# -- regional compile -------------------------------------------------------------------------------


def test_compiled_blocks_match_eager(plain):
    """aot_eager backend: dynamo tracing and AOT graphs without inductor's C++ build, which takes
    ~10-25 s cold on the 2-core CI machine; inductor was checked by hand (same tolerance)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    inputs, ref = plain
    dit = make_dit()
    fuse_qkv(dit)
    set_attention_backend(dit, "math")
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(dit, backend="aot_eager", fullgraph=True)  # fullgraph: no break, complex kept out
    assert is_compiled(dit) and isinstance(dit.blocks[0].self_attn, AccelSelfAttention)
    out = forward(dit, inputs)
    err = rel(out, ref)
    print(f"compiled blocks (fused qkv, fast RoPE, math attention) vs plain: rel err {err:.1e}")
    assert err < TOL
    assert counters["stats"]["unique_graphs"] == 1  # both blocks share one graph
    assert torch.equal(forward(dit, inputs), out)
    uncompile_blocks(dit)
    assert not is_compiled(dit) and all("forward" not in b.__dict__ for b in dit.blocks)
    assert rel(forward(dit, inputs), ref) < TOL
    with pytest.raises(InputError, match="rope must be one of"):
        compile_blocks(dit, rope="complex")


# -- CFG as one batch of two ------------------------------------------------------------------------


def test_cfg_batch_velocity_matches_two_passes():
    dit = make_dit()
    pipe = Pipeline(REGISTRY["tiny-flf2v"], dit, None, None, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    latent = torch.randn(16, 3, 6, 8, generator=g)
    ctx, neg = torch.randn(7, CFG.text_dim, generator=g), torch.randn(12, CFG.text_dim, generator=g)
    clip = torch.randn(1, 514, CFG.image_dim, generator=g)  # what encode_images returns for FLF2V
    y = torch.randn(1, 20, 3, 6, 8, generator=g)
    t = torch.tensor([880])
    cond = Conditioning(ctx, neg, clip, y)
    step = StepContext(index=0, total=1, timestep=t, run=0)
    two = pipe.velocity(latent, cond, step, 5.0)
    calls = []
    handle = dit.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["step"].branch), with_kwargs=True
    )
    pipe.cfg_batch = True
    one = pipe.velocity(latent, cond, step, 5.0)
    handle.remove()
    assert calls == ["both"]  # one call, batch of two
    err = rel(one, two)
    print(f"CFG batch velocity vs two passes: rel err {err:.1e}")
    assert one.shape == latent.shape and err < TOL
    # CLIP features as the frames' batch [2, 257, D] regroup to the same sample
    assert rel(pipe.velocity(latent, Conditioning(ctx, neg, clip.view(2, 257, -1), y), step, 5.0), two) < TOL
    assert torch.equal(pipe.velocity(latent, cond, step, 1.0), dit(latent[None], t, ctx[None], clip, y)[0])
    with pytest.raises(InputError, match="negative prompt context has 513 tokens, at most 512"):
        pipe.velocity(latent, Conditioning(ctx, torch.zeros(513, CFG.text_dim), clip, y), step, 5.0)


def test_cfg_batch_whole_generation(official_ckpt, frames_dir):
    pipe = segue.load(official_ckpt)
    frames = {"first": frames_dir / "first.png", "last": frames_dir / "last.png"}
    kw = dict(**frames, prompt="a red fox", frames=5, steps=3, seed=4)
    ref = pipe.generate(**kw)
    pipe.cfg_batch = True
    out = pipe.generate(**kw)
    err = rel(out.latent, ref.latent)
    print(f"CFG batch generate vs two passes: latent rel err {err:.1e}")
    assert err < TOL
