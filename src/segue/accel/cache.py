"""Step caching for the Wan DiT (TeaCache- and MagCache-style), installed as the DiT's blocks runner.

Between neighbouring sampling steps the blocks change the tokens by a similar amount: the residual
``r = blocks(tokens) - tokens`` drifts slowly. On a step judged close enough to the last computed one, the
cache skips all blocks and adds the cached residual to the new tokens; embeddings and head always run.
``apply_step_cache(pipe)`` sets ``pipe.dit.blocks_runner``: ``pipe.dit`` stays the DiT. The judgement is
made per CFG branch (the conditional and unconditional passes keep separate residuals):

- ``teacache``: the indicator is the first block's timestep-modulated input ``LN(x) * (1 + scale) + shift``.
  Its relative L1 change since the previous call, rescaled by a polynomial fitted offline (indicator
  change -> change of the DiT output), is accumulated; below ``threshold`` the step is skipped, otherwise
  the blocks run and the sum restarts at 0. Without a calibration the polynomial is the identity.
- ``magcache``: the calibrated curve of residual magnitude ratios ``mean_tokens ||r_i|| / ||r_i-1||``
  predicts how the residual would change; the accumulated ratio since the last computed step gives an
  error ``sum |1 - prod ratio|``; the step is skipped while it stays below ``threshold`` and at most
  ``max_skip`` steps in a row. Needs a calibration.

Calibration (``calibrate``) runs one full uncached generation and records, per call: timestep, indicator
change, output change and residual magnitude ratio. It fits the TeaCache polynomial and stores the MagCache
curve as a log-rate per unit timestep, ``log(ratio) / (t_prev - t)`` at the interval midpoint, so a run with
other steps or shift interpolates it (with the calibration's settings it gives the recorded ratios back).
The dict is JSON-able; ``bench/calibrate_cache.py`` writes it and measures fidelity (PSNR vs uncached).

Each call gets the sampling loop's step context (``segue.sampling.guidance.StepContext``) through the DiT:
its ``branch`` ("cond", "uncond", or "both" for CFG as one batch of two) picks the state, and a new ``run``
(a new sampling loop) drops every branch's state. ``reset()`` does the same explicitly. A call without a
step context (the DiT called outside the sampling loop) runs every block and leaves the state alone.

The runner calls each block as a module, so block hooks (sequence parallel, block swap) and swapped attention
functions still apply. Under sequence parallel every rank takes the same decisions: they see the same full
token sequence.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..models.dit import Embedded, WanDiT
from ..sampling.guidance import StepContext

METHODS = ("teacache", "magcache")
DEFAULT_THRESHOLD = {"teacache": 0.1, "magcache": 0.12}
DEFAULT_MAX_SKIP = {"teacache": None, "magcache": 2}
CALIBRATION_FORMAT = "segue-step-cache"
# The indicator is measured on at most this many tokens (a fixed stride): enough for a stable mean, and
# the per-branch copy stays small at 720p (75,600 tokens).
_INDICATOR_TOKENS = 8192
# Which calibrated curve a branch reads (calibration records the conditional pass first).
_BRANCH_INDEX = {"cond": 0, "uncond": 1, "both": 0}


# ---------------------------------------------------------------------------------------------
# The skip indicator (the blocks are run or skipped around WanDiT.embed / WanDiT.unpatchify).


def _indicator(dit: WanDiT, tokens: Tensor, emb: Embedded) -> Tensor:
    """The first block's modulated self-attention input on a strided token subset: [B, L', C] fp32."""
    block = dit.blocks[0]
    # the modulation is read outside the block's call: wherever block swap keeps it between calls
    modulation = block.modulation.to(device=tokens.device, dtype=torch.float32)
    shift, scale = (modulation + emb.e0)[:, :2].chunk(2, dim=1)  # [B, 1, C] each
    stride = max(1, math.ceil(tokens.shape[1] / _INDICATOR_TOKENS))
    sub = tokens[:, ::stride]
    return F.layer_norm(sub, (sub.shape[-1],), eps=block.eps) * (1 + scale) + shift


def _rel_l1(new: Tensor, old: Tensor) -> float:
    return ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()


def _magnitude_ratio(new: Tensor, old: Tensor) -> float:
    """Mean over tokens of ||new|| / ||old|| (norms over channels)."""
    return (new.norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)).mean().item()


# ---------------------------------------------------------------------------------------------
# Calibration data -> skip criteria.


def _poly(coefficients: list[float], x: float, x_range: tuple[float, float] | None) -> float:
    """The fitted change of the output for an indicator change x; x is clipped to the calibrated range
    (a degree-4 fit is meaningless outside it)."""
    if x_range is not None:
        x = min(max(x, x_range[0]), x_range[1])
    return max(0.0, float(np.polyval(coefficients, x)))


class _MagCurve:
    """Magnitude ratio between two timesteps, from a calibrated log-rate per unit timestep (per branch)."""

    def __init__(self, branches: list[Mapping[str, list[float]]]) -> None:
        self.curves = []
        for br in branches:
            t_mid, rate = np.asarray(br["t_mid"], float), np.asarray(br["log_rate"], float)
            order = np.argsort(t_mid)
            self.curves.append((t_mid[order], rate[order]))
        if not self.curves or any(len(c[0]) == 0 for c in self.curves):
            raise InputError("the MagCache calibration holds no ratio curve")

    def ratio(self, branch: int, t_prev: float, t: float) -> float:
        t_mid, rate = self.curves[min(branch, len(self.curves) - 1)]
        return math.exp(float(np.interp(0.5 * (t_prev + t), t_mid, rate)) * (t_prev - t))


def load_calibration(calibration: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A calibration dict, or the JSON file ``calibrate`` wrote."""
    if isinstance(calibration, Mapping):
        data = dict(calibration)
    else:
        try:
            with open(calibration, encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as e:
            raise InputError(f"cannot read the cache calibration {str(calibration)!r}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"cache calibration {str(calibration)!r} is not JSON: {e}") from None
    if data.get("format") != CALIBRATION_FORMAT:
        raise InputError(f"not a step-cache calibration (format {data.get('format')!r}, want {CALIBRATION_FORMAT!r})")
    return data


# ---------------------------------------------------------------------------------------------
# The cache.


@dataclass
class _Branch:
    index: int  # which calibrated curve it reads (0: the conditional pass)
    step: int = 0  # calls seen in this generation
    t_last: float | None = None
    residual: Tensor | None = None
    indicator: Tensor | None = None
    output: Tensor | None = None  # recording only
    accumulated: float = 0.0  # teacache: rescaled distance; magcache: error
    ratio: float = 1.0  # magcache: predicted ||r_now|| / ||r_cached||
    skipped_in_row: int = 0
    # recording only: per computed call after the first (t_prev -> t), and the output change per call
    records: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in ("t", "t_prev", "indicator_change", "magnitude_ratio", "output_change")}
    )


