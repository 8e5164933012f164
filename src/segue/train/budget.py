"""A time budget for a DiT stage: how long a step takes, and how many steps fit what is left.

``segue train --time-budget 7m`` gives each continuation's DiT stage the steps that fit the time left once
its latent cache is built (at most its own count); the warmup stays and the cooldown scales with the
steps, so the stage ends cooled down inside the budget.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch.utils.data import Dataset

from ..errors import InputError
from .checkpoints import rng_state, set_rng_state
from .trainer import LossFn, TrainConfig, Trainer

PROBE_STEPS = 8  # steps timed on copies of the models before a time-budgeted stage picks its length
BUDGET_RESERVE = 0.1  # share of the time left kept back for checkpoints, the EMA and the bundle
WORKER_MARGIN = 1.25  # batches from worker processes: their passing between processes, the workers' start


def seconds_per_step(parts: Mapping[str, torch.nn.Module], loss_fn: LossFn, data: Dataset, cfg: TrainConfig,
                     steps: int = PROBE_STEPS) -> float:  # fmt: skip
    """Seconds a step of ``cfg`` will take, from ``steps`` steps on copies of ``parts`` (the median of the last
    half: the first ones pay for allocations and kernel choice). The batches are collated in this process and
    timed apart from the training: with ``cfg.num_workers`` processes collating, a step takes the longer of
    its training and its share of the collating; without, both. The models and torch's random state are
    left as they were."""
    rng = rng_state()
    with tempfile.TemporaryDirectory() as tmp:
        copies = {k: copy.deepcopy(m) for k, m in parts.items()}
        short = replace(cfg, steps=steps, schedule="constant", warmup=0, cooldown=0, out_dir=tmp, resume=False,
                        num_workers=0)  # fmt: skip
        times = Trainer(copies, loss_fn, data, short).time_steps(steps)[steps // 2 :]
    set_rng_state(rng)
    data_s = statistics.median(t for t, _ in times)
    train_s = statistics.median(t for _, t in times)
    if cfg.num_workers == 0:
        return data_s + train_s
    return max(train_s, data_s / cfg.num_workers) * WORKER_MARGIN


def budget_steps(seconds_left: float, per_step: float, most: int) -> int:
    """The steps that fit ``seconds_left`` at ``per_step`` seconds each, ``BUDGET_RESERVE`` of it kept back,
    at least 1 and at most ``most`` (the stage's own count)."""
    return max(1, min(most, int(seconds_left * (1 - BUDGET_RESERVE) / per_step)))


def parse_duration(text: str) -> float:
    """Seconds from "420", "420s", "7m" or "1.5h"; an InputError names the value and what is allowed."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    scale = units.get(t[-1:])
    number = t[:-1] if scale is not None else t
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"--time-budget: {text!r} is not a positive duration (seconds, or with s, m or h: 420, 7m)")
    return value
