"""LoRA loading: the three published key layouts against diffusers as the oracle, full deltas, unloading.

The oracle converts each file with diffusers' own Wan LoRA converters (WanLoraLoaderMixin.lora_state_dict:
official/lightx2v names and kohya/musubi names -> diffusers names, alpha folded into the factors), loads
it into a tiny WanTransformer3DModel with ``load_lora_adapter`` and fuses it (PEFT). Without PEFT installed
the converted factors are merged by hand instead (the key mapping and alpha handling are still diffusers').
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from segue.accel.cache import StepCache
from segue.accel.fp8 import quantize_fp8
from segue.adapters.dit import config_to_diffusers, diffusers_to_native, native_to_diffusers
from segue.config import REGISTRY
from segue.errors import InputError
from segue.lora import FEW_STEP, load_lora, loaded_loras, unload_lora
from segue.models.dit import WanDiT
from segue.sampling.solvers import SOLVERS
from segue.testing import randomize_

TINY = REGISTRY["tiny-flf2v"].dit
LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
          "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")  # fmt: skip
try:  # diffusers fuses LoRAs through PEFT; without it the oracle merges diffusers' converted factors itself
    import peft  # noqa: F401

    HAS_PEFT = True
except ImportError:
    HAS_PEFT = False


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tiny_dit(seed: int = 0) -> WanDiT:
    return randomize_(WanDiT(TINY), seed).eval()


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, TINY.out_dim, 3, 8, 8, generator=g)
    y = torch.randn(1, TINY.in_dim - TINY.out_dim, 3, 8, 8, generator=g)
    context = torch.randn(1, 7, TINY.text_dim, generator=g)
    clip = torch.randn(1, TINY.image_pos_len, TINY.image_dim, generator=g)
    return x, torch.tensor([600]), context, clip, y


def make_lora(model: WanDiT, style: str, rank: int = 4, alpha: float | None = 3.0, bias: bool = True, seed: int = 5):
    """A random LoRA on every block Linear. style: official (lora_down/up), official_ab (lora_A/B),
    kohya (lora_unet_ underscores), diffusers (transformer. + diffusers names)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(TINY.num_layers):
        for layer in LAYERS:
            w = model.get_submodule(f"blocks.{i}.{layer}").weight
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
            db = torch.randn(w.shape[0], generator=g) * 0.1
            name = f"blocks.{i}.{layer}"
            if style == "official":
                base, d, u = f"diffusion_model.{name}", "lora_down.weight", "lora_up.weight"
            elif style == "official_ab":
                base, d, u = f"diffusion_model.{name}", "lora_A.weight", "lora_B.weight"
            elif style == "kohya":
                base, d, u = "lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
            else:
                diff_name = next(iter(native_to_diffusers({f"{name}.weight": None}))).removesuffix(".weight")
                base, d, u = f"transformer.{diff_name}", "lora_A.weight", "lora_B.weight"
            sd[f"{base}.{d}"], sd[f"{base}.{u}"] = down, up
            if alpha is not None:
                sd[f"{base}.alpha"] = torch.tensor(alpha)
            if bias:
                sd[f"{base}.{'lora_B.bias' if style == 'diffusers' else 'diff_b'}"] = db
    return sd