class StepCache:
    """A blocks runner (``WanDiT.blocks_runner``) that skips the blocks on cached steps; ``install(dit)``.

    ``computed`` / ``skipped`` count calls since creation or ``reset_stats()``. ``record=True`` never skips
    and keeps per-call measurements for ``calibrate``.
    """

    def __init__(
        self,
        method: str = "teacache",
        threshold: float | None = None,
        calibration: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        warmup_steps: int = 2,
        max_skip: int | None = None,
        record: bool = False,
    ) -> None:
        if method not in METHODS:
            raise InputError(f"unknown cache method {method!r}; choose one of: {', '.join(METHODS)}")
        self.method = method
        self.threshold = DEFAULT_THRESHOLD[method] if threshold is None else float(threshold)
        if self.threshold < 0:
            raise InputError(f"cache threshold must be >= 0, got {self.threshold}")
        if warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.max_skip = DEFAULT_MAX_SKIP[method] if max_skip is None else max_skip
        self.record = record
        self.calibration = load_calibration(calibration) if calibration is not None else None
        self.coefficients: list[float] = [1.0, 0.0]
        self.x_range: tuple[float, float] | None = None
        self.curve: _MagCurve | None = None
        if self.calibration is not None:
            tea = self.calibration["teacache"]
            self.coefficients = [float(c) for c in tea["coefficients"]]
            self.x_range = (float(tea["x_range"][0]), float(tea["x_range"][1])) if "x_range" in tea else None
            self.curve = _MagCurve(self.calibration["magcache"]["branches"])
        if method == "magcache" and self.curve is None and not record:
            raise InputError("MagCache needs a calibration: run bench/calibrate_cache.py (or segue's calibrate())")
        self.computed = 0
        self.skipped = 0
        self._run: int | None = None
        self._branches: dict[str, _Branch] = {}
        self.finished: list[_Branch] = []  # recording: the branches of finished generations

    def install(self, dit: WanDiT) -> StepCache:
        """Make this cache ``dit``'s blocks runner; returns it."""
        if isinstance(dit.blocks_runner, StepCache):
            raise InputError("this DiT already has a step cache; remove it first")
        dit.blocks_runner = self
        return self

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all cached residuals and indicators (a new generation starts)."""
        if self.record:
            self.finished.extend(self._branches.values())
        self._branches = {}

    def reset_stats(self) -> None:
        self.computed = self.skipped = 0

    def stats(self) -> dict[str, float]:
        total = self.computed + self.skipped
        return {"computed": self.computed, "skipped": self.skipped, "skip_fraction": self.skipped / max(total, 1)}

    def _branch(self, step: StepContext) -> _Branch:
        if step.run != self._run:
            self.reset()  # a new sampling loop: a new generation
            self._run = step.run
        br = self._branches.get(step.branch)
        if br is None:
            br = self._branches[step.branch] = _Branch(index=_BRANCH_INDEX.get(step.branch, 0))
        return br

    # -- decision -----------------------------------------------------------------------------
    def _skip(self, br: _Branch, indicator: Tensor | None, t: float) -> bool:
        """Decide for this call; updates the branch's accumulators."""
        if self.record or br.residual is None or br.step < self.warmup_steps or br.t_last is None:
            return False
        if self.max_skip is not None and br.skipped_in_row >= self.max_skip:
            return False
        if self.method == "teacache":
            assert indicator is not None and br.indicator is not None
            br.accumulated += _poly(self.coefficients, _rel_l1(indicator, br.indicator), self.x_range)
        else:
            assert self.curve is not None
            br.ratio *= self.curve.ratio(br.index, br.t_last, t)
            br.accumulated += abs(1.0 - br.ratio)
        return br.accumulated < self.threshold

    # -- the blocks runner --------------------------------------------------------------------
    def __call__(self, dit: WanDiT, emb: Embedded, step: StepContext | None) -> Tensor:
        if step is None:
            return dit.run_blocks(emb)
        before, emb.tokens = emb.tokens, None
        assert before is not None
        t_now = float(step.timestep.reshape(-1)[0].item())
        br = self._branch(step)
        indicator = _indicator(dit, before, emb) if self.method == "teacache" or self.record else None
        if self._skip(br, indicator, t_now):
            assert br.residual is not None
            tokens = before + br.residual
            br.skipped_in_row += 1
            self.skipped += 1
        else:
            emb.tokens = before
            tokens = dit.run_blocks(emb)
            residual = tokens - before
            if self.record:
                self._record(br, t_now, indicator, residual)
            br.residual = residual
            br.accumulated, br.ratio, br.skipped_in_row = 0.0, 1.0, 0
            self.computed += 1
        if self.record:
            self._record_output(br, dit.unpatchify(tokens, emb))
        br.indicator = indicator
        br.t_last = t_now
        br.step += 1
        return tokens

    def _record(self, br: _Branch, t: float, indicator: Tensor | None, residual: Tensor) -> None:
        rec = br.records
        if br.residual is None or br.t_last is None or indicator is None or br.indicator is None:
            return
        rec["t"].append(t)
        rec["t_prev"].append(br.t_last)
        rec["indicator_change"].append(_rel_l1(indicator, br.indicator))
        rec["magnitude_ratio"].append(_magnitude_ratio(residual, br.residual))

    def _record_output(self, br: _Branch, out: Tensor) -> None:
        if br.output is not None:
            br.records["output_change"].append(_rel_l1(out, br.output))
        br.output = out.detach()


