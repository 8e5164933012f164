"""Training resumed from a bundle's weights: how the built-in model keeps improving across sessions.

Run folders do not outlive a development session here, but the shipped bundle does. A continuation
starts every component from a bundle (the VAE frozen as it is, so the DiT's latent space stays valid),
encodes a latent cache of *fresh* training clips (a window of the training split that earlier runs did
not see), trains the DiT and its encoders for one more stage and writes a new bundle whose
``segue_lineage`` metadata lists every run that made it, oldest first.

``segue train --continue-from BUNDLE --continuation NAME --out RUN`` runs one; the named schedules are
in ``CONTINUATIONS`` and docs/training.md records which ones made the shipped model.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..bundle import materialize_tokenizer, read_bundle_lineage, read_bundle_metadata, read_bundle_weights, save_bundle
from ..config import ModelConfig, VAEConfig
from ..data.synthetic import GROUP_SIZE, LOOP_GROUPS, Scene, SyntheticVideos, check_loop_groups, check_loops
from ..errors import InputError
from ..io import atomic_write_text
from ..loader import load, resolve_device
from ..models.dit import WanDiT
from ..models.encoders import ImageEncoder, TextEncoder
from ..models.vae import WanVAE
from ..tokenizer import load_tokenizer
from .flow import set_dropout
from .generated import GeneratedClips, generate_latents
from .grow import insert_identity_blocks, widen_decoder
from .latents import CachedClips, CachedFLF2VObjective, GroupedClips, build_latent_cache, build_object_masks
from .recipe import (
    FLF,
    PRESETS,
    Stage,
    is_done,
    load_ema,
    mark_done,
    measured_vae_config,
    stage_train_config,
    train_vae_run,
)
from .trainer import LossFn, TrainConfig, Trainer, rng_state, set_rng_state


@dataclass(frozen=True)
class Continuation:
    """One more DiT stage on top of a bundle: the stage, the window of training clips it caches."""

    name: str
    stage: Stage
    cache_start: int  # first training-split index of the cache (earlier runs cached clips 0..1999)
    cache_clips: int
    shift: float = 3.0
    data_length: int = 200_000
    seed: int = 0
    # share of the training split's 3-clip chunks that are ambiguous groups (the dataset's default: 0.25)
    ambiguous_fraction: float = 0.25
    cache_dtype: str = "float16"
    # where the training clips' circles lie (``synthetic.LOOP_CENTRES``): "any" for every run before default-r13
    loops: str = "any"
    # share of the ambiguous groups that are loop groups (circle_cw, circle_ccw, still with the same keyframes)
    loop_groups: float = LOOP_GROUPS
    # an ambiguous group's clips are drawn into one batch (the cache shuffled in whole 3-clip chunks) with the
    # same noise, sigma and mode (``CachedFLF2VObjective.share_group_draws``): they then differ in the input
    # only where their clips differ, and the gradient that teaches reading the caption is not lost in noise
    paired_groups: bool = False
    # the text encoder's dropout while it trains jointly (``flow.set_dropout``); None keeps its config's rate
    # (umT5's 0.1, what every run before default-r16 used). Inference runs without it, as Wan's frozen encoder
    # always does, so 0 trains the text path as it is used (docs/training.md, session 17).
    text_dropout: float | None = None
    # the DiT trains on noise levels >= this only (``FLF2VObjective.sigma_min``): the shipped sampler (3 UniPC
    # steps at shift 3) asks the model at 1.0, 0.857 and 0.600 alone, so lower levels cost steps and capacity
    # it never uses at its defaults. 0 (every run before default-r17): Wan's whole shifted range.
    sigma_min: float = 0.0
    # (first step, weight) pairs from step 0 (steps scale with the stage's): the DiT's squared error on the
    # latent cells of the moving shapes (grown by ``object_dilate`` cells) counts ``weight`` times
    # (``CachedFLF2VObjective.object_weight``) from that step on; the cache gets their masks. Empty: 1 throughout.
    object_weights: tuple[tuple[int, float], ...] = ()
    object_dilate: int = 1
    bundle_dtype: str = "float16"
    # indices of the bundle's DiT blocks that each get a new block behind them, starting as the identity
    # (``grow.insert_identity_blocks``): the DiT deepens without forgetting what it computes
    insert_blocks: tuple[int, ...] = ()
    # first the whole VAE (encoder too: the latent space moves and the DiT stage adapts to it), on fresh clips
    vae_steps: int = 0
    vae_lr: float = 5e-4
    vae_seed: int = 3
    # then the VAE's decoder alone on its frozen encoder (latents, and so the DiT, stay valid), on the VAE
    # clips of ``preset`` drawn with ``decoder_seed`` (another seed than the runs before: fresh clips)
    decoder_steps: int = 0
    decoder_lr: float = 5e-4
    decoder_seed: int = 2
    # the decoder's error on the first and last frames (the keyframes) counts this many times
    decoder_endpoint_weight: float = 1.0
    # > 0: the decoder's lr falls linearly to 0 over its last this many steps (scaled with its steps)
    decoder_cooldown: int = 0
    # > 0: the decoder trains on the latents the model (this continuation's DiT) generates for this many
    # training clips from ``generated_start``, against their true frames, in place of encoded crops
    # (``generated.generate_latents``; crops of the same size, each clip ``generated_repeat`` times)
    decoder_generated: int = 0
    generated_start: int = 0
    generated_repeat: int = 16
    # the decoder on generated latents learns the scenery from the true frames and keeps the shapes as it
    # rendered them at the start (``DecoderObjective.anchor``): a decoder trained on the true shapes fades a
    # shape whose place the DiT is unsure of, which loses the captions (docs/training.md, sessions 13 and 21)
    decoder_keep_shapes: bool = False
    # the decoder widened to this base width before its phase (``grow.widen_decoder``: the same output at
    # first, more capacity); None keeps the bundle's
    decoder_dim: int | None = None
    # the decoder shipped: this far along the line from the decoder the phase started with to the one it trained
    # (``blend_states``; 1 ships the trained one). A decoder trained on generated latents decodes an uncertain
    # shape as the mean of its likely places; part of the way keeps most of the PSNR and more of the shape.
    decoder_blend: float = 1.0
    # the parts the DiT stage trains (the DiT and the text and image encoders) shipped this far along the line
    # from the bundle's to the stage's EMA (``blend_states``; 1 ships the trained ones): the mean of two runs'
    # weights, a longer average than the EMA's (docs/training.md, session 22)
    stage_blend: float = 1.0
    preset: str = "default"
    # generation defaults written into the new bundle (steps, guidance, shift, solver), chosen on the val split
    # with bench/sampling_sweep.py; empty keeps the source bundle's
    sampling: tuple[tuple[str, float | int | str], ...] = ()

    def __post_init__(self) -> None:
        check_loops(self.loops, f"continuation {self.name!r}: ")
        check_loop_groups(self.loop_groups, f"continuation {self.name!r}: ")
        if self.paired_groups and self.cache_start % GROUP_SIZE:
            raise ValueError(f"continuation {self.name!r}: paired_groups needs cache_start on a {GROUP_SIZE}-clip "
                             f"chunk boundary (a multiple of {GROUP_SIZE}), got {self.cache_start}")  # fmt: skip
        if self.text_dropout is not None and not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"continuation {self.name!r}: text_dropout must be in [0, 1) or None, "
                             f"got {self.text_dropout}")  # fmt: skip
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"continuation {self.name!r}: sigma_min must be in [0, 1), got {self.sigma_min}")
        allowed = ("steps", "guidance", "shift", "solver", "guidance_steps")
        bad = [k for k, _ in self.sampling if k not in allowed]
        if bad:
            raise ValueError(f"continuation {self.name!r}: sampling keys {bad} not among {allowed}")
        if self.stage.steps < 0 or (self.stage.steps == 0 and (self.object_weights or self.insert_blocks)):
            raise ValueError(f"continuation {self.name!r}: the DiT stage needs steps >= 0 (0: the bundle's DiT "
                             f"as it is, without object_weights or insert_blocks), got {self.stage.steps}")  # fmt: skip
        if not 0 <= self.decoder_cooldown <= self.decoder_steps:
            raise ValueError(f"continuation {self.name!r}: decoder_cooldown must be in 0..decoder_steps "
                             f"({self.decoder_steps}), got {self.decoder_cooldown}")  # fmt: skip
        if self.decoder_generated < 0 or (self.decoder_generated and self.decoder_steps <= 0):
            raise ValueError(f"continuation {self.name!r}: decoder_generated needs decoder_steps > 0 and a count "
                             f">= 0, got {self.decoder_generated}")  # fmt: skip
        if self.decoder_dim is not None and self.decoder_steps <= 0:
            raise ValueError(f"continuation {self.name!r}: a widened decoder (decoder_dim) needs decoder_steps > 0")
        if self.decoder_keep_shapes and not self.decoder_generated:
            raise ValueError(f"continuation {self.name!r}: decoder_keep_shapes needs decoder_generated > 0")
        if not 0.0 < self.decoder_blend <= 1.0 or (self.decoder_blend != 1.0 and self.decoder_steps <= 0):
            raise ValueError(f"continuation {self.name!r}: decoder_blend must be in (0, 1] and below 1 only with "
                             f"decoder_steps > 0, got {self.decoder_blend}")  # fmt: skip
        if not 0.0 < self.stage_blend <= 1.0 or (self.stage_blend != 1.0 and self.stage.steps <= 0):
            raise ValueError(f"continuation {self.name!r}: stage_blend must be in (0, 1] and below 1 only with a "
                             f"DiT stage (steps > 0), got {self.stage_blend}")  # fmt: skip
        if not self.decoder_endpoint_weight > 0:
            raise ValueError(f"continuation {self.name!r}: decoder_endpoint_weight must be > 0, "
                             f"got {self.decoder_endpoint_weight}")  # fmt: skip
        starts, ow = [s for s, _ in self.object_weights], self.object_weights
        if ow and (starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= self.stage.steps
                   or min(w for _, w in ow) < 1.0):  # fmt: skip
            raise ValueError(f"continuation {self.name!r}: object_weights must start at step 0, with increasing "
                             f"steps below the stage's {self.stage.steps} and weights >= 1; got {ow}")  # fmt: skip


def with_sampling(config: ModelConfig, sampling: tuple[tuple[str, float | int | str], ...]) -> ModelConfig:
    """``config`` with its generation defaults overridden by ``sampling`` ((key, value) pairs)."""
    return replace(config, defaults=replace(config.defaults, **dict(sampling))) if sampling else config


# Sampling chosen on the val split for the session-7 model (bench/sampling_sweep.py, docs/training.md session 8):
# 3 UniPC steps without classifier-free guidance beat 25 steps at guidance 4 there on the last frame, the
# in-between PSNR and SSIM and the captions (the first frame tied).
SAMPLING_S8 = (("steps", 3), ("guidance", 1.0), ("shift", 3.0))


def _again(
    base: Continuation, name: str, stage: Mapping[str, float | int] | None = None, **fields: object
) -> Continuation:
    """``base``'s recipe under ``name`` (its DiT stage renamed to match) with ``fields`` changed; ``stage`` changes
    the stage's numbers (steps, lr, batch_size, warmup, cooldown)."""
    stage_name = "stage2-flf-" + name.removeprefix("default-")
    return replace(base, name=name, stage=replace(base.stage, name=stage_name, **(stage or {})), **fields)


