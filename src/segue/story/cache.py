"""A content-addressed cache of rendered shots.

A shot's key is the SHA-256 of everything its frames depend on: the model's weights identity, the pixels
of both keyframes and of any carried frames, the prompt and every resolved setting. Entries are
safetensors files (uint8 frames and the key in the metadata, nothing that unpickles) written under a
temporary name and renamed when whole, so two runs sharing a folder never see half an entry and the
last writer of a key simply replaces an equal one. An entry that cannot be read, or whose key or frame
digest does not match, is ignored (and later replaced), never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path

log = logging.getLogger("segue")

FORMAT = "segue-shot-1"
_IDENTITY: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
# Tensors up to this many elements are hashed whole; larger ones by a strided sample plus their sum, so a
# 14B checkpoint is identified in seconds while any LoRA merge or quantization still changes the identity.
_WHOLE = 1 << 20
_SAMPLE = 1 << 14


def pixels_digest(image: Any) -> str:
    """SHA-256 of an image's 8-bit RGB pixels and shape."""
    a = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _tensor_digest(h: Any, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    if t.device.type == "meta" or t.numel() == 0:
        return
    flat = t.detach().reshape(-1)
    if flat.numel() > _WHOLE:
        stride = flat.numel() // _SAMPLE
        h.update(repr(float(flat.float().sum())).encode())
        flat = flat[::stride]
    h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def weights_identity(pipe: Any) -> str:
    """SHA-256 over the config, the speed options applied and every weight of the four components (once per
    pipeline). Hashes the weights as loaded: a LoRA merge or a quantized copy gets its own identity."""
    if pipe in _IDENTITY:
        return _IDENTITY[pipe]
    h = hashlib.sha256()
    h.update(repr(pipe.config).encode())
    h.update(json.dumps(list(pipe.applied)).encode())
    for part in ("dit", "vae", "text_encoder", "image_encoder"):
        module = getattr(pipe, part, None)
        if not isinstance(module, torch.nn.Module):
            continue
        for name, t in module.state_dict(keep_vars=False).items():
            _tensor_digest(h, f"{part}.{name}", t)
    _IDENTITY[pipe] = h.hexdigest()
    return _IDENTITY[pipe]


def shot_key(parts: dict[str, Any]) -> str:
    """The cache key: SHA-256 of the canonical JSON of everything a shot's frames depend on."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ShotCache:
    """Shot frames by key under ``folder`` (created at the first entry); ``folder=None`` caches nothing."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)

    def path(self, key: str) -> Path:
        if self.folder is None or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a shot key: {key!r}")
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> np.ndarray | None:
        """The frames of ``key``, or None when absent or unusable (a warning says which file and why)."""
        if self.folder is None:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                frames = f.get_tensor("frames")
            if meta.get("format") != FORMAT or meta.get("key") != key:
                raise ValueError("its key does not match its name")
            if meta.get("digest") != _frames_digest(frames):
                raise ValueError("its frames do not match their digest")
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"unexpected frames {frames.dtype} {frames.shape}")
            return frames
        except Exception as e:  # any damage: a torn, truncated or foreign file is re-rendered, never used
            log.warning("shot cache: ignoring %s (%s); the shot is rendered again", path, e)
            return None

    def put(self, key: str, frames: np.ndarray, info: dict[str, Any] | None = None) -> Path | None:
        """Store ``frames`` under ``key``: written to a temporary file, flushed, renamed into place."""
        if self.folder is None:
            return None
        from safetensors.numpy import save

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)  # the cache folder and its two-letter shard
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        meta = {"format": FORMAT, "key": key, "digest": _frames_digest(frames), "info": json.dumps(info or {})}
        data = save({"frames": frames}, metadata=meta)
        with atomic_path(path) as tmp:  # flushed and renamed whole; removed on any error or interrupt
            tmp.write_bytes(data)
        return path


def _frames_digest(frames: np.ndarray) -> str:
    return pixels_digest(frames)
