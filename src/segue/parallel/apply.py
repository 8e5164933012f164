"""Turn a loaded pipeline into one rank of a parallel run: mesh, sequence parallel, FSDP, CFG, VAE."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..dist import ParallelConfig, ParallelState, init_parallel
from ..loader import load
from ..pipeline import Pipeline
from ..placement.tensors import resolve_dtype

log = logging.getLogger("segue")


def parallelize(pipe: Pipeline, state: ParallelState) -> Pipeline:
    """Apply the layout of ``state`` to a pipeline whose weights are already on ``state.device``
    (or on the CPU when FSDP will shard them there)."""
    pc = state.config
    if pc.fsdp:
        from .fsdp import shard_dit, shard_text_encoder

        shard_dit(pipe.dit, state)
        shard_text_encoder(pipe.text_encoder, state)
    if pc.sp_size > 1:
        from .sequence import apply_sequence_parallel

        apply_sequence_parallel(pipe.dit, state)
    if pc.cfg:
        from .cfg import CFGParallel

        pipe.cfg_strategy = CFGParallel(state)
    if state.world_size > 1:
        from .vae import video_decoder

        pipe.video_decoder = video_decoder(pipe.vae, state)
    pipe.parallel = state
    return pipe


def load_parallel(
    path: str | Path | None, pc: ParallelConfig, device: str | torch.device | None = None, dtype=None
) -> Pipeline:
    """``segue.load`` for a torchrun job: join the process group, load, place, parallelize."""
    state = init_parallel(pc, device)
    dev = state.device
    run_dtype = resolve_dtype(dtype, dev)
    if pc.fsdp:
        # Full weights in CPU memory first; sharding then moves only this rank's shards to the device.
        pipe = load(path, device="cpu", dtype=run_dtype)
        for m in (pipe.vae, pipe.image_encoder):
            if m is not None:
                m.to(dev)
        pipe.device = dev
    else:
        pipe = load(path, device=dev, dtype=run_dtype)
    log.info("rank %d/%d on %s: %s", state.rank, state.world_size, dev, pc)
    return parallelize(pipe, state)