# Session 14 on top of default-r11 (not r12: its decoder blurred the shapes): the 12-block DiT trains on
# fresh clips 19000-20999 (after r12's generated window) whose circles lie inward (their centre toward the
# frame's centre, so the first frame shows which way "clockwise" goes; before, the centre lay in any
# direction and the two captions of a circle asked for the same distribution of positions), as in
# session 12 otherwise: shapes at weight 2, 1800 steps with a 700-step cooldown to fit one session at about
# 2.7 s/step. No decoder phase: the DiT does not move the latent space, so r11's widened decoder stays.
_R13 = Continuation(
    "default-r13",
    Stage("stage2-flf-r13", steps=1800, lr=2e-4, modes=FLF, warmup=100, cooldown=700),
    cache_start=19000,
    cache_clips=2000,
    ambiguous_fraction=0.5,
    object_weights=((0, 2.0),),
    object_dilate=0,
    loops="inward",
    sampling=SAMPLING_S8,
)


# Session 15 on top of default-r13: the captions it missed were mostly circle_ccw (5 of 6 test clips went
# clockwise), so more of the same on fresh clips 21000-22999 with twice the loop groups (0.6 of the
# ambiguous groups: circle_cw, circle_ccw and still from the same keyframes, so only the caption tells them
# apart), shapes at weight 2, 1800 steps with a 700-step cooldown, as r13.
_R14 = _again(_R13, "default-r14", cache_start=21000, loop_groups=0.6)


# Session 16 on top of default-r13: r14 on the same clips (21000-22999, loop groups 0.6; its latent cache
# can be reused) with paired groups: a group's clips share a batch and their noise, sigma and mode, so that
# the two senses of a circle, given the same keyframes and noise, differ only in the caption and the
# target. r14 left the model making the same video for "clockwise" and "counterclockwise"; this is the
# A/B test of whether the pairing teaches the word (it did not: docs/training.md, session 16).
_R15 = _again(_R14, "default-r15", paired_groups=True)


# Session 17 on top of default-r13: r15's recipe (paired groups, loop groups 0.6) on fresh clips 24000-25999
# with the text encoder's dropout off (the A/B test against r15). Trained on one loop group alone, r13 learns
# the circle's sense within 100-200 steps, with or without the dropout (docs/training.md, session 17).
# 1800 steps with a 700-step cooldown, as r13 to r15.
_R16 = _again(_R15, "default-r16", cache_start=24000, text_dropout=0.0)


# Session 18 on top of default-r13: r16 on its own clips (24000-25999; its latent cache can be reused) with the
# noise levels cut below 0.5, where the shipped 3-step sampler never asks the model (it evaluates it at 1.0,
# 0.857 and 0.600; 4 steps go down to 0.500). With shift 3 a quarter of every batch was drawn below 0.5, where
# the velocity target is mostly the unpredictable noise. The A/B test against r16.
_R17 = _again(_R16, "default-r17", sigma_min=0.5)


# r17's recipe on default-r19, on the window after r19's (54003-56002); registered below as default-r20 and, with
# its trained parts shipped half-way from r19's, default-r20h (the same stage and run folder)
_R20 = _again(_R17, "default-r20", cache_start=54003)

# r17's recipe on default-r20h, on twice the fresh clips for fewer steps (4000 clips from 57102, after r21's
# generated ones; 1500 steps). Session 23 measured the runs of 1800 steps on 2000 clips (14 epochs) learning
# their window: r19's flow loss 0.059 on its own clips, 0.071 on the next window's. Registered below as
# default-r23 and, shipped half-way from r20h's weights, default-r23h.
_R23 = _again(_R17, "default-r23", {"steps": 1500, "cooldown": 600}, cache_start=57102, cache_clips=4000)

# r23's recipe on default-r23h (the lowest flow loss on unseen clips after session 23) on 6000 fresh clips
# (61104-67103, on a 3-clip chunk boundary; about 28 min of cache), 4 passes; default-r24h below
_R24 = _again(_R23, "default-r24", cache_start=61104, cache_clips=6000)


# Session 21 on top of default-r18: no DiT stage; r12's decoder phase (the decoder trained on the latents the
# model generates, against the true frames) with r18's DiT as the generator, on 1000 fresh clips of r17's
# distribution (56100-57099, after r20's window). r12 did this on r11, whose captions were weaker. r22 is the
# same with the shapes kept as r18's decoder renders them: the decoder learns only the scenery of the generated
# latents from the true frames (r21's generated latents can be reused).
_R21 = _again(
    _R17,
    "default-r21",
    {"steps": 0, "warmup": 0, "cooldown": 0},
    cache_clips=0,
    object_weights=(),
    decoder_steps=1200,
    decoder_seed=12,
    decoder_endpoint_weight=4.0,
    decoder_cooldown=500,
    decoder_generated=1000,
    generated_start=56100,
)

# Session 24 on top of default-r20h: r21's decoder phase on the latents r20h generates at guidance 2 (fresh clips
# 67104-68103, after r24's window), shipped half-way from the starting decoder, with guidance 2 as the bundle's
# default. On val, guidance 2 gave r20h six captions more at seed 0 for 0.04 dB of in-between frames, and r21's
# decoder half-way gave 0.5 dB in-between frames at the cost of captions: the two together kept both
# (docs/training.md, session 24).
SAMPLING_S24 = (("steps", 3), ("guidance", 2.0), ("shift", 3.0))
_R25 = _again(_R21, "default-r25", generated_start=67104, decoder_seed=25, decoder_blend=0.5, sampling=SAMPLING_S24)


CONTINUATIONS: dict[str, Continuation] = {
    # Session 5 on top of the second whole run of the default preset: first-last specialisation goes on
    # (its flow loss was still falling) on 2000 clips it has not seen; fresh AdamW, so a short warmup.
    "default-r3": Continuation(
        "default-r3",
        Stage("stage2-flf-r3", steps=5000, lr=2e-4, modes=FLF, warmup=100),
        cache_start=2000,
        cache_clips=2000,
        decoder_steps=1000,
    ),
    # Session 6 on top of default-r3: the VAE bounded both endpoint and in-between PSNR (24.8 dB held-out
    # reconstruction against a 24.3 dB in-between target), so the whole VAE trains on (26.95 dB after), then
    # the DiT adapts to the moved latent space on 2000 more fresh clips. 56 + 14 + 55 minutes on 2 cores.
    "default-r4": Continuation(
        "default-r4",
        Stage("stage2-flf-r4", steps=3000, lr=2e-4, modes=FLF, warmup=100),
        cache_start=4000,
        cache_clips=2000,
        vae_steps=4000,
    ),
    # Session 7 on top of default-r4: the in-between frames, the last keyframe and the caption are now
    # limited by the DiT (its in-between PSNR gained 0.08 dB while the VAE bound rose 2.2 dB), and every
    # whole-VAE phase moves the latent space the DiT has to re-learn (its loss restarted at 0.43 in r4). So
    # the VAE's encoder stays frozen: a longer DiT stage on clips 6000-7999, with ambiguous groups (same
    # keyframes, different paths: only the caption tells them apart) in half the chunks instead of a
    # quarter, then the decoder alone on fresh crops (seed 4), which leaves the latents as they are.
    "default-r5": Continuation(
        "default-r5",
        Stage("stage2-flf-r5", steps=5000, lr=2e-4, modes=FLF, warmup=100),
        cache_start=6000,
        cache_clips=2000,
        ambiguous_fraction=0.5,
        decoder_steps=1000,
        decoder_seed=4,
    ),
    # Session 8: r5's schedule again on clips 8000-9999 and decoder crops of seed 5, while the DiT's flow
    # loss keeps falling (0.136 to 0.108 over r5's 5000 steps, not flattened); 2500 DiT steps and 500 decoder
    # steps to fit one session on a machine that ran 1.7 s/step (r5: 1.05); the bundle ships the sampling
    # chosen on the val split.
    "default-r6": Continuation(
        "default-r6",
        Stage("stage2-flf-r6", steps=2500, lr=2e-4, modes=FLF, warmup=100),
        cache_start=8000,
        cache_clips=2000,
        ambiguous_fraction=0.5,
        decoder_steps=500,
        decoder_seed=5,
        sampling=SAMPLING_S8,
    ),
    # Session 9: r6's schedule on clips 10000-11999 and decoder crops of seed 6, with two changes.
    # - The moving shapes' latent cells weigh more in the flow loss: on held-out clips they are 5% of the
    #   in-between pixels and carry more of the error than the scenery (bench/inbetween_breakdown.py), and the
    #   model drew them barely better than a crossfade does. At weight 4, step 1500 drew the shapes 0.65 dB
    #   better and the scenery 1.43 dB worse (8 test clips): a loss on PSNR, so from step 1750 the weight is 2.
    # - A cooldown: the lr stays at 2e-4, then falls linearly to 0 over the last 1000 steps (every stage before
    #   ran at a constant lr, its EMA the only averaging of the optimiser's noise). Until the cooldown begins,
    #   the steps can be changed at a checkpoint to fit the session (3500, planned 4000).
    "default-r7": Continuation(
        "default-r7",
        Stage("stage2-flf-r7", steps=3500, lr=2e-4, modes=FLF, warmup=100, cooldown=1000),
        cache_start=10000,
        cache_clips=2000,
        ambiguous_fraction=0.5,
        object_weights=((0, 4.0), (1750, 2.0)),
        object_dilate=0,
        decoder_steps=500,
        decoder_seed=6,
        sampling=SAMPLING_S8,
    ),
    # Session 10 on top of default-r7: the DiT (dim 192, 6 blocks) traded the shapes against the scenery in
    # session 9, as a model at its capacity does, so it grows: a new block behind blocks 1, 3 and 5, each
    # starting as the identity (grow.insert_identity_blocks: the 9-block DiT computes exactly what the 6-block
    # one did) and trained on clips 12000-13999 with the shapes at weight 2 and a cooldown over the last
    # 1000 steps; then 300 decoder steps on crops of seed 7.
    "default-r8": Continuation(
        "default-r8",
        Stage("stage2-flf-r8", steps=3000, lr=2e-4, modes=FLF, warmup=100, cooldown=1000),
        cache_start=12000,
        cache_clips=2000,
        ambiguous_fraction=0.5,
        object_weights=((0, 2.0),),
        object_dilate=0,
        insert_blocks=(1, 3, 5),
        decoder_steps=300,
        decoder_seed=7,
        sampling=SAMPLING_S8,
    ),
    # Session 11 on top of default-r8: depth paid on both parts of the picture in session 10 (shapes +0.23 dB,
    # scenery +0.67 dB on 8 test clips), so the DiT grows again, 9 to 12 blocks (an identity block behind
    # blocks 2, 5 and 8), on clips 14000-15999; 1600 steps with a 600-step cooldown to fit one session at
    # 2.7-2.9 s/step on 2 cores (planned: 2000 and 700; cut at the step-250 checkpoint, before the cooldown);
    # then 300 decoder steps on crops of seed 8 with the keyframes' error counted 4 times
    # (16 val clips through the VAE, against the same 300 steps at weight 1: first frame +0.17 dB, last +0.02,
    # mean -0.01).
    "default-r9": Continuation(
        "default-r9",
        Stage("stage2-flf-r9", steps=1600, lr=2e-4, modes=FLF, warmup=100, cooldown=600),
        cache_start=14000,
        cache_clips=2000,
        ambiguous_fraction=0.5,
        object_weights=((0, 2.0),),
        object_dilate=0,
        insert_blocks=(2, 5, 8),
        decoder_steps=300,
        decoder_seed=8,
        decoder_endpoint_weight=4.0,
        sampling=SAMPLING_S8,
    ),
    # Session 12 on top of default-r9: the 12-block DiT trains on, without growing, on fresh clips 16000-17999
    # (its flow loss was still falling when session 11's cooldown ended: 0.140 to 0.123 over the stage); 1800
    # steps with a 700-step cooldown to fit one session at about 2.7 s/step; then 300 decoder steps on crops of
    # seed 9 with the keyframes at weight 4, as in session 11.
    "default-r10": Continuation(
        "default-r10",
        Stage("stage2-flf-r10", steps=1800, lr=2e-4, modes=FLF, warmup=100, cooldown=700),
        cache_start=16000,
        cache_clips=2000,
        ambiguous_fraction=0.5,
        object_weights=((0, 2.0),),
        object_dilate=0,
        decoder_steps=300,
        decoder_seed=9,
        decoder_endpoint_weight=4.0,
        sampling=SAMPLING_S8,
    ),
    # Session 13 on top of default-r10: the keyframes are capped by the VAE (the decoder alone reconstructs
    # held-out first frames at 26.9 dB against the 28 dB target) and 300-step decoder phases had stopped
    # moving its mean (sessions 11-12: +0.01 dB), so the decoder is at its capacity at base width 16. It
    # widens to 24 (grow.widen_decoder: the same output at first; 1.4M -> 3.2M parameters, the bundle stays
    # under 25 MB) and trains on crops of seed 10 with the keyframes at weight 4. Every decoder phase before
    # ended at a constant lr of 5e-4 on batches of 4 (its loss flat and noisy, its EMA 100 steps long), so the
    # lr now falls to 0 over the last 1000 steps (set at the step-750 checkpoint). The DiT, its encoders and
    # the VAE's encoder stay as they are (no DiT stage), so the latents the DiT learned are untouched.
    "default-r11": Continuation(
        "default-r11",
        Stage("stage2-flf-r11", steps=0, lr=2e-4, modes=FLF),
        cache_start=18000,
        cache_clips=0,
        decoder_steps=2400,
        decoder_seed=10,
        decoder_endpoint_weight=4.0,
        decoder_dim=24,
        decoder_cooldown=1000,
        sampling=SAMPLING_S8,
    ),
    # Session 13 on top of default-r11: the decoder learns the frames for the latents it is given at generation
    # time. Trained on encoded clips it decodes the DiT's latents as if they were encodings, while they miss
    # them in ways the DiT repeats (mid-clip shapes blurred between paths, a last latent frame seen through
    # the mask). So 1000 fresh training clips (18000-18999, r11's unused window) are generated by the model
    # itself (its shipped sampling, seed = clip index, no decode) and the decoder trains on (generated latent,
    # true clip) crops, keyframes at weight 4, cooling down over its last 500 of 1200 steps. Nothing else moves.
    "default-r12": Continuation(
        "default-r12",
        Stage("stage2-flf-r12", steps=0, lr=2e-4, modes=FLF),
        cache_start=18000,
        cache_clips=0,
        decoder_steps=1200,
        decoder_seed=11,
        decoder_endpoint_weight=4.0,
        decoder_cooldown=500,
        decoder_generated=1000,
        generated_start=18000,
        sampling=SAMPLING_S8,
    ),
    "default-r13": _R13,
    "default-r14": _R14,
    "default-r15": _R15,
    "default-r16": _R16,
    "default-r17": _R17,
    # Session 19 on top of default-r17: its recipe again on the next fresh window (26001-28000, on a 3-clip chunk
    # boundary): more steps on new clips for the run trained at the sampler's noise levels only.
    "default-r18": _again(_R17, "default-r18", cache_start=26001),
    # For a lent GPU (docs/training.md, session 19): r17's recipe on the shipped default-r13 with a batch 8 times
    # as large and a 24000-clip window of fresh clips (28002-52001), for as many steps as a time budget allows
    # (`--time-budget`; 20000 is the most, the cooldown is 30% of what runs). The lr is twice that of the
    # batch-16 runs (less than linear scaling: AdamW, and the run starts from trained weights).
    "default-g1": _again(
        _R17,
        "default-g1",
        {"steps": 20000, "lr": 4e-4, "batch_size": 128, "warmup": 200, "cooldown": 6000},
        cache_start=28002,
        cache_clips=24000,
    ),
    # Session 20 on top of default-r18 (measured, not shipped: val +0.16 dB in-between, test the same): the same
    # recipe on the window after default-g1's (52002-54001), so that a GPU run of g1 and this CPU run never share clips.
    "default-r19": _again(_R17, "default-r19", cache_start=52002),
    # Next on top of default-r19 (session 20): the same recipe on the window after r19's (54003-56002, on a
    # 3-clip chunk boundary).
    "default-r20": _R20,
    # Session 22: r20 with its trained parts shipped half-way from r19's (the mean of the two runs' weights; the
    # same stage, so r20's run folder is reused as it is: `--continuation default-r20h --out R20`)
    "default-r20h": replace(_R20, name="default-r20h", stage_blend=0.5),
    # Session 21 on top of default-r18 (both measured, not shipped: docs/training.md, session 21).
    "default-r21": _R21,
    "default-r22": _again(_R21, "default-r22", decoder_keep_shapes=True),
    # Session 23 on top of default-r20h: r17's recipe on 4000 fresh clips (57102-61101), 1500 steps
    "default-r23": _R23,
    # r23 with its trained parts shipped half-way from r20h's (the same stage and run folder, as r20h); both
    # measured, not shipped (docs/training.md, session 23)
    "default-r23h": replace(_R23, name="default-r23h", stage_blend=0.5),
    # Session 24 on top of default-r23h: r23's recipe on 6000 fresh clips (61104-67103)
    "default-r24": _R24,
    # r24 with its trained parts shipped half-way from r23h's (the same stage and run folder, as r20h and r23h)
    "default-r24h": replace(_R24, name="default-r24h", stage_blend=0.5),
    "default-r25": _R25,
    # the same path in seconds, for tests
    "smoke": Continuation(
        "smoke",
        Stage("stage-smoke", steps=2, lr=1e-3, modes=FLF, size=(32, 32), frames=5, batch_size=2),
        cache_start=8,
        cache_clips=4,
        data_length=64,
        decoder_steps=1,
        preset="smoke",
    ),
}


class Window(Dataset):
    """Items ``start .. start + length - 1`` of a dataset, as items 0 .. length - 1."""

    def __init__(self, data: SyntheticVideos, start: int, length: int) -> None:
        if start < 0 or length < 1 or start + length > len(data):
            raise InputError(f"window [{start}, {start + length}) does not fit a dataset of {len(data)} items")
        self.data, self.start, self.length = data, start, length
        self.split, self.frames, self.size = data.split, data.frames, data.size  # what the cache records
        self.ambiguous_fraction, self.loops, self.loop_groups = data.ambiguous_fraction, data.loops, data.loop_groups

    def __len__(self) -> int:
        return self.length

    def _position(self, index: int) -> int:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.start + index

    def __getitem__(self, index: int) -> dict:
        return self.data[self._position(index)]

    def scene(self, index: int) -> Scene:
        return self.data.scene(self._position(index))


def _train_vae(
    c: Continuation,
    cfg: VAEConfig,
    state: dict[str, torch.Tensor],
    out: Path,
    steps: int,
    dev: torch.device,
    decoder_only: bool,
    data: Dataset | None = None,
) -> dict[str, torch.Tensor]:
    """Train the VAE ``state`` (whole, or its decoder on the frozen encoder) into ``out/vae`` or
    ``out/vae-decoder`` (resumes; skipped when done); returns its EMA weights."""
    run = out / ("vae-decoder" if decoder_only else "vae")
    lr, seed = (c.decoder_lr, c.decoder_seed) if decoder_only else (c.vae_lr, c.vae_seed)
    p = PRESETS[c.preset]
    ew = c.decoder_endpoint_weight if decoder_only else 1.0
    cooldown = round(c.decoder_cooldown * steps / c.decoder_steps) if decoder_only and c.decoder_cooldown else 0
    train_vae_run(p, cfg, state, run, steps=steps, lr=lr, seed=seed, decoder_only=decoder_only, device=dev,
                  endpoint_weight=ew, cooldown=cooldown, data=data,
                  keep_shapes=decoder_only and c.decoder_keep_shapes)  # fmt: skip
    return load_ema(run, "vae")


def blend_states(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """``start + t * (end - start)`` for every floating tensor (weight-space interpolation of two states of one
    model; other tensors are taken from ``end``). The keys and shapes must match."""
    if start.keys() != end.keys():
        raise ValueError(f"cannot blend states with different keys: {sorted(start.keys() ^ end.keys())[:5]}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"blend fraction must be in [0, 1], got {t}")
    if t == 1.0:
        return dict(end)  # exactly the trained state
    out = {}
    for k, b in end.items():
        a = start[k]
        if a.shape != b.shape:
            raise ValueError(f"cannot blend {k!r}: shapes {tuple(a.shape)} and {tuple(b.shape)}")
        out[k] = torch.lerp(a.to(b.dtype), b, t) if b.is_floating_point() else b
    return out


def stage_clips(c: Continuation) -> SyntheticVideos:
    """The clips of the continuation's DiT stage: its cache window and the VAE's latent statistics come from them."""
    return SyntheticVideos("train", length=c.data_length, frames=c.stage.frames, size=c.stage.size,
                           ambiguous_fraction=c.ambiguous_fraction, loops=c.loops,
                           loop_groups=c.loop_groups)  # fmt: skip


def with_latent_stats(
    c: Continuation, config: ModelConfig, vae_state: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> ModelConfig:
    """``config`` with the latent statistics of the VAE ``vae_state`` measured on the stage's clips (the same
    numbers on every call: ``bench/ckpt_bundle.py`` rebuilds a running continuation's config with it)."""
    stats_batches = PRESETS[c.preset].stats_batches
    return replace(config, vae=measured_vae_config(config.vae, vae_state, stage_clips(c), stats_batches, device))


def _generated_clips(
    c: Continuation, config: ModelConfig, modules: dict[str, torch.nn.Module], data: SyntheticVideos,
    tok_dir: Path, out: Path, dev: torch.device,
) -> GeneratedClips:  # fmt: skip
    """The decoder's training pairs: the latents the model as it stands (DiT, encoders, VAE encoder, the
    sampling it ships with) generates for ``c.decoder_generated`` fresh clips of ``data``, with their frames."""
    gen_dir = out / "generated"
    if not is_done(gen_dir):
        gen_dir.mkdir(parents=True, exist_ok=True)
        generator = gen_dir / "generator.safetensors"  # the model that generates them, as a bundle loads
        if not generator.is_file():
            save_bundle(generator, config, modules, tok_dir, getattr(torch, c.bundle_dtype))
        generate_latents(load(generator, device=dev), data, c.generated_start, c.decoder_generated, gen_dir)
        mark_done(gen_dir, {"clips": c.decoder_generated, "start": c.generated_start})
    p, sf = PRESETS[c.preset], config.vae.spatial_factor
    crop = None if p.vae_crop is None else (p.vae_crop[0] // sf, p.vae_crop[1] // sf)
    return GeneratedClips(data, c.generated_start, c.decoder_generated, gen_dir, sf, crop, c.decoder_seed,
                          c.generated_repeat, backdrop=c.decoder_keep_shapes)  # fmt: skip


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


def continue_from_bundle(
    bundle: str | Path,
    name: str,
    out_dir: str | Path,
    device: str = "cpu",
    steps_scale: float = 1.0,
    time_budget: float | None = None,
    workers: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Run continuation ``name`` on ``bundle``'s weights into ``out_dir`` (resumes); returns the new bundle.

    ``time_budget`` (seconds from this call): the DiT stage runs as many steps as fit what is left once its
    latent cache is built (timed on copies of the models, ``seconds_per_step``), at most its own count; the
    warmup stays, the cooldown scales with the steps, so the stage ends cooled down inside the budget. The
    count is recorded (``budget.json``) and a resumed run keeps it. ``workers``: processes that render the
    cache's clips and collate the DiT's batches (for a GPU, whose steps outrun one CPU core's data). ``clock``:
    seconds, for the budget (tests pass their own, so no result depends on the machine's speed)."""
    started = clock()
    if time_budget is not None and not time_budget > 0:
        raise InputError(f"time budget must be positive seconds, got {time_budget}")
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    if name not in CONTINUATIONS:
        raise InputError(f"unknown continuation {name!r}; known: {', '.join(CONTINUATIONS)}")
    bundle = Path(bundle)
    if not bundle.is_file():
        raise InputError(f"--continue-from: no such bundle file: {bundle}")
    c = CONTINUATIONS[name]
    dev = resolve_device(device)
    config, tok_files = read_bundle_metadata(bundle)  # a bad bundle is refused before anything is written
    weights = read_bundle_weights(bundle)
    if c.insert_blocks:
        try:
            dit_cfg, weights["dit"] = insert_identity_blocks(config.dit, weights["dit"], c.insert_blocks)
        except ValueError as e:
            raise InputError(f"continuation {name!r} on {bundle}: {e}") from None
        config = replace(config, dit=dit_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def scaled(n: int) -> int:
        return max(1, round(n * steps_scale))

    steps = scaled(c.stage.steps) if c.stage.steps else 0  # the DiT stage's; 0: the bundle's DiT as it is
    budget_file = out / "budget.json"
    if steps and budget_file.is_file():  # a resumed time-budgeted run keeps the length it chose
        steps = json.loads(budget_file.read_text())["steps"]
    phase_steps = {"vae": scaled(c.vae_steps) if c.vae_steps else 0, "dit": steps,
                   "decoder": scaled(c.decoder_steps) if c.decoder_steps else 0}  # fmt: skip
    record = {"continuation": asdict(c), "steps": steps, "phase_steps": phase_steps, "from": bundle.name}
    atomic_write_text(out / "continuation.json", json.dumps(record, indent=2))
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        materialize_tokenizer(tok_files, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    # the stage's clips: the VAE's latent statistics and the DiT's cache come from them
    data = stage_clips(c)

    # The whole VAE first, when this continuation trains it: its latent space moves, so the statistics
    # are measured again, and the DiT adapts to it in the stage below.
    vae_state = weights["vae"]
    if c.vae_steps > 0:
        vae_state = _train_vae(c, config.vae, vae_state, out, phase_steps["vae"], dev, decoder_only=False)
        config = with_latent_stats(c, config, vae_state, dev)
    # Then frozen: the DiT learns (or learned) its latent space.
    vae = WanVAE(config.vae)
    vae.load_state_dict(vae_state)
    vae.to(dev).eval().requires_grad_(False)
    parts = {"dit": WanDiT(config.dit), "text": TextEncoder(config.text, tokenizer),
             "image": ImageEncoder(config.image)}  # fmt: skip
    targets = {"dit": parts["dit"], "text": parts["text"].model, "image": parts["image"].model}
    for part, module in targets.items():
        module.load_state_dict(weights[part])
    for m in parts.values():
        m.to(dev).requires_grad_(True)
    if c.text_dropout is not None:
        set_dropout(parts["text"], c.text_dropout)

    run = out / c.stage.name
    if steps and not is_done(run):
        window = Window(data, c.cache_start, c.cache_clips)
        cache_dir = out / "latents"
        modes = sorted(m for m, w in c.stage.modes.items() if w > 0)
        if not is_done(cache_dir):
            encode_batch = 64 if dev.type == "cuda" else 8  # the same cache; a GPU encodes big batches faster
            build_latent_cache(vae, window, c.cache_clips, cache_dir, modes, batch_size=encode_batch,
                               dtype=getattr(torch, c.cache_dtype), workers=workers)  # fmt: skip
            mark_done(cache_dir, {"clips": c.cache_clips, "start": c.cache_start, "modes": modes})
        segments = c.object_weights or ((0, 1.0),)
        if any(w != 1.0 for _, w in segments) and not (cache_dir / "objects.pt").is_file():
            build_object_masks(window, cache_dir, vae.cfg.temporal_factor, vae.cfg.spatial_factor, c.object_dilate,
                               workers)  # fmt: skip

        def train_config(steps: int) -> TrainConfig:
            # paired groups: the cache starts on a chunk boundary (checked), so its 3-item blocks are chunks
            return replace(stage_train_config(c.stage, steps, c.seed, run), num_workers=workers,
                           keep_together=GROUP_SIZE if c.paired_groups else 1)  # fmt: skip

        def objective(weight: float) -> CachedFLF2VObjective:
            return CachedFLF2VObjective(shift=c.shift, modes=c.stage.modes, caption_dropout=c.stage.caption_dropout,
                                        object_weight=weight, share_group_draws=c.paired_groups,
                                        sigma_min=c.sigma_min)  # fmt: skip

        clips: Dataset = CachedClips(cache_dir, temporal=vae.cfg.temporal_factor)
        if c.paired_groups:
            clips = GroupedClips(clips, [data.group_of(c.cache_start + i) for i in range(c.cache_clips)])
        tc = train_config(steps)
        if time_budget is not None and not budget_file.is_file():
            per_step = seconds_per_step(parts, objective(segments[0][1]), clips, tc)
            left = time_budget - (clock() - started)
            steps = budget_steps(left, per_step, steps)
            info = {"time_budget_s": time_budget, "seconds_left": round(left, 1),
                    "seconds_per_step": round(per_step, 4), "steps": steps, "of": tc.steps}  # fmt: skip
            atomic_write_text(budget_file, json.dumps(info, indent=2))
            print(f"time budget: {left:.0f} s left at {per_step:.3f} s/step: {steps} of {tc.steps} steps",
                  file=sys.stderr, flush=True)  # fmt: skip
            tc = train_config(steps)
            record["steps"] = phase_steps["dit"] = steps
            atomic_write_text(out / "continuation.json", json.dumps(record, indent=2))
        trainer = Trainer(parts, objective(segments[0][1]), clips, tc)
        # one run per weight segment; the first resumes from the latest checkpoint, which may lie past its end
        ends = [round(s * steps / c.stage.steps) for s, _ in segments[1:]] + [steps]
        for (_, weight), end in zip(segments, ends):
            trainer.loss_fn = objective(weight)
            trainer.run(stop_at=end)
        mark_done(run, {"steps": steps})

    if steps:
        for part, module in parts.items():  # the EMA holds the wrappers' names (text.model.*, image.model.*)
            module.load_state_dict(load_ema(run, part))
            if c.stage_blend != 1.0:
                targets[part].load_state_dict(blend_states(weights[part], targets[part].state_dict(), c.stage_blend))
    modules = {"dit": parts["dit"], "vae": vae, "text": targets["text"], "image": targets["image"]}
    config = with_sampling(config, c.sampling)
    if c.decoder_steps > 0:
        dec_data = _generated_clips(c, config, modules, data, tok_dir, out, dev) if c.decoder_generated else None
        if c.decoder_dim is not None:  # same output at first; the encoder, so the latents, as they were
            vae_cfg, vae_state = widen_decoder(config.vae, vae_state, c.decoder_dim, seed=c.decoder_seed)
            config = replace(config, vae=vae_cfg)
            vae = modules["vae"] = WanVAE(vae_cfg).to(dev).eval().requires_grad_(False)
        state = _train_vae(c, config.vae, vae_state, out, phase_steps["decoder"], dev, True, dec_data)
        vae.load_state_dict(blend_states(vae_state, state, c.decoder_blend))
    # Bundles written before train_preset recorded its own entry carry none: the only such bundle shipped
    # was run 2 of the default preset (docs/training.md); anything else is named as unknown.
    lineage = read_bundle_lineage(bundle) or [{"preset": None, "note": "no lineage recorded in " + bundle.name}]
    lineage.append(record)
    return save_bundle(out / "model.safetensors", config, modules, tok_dir, getattr(torch, c.bundle_dtype), lineage)