# ---------------------------------------------------------------------------------------------
# Public API.


def apply_step_cache(
    pipe: Any,
    method: str = "teacache",
    threshold: float | None = None,
    calibration: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    warmup_steps: int = 2,
    max_skip: int | None = None,
) -> StepCache:
    """Install a StepCache as ``pipe.dit``'s blocks runner (replacing an existing one); returns it.

    ``threshold``: higher skips more (defaults: teacache 0.1, magcache 0.12). ``warmup_steps``: the first
    calls of each branch always run the blocks. ``max_skip``: most skipped calls in a row (magcache: 2).
    """
    cache = StepCache(method, threshold, calibration, warmup_steps, max_skip)
    remove_step_cache(pipe)
    return cache.install(pipe.dit)


def remove_step_cache(pipe: Any) -> StepCache | None:
    """Let ``pipe.dit`` run all its blocks again; returns the cache removed (None if there was none)."""
    cache = getattr(pipe.dit, "blocks_runner", None)
    if not isinstance(cache, StepCache):
        return None
    pipe.dit.blocks_runner = None
    return cache


def fit_calibration(branches: list[dict[str, list[float]]], degree: int = 4) -> dict[str, Any]:
    """Per-branch records -> the TeaCache polynomial and the MagCache log-rate curves."""
    xs = [x for br in branches for x in br["indicator_change"]]
    ys = [y for br in branches for y in br["output_change"][-len(br["indicator_change"]) :]]
    if len(xs) < 2 or len(xs) != len(ys):
        raise InputError("calibration needs at least 3 sampling steps")
    deg = min(degree, len(xs) - 1)
    coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), deg).tolist()
    curves = []
    for br in branches:
        t_mid, rate = [], []
        for t, tp, r in zip(br["t"], br["t_prev"], br["magnitude_ratio"]):
            if tp > t and r > 0:
                t_mid.append(0.5 * (t + tp))
                rate.append(math.log(r) / (tp - t))
        curves.append({"t_mid": t_mid, "log_rate": rate})
    tea = {"coefficients": coefficients, "degree": deg, "x_range": [min(xs), max(xs)]}
    return {"teacache": tea, "magcache": {"branches": curves}}


