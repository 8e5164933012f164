"""CFG parallel: the conditional and unconditional passes of classifier-free guidance on two halves of the ranks.

A guidance strategy (``segue.sampling.guidance``): the ranks of the conditional half (``cfg_rank`` 0) run
the conditional pass and the others the unconditional one, on the same latent; the pair of ranks that
hold the same sequence chunk swap results (``cfg_group``) and both combine them as ``TwoPasses`` would,
so every rank holds the same latent. ``parallelize`` installs it as ``pipe.cfg_strategy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..dist import ParallelState
from ..sampling.guidance import Conditioning, StepContext, guide

__all__ = ["CFGParallel"]


class CFGParallel:
    """CFG with one pass per half of the ranks (``ParallelConfig.cfg``)."""

    name = "CFG parallel"

    def __init__(self, state: ParallelState) -> None:
        self.state = state

    def __call__(self, dit: nn.Module, latent: Tensor, cond: Conditioning, step: StepContext, scale: float) -> Tensor:
        ps = self.state
        context, branch = (cond.context, "cond") if ps.cfg_rank == 0 else (cond.context_neg, "uncond")
        mine = dit(latent[None], step.timestep, context[None], cond.clip, cond.y, step=step.on(branch))
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine.contiguous(), group=ps.cfg_group)
        return guide(both[0][0], both[1][0], scale)
