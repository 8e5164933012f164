"""One sampling step's context and classifier-free guidance as a strategy chosen when the pipeline is built.

The sampling loop (``Pipeline.denoise``) makes a ``StepContext`` per step and hands it to the guidance
strategy, which calls the DiT once per branch with the context of that branch (``step.on("uncond")``);
the DiT passes it on to its blocks runner (``WanDiT.blocks_runner``), where a step cache reads the
branch and the step instead of guessing them. Strategies, all ``v_u + g * (v_c - v_u)``:

- ``TwoPasses``: the conditional pass, then the unconditional one (the reference).
- ``OneBatch``: both as one DiT call on a batch of two, cond first: fewer, larger kernels for twice the
  activation memory (equal within float rounding).
- ``segue.parallel.cfg.CFGParallel``: each half of the ranks runs one pass and they swap results.

A step whose guidance scale is 1 runs the conditional pass alone, whatever the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["Conditioning", "Guidance", "OneBatch", "StepContext", "TwoPasses", "cond_velocity", "guide"]

BRANCHES = ("cond", "uncond", "both")


@dataclass(frozen=True)
class StepContext:
    """Where the sampling loop is, for whatever needs it (guidance, the DiT's blocks runner)."""

    index: int  # 0-based step
    total: int  # steps of this run
    timestep: Tensor  # [1] the solver's timestep on the run device
    run: int  # one number per sampling loop: a new one starts a new generation
    branch: str = "cond"  # "cond", "uncond", or "both" (one batch of two, cond first)

    def on(self, branch: str) -> StepContext:
        """This step on another CFG branch."""
        return replace(self, branch=branch)


@dataclass(frozen=True)
class Conditioning:
    """What the DiT is conditioned on, the same every step."""

    context: Tensor  # [L, C_text] the prompt's text features
    context_neg: Tensor  # [L', C_text] the negative prompt's
    clip: Tensor | None  # [1, N, D] CLIP features (both keyframes' tokens for FLF2V)
    y: Tensor | None  # [1, 4 + z, T, h, w] frame mask and conditioning latent


class Guidance(Protocol):
    """A CFG strategy: the guided velocity of ``latent`` at ``step`` with scale ``scale`` (> 1 or < 1)."""

    def __call__(
        self, dit: nn.Module, latent: Tensor, cond: Conditioning, step: StepContext, scale: float
    ) -> Tensor: ...


def guide(v: Tensor, v_neg: Tensor, scale: float) -> Tensor:
    """``v_u + g * (v_c - v_u)``."""
    return v_neg + scale * (v - v_neg)


def cond_velocity(dit: nn.Module, latent: Tensor, cond: Conditioning, step: StepContext) -> Tensor:
    """The conditional pass alone: [z, T, h, w] -> [z, T, h, w]."""
    return dit(latent[None], step.timestep, cond.context[None], cond.clip, cond.y, step=step.on("cond"))[0]


class TwoPasses:
    """CFG as the reference runs it: two DiT calls per step."""

    name = "two passes"

    def __call__(self, dit: nn.Module, latent: Tensor, cond: Conditioning, step: StepContext, scale: float) -> Tensor:
        t = step.timestep
        v = dit(latent[None], t, cond.context[None], cond.clip, cond.y, step=step.on("cond"))[0]
        v_neg = dit(latent[None], t, cond.context_neg[None], cond.clip, cond.y, step=step.on("uncond"))[0]
        return guide(v, v_neg, scale)


class OneBatch:
    """CFG as one DiT call on a batch of two, cond first."""

    name = "CFG batch of two"

    def __call__(self, dit: nn.Module, latent: Tensor, cond: Conditioning, step: StepContext, scale: float) -> Tensor:
        # The DiT zero-pads text to text_len itself: pad both here so prompts of different lengths stack.
        text_len = dit.cfg.text_len
        for name, c in (("prompt", cond.context), ("negative prompt", cond.context_neg)):
            if c.shape[0] > text_len:
                raise InputError(f"{name} context has {c.shape[0]} tokens, at most {text_len} allowed")
        texts = torch.stack([F.pad(c, (0, 0, 0, text_len - c.shape[0])) for c in (cond.context, cond.context_neg)])
        # clip and y belong to the one sample: FLF2V's two frames' CLIP tokens regroup to one row.
        clip, y = cond.clip, cond.y
        clip2 = None if clip is None else clip.reshape(1, -1, clip.shape[-1]).expand(2, -1, -1)
        y2 = None if y is None else y.expand(2, *y.shape[1:])
        both = dit(latent[None].expand(2, *latent.shape), step.timestep, texts, clip2, y2, step=step.on("both"))
        return guide(both[0], both[1], scale)
