"""Strict loading of state dicts into modules built on the meta device.

Every component is built under ``torch.device("meta")`` (no memory, no init cost) and then
receives its tensors with ``load_state_dict(assign=True)``. Before that, every key is checked:
a missing, unexpected or mis-shaped tensor is a ``CheckpointError`` that names it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .errors import CheckpointError

# How many names to list per category before summarising; enough to debug, short enough to read.
_MAX_NAMES = 12


def _names(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_NAMES])
    return shown + (f", ... ({len(keys) - _MAX_NAMES} more)" if len(keys) > _MAX_NAMES else "")


def check_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor], component: str, source: str = "") -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    where = f" in {source}" if source else ""
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {expected[k]})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped {len(shapes)} tensor(s): {_names(shapes)}")
    if problems:
        raise CheckpointError(f"{component} weights{where} do not fit the model: " + "; ".join(problems))


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    component: str,
    *,
    source: str = "",
    device: torch.device | str = "cpu",
    dtype_for: Callable[[str, torch.Tensor], torch.dtype | None] | None = None,
) -> nn.Module:
    """Check keys, then assign the tensors (moved to ``device``; cast per ``dtype_for(name, t)``).

    ``dtype_for`` returns the dtype a tensor should have, or None to keep the checkpoint's dtype.
    Buffers that are not in the state dict (non-persistent ones) are left as the module made them.
    """
    check_keys(module, state_dict, component, source)
    ready = {}
    for name, t in state_dict.items():
        dtype = dtype_for(name, t) if dtype_for is not None else None
        ready[name] = t.to(device=device, dtype=dtype or t.dtype)
    module.load_state_dict(ready, strict=True, assign=True)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
