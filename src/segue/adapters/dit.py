"""DiT checkpoint layouts: official (``WanModel``) <-> diffusers (``WanTransformer3DModel``).

Pure functions on names, shapes and config dicts; segue's native names are the official ones.
Diffusers stores every tensor with the official shape (``scale_shift_table`` is [1, 6, dim] per block
and [1, 2, dim] for the head, like ``modulation``), so only the names change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ..config import DiTConfig, json_value

T = TypeVar("T")

OFFICIAL_CLASS_NAME = "WanModel"
DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"
# The version string the official Wan2.1 config.json files carry.
OFFICIAL_DIFFUSERS_VERSION = "0.33.0.dev0"
# diffusers hard-codes the text context length of its image branch split to 512 tokens.
DIFFUSERS_TEXT_LEN = 512

# Official -> diffusers prefixes. Top level, then within ``blocks.i.``; a key maps by its longest
# matching prefix (whole dot-separated parts), the rest of the key is kept.
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "norm3": "norm2",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Tensors some diffusers files carry that no model uses (diffusers ignores them on load too).
_DIFFUSERS_IGNORED = (".attn2.norm_added_q.",)


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest prefix of ``key`` found in ``table`` (whole parts); None if none fits."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        new = table.get(".".join(parts[:n]))
        if new is not None:
            return ".".join([new, *parts[n:]])
    return None


def _map_key(key: str, top: Mapping[str, str], block: Mapping[str, str], layout: str) -> str:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        new = _rename(".".join(parts[2:]), block)
        new = None if new is None else f"blocks.{parts[1]}.{new}"
    else:
        new = _rename(key, top)
    if new is None:
        raise ValueError(f"unknown {layout} DiT tensor {key!r}")
    return new


_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}


def native_to_diffusers(sd: Mapping[str, T]) -> dict[str, T]:
    """Rename official DiT keys to diffusers' ``WanTransformer3DModel`` keys (ValueError if unknown)."""
    return {_map_key(k, _TOP, _BLOCK, "official"): v for k, v in sd.items()}


def diffusers_to_native(sd: Mapping[str, T]) -> dict[str, T]:
    """Rename diffusers DiT keys to official ones (ValueError naming any unknown key)."""
    out = {}
    for k, v in sd.items():
        if any(s in f".{k}" for s in _DIFFUSERS_IGNORED):
            continue
        out[_map_key(k, _TOP_INV, _BLOCK_INV, "diffusers")] = v
    return out


# ---------------------------------------------------------------------------------------------
# Configs.

_OFFICIAL_REQUIRED = (
    "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type",
    "num_heads", "num_layers", "out_dim", "text_len",
)  # fmt: skip
_MODEL_TYPES = ("t2v", "i2v", "flf2v")


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"{where} has no {key!r}")
    return d[key]


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, why: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"DiT weights have no {key!r} (needed for {why})")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"DiT tensor {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def _patch(cfg_json: Mapping[str, Any], key: str) -> tuple[int, int, int]:
    return json_value(cfg_json, key, tuple[int, int, int], (1, 2, 2))


def config_from_official(cfg_json: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> DiTConfig:
    """Official config.json + tensor shapes -> DiTConfig.

    text_dim, image_dim and image_pos_len are not in the file: they come from the shapes of
    ``text_embedding.0.weight``, ``img_emb.proj.1.weight`` and ``img_emb.emb_pos``.
    """
    where = "official DiT config.json"
    for key in _OFFICIAL_REQUIRED:
        _need(cfg_json, key, where)
    model_type = cfg_json["model_type"]
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}")
    window = json_value(cfg_json, "window_size", tuple[int, int], (-1, -1))
    if window != (-1, -1):
        raise ValueError(f"window_size {window!r} (local attention) is not supported; only (-1, -1)")
    text_dim = _shape(shapes, "text_embedding.0.weight", 2, "text_dim")[1]
    image_dim = image_pos_len = None
    if model_type != "t2v":
        image_dim = _shape(shapes, "img_emb.proj.1.weight", 2, f"model_type {model_type!r}")[1]
    elif "img_emb.proj.1.weight" in shapes:
        raise ValueError("model_type 't2v' but the weights have an image branch (img_emb)")
    if model_type == "flf2v":
        image_pos_len = _shape(shapes, "img_emb.emb_pos", 3, "model_type 'flf2v'")[1]
    elif "img_emb.emb_pos" in shapes:
        raise ValueError(f"model_type {model_type!r} but the weights have img_emb.emb_pos (flf2v)")
    return DiTConfig(
        dim=json_value(cfg_json, "dim", int),
        ffn_dim=json_value(cfg_json, "ffn_dim", int),
        num_heads=json_value(cfg_json, "num_heads", int),
        num_layers=json_value(cfg_json, "num_layers", int),
        freq_dim=json_value(cfg_json, "freq_dim", int),
        text_dim=int(text_dim),
        text_len=json_value(cfg_json, "text_len", int),
        in_dim=json_value(cfg_json, "in_dim", int),
        out_dim=json_value(cfg_json, "out_dim", int),
        patch_size=_patch(cfg_json, "patch_size"),
        eps=json_value(cfg_json, "eps", float),
        # The reference never saves these two and always uses True.
        qk_norm=json_value(cfg_json, "qk_norm", bool, True),
        cross_attn_norm=json_value(cfg_json, "cross_attn_norm", bool, True),
        image_dim=None if image_dim is None else int(image_dim),
        image_pos_len=None if image_pos_len is None else int(image_pos_len),
    )


