"""Parallelism applied from outside the model code: sequence parallel (Ulysses, ring), CFG parallel,
FSDP2 sharding and spatially split VAE decoding, over a torchrun process group."""

from ..dist import ParallelConfig, ParallelState, init_parallel, layout

__all__ = ["ParallelConfig", "ParallelState", "init_parallel", "layout"]
