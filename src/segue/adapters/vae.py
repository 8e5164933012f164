"""Wan2.1 VAE checkpoint layouts: official ``Wan2.1_VAE.pth`` names <-> diffusers ``AutoencoderKLWan``.

Pure functions on key names and shapes (tensors are passed through untouched: both layouts store
the same shapes). The official names are the native ones (``segue.models.vae.WanVAE``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ..config import VAEConfig, json_value
from ..models.vae import WanVAE

T = TypeVar("T")

# Renames inside a residual block: official Sequential index -> diffusers attribute.
_RES_TO_DIFFUSERS = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
                     "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}  # fmt: skip
_RES_TO_NATIVE = {v: k for k, v in _RES_TO_DIFFUSERS.items()}
_MIDDLE_TO_DIFFUSERS = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MIDDLE_TO_NATIVE = {v: k for k, v in _MIDDLE_TO_DIFFUSERS.items()}
_TOP_TO_DIFFUSERS = {
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "encoder.conv1.": "encoder.conv_in.",
    "decoder.conv1.": "decoder.conv_in.",
    "encoder.head.0.": "encoder.norm_out.",
    "encoder.head.2.": "encoder.conv_out.",
    "decoder.head.0.": "decoder.norm_out.",
    "decoder.head.2.": "decoder.conv_out.",
}
_TOP_TO_NATIVE = {v: k for k, v in _TOP_TO_DIFFUSERS.items()}


def _swap_prefix(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _upsample_layout(keys: list[str]) -> list[tuple[int, int | None]]:
    """For the official ``decoder.upsamples.N``: (stage, resnet index or None for the upsampler)."""
    found = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))}
    if found and found != set(range(max(found) + 1)):
        raise ValueError(f"decoder.upsamples indices are not contiguous: {sorted(found)}")
    is_resampler = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))}
    layout: list[tuple[int, int | None]] = []
    stage, j = 0, 0
    for n in range(len(found)):
        if n in is_resampler:
            layout.append((stage, None))
            stage, j = stage + 1, 0
        else:
            layout.append((stage, j))
            j += 1
    return layout


def native_to_diffusers(sd: Mapping[str, T]) -> dict[str, T]:
    """Official ``Wan2.1_VAE.pth`` names -> diffusers ``AutoencoderKLWan`` names (SPEC section 6)."""
    layout = _upsample_layout(list(sd))
    out: dict[str, T] = {}
    for key, value in sd.items():
        new = _swap_prefix(key, _TOP_TO_DIFFUSERS)
        if m := re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)", key):
            part, idx, rest = m.groups()
            new = f"{part}.mid_block.{_MIDDLE_TO_DIFFUSERS[idx]}.{_swap_prefix(rest, _RES_TO_DIFFUSERS)}"
        elif m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key):
            n, rest = m.groups()
            new = f"encoder.down_blocks.{n}.{_swap_prefix(rest, _RES_TO_DIFFUSERS)}"
        elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key):
            n, rest = m.groups()
            stage, j = layout[int(n)]
            if j is None:
                new = f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
            else:
                new = f"decoder.up_blocks.{stage}.resnets.{j}.{_swap_prefix(rest, _RES_TO_DIFFUSERS)}"
        out[new] = value
    return out


def diffusers_to_native(sd: Mapping[str, T]) -> dict[str, T]:
    """Diffusers ``AutoencoderKLWan`` names -> official ``Wan2.1_VAE.pth`` names."""
    # flat index of each (stage, resnet j / upsampler) in the official decoder.upsamples
    blocks: dict[int, tuple[int, bool]] = {}  # stage -> (number of resnets, has upsampler)
    for key in sd:
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", key):
            s, j = int(m.group(1)), int(m.group(2))
            count, up = blocks.get(s, (0, False))
            blocks[s] = (max(count, j + 1), up)
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", key):
            s = int(m.group(1))
            blocks[s] = (blocks.get(s, (0, False))[0], True)
    if blocks and set(blocks) != set(range(max(blocks) + 1)):
        raise ValueError(f"decoder.up_blocks indices are not contiguous: {sorted(blocks)}")
    start, offset = {}, 0
    for s in range(len(blocks)):
        start[s] = offset
        offset += blocks[s][0] + int(blocks[s][1])

    out: dict[str, T] = {}
    for key, value in sd.items():
        new = _swap_prefix(key, _TOP_TO_NATIVE)
        if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets\.\d|attentions\.0)\.(.*)", key):
            part, sub, rest = m.groups()
            new = f"{part}.middle.{_MIDDLE_TO_NATIVE[sub]}.{_swap_prefix(rest, _RES_TO_NATIVE)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
            n, rest = m.groups()
            new = f"encoder.downsamples.{n}.{_swap_prefix(rest, _RES_TO_NATIVE)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            s, j, rest = m.groups()
            new = f"decoder.upsamples.{start[int(s)] + int(j)}.{_swap_prefix(rest, _RES_TO_NATIVE)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            s, rest = m.groups()
            new = f"decoder.upsamples.{start[int(s)] + blocks[int(s)][0]}.{rest}"
        out[new] = value
    return out


def _encoder_stages(
    shapes: Mapping[str, tuple[int, ...]], shape: Callable[[str], tuple[int, ...]]
) -> tuple[list[list[int]], list[bool]]:
    """The encoder's stages, split at each ``resample``: the output width of each residual block per
    stage, and whether each downsampler also halves time."""
    indices = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"encoder.downsamples indices are missing or not contiguous: {indices}")
    stages: list[list[int]] = [[]]
    temporal: list[bool] = []
    for n in indices:
        prefix = f"encoder.downsamples.{n}."
        if f"{prefix}resample.1.weight" in shapes:
            temporal.append(f"{prefix}time_conv.weight" in shapes)
            stages.append([])
        else:
            stages[-1].append(shape(f"{prefix}residual.6.weight")[0])
    return stages, temporal


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    """Infer the VAE size from official tensor names and shapes; ValueError if they do not fit one.

    Reads the encoder (stages split at each ``resample``), then checks every name and shape against
    the model that size builds. Latent mean/std keep the Wan2.1 values when z_dim is 16.
    """

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise ValueError(f"VAE weights lack {name}")
        return tuple(shapes[name])

    dim = shape("encoder.conv1.weight")[0]
    z_dim = shape("conv2.weight")[0]
    stages, temporal = _encoder_stages(shapes, shape)
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"encoder stages have different numbers of residual blocks: {[len(s) for s in stages]}")
    mult = []
    for i, widths in enumerate(stages):
        if len(set(widths)) != 1 or widths[0] % dim:
            raise ValueError(f"encoder stage {i} widths {widths} are not one multiple of dim {dim}")
        mult.append(widths[0] // dim)
    kwargs: dict[str, Any] = dict(
        dim=dim, z_dim=z_dim, dim_mult=tuple(mult), num_res_blocks=counts.pop(),
        temporal_downsample=tuple(temporal),
    )  # fmt: skip
    # the decoder's first conv maps z to its widest stage, mult[-1] times its base width
    dec = shape("decoder.conv1.weight")[0]
    if dec % mult[-1]:
        raise ValueError(f"decoder.conv1 width {dec} is not a multiple of dim_mult[-1] = {mult[-1]}")
    if dec // mult[-1] != dim:
        kwargs["decoder_dim"] = dec // mult[-1]
    if z_dim != len(VAEConfig.latent_mean):
        # no published statistics for this width: identity normalisation
        kwargs.update(latent_mean=(0.0,) * z_dim, latent_std=(1.0,) * z_dim)
    cfg = VAEConfig(**kwargs)

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in expected if k in shapes and tuple(shapes[k]) != expected[k])
    if missing or extra or wrong:
        found = (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong))
        parts = [f"{name}: {', '.join(ks[:5])}{' ...' if len(ks) > 5 else ''}" for name, ks in found if ks]
        raise ValueError(f"VAE weights do not fit the inferred size {cfg}: " + "; ".join(parts))
    return cfg


def config_from_diffusers(cfg_json: Mapping[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers ``vae/config.json`` (AutoencoderKLWan, the Wan2.1 variant only)."""
    unsupported = {
        "is_residual": (cfg_json.get("is_residual", False), False),
        "attn_scales": (cfg_json.get("attn_scales", []), []),
        "patch_size": (cfg_json.get("patch_size"), None),
        "in_channels": (cfg_json.get("in_channels", 3), 3),
        "out_channels": (cfg_json.get("out_channels", 3), 3),
    }
    base = json_value(cfg_json, "base_dim", int, 96)
    decoder_base = json_value(cfg_json, "decoder_base_dim", int | None, None)
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"AutoencoderKLWan {name}={value!r} is not supported (Wan2.1 VAE needs {wanted!r})")
    default = VAEConfig()
    return VAEConfig(
        dim=base,
        z_dim=json_value(cfg_json, "z_dim", int, default.z_dim),
        dim_mult=json_value(cfg_json, "dim_mult", tuple[int, ...], default.dim_mult),
        num_res_blocks=json_value(cfg_json, "num_res_blocks", int, default.num_res_blocks),
        temporal_downsample=json_value(cfg_json, "temperal_downsample", tuple[bool, ...], default.temporal_downsample),
        latent_mean=json_value(cfg_json, "latents_mean", tuple[float, ...], default.latent_mean),
        latent_std=json_value(cfg_json, "latents_std", tuple[float, ...], default.latent_std),
        decoder_dim=None if decoder_base in (None, base) else decoder_base,
    )


def config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    """A diffusers ``vae/config.json`` dict for ``cfg``."""
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": cfg.dim,
        "decoder_base_dim": cfg.decoder_dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample),
        "dropout": 0.0,
        "latents_mean": list(cfg.latent_mean),
        "latents_std": list(cfg.latent_std),
    }