def config_to_official(cfg: DiTConfig) -> dict[str, Any]:
    """DiTConfig -> official config.json dict (sizes the file cannot hold live in the tensor shapes)."""
    if cfg.rope_max_len != 1024:
        raise ValueError(f"rope_max_len {cfg.rope_max_len}: the official layout fixes it at 1024")
    out: dict[str, Any] = {
        "_class_name": OFFICIAL_CLASS_NAME,
        "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
        "dim": cfg.dim,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "model_type": cfg.model_type,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim,
        "text_len": cfg.text_len,
    }
    # Written only when they differ from the reference's fixed values, like the real files.
    if tuple(cfg.patch_size) != (1, 2, 2):
        out["patch_size"] = list(cfg.patch_size)
    if not cfg.qk_norm:
        out["qk_norm"] = False
    if not cfg.cross_attn_norm:
        out["cross_attn_norm"] = False
    return out


_DIFFUSERS_REQUIRED = (
    "num_attention_heads", "attention_head_dim", "in_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers",
)  # fmt: skip


def config_from_diffusers(cfg_json: Mapping[str, Any]) -> DiTConfig:
    """diffusers ``transformer/config.json`` (WanTransformer3DModel) -> DiTConfig."""
    where = "diffusers transformer config.json"
    for key in _DIFFUSERS_REQUIRED:
        _need(cfg_json, key, where)
    cls = cfg_json.get("_class_name", DIFFUSERS_CLASS_NAME)
    if cls != DIFFUSERS_CLASS_NAME:
        raise ValueError(f"_class_name must be {DIFFUSERS_CLASS_NAME!r}, got {cls!r}")
    heads, head_dim = json_value(cfg_json, "num_attention_heads", int), json_value(cfg_json, "attention_head_dim", int)
    dim = heads * head_dim
    # diffusers builds and applies the q/k RMSNorms whatever this says; only the across-heads kind exists.
    qk_norm = cfg_json.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in ("rms_norm_across_heads", None):
        raise ValueError(f"qk_norm must be 'rms_norm_across_heads' or null, got {qk_norm!r}")
    image_dim = json_value(cfg_json, "image_dim", int | None, None)
    added_kv = json_value(cfg_json, "added_kv_proj_dim", int | None, None)
    if (image_dim is None) != (added_kv is None) or added_kv not in (None, dim):
        raise ValueError(
            f"added_kv_proj_dim must be {dim} (the model width) with image_dim set and null without; "
            f"got added_kv_proj_dim={added_kv!r}, image_dim={image_dim!r}"
        )
    pos_len = json_value(cfg_json, "pos_embed_seq_len", int | None, None)
    in_dim = json_value(cfg_json, "in_channels", int)
    out_dim = json_value(cfg_json, "out_channels", int | None, None) or in_dim
    return DiTConfig(
        dim=dim,
        ffn_dim=json_value(cfg_json, "ffn_dim", int),
        num_heads=heads,
        num_layers=json_value(cfg_json, "num_layers", int),
        freq_dim=json_value(cfg_json, "freq_dim", int),
        text_dim=json_value(cfg_json, "text_dim", int),
        text_len=DIFFUSERS_TEXT_LEN,
        in_dim=in_dim,
        out_dim=int(out_dim),
        patch_size=_patch(cfg_json, "patch_size"),
        eps=json_value(cfg_json, "eps", float, 1e-6),
        qk_norm=True,
        cross_attn_norm=json_value(cfg_json, "cross_attn_norm", bool, True),
        image_dim=None if image_dim is None else int(image_dim),
        image_pos_len=None if pos_len is None else int(pos_len),
        rope_max_len=json_value(cfg_json, "rope_max_seq_len", int, 1024),
    )


def config_to_diffusers(cfg: DiTConfig) -> dict[str, Any]:
    """DiTConfig -> diffusers WanTransformer3DModel config dict."""
    if not cfg.qk_norm:
        raise ValueError("qk_norm False: diffusers' WanTransformer3DModel always has q/k norms")
    if cfg.image_dim is not None and cfg.text_len != DIFFUSERS_TEXT_LEN:
        raise ValueError(f"text_len {cfg.text_len}: diffusers' image branch needs {DIFFUSERS_TEXT_LEN}")
    return {
        "_class_name": DIFFUSERS_CLASS_NAME,
        "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": cfg.image_dim,
        "added_kv_proj_dim": cfg.dim if cfg.image_dim is not None else None,
        "rope_max_seq_len": cfg.rope_max_len,
        "pos_embed_seq_len": cfg.image_pos_len,
    }
