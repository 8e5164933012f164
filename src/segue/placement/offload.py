"""Component offload: a module's weights rest in CPU memory and visit the device around chosen calls.

``ComponentOffload(module, device, ("encode",))`` wraps ``module.encode``: each call copies every
tensor to the device (from pinned memory, ``non_blocking``), runs, then points the tensors back at
their CPU copies. The wrappers are instance attributes (``patch_method``), so the class and its code
are untouched and ``remove`` restores the plain methods. The "offload" memory profile and every
profile built on it apply this to the text encoder, the image encoder and the VAE.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .tensors import home_copy, module_tensors, want_pin

__all__ = ["ComponentOffload", "patch_method"]


def patch_method(obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Shadow ``obj.name`` with ``make(current)`` as an instance attribute; returns the undo."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, make(getattr(obj, name)))

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return undo


class ComponentOffload:
    """Keep ``module``'s weights in CPU memory; copy them to ``device`` around calls of ``methods``.

    Each wrapped call loads every tensor (from pinned memory, ``non_blocking``: the copies are
    ordered before the call's kernels on the current stream), runs, then points the tensors back at
    their CPU copies; the device copies are freed in stream order. Weights are read-only here (it
    is for inference), so nothing is copied back. Nested wrapped calls load once.
    """

    def __init__(
        self, module: nn.Module, device: torch.device | str, methods: Sequence[str], pin: bool | None = None
    ) -> None:
        self.module = module
        self.device = torch.device(device)
        self.tensors = module_tensors(module)
        if any(t.is_meta for t in self.tensors):
            raise InputError(f"{type(module).__name__} still has meta tensors: load its weights first")
        pin = want_pin(self.device, pin)
        self.home = [home_copy(t, pin) for t in self.tensors]
        for t, h in zip(self.tensors, self.home):
            t.data = h
        self.depth = 0
        self.loads = 0  # how many times the weights went to the device (for tests and logs)
        self._undo = [patch_method(module, m, self._wrap) for m in methods]

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def offloaded(*args: Any, **kwargs: Any) -> Any:
            self.load()
            try:
                return fn(*args, **kwargs)
            finally:
                self.unload()

        return offloaded

    def load(self) -> None:
        self.depth += 1
        if self.depth > 1:
            return
        self.loads += 1
        for t, h in zip(self.tensors, self.home):
            # a real copy also on a CPU "device", so that a CPU test sees the weights move
            t.data = torch.empty(h.shape, dtype=h.dtype, device=self.device).copy_(h, non_blocking=True)

    def unload(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            for t, h in zip(self.tensors, self.home):
                t.data = h

    @property
    def loaded(self) -> bool:
        return self.depth > 0

    def remove(self, to: torch.device | str) -> None:
        """Unwrap the methods and put the weights on ``to`` for good."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        to = torch.device(to)
        for t, h in zip(self.tensors, self.home):
            t.data = h.to(to, copy=True) if to.type != "cpu" or h.is_pinned() else h
        self.home = []
