"""Training checkpoints read safely: every RNG state as tensors and plain values (so a checkpoint loads with
``weights_only=True``), the one file name ``ckpt/latest`` may hold, and the EMA weights of a run folder."""

from __future__ import annotations

import pickle
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values only, so a checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The only names ``ckpt/latest`` may hold: a checkpoint this trainer wrote, straight inside ``ckpt/``.
CHECKPOINT_NAME = re.compile(r"step-\d{8}\.pt")


def latest_checkpoint_path(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint that ``ckpt_dir/latest`` names, or None when the folder holds none yet. The name must be
    one this trainer writes (``step-NNNNNNNN.pt``): a name read from a file never leads out of the folder."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {latest}: {e}") from None
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{latest} names {name[:80]!r}; allowed: a checkpoint file name step-NNNNNNNN.pt")
    return Path(ckpt_dir) / name


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint read with ``weights_only=True``: tensors and plain values, never pickled code.
    A checkpoint holding other objects (one written before RNG states were stored as tensors, or a crafted
    file) is refused with a CheckpointError."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds pickled Python objects other than tensors and plain values (a checkpoint from an older "
            "segue, or a crafted file); segue does not unpickle them: start this stage afresh (remove its ckpt "
            "folder)"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable training checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(ck, dict) or not {"step", "model", "ema"} <= ck.keys():
        raise CheckpointError(f"{path} is not a segue training checkpoint (no step, model and ema)")
    return ck


def latest_ema(run: str | Path) -> tuple[int | None, dict[str, dict[str, Tensor]]]:
    """``(step, {part: state dict with the EMA weights})`` of a run folder: its final ``ema.pt`` (step
    None) when the run finished, else its latest checkpoint's, to look at a run while it trains."""
    run = Path(run)
    if (run / "ema.pt").is_file():
        return None, torch.load(run / "ema.pt", map_location="cpu", weights_only=True)
    path = latest_checkpoint_path(run / "ckpt")
    if path is None:
        raise FileNotFoundError(f"{run}: neither ema.pt nor a checkpoint (ckpt/latest)")
    ck = load_training_checkpoint(path)
    return ck["step"], with_ema(ck["model"], ck["ema"].items())


def with_ema(
    states: Mapping[str, Mapping[str, Tensor]], ema: Iterable[tuple[str, Tensor]]
) -> dict[str, dict[str, Tensor]]:
    """``{part: state dict}`` with the EMA copies (named ``part.key``; only trained parameters have one) in
    place of the weights."""
    out = {part: dict(sd) for part, sd in states.items()}
    for n, t in ema:
        part, key = n.split(".", 1)
        if key in out[part]:
            out[part][key] = t
    return out
