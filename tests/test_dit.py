"""Wan DiT: parity with diffusers' WanTransformer3DModel, real sizes, key/config mapping, dtype policy."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from segue.adapters.dit import (
    config_from_diffusers,
    config_from_official,
    config_to_diffusers,
    config_to_official,
    diffusers_to_native,
    native_to_diffusers,
)
from segue.config import REGISTRY, DiTConfig
from segue.models.dit import WanDiT, apply_dtype_policy, dit_param_dtype, rope_split

TINY_FLF2V = REGISTRY["tiny-flf2v"].dit
TINY_I2V = REGISTRY["tiny-i2v"].dit
# Head dim 24 (pairs split 4/4/4), patch (2, 2, 2) in time, no image branch, no cross-attn norm.
TINY_T2V = DiTConfig(
    dim=48, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, in_dim=16, out_dim=16,
    patch_size=(2, 2, 2), image_dim=None, image_pos_len=None, cross_attn_norm=False,
)  # fmt: skip

# The official tensor names of SPEC section 3 ({i} = block index, {w} = weight/bias).
_OFFICIAL = re.compile(
    r"^(patch_embedding|text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head"
    r"|img_emb\.proj\.[0134])\.(weight|bias)$"
    r"|^(img_emb\.emb_pos|head\.modulation)$"
    r"|^blocks\.\d+\.(modulation"
    r"|(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o|k_img|v_img)|norm3|ffn\.[02])\.(weight|bias)"
    r"|(self_attn\.(norm_q|norm_k)|cross_attn\.(norm_q|norm_k|norm_k_img))\.weight)$"
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_model(cfg: DiTConfig, seed: int = 0) -> WanDiT:
    """A DiT with every tensor random (no zeros, no ones): modulation, norms and emb_pos included."""
    torch.manual_seed(seed)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith(("img_emb.proj.0", "img_emb.proj.4")):
                p.copy_(1 + 0.3 * torch.randn_like(p))  # norm gains around 1
            else:
                p.normal_(0, 0.1 if p.ndim > 1 else 0.3)
    return model


def diffusers_twin(model: WanDiT) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_config(config_to_diffusers(model.cfg)).eval()
    ref.load_state_dict(native_to_diffusers(model.state_dict()), strict=True)
    return ref


def inputs(cfg: DiTConfig, b: int, t: list[int], text_tokens: int = 7, frames: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.out_dim, frames, 8, 8, generator=g)
    y = torch.randn(b, cfg.in_dim - cfg.out_dim, frames, 8, 8, generator=g) if cfg.image_dim else None
    context = torch.randn(b, text_tokens, cfg.text_dim, generator=g)
    clip = None
    if cfg.image_dim is not None:
        clip = torch.randn(b, cfg.image_pos_len or 257, cfg.image_dim, generator=g)
    return x, torch.tensor(t, dtype=torch.int64), context, clip, y


def run_diffusers(ref, cfg: DiTConfig, x, t, context, clip, y) -> torch.Tensor:
    hidden = x if y is None else torch.cat([x, y], dim=1)
    # diffusers does not pad the text; it expects the padded 512 tokens.
    context = torch.nn.functional.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
    if clip is not None and cfg.image_pos_len is not None:
        clip = clip.reshape(-1, 257, cfg.image_dim)  # diffusers takes first/last frames on the batch axis
    with torch.no_grad():
        return ref(hidden, t, context, clip, return_dict=False)[0]


@pytest.mark.parametrize(
    ("cfg", "b", "t", "frames"),
    [
        (TINY_FLF2V, 1, [999], 3),
        (TINY_FLF2V, 2, [999, 37], 3),
        (TINY_I2V, 1, [999], 3),
        (TINY_I2V, 2, [500, 1], 2),
        (TINY_T2V, 2, [999, 250], 4),
        (replace(TINY_FLF2V, patch_size=(1, 4, 4)), 2, [999, 37], 3),  # the built-in model's patch
    ],
    ids=["flf2v-b1", "flf2v-b2", "i2v-b1", "i2v-b2", "t2v-patch2-b2", "flf2v-patch4-b2"],
)
def test_parity_with_diffusers(cfg: DiTConfig, b: int, t: list[int], frames: int) -> None:
    model = random_model(cfg)
    ref = diffusers_twin(model)
    args = inputs(cfg, b, t, frames=frames)
    with torch.no_grad():
        ours = model(*args)
    theirs = run_diffusers(ref, cfg, *args)
    assert ours.dtype == torch.float32
    assert ours.shape == (b, cfg.out_dim, frames, 8, 8)
    err = rel_err(ours, theirs)
    assert err < 1e-5, err
    if b == 2:  # samples are independent: each equals its own B=1 run
        x, tt, ctx, clip, y = args
        with torch.no_grad():
            tail = [None if u is None else u[1:] for u in (clip, y)]
            one = model(x[1:], tt[1:], ctx[1:], *tail)
        assert rel_err(ours[1:], one) < 1e-5


def test_rope_reaches_every_axis() -> None:
    """Changing the position along t, h or w alone changes the output (each axis gets rotations)."""
    assert rope_split(128) == (22, 21, 21)
    assert rope_split(16) == (4, 2, 2)
    model = random_model(TINY_I2V)
    x, t, ctx, clip, y = inputs(TINY_I2V, 1, [999])
    with torch.no_grad():
        base = model(x, t, ctx, clip, y)
        for dim in (2, 3, 4):  # a flip permutes tokens along one axis; without RoPE it would commute
            flipped = model(x.flip(dim), t, ctx, clip, y.flip(dim)).flip(dim)
            assert rel_err(flipped, base) > 1e-3


def test_context_is_zero_padded() -> None:
    model = random_model(TINY_FLF2V)
    x, t, ctx, clip, y = inputs(TINY_FLF2V, 2, [999, 3], text_tokens=5)
    padded = torch.nn.functional.pad(ctx, (0, 0, 0, TINY_FLF2V.text_len - 5))
    with torch.no_grad():
        short = model(x, t, ctx, clip, y)
        full = model(x, t, padded, clip, y)
        other = model(x, t, ctx[:, :4], clip, y)
    torch.testing.assert_close(short, full, rtol=1e-6, atol=1e-6)
    assert rel_err(other, short) > 1e-4  # the padding is attended to, so the length matters
    with pytest.raises(ValueError, match="at most 512"):
        model(x, t, torch.zeros(2, 513, TINY_FLF2V.text_dim), clip, y)


def test_input_errors() -> None:
    model = random_model(TINY_FLF2V)
    x, t, ctx, clip, y = inputs(TINY_FLF2V, 1, [999])
    with pytest.raises(ValueError, match="36"):
        model(x, t, ctx, clip, None)
    with pytest.raises(ValueError, match="clip"):
        model(x, t, ctx, None, y)


@pytest.mark.parametrize("name", ["flf2v-14b", "i2v-14b-720p"])
def test_real_size_on_meta(name: str) -> None:
    cfg = REGISTRY[name].dit
    with torch.device("meta"):
        model = WanDiT(cfg)
    sd = model.state_dict()
    flf2v = cfg.image_pos_len is not None
    assert len(sd) == (1304 if flf2v else 1303)
    n_params = sum(v.numel() for v in sd.values())
    assert n_params == (16_395_536_704 if flf2v else 16_395_536_704 - 514 * 1280)
    unofficial = [k for k in sd if not _OFFICIAL.match(k)]
    assert not unofficial
    for key, shape in [
        ("patch_embedding.weight", (5120, 36, 1, 2, 2)),
        ("text_embedding.0.weight", (5120, 4096)),
        ("time_embedding.0.weight", (5120, 256)),
        ("time_projection.1.weight", (30720, 5120)),
        ("img_emb.proj.1.weight", (1280, 1280)),
        ("img_emb.proj.3.weight", (5120, 1280)),
        ("img_emb.proj.4.bias", (5120,)),
        ("blocks.39.modulation", (1, 6, 5120)),
        ("blocks.0.self_attn.norm_q.weight", (5120,)),
        ("blocks.0.norm3.weight", (5120,)),
        ("blocks.7.cross_attn.k_img.weight", (5120, 5120)),
        ("blocks.7.cross_attn.norm_k_img.weight", (5120,)),
        ("blocks.3.ffn.0.weight", (13824, 5120)),
        ("blocks.3.ffn.2.weight", (5120, 13824)),
        ("head.head.weight", (64, 5120)),
        ("head.modulation", (1, 2, 5120)),
    ]:
        assert tuple(sd[key].shape) == shape, key
    assert ("img_emb.emb_pos" in sd) == flf2v
    if flf2v:
        assert tuple(sd["img_emb.emb_pos"].shape) == (1, 514, 1280)


@pytest.mark.parametrize("cfg", [TINY_FLF2V, TINY_I2V, TINY_T2V], ids=["flf2v", "i2v", "t2v"])
def test_key_mapping_round_trip(cfg: DiTConfig) -> None:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanDiT(cfg)
        ref = WanTransformer3DModel.from_config(config_to_diffusers(cfg))
    native = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert native_to_diffusers(native) == theirs  # every key mapped, shapes equal
    assert diffusers_to_native(theirs) == native
    with pytest.raises(ValueError, match="blocks.0.self_attn.foo.weight"):
        native_to_diffusers({"blocks.0.self_attn.foo.weight": 0})
    with pytest.raises(ValueError, match="mystery"):
        diffusers_to_native({"mystery.weight": 0})


@pytest.mark.parametrize("name", ["tiny-flf2v", "tiny-i2v", "flf2v-14b", "i2v-14b-720p"])
def test_config_round_trips(name: str) -> None:
    cfg = REGISTRY[name].dit
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}
    official = config_to_official(cfg)
    assert official["_class_name"] == "WanModel" and "_diffusers_version" in official
    assert official["model_type"] == cfg.model_type
    assert "text_dim" not in official and "image_dim" not in official
    assert config_from_official(official, shapes) == cfg
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg


def test_real_config_files() -> None:
    official = {
        "_class_name": "WanModel", "_diffusers_version": "0.33.0.dev0", "dim": 5120, "eps": 1e-06,
        "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36, "model_type": "flf2v", "num_heads": 40,
        "num_layers": 40, "out_dim": 16, "text_len": 512,
    }  # fmt: skip
    shapes = {
        "text_embedding.0.weight": (5120, 4096),
        "img_emb.proj.1.weight": (1280, 1280),
        "img_emb.emb_pos": (1, 514, 1280),
    }
    assert config_from_official(official, shapes) == REGISTRY["flf2v-14b"].dit
    i2v_shapes = {k: v for k, v in shapes.items() if k != "img_emb.emb_pos"}
    assert config_from_official({**official, "model_type": "i2v"}, i2v_shapes) == REGISTRY["i2v-14b-720p"].dit
    theirs = {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0",
        "added_kv_proj_dim": 5120,
        "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
        "image_dim": 1280, "in_channels": 36, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
        "patch_size": [1, 2, 2], "pos_embed_seq_len": 514, "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024, "text_dim": 4096,
    }  # fmt: skip
    assert config_from_diffusers(theirs) == REGISTRY["flf2v-14b"].dit


def test_config_errors_name_the_key() -> None:
    official = config_to_official(TINY_FLF2V)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(TINY_FLF2V).state_dict().items()}
    with pytest.raises(ValueError, match="model_type"):
        config_from_official({**official, "model_type": "v2v"}, shapes)
    with pytest.raises(ValueError, match="'num_layers'"):
        config_from_official({k: v for k, v in official.items() if k != "num_layers"}, shapes)
    with pytest.raises(ValueError, match="img_emb.emb_pos"):
        config_from_official(official, {k: v for k, v in shapes.items() if k != "img_emb.emb_pos"})
    with pytest.raises(ValueError, match="text_embedding.0.weight"):
        config_from_official(official, {})
    with pytest.raises(ValueError, match="window_size"):
        config_from_official({**official, "window_size": [4, 4]}, shapes)
    theirs = config_to_diffusers(TINY_FLF2V)
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        config_from_diffusers({**theirs, "added_kv_proj_dim": 7})
    with pytest.raises(ValueError, match="qk_norm"):
        config_from_diffusers({**theirs, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="text_len"):
        config_to_diffusers(replace(TINY_FLF2V, text_len=256))


def test_dtype_policy() -> None:
    cfg = TINY_FLF2V
    model = random_model(cfg)
    args = inputs(cfg, 2, [999, 400])
    with torch.no_grad():
        ref = model(*args)
        apply_dtype_policy(model, torch.bfloat16)
        low = model(*args)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    fp32 = [
        "time_embedding.0.weight", "time_embedding.2.bias", "time_projection.1.weight",
        "blocks.0.modulation", "blocks.1.self_attn.norm_q.weight", "blocks.1.self_attn.norm_k.weight",
        "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.0.cross_attn.norm_q.weight",
        "blocks.0.cross_attn.norm_k.weight", "blocks.0.cross_attn.norm_k_img.weight",
        "img_emb.proj.0.weight", "img_emb.proj.4.bias", "img_emb.emb_pos",
        "head.head.weight", "head.head.bias", "head.modulation",
    ]  # fmt: skip
    bf16 = [
        "patch_embedding.weight", "patch_embedding.bias", "text_embedding.0.weight", "text_embedding.2.bias",
        "img_emb.proj.1.weight", "img_emb.proj.3.bias", "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.o.bias", "blocks.1.cross_attn.k_img.weight", "blocks.1.cross_attn.v_img.weight",
        "blocks.1.cross_attn.v.weight", "blocks.1.ffn.0.weight", "blocks.1.ffn.2.bias",
    ]  # fmt: skip
    for k in fp32:
        assert dtypes[k] == torch.float32 == dit_param_dtype(k, torch.bfloat16), k
    for k in bf16:
        assert dtypes[k] == torch.bfloat16 == dit_param_dtype(k, torch.bfloat16), k
    assert set(dtypes.values()) == {torch.float32, torch.bfloat16}
    assert all(dit_param_dtype(k, torch.float32) == torch.float32 for k in dtypes)
    assert low.dtype == torch.float32
    err = rel_err(low, ref)
    assert 0 < err < 2e-2, err
