"""Text and image encoders: segue's umT5 and CLIP modules against transformers' (the oracle, bit for bit at
fp32 on random weights), key adapters, loading on meta, tokenizers, pre/post-processing, sizes, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    UMT5Config,
    UMT5EncoderModel,
)

from segue.adapters.encoders import (
    clip_config_from_hf,
    clip_config_from_shapes,
    clip_config_to_hf,
    clip_hf_to_official,
    clip_official_to_hf,
    t5_config_from_hf,
    t5_config_from_shapes,
    t5_config_to_hf,
    t5_hf_to_official,
    t5_official_to_hf,
)
from segue.config import CLIP_ACTIVATIONS, REGISTRY, ImageEncoderConfig, TextEncoderConfig
from segue.errors import CheckpointError
from segue.models.clip_vision import ACTIVATIONS, CLIPVisionTower
from segue.models.encoders import (
    ImageEncoder,
    TextEncoder,
    clean_prompt,
    load_image_encoder,
    load_text_encoder,
)
from segue.models.umt5 import UMT5Encoder, relative_position_bucket
from segue.tokenizer import FileTokenizer, TransformersTokenizer, load_tokenizer, save_tiny_tokenizer
from segue.weights import count_parameters

TEXT_CFG = REGISTRY["tiny-flf2v"].text
IMAGE_CFG = REGISTRY["tiny-flf2v"].image
assert IMAGE_CFG is not None

# The reference's names for umT5 encoder block 0 (wan/modules/t5.py, T5SelfAttention, shared_pos=False).
T5_BLOCK0_KEYS = sorted(
    [
        "blocks.0.norm1.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.attn.k.weight",
        "blocks.0.attn.v.weight",
        "blocks.0.attn.o.weight",
        "blocks.0.norm2.weight",
        "blocks.0.ffn.gate.0.weight",
        "blocks.0.ffn.fc1.weight",
        "blocks.0.ffn.fc2.weight",
        "blocks.0.pos_embedding.embedding.weight",
    ]
)
CLIP_LAYER0_KEYS = sorted(
    f"visual.transformer.0.{m}.{p}"
    for m in ("norm1", "attn.to_qkv", "attn.proj", "norm2", "mlp.0", "mlp.2")
    for p in ("weight", "bias")
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturb_norms(model: torch.nn.Module) -> None:
    """Move norm weights/biases off their 1/0 init so that a swapped norm shows up."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))


def _tiny_clip_hf() -> dict:
    hf = clip_config_to_hf(IMAGE_CFG)
    hf.pop("architectures"), hf.pop("model_type")
    return hf


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(folder, TEXT_CFG.vocab_size)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def t5_model() -> UMT5EncoderModel:
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(**t5_config_to_hf(TEXT_CFG))).eval()
    perturb_norms(model)
    with torch.no_grad():  # a larger bias table so the relative positions matter
        for blk in model.encoder.block:
            blk.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def clip_model() -> CLIPVisionModel:
    torch.manual_seed(1)
    model = CLIPVisionModel(CLIPVisionConfig(**_tiny_clip_hf())).eval()
    perturb_norms(model)
    return model


# ---------------------------------------------------------------------------------------------
# Independent re-statements of the reference computations on OFFICIAL keys (wan/modules/t5.py and
# clip.py): they pin the meaning of each official tensor, which a round trip alone would not.


def ref_t5_forward(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig, ids: torch.Tensor) -> torch.Tensor:
    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon)

    b, n = ids.shape
    x = sd["token_embedding.weight"][ids]  # [B, L, C]
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query, [L, L]
    half = cfg.relative_attention_num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_ratio = torch.log(dist.float() / exact) / math.log(cfg.relative_attention_max_distance / exact)
    far = exact + (log_ratio * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(dist < exact, dist, far.clamp(max=half - 1))
    h, d = cfg.num_heads, cfg.d_kv
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        y = rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(y, sd[p + f"attn.{s}.weight"]).view(b, n, h, d) for s in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)  # [H, L, L]
        att = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d) in T5
        y = torch.einsum("bnij,bjnc->binc", att.softmax(-1), v).reshape(b, n, h * d)
        x = x + F.linear(y, sd[p + "attn.o.weight"])
        y = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(y, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(y, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


def ref_clip_visual_31(sd: dict[str, torch.Tensor], cfg: ImageEncoderConfig, pixels: torch.Tensor) -> torch.Tensor:
    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], cfg.layer_norm_eps)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    b = pixels.shape[0]
    x = F.conv2d(pixels, sd["visual.patch_embedding.weight"], stride=cfg.patch_size)  # [B, C, h, w]
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    x = ln(x, "visual.pre_norm")
    s, n, d = x.shape[1], cfg.num_heads, cfg.hidden_size // cfg.num_heads
    for i in range(cfg.num_layers - 1):  # use_31_block: all blocks but the last
        p = f"visual.transformer.{i}."
        q, k, v = lin(ln(x, p + "norm1"), p + "attn.to_qkv").view(b, s, 3, n, d).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + lin(y.transpose(1, 2).reshape(b, s, n * d), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.0")), p + "mlp.2")
    return x


# ---------------------------------------------------------------------------------------------
# 0. segue's modules against transformers' (bit for bit at fp32, random weights)


def _random_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def test_modules_keep_the_transformers_state_dict_layout(t5_model: UMT5EncoderModel, clip_model) -> None:
    # the same names in the same order: bundles, diffusers folders and training EMAs load as they are
    assert list(UMT5Encoder(TEXT_CFG).state_dict()) == list(t5_model.state_dict())
    assert list(CLIPVisionTower(IMAGE_CFG).state_dict()) == list(clip_model.state_dict())
    ours = UMT5Encoder(TEXT_CFG)
    assert ours.shared is ours.encoder.embed_tokens  # one tied table, stored under both names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_umt5_matches_transformers_bitwise(t5_model: UMT5EncoderModel, dtype: torch.dtype) -> None:
    ours = UMT5Encoder(TEXT_CFG).eval()
    ours.load_state_dict(t5_model.state_dict())
    theirs = UMT5EncoderModel(UMT5Config(**t5_config_to_hf(TEXT_CFG))).eval()
    theirs.load_state_dict(t5_model.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    torch.manual_seed(5)
    ids = torch.randint(3, TEXT_CFG.vocab_size, (3, 150))  # past the exact buckets, into the log-spaced ones
    padded = torch.ones_like(ids)
    padded[1, 90:] = 0
    padded[2, 7:] = 0
    with torch.no_grad():
        for mask in (None, torch.ones_like(ids), padded):
            want = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
            got = ours(ids, mask)
            assert got.dtype == want.dtype == dtype and torch.equal(got, want), (dtype, mask is None)
    # padding changes nothing in the real tokens' features (up to rounding: other batch shapes)
    with torch.no_grad():
        alone = ours.float()(ids[2:, :7])
        assert rel_err(ours(ids, padded)[2, :7], alone[0]) < 1e-5


def test_umt5_training_step_matches_transformers(t5_model: UMT5EncoderModel) -> None:
    """Jointly trained, the encoder runs in train mode: the same dropout draws, outputs and gradients."""
    from segue.train.flow import set_dropout

    ours = UMT5Encoder(TEXT_CFG)
    ours.load_state_dict(t5_model.state_dict())
    theirs = UMT5EncoderModel(UMT5Config(**t5_config_to_hf(TEXT_CFG)))
    theirs.load_state_dict(t5_model.state_dict())
    assert set_dropout(ours, 0.2) == set_dropout(theirs, 0.2) > 0
    ours.train(), theirs.train()
    ids = torch.randint(3, TEXT_CFG.vocab_size, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    torch.manual_seed(7)
    want = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(7)
    got = ours(ids, mask)
    assert torch.equal(got, want)
    (got * torch.arange(got.shape[-1])).sum().backward()
    (want * torch.arange(want.shape[-1])).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_relative_position_buckets_match_transformers(t5_model: UMT5EncoderModel) -> None:
    rel = torch.arange(-300, 301)[None, :]
    attn = t5_model.encoder.block[0].layer[0].SelfAttention
    want = attn._relative_position_bucket(rel)
    got = relative_position_bucket(
        rel, TEXT_CFG.relative_attention_num_buckets, TEXT_CFG.relative_attention_max_distance
    )
    assert torch.equal(got, want)
    # keys before the query in 0..15, after it in 16..31; exact up to 7 away, one bucket from 128 on
    assert relative_position_bucket(torch.tensor([0, -1, 1, -7, 7, -128, 128, -999, 999]), 32, 128).tolist() == [
        0, 1, 17, 7, 23, 15, 31, 15, 31,
    ]  # fmt: skip


@pytest.mark.parametrize("act", CLIP_ACTIVATIONS)
def test_clip_tower_matches_transformers_bitwise(act: str) -> None:
    cfg = ImageEncoderConfig(**{**vars(IMAGE_CFG), "hidden_act": act})
    hf = clip_config_to_hf(cfg)
    hf.pop("architectures"), hf.pop("model_type")
    theirs = _random_(CLIPVisionModel(CLIPVisionConfig(**hf)), seed=11)
    ours = CLIPVisionTower(cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        out = theirs(pixel_values=pixels, output_hidden_states=True)
        assert torch.equal(ours(pixels, layers=cfg.num_layers - 1), out.hidden_states[-2])  # what Wan uses
        assert torch.equal(ours(pixels), out.last_hidden_state)
        assert torch.equal(ours(pixels, layers=0), out.hidden_states[0])
    with pytest.raises(ValueError, match="224x224"):
        ours(pixels[..., :200])
    assert set(ACTIVATIONS) == set(CLIP_ACTIVATIONS)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not one of"):
        ImageEncoderConfig(hidden_act="relu")


def test_encode_outputs_are_transformers_outputs(t5_model: UMT5EncoderModel, clip_model, tokenizer) -> None:
    """Exactly what the pipeline consumes: trimmed per-prompt features and the penultimate CLIP block."""
    text = load_text_encoder(TEXT_CFG, t5_model.state_dict(), tokenizer, "cpu", torch.float32)
    prompts = ["a cat walks across the road", "the boat", "a dog " * 30]
    outs = text.encode(prompts)
    ids, mask = tokenizer.batch([clean_prompt(p) for p in prompts], TEXT_CFG.text_len)
    longest = int(mask.sum(1).max())
    with torch.no_grad():
        ref = t5_model(input_ids=ids[:, :longest], attention_mask=mask[:, :longest]).last_hidden_state
    for out, row, n in zip(outs, ref, mask.sum(1).tolist()):
        assert torch.equal(out, row[:n])
    image = load_image_encoder(IMAGE_CFG, clip_model.state_dict(), "cpu", torch.float32)
    frames = [torch.rand(1, 3, 40, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1]
    with torch.no_grad():
        ref = clip_model(pixel_values=image.preprocess(frames), output_hidden_states=True).hidden_states[-2]
    assert torch.equal(image.encode(frames), ref)


def test_from_scratch_init_follows_the_transformers_scheme() -> None:
    """Random init (a model trained from scratch) has transformers' per-tensor scales; a meta build has none."""
    cfg = TextEncoderConfig(vocab_size=2000, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    theirs = dict(UMT5EncoderModel(UMT5Config(**t5_config_to_hf(cfg))).named_parameters())
    ours = dict(UMT5Encoder(cfg).named_parameters())
    icfg = ImageEncoderConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, image_size=32,
                              patch_size=8)  # fmt: skip
    hf = clip_config_to_hf(icfg)
    hf.pop("architectures"), hf.pop("model_type")
    theirs |= {f"clip.{k}": v for k, v in CLIPVisionModel(CLIPVisionConfig(**hf)).named_parameters()}
    ours |= {f"clip.{k}": v for k, v in CLIPVisionTower(icfg).named_parameters()}
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        q, n = theirs[name], p.numel()
        if n == 1 or q.std() == 0:  # constants: norm weights 1, biases 0
            assert torch.equal(p, q), name
            continue
        # same distribution: means and standard deviations agree within 5 standard errors
        assert abs(p.mean().item() - q.mean().item()) < 5 * q.std().item() * (2 / n) ** 0.5, name
        assert abs(p.std().item() / q.std().item() - 1) < 5 * (1 / n) ** 0.5, name
    with torch.device("meta"):
        assert all(p.is_meta for p in UMT5Encoder(TextEncoderConfig()).parameters())


def test_loading_the_built_in_model_imports_no_transformers_and_no_compiler(tmp_path: Path) -> None:
    code = (
        "import sys, segue; p = segue.load(); p.text_encoder.encode(['a cat'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m.startswith('torch._dynamo')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TMPDIR": str(tmp_path)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # no compiler cache folder either


# ---------------------------------------------------------------------------------------------
# 1. Text encoder


def test_t5_official_keys_round_trip_and_config(t5_model: UMT5EncoderModel) -> None:
    hf = t5_model.state_dict()
    official = t5_hf_to_official(hf)
    assert sorted(k for k in official if k.startswith("blocks.0.")) == T5_BLOCK0_KEYS
    assert {k for k in official if not k.startswith("blocks.")} == {"token_embedding.weight", "norm.weight"}
    assert len(official) == 2 + 10 * TEXT_CFG.num_layers
    back = t5_official_to_hf(official)
    assert set(back) == set(hf) - {"encoder.embed_tokens.weight"}
    assert all(torch.equal(back[k], hf[k]) for k in back)
    assert t5_config_from_shapes({k: tuple(v.shape) for k, v in official.items()}) == TEXT_CFG
    assert t5_config_from_hf(t5_config_to_hf(TEXT_CFG)) == TEXT_CFG
    real = t5_config_to_hf(TextEncoderConfig())
    assert (real["model_type"], real["feed_forward_proj"]) == ("umt5", "gated-gelu")
    assert real["is_gated_act"] and real["vocab_size"] == 256384


def test_t5_load_matches_transformers_and_reference(t5_model: UMT5EncoderModel, tokenizer) -> None:
    official = t5_hf_to_official(t5_model.state_dict())
    enc = load_text_encoder(TEXT_CFG, t5_official_to_hf(official), tokenizer, "cpu", torch.float32)
    assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight
    assert not any(t.is_meta for t in enc.state_dict().values())
    torch.manual_seed(2)
    ids = torch.randint(3, TEXT_CFG.vocab_size, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        ours = enc.model(ids, mask)
        theirs = t5_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = ref_t5_forward(official, TEXT_CFG, ids[:1])
    assert torch.equal(ours, theirs)
    # The reference's own math on the official keys (gate = GELU side, relative buckets, no scaling).
    assert rel_err(ours[:1], ref) < 1e-5


def test_t5_either_embedding_name_loads(t5_model: UMT5EncoderModel, tokenizer) -> None:
    ids = torch.tensor([[5, 9, 200, 17, 1]])
    with torch.no_grad():
        want = t5_model(input_ids=ids).last_hidden_state
    for drop in ("shared.weight", "encoder.embed_tokens.weight"):
        sd = {k: v for k, v in t5_model.state_dict().items() if k != drop}
        enc = load_text_encoder(TEXT_CFG, sd, tokenizer, "cpu", torch.float32)
        assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight
        with torch.no_grad():
            assert torch.equal(enc.model(ids), want)


def test_t5_encode_trims_and_matches_unpadded(t5_model: UMT5EncoderModel, tokenizer) -> None:
    enc = load_text_encoder(TEXT_CFG, t5_model.state_dict(), tokenizer, "cpu", torch.float32)
    prompts = [
        "A cat walks across the road, the sky turns orange.",
        "  the  boat &amp;amp; the\n river ",
        "",
        "a dog " * 400,  # longer than text_len: truncated, EOS kept
    ]
    outs = enc.encode(prompts)
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        ids = tokenizer.ids(clean_prompt(prompt), TEXT_CFG.text_len)
        assert ids[-1] == tokenizer.eos_token_id == 1
        assert out.dtype == torch.float32 and out.shape == (len(ids), TEXT_CFG.d_model)
        with torch.no_grad():
            alone = t5_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        assert rel_err(out, alone) < 1e-5
    assert outs[2].shape[0] == 1  # empty prompt: EOS only
    assert outs[3].shape[0] == TEXT_CFG.text_len
    # Cleaning happened before tokenizing: the messy prompt encodes like its clean form.
    assert rel_err(outs[1], enc.encode(["the boat & the river"])[0]) < 1e-6


def test_clean_prompt() -> None:
    assert clean_prompt("  a \n\t cat   sits  ") == "a cat sits"
    assert clean_prompt("salt &amp;amp; pepper &lt;3") == "salt & pepper <3"  # unescaped twice
    assert clean_prompt("caf\u00c3\u00a9 au lait") == "caf\u00e9 au lait"  # mojibake fixed by ftfy
    assert clean_prompt("") == ""


def test_tiny_tokenizer(tmp_path: Path, tokenizer) -> None:
    assert len(tokenizer) == TEXT_CFG.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids, mask = tokenizer.batch(["a cat", "the river and the city"], 12)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (2, 12)
    assert ids[0, :3].tolist() == tokenizer.ids("a cat")
    assert ids[0, 2:].tolist() == [1] + [0] * 9
    assert int(mask[1].sum()) == len(tokenizer.ids("the river and the city"))
    # Deterministic: a second folder tokenizes the same.
    save_tiny_tokenizer(tmp_path, TEXT_CFG.vocab_size)
    again = load_tokenizer(tmp_path)
    assert again.ids("a zebra at dawn") == tokenizer.ids("a zebra at dawn")


PROMPTS = [
    "a cat",
    "",
    "the river and the city at night, full of light",
    "  several   spaces\tand a tab  ",
    "Ｆｕｌｌｗｉｄｔｈ and caf\u00e9, na\u00efve, \u00c5ngstr\u00f6m, \u4e2d\u6587, emoji \U0001f600",
    "special-looking </s> <pad> <unk> text",
    "a dog " * 300,  # longer than any length below: truncated, EOS kept
]


def _bundle_tokenizer_files() -> dict[str, str]:
    from safetensors import safe_open

    from segue.loader import DEFAULT_MODEL

    with safe_open(str(DEFAULT_MODEL), framework="pt") as f:
        meta = f.metadata()
    return {k.removeprefix("tokenizer/"): v for k, v in meta.items() if k.startswith("tokenizer/")}


@pytest.mark.parametrize("source", ["tiny", "built-in"])
def test_plain_tokenizer_matches_transformers(tmp_path: Path, source: str) -> None:
    """The tokenizers-only path gives transformers' ids, masks and pieces for the folders segue writes."""
    from transformers import AutoTokenizer

    if source == "tiny":
        save_tiny_tokenizer(tmp_path, TEXT_CFG.vocab_size)
    else:
        for name, text in _bundle_tokenizer_files().items():
            (tmp_path / name).write_text(text)
    plain = load_tokenizer(tmp_path)
    assert isinstance(plain, FileTokenizer)
    hf = TransformersTokenizer(AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True))
    assert len(plain) == len(hf)
    assert (plain.pad_token_id, plain.eos_token_id, plain.unk_token_id) == (hf.pad_token_id, hf.eos_token_id,
                                                                            hf.unk_token_id) == (0, 1, 2)  # fmt: skip
    for length in (1, 5, 64, 512):
        ids, mask = plain.batch(PROMPTS, length)
        want_ids, want_mask = hf.batch(PROMPTS, length)
        assert ids.dtype == want_ids.dtype and torch.equal(ids, want_ids), length
        assert mask.dtype == want_mask.dtype and torch.equal(mask, want_mask), length
    for p in PROMPTS:
        assert plain.ids(p) == hf.ids(p) and plain.ids(p, 8) == hf.ids(p, 8)
        assert plain.pieces(plain.ids(p)) == hf.pieces(hf.ids(p))
    assert plain.ids("a cat")[-1] == 1 and plain.ids(PROMPTS[-1], 8)[-1] == 1


def test_bundle_tokenizer_loads_without_a_folder_or_transformers(tmp_path: Path) -> None:
    from segue.bundle import load_bundle_tokenizer

    files = _bundle_tokenizer_files()
    tok = load_bundle_tokenizer(files)
    assert isinstance(tok, FileTokenizer) and tok.ids("a cat")[-1] == 1
    broken = {**files, "tokenizer.json": json.dumps({**json.loads(files["tokenizer.json"]), "model": 3})}
    with pytest.raises(CheckpointError, match="tokenizer.json cannot be loaded"):
        load_bundle_tokenizer(broken, "crafted.safetensors")


def test_other_tokenizer_folders_take_the_transformers_path(tmp_path: Path) -> None:
    save_tiny_tokenizer(tmp_path, TEXT_CFG.vocab_size)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["padding_side"] = "left"  # a setting transformers applies: not a plain tokenizer.json any more
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TransformersTokenizer)
    ids, mask = tok.batch(["a cat"], 6)
    assert ids[0].tolist()[-3:] == tok.ids("a cat") and mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not JSON"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# 2. Image encoder


def test_clip_official_keys_round_trip_and_config(clip_model: CLIPVisionModel) -> None:
    hf = clip_model.state_dict()
    official = clip_hf_to_official(hf)
    assert "visual.head" in official and any(k.startswith("textual.") for k in official)
    assert sorted(k for k in official if k.startswith("visual.transformer.0.")) == CLIP_LAYER0_KEYS
    w = IMAGE_CFG.hidden_size
    assert official["visual.transformer.0.attn.to_qkv.weight"].shape == (3 * w, w)
    assert official["visual.cls_embedding"].shape == (1, 1, w)
    assert official["visual.pos_embedding"].shape == (1, 257, w)
    back = clip_official_to_hf(official)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in back)
    assert clip_config_from_shapes({k: tuple(v.shape) for k, v in official.items()}) == IMAGE_CFG
    assert clip_config_from_hf(clip_config_to_hf(IMAGE_CFG)) == IMAGE_CFG
    real = clip_config_from_shapes({k: tuple(v.shape) for k, v in clip_hf_to_official(hf).items()})
    assert real.num_heads == w // 80


def _reference_pixels(frame: torch.Tensor, cfg: ImageEncoderConfig) -> torch.Tensor:
    x = F.interpolate(frame, size=(cfg.image_size,) * 2, mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def test_clip_encode_matches_reference(clip_model: CLIPVisionModel) -> None:
    official = clip_hf_to_official(clip_model.state_dict())
    enc = load_image_encoder(IMAGE_CFG, clip_official_to_hf(official), "cpu", torch.float32)
    assert not any(t.is_meta for t in enc.state_dict().values())
    torch.manual_seed(3)
    frames = [torch.rand(1, 3, 40, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1]
    ours = enc.encode(frames)
    assert ours.shape == (2, 257, IMAGE_CFG.hidden_size) and ours.dtype == torch.float32
    pixels = torch.cat([_reference_pixels(f, IMAGE_CFG) for f in frames])
    with torch.no_grad():
        hs = clip_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        ref = ref_clip_visual_31(official, IMAGE_CFG, pixels)
    assert len(hs) == IMAGE_CFG.num_layers + 1
    assert rel_err(ours, hs[-2]) < 1e-5
    assert rel_err(ours, ref) < 1e-5
    # A single [N, 3, H, W] tensor works the same.
    assert rel_err(enc.encode(frames[1]), ours[1:]) < 1e-6


def test_clip_with_projection_checkpoint_loads(clip_model: CLIPVisionModel) -> None:
    torch.manual_seed(4)
    proj = CLIPVisionModelWithProjection(CLIPVisionConfig(**_tiny_clip_hf(), projection_dim=24)).eval()
    sd = proj.state_dict()
    assert "visual_projection.weight" in sd
    enc = load_image_encoder(IMAGE_CFG, sd, "cpu", torch.float32)
    frame = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        hs = proj.vision_model(pixel_values=_reference_pixels(frame, IMAGE_CFG), output_hidden_states=True)
    assert rel_err(enc.encode(frame), hs.hidden_states[-2]) < 1e-5


# ---------------------------------------------------------------------------------------------
# 3. Full sizes on meta


def test_full_size_parameter_counts() -> None:
    with torch.device("meta"):
        text = TextEncoder(TextEncoderConfig(), tokenizer=None)
        image = ImageEncoder(ImageEncoderConfig())
    n_text = count_parameters(text.model)  # the tied embedding counts once
    assert n_text == 5_680_910_336
    assert round(n_text / 1e7) / 100 == 5.68
    assert count_parameters(image.model) == 630_766_080


# ---------------------------------------------------------------------------------------------
# 4. Errors


def test_bad_state_dict_names_missing_and_unexpected(t5_model: UMT5EncoderModel, tokenizer) -> None:
    sd = dict(t5_model.state_dict())
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    sd["encoder.block.9.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_text_encoder(TEXT_CFG, sd, tokenizer, "cpu", torch.float32)
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in str(err.value)
    assert "encoder.block.9.extra.weight" in str(err.value)

    sd = dict(CLIPVisionModel(CLIPVisionConfig(**_tiny_clip_hf())).state_dict())
    sd["embeddings.class_embedding"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*embeddings\.class_embedding"):
        load_image_encoder(IMAGE_CFG, sd, "cpu", torch.float32)


def test_load_tokenizer_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
