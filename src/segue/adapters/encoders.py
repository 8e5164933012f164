"""Key and config mapping for the text (umT5) and image (CLIP ViT) encoders.

segue's encoder modules (``segue.models.umt5``, ``segue.models.clip_vision``) keep transformers' key names
(``UMT5EncoderModel``, ``CLIPVisionModel``): diffusers folders and segue bundles store those, so they are
the native names here. The official Wan2.1 ``.pth`` files use the reference's own module names; these
pure functions translate between the two layouts and read the sizes back from tensor shapes (the
official files carry no config). The ``*_to_hf`` configs are what a diffusers folder's ``config.json``
holds for each encoder.

Official umT5 encoder (``models_t5_umt5-xxl-enc-bf16.pth``), per block ``i``::

    token_embedding.weight               -> shared.weight (+ encoder.embed_tokens.weight, tied)
    blocks.i.norm1.weight                -> encoder.block.i.layer.0.layer_norm.weight
    blocks.i.attn.{q,k,v,o}.weight       -> encoder.block.i.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.i.pos_embedding.embedding.weight
                                   -> encoder.block.i.layer.0.SelfAttention.relative_attention_bias.weight
    blocks.i.norm2.weight                -> encoder.block.i.layer.1.layer_norm.weight
    blocks.i.ffn.gate.0.weight           -> encoder.block.i.layer.1.DenseReluDense.wi_0.weight  (GELU side)
    blocks.i.ffn.fc1.weight              -> encoder.block.i.layer.1.DenseReluDense.wi_1.weight  (linear side)
    blocks.i.ffn.fc2.weight              -> encoder.block.i.layer.1.DenseReluDense.wo.weight
    norm.weight                          -> encoder.final_layer_norm.weight

Official CLIP (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``) holds the whole XLM-R CLIP;
only the image tower under ``visual.`` is used::

    visual.patch_embedding.weight [W, 3, P, P]  -> embeddings.patch_embedding.weight
    visual.cls_embedding [1, 1, W]              -> embeddings.class_embedding [W]
    visual.pos_embedding [1, T, W]              -> embeddings.position_embedding.weight [T, W]
    visual.pre_norm                             -> pre_layrnorm
    visual.transformer.i.norm1 / norm2          -> encoder.layers.i.layer_norm1 / layer_norm2
    visual.transformer.i.attn.to_qkv [3W, W]    -> encoder.layers.i.self_attn.{q,k,v}_proj (rows q | k | v)
    visual.transformer.i.attn.proj              -> encoder.layers.i.self_attn.out_proj
    visual.transformer.i.mlp.0 / mlp.2          -> encoder.layers.i.mlp.fc1 / fc2
    visual.post_norm                            -> post_layernorm
    visual.head [W, out]                        -> dropped (projection to the joint space, unused)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..config import ImageEncoderConfig, TextEncoderConfig, json_value
from ..errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# umT5 text encoder

# Per-block renames official -> transformers (suffix after "blocks.i." / "encoder.block.i.").
_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_BLOCK_BACK = {v: k for k, v in _T5_BLOCK.items()}
_T5_OFFICIAL_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_T5_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")

# The real google/umt5-xxl config.json (values not given by TextEncoderConfig).
_UMT5_FIXED: dict[str, Any] = {
    "model_type": "umt5",
    "architectures": ["UMT5EncoderModel"],
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "dropout_rate": 0.1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "classifier_dropout": 0.0,
    "scalable_attention": True,
    "tokenizer_class": "T5Tokenizer",
    "use_cache": True,
}


def t5_official_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official umT5 encoder keys -> ``UMT5EncoderModel`` keys (tensors are not copied).

    The official file has one token embedding; it is written as ``shared.weight`` only (the loader ties
    ``encoder.embed_tokens.weight`` to it). Raises CheckpointError on a key it does not know.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = t
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = t
        elif (m := _T5_OFFICIAL_BLOCK_RE.match(key)) and m.group(2) in _T5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"umT5 checkpoint has unknown tensor(s): {', '.join(sorted(unknown)[:12])}")
    return out


def t5_hf_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``UMT5EncoderModel`` keys -> official umT5 encoder keys (either tied embedding name is accepted)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out.setdefault("token_embedding.weight", t)
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = t
        elif (m := _T5_HF_BLOCK_RE.match(key)) and m.group(2) in _T5_BLOCK_BACK:
            out[f"blocks.{m.group(1)}.{_T5_BLOCK_BACK[m.group(2)]}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"umT5 state dict has unknown tensor(s): {', '.join(sorted(unknown)[:12])}")
    return out


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{what} checkpoint lacks {key}: cannot infer its size")
    return tuple(shapes[key])


def _count_blocks(shapes: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"blocks matching {pattern!r} are missing or not numbered 0..n-1")
    return len(found)


def t5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> TextEncoderConfig:
    """Sizes of an official umT5 encoder from its tensor shapes (``{key: shape}``).

    The head count comes from the relative-bias table ``[buckets, heads]``; ``d_kv`` = q rows / heads.
    The max bucket distance (128) and the epsilon are not stored and keep their defaults.
    """
    vocab, d_model = _need(shapes, "token_embedding.weight", "umT5")
    buckets, heads = _need(shapes, "blocks.0.pos_embedding.embedding.weight", "umT5")
    q_rows = _need(shapes, "blocks.0.attn.q.weight", "umT5")[0]
    d_ff = _need(shapes, "blocks.0.ffn.fc1.weight", "umT5")[0]
    if q_rows % heads:
        raise CheckpointError(f"umT5 q rows {q_rows} not divisible by {heads} heads")
    return TextEncoderConfig(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=q_rows // heads,
        d_ff=d_ff,
        num_layers=_count_blocks(shapes, r"^blocks\.(\d+)\.norm1\.weight$"),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def t5_config_from_hf(cfg_json: Mapping[str, Any]) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers UMT5 ``config.json`` dict (gated-GELU only)."""
    ff = cfg_json.get("feed_forward_proj", "gated-gelu")
    if ff != "gated-gelu":
        raise CheckpointError(f"text encoder feed_forward_proj is {ff!r}; only 'gated-gelu' is supported")
    defaults = TextEncoderConfig()
    return TextEncoderConfig(
        vocab_size=json_value(cfg_json, "vocab_size", int),
        d_model=json_value(cfg_json, "d_model", int),
        d_kv=json_value(cfg_json, "d_kv", int),
        d_ff=json_value(cfg_json, "d_ff", int),
        num_layers=json_value(cfg_json, "num_layers", int),
        num_heads=json_value(cfg_json, "num_heads", int),
        relative_attention_num_buckets=json_value(
            cfg_json, "relative_attention_num_buckets", int, defaults.relative_attention_num_buckets
        ),
        relative_attention_max_distance=json_value(
            cfg_json, "relative_attention_max_distance", int, defaults.relative_attention_max_distance
        ),
        layer_norm_epsilon=json_value(cfg_json, "layer_norm_epsilon", float, defaults.layer_norm_epsilon),
    )