def calibrate_with_video(pipe: Any, *args: Any, degree: int = 4, **generate_kwargs: Any) -> tuple[dict, Any]:
    """``calibrate`` that also returns the uncached Video it generated (the fidelity reference)."""
    remove_step_cache(pipe)
    recorder = StepCache("teacache", threshold=0.0, warmup_steps=0, record=True).install(pipe.dit)
    try:
        video = pipe.generate(*args, **generate_kwargs)
    finally:
        remove_step_cache(pipe)
    recorder.reset()
    branches = [{k: list(v) for k, v in br.records.items()} for br in sorted(recorder.finished, key=lambda b: b.index)]
    fitted = fit_calibration(branches, degree)
    settings = {k: v for k, v in (video.info.get("settings", {}) if video is not None else {}).items()}
    data = {
        "format": CALIBRATION_FORMAT,
        "version": 1,
        "model": getattr(pipe, "source", ""),
        "settings": settings,
        "indicator_tokens": _INDICATOR_TOKENS,
        "records": branches,
        **fitted,
    }
    return data, video


def calibrate(pipe: Any, *args: Any, degree: int = 4, **generate_kwargs: Any) -> dict[str, Any]:
    """Run one full uncached ``pipe.generate(*args, **generate_kwargs)`` and return a JSON-able calibration
    for both methods: per-branch records, the TeaCache polynomial (``degree``) and the MagCache curves."""
    return calibrate_with_video(pipe, *args, degree=degree, **generate_kwargs)[0]
