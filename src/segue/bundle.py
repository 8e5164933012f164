"""segue's own single-file model format: every component, the config and the tokenizer in one
safetensors file. This is how the built-in default model ships inside the package.

Tensors are stored under ``dit.``, ``vae.`` (native names), ``text.`` and ``image.`` (transformers
names); the metadata holds ``segue_format``, the ModelConfig as JSON (``segue_config``) and the
tokenizer files (``tokenizer/<name>``, ``<name>`` one of ``TOKENIZER_FILES``: a name read from a file never
becomes a path, see docs/security.md).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError
from .io import atomic_path
from .tokenizer import TOKENIZER_FILES

FORMAT_VERSION = "1"
PARTS = ("dit", "vae", "text", "image")


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            return "segue_format" in (f.metadata() or {})
    except Exception:
        return False


def save_bundle(
    path: str | Path,
    config: ModelConfig,
    modules: dict[str, torch.nn.Module],
    tokenizer_dir: str | Path,
    dtype: torch.dtype | None = None,
    lineage: list[dict] | None = None,
) -> Path:
    """Write ``modules`` (keys among dit, vae, text, image) as one file; ``dtype`` casts floating tensors.
    ``lineage``: the training runs that made these weights, oldest first (stored as ``segue_lineage``)."""
    tensors: dict[str, torch.Tensor] = {}
    for part, module in modules.items():
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
        for name, t in module.state_dict().items():
            t = t.detach().cpu()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[f"{part}.{name}"] = t.contiguous().clone()  # clone: tied weights must not share storage
    meta = {"format": "pt", "segue_format": FORMAT_VERSION, "segue_config": json.dumps(config.to_dict())}
    if lineage:
        meta["segue_lineage"] = json.dumps(lineage)
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file() and f.name in TOKENIZER_FILES:
            meta[f"tokenizer/{f.name}"] = f.read_text() if f.suffix != ".model" else f.read_bytes().hex()
    dest = Path(path)
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return dest


def read_bundle_metadata(path: Path) -> tuple[ModelConfig, dict[str, str]]:
    """The config and the tokenizer files of a bundle."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if meta.get("segue_format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: segue format {meta.get('segue_format')!r}, expected {FORMAT_VERSION}")
    try:
        config = ModelConfig.from_dict(json.loads(meta["segue_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad segue_config metadata ({e})") from None
    d = config.defaults
    if d.trained_frames is None and d.trained_size is None:  # written before the config recorded it
        clip = trained_clip(_lineage(meta.get("segue_lineage")))
        if clip is not None:
            config = trained_on(config, *clip)
    files = {k.removeprefix("tokenizer/"): v for k, v in meta.items() if k.startswith("tokenizer/")}
    for name in files:
        if name not in TOKENIZER_FILES:
            raise CheckpointError(
                f"{path}: metadata key {'tokenizer/' + name!r} names no tokenizer file segue reads; "
                f"allowed: {', '.join('tokenizer/' + n for n in TOKENIZER_FILES)}"
            )
    return config, files


def read_bundle_lineage(path: Path) -> list[dict]:
    """The training runs recorded in a bundle, oldest first ([] when it records none)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("segue_lineage")
    lineage = _lineage(raw)
    if raw and not lineage:
        raise CheckpointError(f"{path}: metadata segue_lineage is not a JSON list of objects")
    return lineage


def _lineage(raw: str | None) -> list[dict]:
    """``segue_lineage`` metadata as a list of records ([] when absent or not a JSON list of objects)."""
    try:
        lineage = json.loads(raw) if raw else []
    except ValueError:
        return []
    return lineage if isinstance(lineage, list) and all(isinstance(r, dict) for r in lineage) else []


def trained_clip(lineage: list[dict]) -> tuple[int, tuple[int, int]] | None:
    """(frames, (height, width)) of the newest DiT stage a lineage records with steps, or None."""
    for record in reversed(lineage):
        c = record.get("continuation")
        if not isinstance(c, dict) or not record.get("steps"):
            continue
        stage = c.get("stage") if isinstance(c.get("stage"), dict) else {}
        frames, size = stage.get("frames"), stage.get("size")
        ok = isinstance(frames, int) and frames >= 1 and isinstance(size, list) and len(size) == 2
        if ok and all(isinstance(v, int) and v >= 1 for v in size):
            return frames, (size[0], size[1])
        return None
    return None


def trained_on(config: ModelConfig, frames: int, size: tuple[int, int]) -> ModelConfig:
    """``config`` recording that its DiT was trained on clips of ``frames`` x ``size`` (height, width): the
    pipeline warns in one line when asked for another length or a larger size."""
    defaults = replace(config.defaults, trained_frames=frames, trained_size=(size[0], size[1]))
    return replace(config, defaults=defaults)


def read_bundle_weights(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """A bundle's tensors per part (``dit``, ``vae``, ``text``, ``image``), floating ones cast to ``dtype``."""
    out: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            part, _, name = key.partition(".")
            if part not in out:
                raise CheckpointError(f"{path}: tensor {key!r} belongs to no part of {PARTS}")
            t = f.get_tensor(key)
            out[part][name] = t.to(dtype) if t.is_floating_point() else t
    return out


def build_modules(config: ModelConfig, weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.nn.Module]:
    """The modules a bundle stores (the DiT, the VAE, the text and image encoders' models), built from
    ``config`` with ``weights`` (``read_bundle_weights``) loaded: what ``save_bundle`` takes."""
    from .models.dit import WanDiT
    from .models.encoders import ImageEncoder, TextEncoder
    from .models.vae import WanVAE

    modules = {"dit": WanDiT(config.dit), "vae": WanVAE(config.vae), "text": TextEncoder(config.text, None).model,
               "image": ImageEncoder(config.image).model}  # fmt: skip
    for part, module in modules.items():
        module.load_state_dict(weights[part])
    return modules


def materialize_tokenizer(files: dict[str, str], folder: Path) -> Path:
    """Write a bundle's tokenizer files into ``folder`` (read by ``segue.tokenizer.load_tokenizer``). Only the
    names of ``TOKENIZER_FILES`` are written, each straight inside ``folder``."""
    if not files:
        raise CheckpointError("the bundle holds no tokenizer files")
    bad = sorted(n for n in files if n not in TOKENIZER_FILES)
    if bad:
        raise CheckpointError(
            f"tokenizer file name(s) {', '.join(map(repr, bad))} not among {', '.join(TOKENIZER_FILES)}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = folder / name
        if name.endswith(".model"):
            try:
                target.write_bytes(bytes.fromhex(content))
            except ValueError:
                raise CheckpointError(f"tokenizer file {name!r} is not hex-encoded bytes") from None
        else:
            target.write_text(content)
    return folder


def load_bundle_tokenizer(files: dict[str, str], origin: str = "the bundle") -> Any:
    """The tokenizer a bundle holds: straight from its ``tokenizer.json`` text when that is a plain one (what
    segue writes), else through a private temporary folder that is removed at once."""
    from .tokenizer import load_tokenizer, plain_tokenizer

    bad = sorted(n for n in files if n not in TOKENIZER_FILES)
    plain = None if bad else plain_tokenizer(files, origin)  # bad names: materialize_tokenizer says which
    if plain is not None:
        return plain
    with tempfile.TemporaryDirectory(prefix="segue-tokenizer-") as tmp:
        return load_tokenizer(materialize_tokenizer(files, Path(tmp)))