def t5_config_to_hf(cfg: TextEncoderConfig) -> dict[str, Any]:
    """A UMT5Config dict shaped like the real google/umt5-xxl config (encoder only)."""
    return {
        **_UMT5_FIXED,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
    }


# ---------------------------------------------------------------------------------------------
# CLIP ViT image tower

# open-clip ViT-H/14 uses 80-wide heads (1280 / 16); the official file does not store the head count,
# so it is read as width // 80.
CLIP_HEAD_DIM = 80

# Renames official (after "visual.") -> transformers, for keys that keep their shape.
_CLIP_TOP = {
    "patch_embedding.weight": "embeddings.patch_embedding.weight",
    "pre_norm.weight": "pre_layrnorm.weight",
    "pre_norm.bias": "pre_layrnorm.bias",
    "post_norm.weight": "post_layernorm.weight",
    "post_norm.bias": "post_layernorm.bias",
}
_CLIP_TOP_BACK = {v: k for k, v in _CLIP_TOP.items()}
_CLIP_LAYER = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
_CLIP_LAYER_BACK = {v: k for k, v in _CLIP_LAYER.items()}
_CLIP_OFFICIAL_LAYER_RE = re.compile(r"^visual\.transformer\.(\d+)\.(.+)\.(weight|bias)$")
_CLIP_HF_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def clip_official_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official whole-CLIP keys -> ``CLIPVisionModel`` keys.

    Keeps only ``visual.*`` (the text tower and logit scale are dropped), drops ``visual.head`` and
    splits the fused ``to_qkv`` into q, k and v.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        if not key.startswith("visual.") or key == "visual.head":
            continue
        name = key.removeprefix("visual.")
        if name in _CLIP_TOP:
            out[_CLIP_TOP[name]] = t
        elif name == "cls_embedding":
            out["embeddings.class_embedding"] = t.reshape(-1)  # [1, 1, W] -> [W]
        elif name == "pos_embedding":
            out["embeddings.position_embedding.weight"] = t.reshape(-1, t.shape[-1])  # [1, T, W] -> [T, W]
        elif m := _CLIP_OFFICIAL_LAYER_RE.match(key):
            i, mod, kind = m.groups()
            prefix = f"encoder.layers.{i}"
            if mod == "attn.to_qkv":
                for proj, part in zip(_QKV, t.chunk(3, dim=0)):  # rows ordered q | k | v
                    out[f"{prefix}.self_attn.{proj}.{kind}"] = part
            elif mod in _CLIP_LAYER:
                out[f"{prefix}.{_CLIP_LAYER[mod]}.{kind}"] = t
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"CLIP checkpoint has unknown tensor(s): {', '.join(sorted(unknown)[:12])}")
    return out


