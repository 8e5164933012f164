"""Text and image encoders: key adapters, loading on meta, pre/post-processing, sizes, errors."""

from __future__ import annotations

import math
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
from segue.config import REGISTRY, ImageEncoderConfig, TextEncoderConfig
from segue.errors import CheckpointError
from segue.models.encoders import (
    ImageEncoder,
    TextEncoder,
    clean_prompt,
    load_image_encoder,
    load_text_encoder,
)
from segue.tokenizer import load_tokenizer, save_tiny_tokenizer
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
        ours = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
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
            assert torch.equal(enc.model(input_ids=ids).last_hidden_state, want)


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
        ids = tokenizer(clean_prompt(prompt), truncation=True, max_length=TEXT_CFG.text_len).input_ids
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
    batch = tokenizer(["a cat", "the river and the city"], padding="max_length", max_length=12)
    assert batch["input_ids"][0][:3] == [*tokenizer("a cat").input_ids]
    assert batch["input_ids"][0][2:] == [1] + [0] * 9
    assert sum(batch["attention_mask"][1]) == len(tokenizer("the river and the city").input_ids)
    # Deterministic: a second folder tokenizes the same.
    save_tiny_tokenizer(tmp_path, TEXT_CFG.vocab_size)
    again = load_tokenizer(tmp_path)
    assert again("a zebra at dawn").input_ids == tokenizer("a zebra at dawn").input_ids


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
    assert not enc.model.embeddings.position_ids.is_meta
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