def diffusers_merged(model: WanDiT, lora: dict[str, torch.Tensor], scale: float) -> torch.nn.Module:
    """diffusers' twin of ``model`` with the LoRA converted by diffusers and fused."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    ref = WanTransformer3DModel.from_config(config_to_diffusers(model.cfg)).eval()
    ref.load_state_dict(native_to_diffusers(model.state_dict()), strict=True)
    # the converters scale the factors in place: hand them copies
    converted = WanLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in lora.items()})
    if HAS_PEFT:
        ref.load_lora_adapter(converted, prefix="transformer", adapter_name="x")
        ref.fuse_lora(lora_scale=scale)
        ref.unload_lora()
        return ref
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for key, a in converted.items():
            if not key.endswith(".lora_A.weight"):
                continue
            mod = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = converted[key.replace("lora_A", "lora_B")]
            params[f"{mod}.weight"] += scale * (b @ a)
            if f"transformer.{mod}.lora_B.bias" in converted:
                params[f"{mod}.bias"] += scale * converted[f"transformer.{mod}.lora_B.bias"]
    return ref


def run_diffusers(ref: torch.nn.Module, x, t, context, clip, y) -> torch.Tensor:
    context = torch.nn.functional.pad(context, (0, 0, 0, TINY.text_len - context.shape[1]))
    with torch.no_grad():
        return ref(torch.cat([x, y], 1), t, context, clip.reshape(-1, 257, TINY.image_dim), return_dict=False)[0]


@pytest.mark.parametrize(
    ("style", "alpha", "scale"),
    [("official", 3.0, 0.7), ("official_ab", None, 1.0), ("kohya", 2.0, 1.0), ("diffusers", None, 0.5)],
)
def test_parity_with_diffusers(style: str, alpha: float | None, scale: float, tmp_path) -> None:
    model = tiny_dit()
    lora = make_lora(model, style, alpha=alpha, bias=style != "kohya")  # musubi files carry no diff_b
    ref = diffusers_merged(model, lora, scale)
    path = tmp_path / "lora.safetensors"
    save_file(lora, path)
    info = load_lora(model, path, scale=scale)
    assert info.rank == 4 and len(info.params) == len(LAYERS) * TINY.num_layers * (1 if style == "kohya" else 2)
    theirs = diffusers_to_native(ref.state_dict())
    ours = model.state_dict()
    assert set(theirs) == set(ours)
    worst = max(rel_err(ours[k], theirs[k]) for k in ours)
    changed = rel_err(
        ours["blocks.1.cross_attn.k_img.weight"], tiny_dit().state_dict()["blocks.1.cross_attn.k_img.weight"]
    )
    args = dit_inputs()
    with torch.no_grad():
        out_err = rel_err(model(*args), run_diffusers(ref, *args))
    print(
        f"\nLoRA {style}: merged weights max rel err {worst:.1e}, DiT output rel err {out_err:.1e} (peft: {HAS_PEFT})"
    )
    assert worst < 1e-6 and changed > 0.1
    assert out_err < 1e-5


def test_full_deltas_modulation_norms_and_conv() -> None:
    """lightx2v-style .diff / .diff_b / .diff_m and a LoRA on the (Conv3d) patch embedding, by hand."""
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    pe = model.patch_embedding.weight  # [C, 36, 1, 2, 2]
    lora = {
        "diffusion_model.blocks.0.cross_attn.norm_k_img.diff": torch.randn(TINY.dim, generator=g),
        "diffusion_model.blocks.1.norm3.diff": torch.randn(TINY.dim, generator=g),
        "diffusion_model.blocks.1.norm3.diff_b": torch.randn(TINY.dim, generator=g),
        "diffusion_model.blocks.0.diff_m": torch.randn(1, 6, TINY.dim, generator=g),
        "diffusion_model.head.head.diff": torch.randn(model.head.head.weight.shape, generator=g),
        "diffusion_model.head.head.diff_b": torch.randn(model.head.head.bias.shape, generator=g),
        "diffusion_model.time_projection.1.lora_down.weight": torch.randn(2, TINY.dim, generator=g),
        "diffusion_model.time_projection.1.lora_up.weight": torch.randn(6 * TINY.dim, 2, generator=g),
        "diffusion_model.patch_embedding.lora_down.weight": torch.randn(3, *pe.shape[1:], generator=g),
        "diffusion_model.patch_embedding.lora_up.weight": torch.randn(pe.shape[0], 3, 1, 1, 1, generator=g),
        "diffusion_model.patch_embedding.alpha": torch.tensor(1.5),
    }
    info = load_lora(model, lora, scale=0.5)
    after = model.state_dict()
    for name, key in (("blocks.0.cross_attn.norm_k_img.weight", "blocks.0.cross_attn.norm_k_img.diff"),
                      ("blocks.1.norm3.weight", "blocks.1.norm3.diff"),
                      ("blocks.1.norm3.bias", "blocks.1.norm3.diff_b"), ("blocks.0.modulation", "blocks.0.diff_m"),
                      ("head.head.weight", "head.head.diff"), ("head.head.bias", "head.head.diff_b")):  # fmt: skip
        assert torch.equal(after[name], before[name] + 0.5 * lora[f"diffusion_model.{key}"]), name
    tp = (
        lora["diffusion_model.time_projection.1.lora_up.weight"]
        @ lora["diffusion_model.time_projection.1.lora_down.weight"]
    )
    assert torch.allclose(after["time_projection.1.weight"], before["time_projection.1.weight"] + 0.5 * tp, atol=1e-6)
    up = lora["diffusion_model.patch_embedding.lora_up.weight"].flatten(1)
    down = lora["diffusion_model.patch_embedding.lora_down.weight"].flatten(1)
    want = before["patch_embedding.weight"] + 0.5 * (1.5 / 3) * (up @ down).view(pe.shape)
    assert torch.allclose(after["patch_embedding.weight"], want, atol=1e-6)
    assert len(info.params) == 8
    unload_lora(model, info)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_unload_is_exact_and_loras_stack_in_bf16() -> None:
    model = tiny_dit().to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    a = load_lora(model, make_lora(model, "official", seed=1))
    b = load_lora(model, make_lora(model, "kohya", seed=2), scale=0.8)
    assert loaded_loras(model) == [a, b]
    unload_lora(model, a)  # not the last one loaded: b is taken out, a removed, b merged again
    only_b = tiny_dit().to(torch.bfloat16)
    load_lora(only_b, make_lora(model, "kohya", seed=2), scale=0.8)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in only_b.state_dict().items())
    unload_lora(model, b)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert loaded_loras(model) == []
    with pytest.raises(InputError, match="not loaded"):
        unload_lora(model, b)
    # exact=False keeps no copies: the delta is subtracted again, off by bf16 rounding only
    c = load_lora(model, make_lora(model, "official", seed=3), exact=False)
    assert c._originals == {}
    unload_lora(model, c)
    worst = max(rel_err(model.state_dict()[k], v) for k, v in original.items())
    assert 0 < worst < 2e-2


def test_unmatched_and_misshapen_keys_are_named() -> None:
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = make_lora(model, "official", bias=False)
    lora["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, TINY.dim)  # no block 7
    lora["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(1, TINY.dim)  # DoRA: unsupported
    lora["diffusion_model.blocks.1.ffn.0.lora_down.weight"] = torch.zeros(4, 2 * TINY.dim)  # wrong in-features
    del lora["diffusion_model.blocks.0.ffn.2.lora_up.weight"]  # a down without its up
    with pytest.raises(InputError) as e:
        load_lora(model, lora)
    msg = str(e.value)
    assert "4 key(s) do not fit" in msg
    for part in ("blocks.7.self_attn.q.lora_down.weight (no DiT parameter", "dora_scale (not a LoRA tensor",
                 "blocks.1.ffn.0.lora_down.weight", "does not fit blocks.1.ffn.0.weight",
                 "no up (lora_B/lora_up) matrix for blocks.0.ffn.2"):  # fmt: skip
        assert part in msg, part
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing merged
    with pytest.warns(UserWarning, match="skipped 4 key"):
        info = load_lora(model, lora, strict=False)
    assert len(info.skipped) == 4 and len(info.params) == len(LAYERS) * TINY.num_layers - 2
    with pytest.raises(InputError, match="none of its keys apply"), pytest.warns(UserWarning):
        load_lora(model, {"diffusion_model.blocks.9.ffn.0.diff_b": torch.zeros(3)}, strict=False)
    with pytest.raises(InputError, match="does not exist"):
        load_lora(model, "/nonexistent/lora.safetensors")


def test_lora_under_a_step_cache_and_refused_on_fp8() -> None:
    model = tiny_dit()
    StepCache("teacache").install(model)  # the cache is the DiT's blocks runner: the DiT stays the DiT
    info = load_lora(model, make_lora(model, "official"))
    assert loaded_loras(model) == [info]
    unload_lora(model, info)
    quantize_fp8(model)
    with pytest.raises(InputError, match="load LoRAs before quantize_fp8"):
        load_lora(model, make_lora(tiny_dit(), "official"))


def test_few_step_settings_name_a_real_solver() -> None:
    assert FEW_STEP["solver"] in SOLVERS and FEW_STEP["steps"] == 4 and FEW_STEP["guidance"] == 1.0