def clip_hf_to_official(sd: Mapping[str, torch.Tensor], out_dim: int = 1024) -> dict[str, torch.Tensor]:
    """``CLIPVisionModel`` keys -> a whole-CLIP official dict.

    Besides ``visual.*`` it writes stand-ins (zeros) for what the real file also has and segue ignores:
    ``visual.head`` [W, out_dim], a text tower tensor and ``log_scale``, so that a round trip
    exercises the dropping.
    """
    sd = clip_hf_strip(sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        if key in _CLIP_TOP_BACK:
            out[f"visual.{_CLIP_TOP_BACK[key]}"] = t
        elif key == "embeddings.class_embedding":
            out["visual.cls_embedding"] = t.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = t.unsqueeze(0)
        elif m := _CLIP_HF_LAYER_RE.match(key):
            i, mod, kind = m.groups()
            prefix = f"visual.transformer.{i}"
            if mod.startswith("self_attn.") and mod.removeprefix("self_attn.") in _QKV:
                qkv.setdefault((i, kind), {})[mod.removeprefix("self_attn.")] = t
            elif mod in _CLIP_LAYER_BACK:
                out[f"{prefix}.{_CLIP_LAYER_BACK[mod]}.{kind}"] = t
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (i, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise CheckpointError(f"CLIP layer {i} lacks some of q/k/v {kind}")
        out[f"visual.transformer.{i}.attn.to_qkv.{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    if unknown:
        raise CheckpointError(f"CLIP state dict has unknown tensor(s): {', '.join(sorted(unknown)[:12])}")
    width = out["visual.pos_embedding"].shape[-1]
    ref = out["visual.pos_embedding"]
    out["visual.head"] = torch.zeros(width, out_dim, dtype=ref.dtype)
    out["textual.head.0.weight"] = torch.zeros(out_dim, out_dim, dtype=ref.dtype)
    out["log_scale"] = torch.zeros((), dtype=ref.dtype)
    return out


def clip_hf_strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP vision state dict reduced to ``CLIPVisionModel`` keys.

    Accepts ``CLIPVisionModelWithProjection`` dicts (``vision_model.`` prefix; ``visual_projection`` is
    dropped) and drops the ``position_ids`` buffer that older transformers versions saved.
    """
    out = {}
    for key, t in sd.items():
        if key.startswith("visual_projection."):
            continue
        name = key.removeprefix("vision_model.")
        if name == "embeddings.position_ids":
            continue
        out[name] = t
    return out


def clip_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> ImageEncoderConfig:
    """Sizes of the official CLIP image tower from tensor shapes (``{key: shape}``).

    Width and patch size from the patch conv, image size from the position table length
    (``(image/patch)^2 + 1`` tokens), MLP width from ``mlp.0``; heads = width // 80 (ViT-H/14 has
    80-wide heads; the file does not store the head count).
    """
    width, _, patch, _ = _need(shapes, "visual.patch_embedding.weight", "CLIP")
    tokens = _need(shapes, "visual.pos_embedding", "CLIP")[-2]
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise CheckpointError(f"CLIP position table has {tokens} rows, not a square grid plus a class token")
    if width % CLIP_HEAD_DIM:
        raise CheckpointError(f"CLIP width {width} is not a multiple of the {CLIP_HEAD_DIM}-wide heads")
    return ImageEncoderConfig(
        hidden_size=width,
        intermediate_size=_need(shapes, "visual.transformer.0.mlp.0.weight", "CLIP")[0],
        num_layers=_count_blocks(shapes, r"^visual\.transformer\.(\d+)\.norm1\.weight$"),
        num_heads=width // CLIP_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
    )


def clip_config_from_hf(cfg_json: Mapping[str, Any]) -> ImageEncoderConfig:
    """ImageEncoderConfig from a transformers CLIP(Vision) ``config.json`` dict."""
    vis = cfg_json.get("vision_config", cfg_json)  # a full CLIPConfig nests the tower's config
    if not isinstance(vis, Mapping):
        raise ValueError(f"vision_config must be an object, got {vis!r:.80}")
    defaults = ImageEncoderConfig()
    return ImageEncoderConfig(
        hidden_size=json_value(vis, "hidden_size", int),
        intermediate_size=json_value(vis, "intermediate_size", int),
        num_layers=json_value(vis, "num_hidden_layers", int),
        num_heads=json_value(vis, "num_attention_heads", int),
        image_size=json_value(vis, "image_size", int, defaults.image_size),
        patch_size=json_value(vis, "patch_size", int, defaults.patch_size),
        layer_norm_eps=json_value(vis, "layer_norm_eps", float, defaults.layer_norm_eps),
        hidden_act=json_value(vis, "hidden_act", str, defaults.hidden_act),
    )


def clip_config_to_hf(cfg: ImageEncoderConfig) -> dict[str, Any]:
    """A CLIPVisionConfig dict for the tower."""
    return {
        "model_type": "clip_vision_model",
        "architectures": ["CLIPVisionModel"],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }
