"""Process groups: joining a torchrun job, and the layout of a parallel run (which ranks share what).

``init_parallel(config)`` joins the job and builds the groups of a parallel generation;
``init_data_parallel()`` those of a training run (every rank a replica). Both join through
``join_process_group``, the one place that picks the backend and this rank's device.

A run of ``world = cfg * ring * ulysses`` processes (torchrun) is laid out on a 3-D device mesh
``(cfg, ring, ulysses)``; rank = (c * ring + r) * ulysses + u, so Ulysses groups are runs of
neighbouring ranks (the all-to-all stays inside a machine when it can). The token sequence is split
over the ``sp = ring * ulysses`` ranks of one CFG half, sequence-parallel rank ``r * ulysses + u``
holding the r*ulysses+u-th contiguous chunk. FSDP shards weights over all ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .errors import InputError


@dataclass(frozen=True)
class ParallelConfig:
    """What to parallelise. ``reference_padding`` keeps the reference's unmasked padded keys."""

    ulysses: int = 1
    ring: int = 1
    cfg: bool = False
    fsdp: bool = False
    vae: bool = True
    reference_padding: bool = False

    def __post_init__(self) -> None:
        if self.ulysses < 1 or self.ring < 1:
            raise InputError(f"--ulysses and --ring must be >= 1, got {self.ulysses} and {self.ring}")

    @property
    def world_size(self) -> int:
        return (2 if self.cfg else 1) * self.ring * self.ulysses

    @property
    def sp_size(self) -> int:
        return self.ring * self.ulysses


@dataclass
class ParallelState:
    """This rank's place in the mesh and the process groups it talks over."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    cfg_rank: int  # 0: conditional half, 1: unconditional half
    ring_rank: int
    ulysses_rank: int
    world_group: ProcessGroup | None = None
    cfg_group: ProcessGroup | None = None  # the 2 ranks with the same sequence chunk
    sp_group: ProcessGroup | None = None  # ring * ulysses ranks of one CFG half
    ring_group: ProcessGroup | None = None
    ulysses_group: ProcessGroup | None = None
    mesh: object | None = field(default=None, repr=False)  # torch DeviceMesh (replica, cfg, ring, ulysses)

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.config.ulysses + self.ulysses_rank

    @property
    def sp_size(self) -> int:
        return self.config.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def layout(rank: int, pc: ParallelConfig) -> tuple[int, int, int]:
    """(cfg, ring, ulysses) coordinates of ``rank``."""
    u = rank % pc.ulysses
    r = (rank // pc.ulysses) % pc.ring
    c = (rank // (pc.ulysses * pc.ring)) % (2 if pc.cfg else 1)
    return c, r, u


def _groups(pc: ParallelConfig, world: int, rank: int) -> dict[str, ProcessGroup]:
    """Create every group on every rank in the same order (new_group is collective); keep ours.

    With FSDP the world may hold several replicas of the layout (same work, weights sharded over
    all of them); the groups stay inside one replica."""
    coords = [(q // pc.world_size, *layout(q, pc)) for q in range(world)]  # (replica, cfg, ring, ulysses)
    mine = coords[rank]
    keys = {
        "cfg_group": lambda c: (c[0], c[2], c[3]),
        "sp_group": lambda c: (c[0], c[1]),
        "ring_group": lambda c: (c[0], c[1], c[3]),
        "ulysses_group": lambda c: (c[0], c[1], c[2]),
    }
    out: dict[str, ProcessGroup] = {}
    for name, key in keys.items():
        buckets: dict[tuple, list[int]] = {}
        for q, c in enumerate(coords):
            buckets.setdefault(key(c), []).append(q)
        for k in sorted(buckets):
            g = dist.new_group(buckets[k])
            if k == key(mine):
                out[name] = g
    return out


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_process_group(device: str | torch.device | None = None) -> torch.device:
    """Join the torchrun process group (env://; NCCL for CUDA, gloo otherwise) once, and return this
    rank's device: ``device``, or ``cuda:LOCAL_RANK`` where there is a GPU, else the CPU."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and str(device or "cuda").startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_parallel(pc: ParallelConfig, device: str | torch.device | None = None) -> ParallelState:
    """Join the torchrun process group (env://) and lay the ranks out; checks the world size.

    On one process without torchrun this returns a trivial state (no groups) when the config asks
    for nothing parallel, so the same code path serves both.
    """
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed")
    if not launched():
        if pc.world_size != 1:
            raise InputError(
                f"this layout needs {pc.world_size} processes: start it with "
                f"torchrun --nproc_per_node={pc.world_size} -m segue generate ..."
            )
        dev = torch.device(device or "cpu")
        return ParallelState(pc, 0, 1, dev, 0, 0, 0)
    dev = join_process_group(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != pc.world_size and not (pc.fsdp and world % pc.world_size == 0):
        raise InputError(
            f"{world} processes started, but the layout needs (2 if --cfg-parallel else 1) x ring {pc.ring} x "
            f"ulysses {pc.ulysses} = {pc.world_size}" + (" (or, with --fsdp, a multiple of it)" if pc.fsdp else "")
        )
    c, r, u = layout(rank, pc)
    groups = _groups(pc, world, rank)
    mesh = None
    try:
        from torch.distributed.device_mesh import init_device_mesh

        shape = (world // pc.world_size, 2 if pc.cfg else 1, pc.ring, pc.ulysses)
        mesh = init_device_mesh(dev.type, shape, mesh_dim_names=("replica", "cfg", "ring", "ulysses"))
    except Exception:  # the mesh is a convenience for FSDP; the explicit groups are what we use
        mesh = None
    return ParallelState(pc, rank, world, dev, c, r, u, dist.group.WORLD, mesh=mesh, **groups)


def init_data_parallel(fsdp: bool = False, device: str | torch.device | None = None) -> ParallelState:
    """The ParallelState of a data-parallel run (every rank a replica) under torchrun; one process
    without torchrun gives a trivial state. ``fsdp`` shards the trainable parts with FSDP2."""
    if fsdp or not launched():
        return init_parallel(ParallelConfig(fsdp=fsdp), device)
    dev = join_process_group(device)
    return ParallelState(ParallelConfig(), dist.get_rank(), dist.get_world_size(), dev, 0, 0, 0, dist.group.WORLD)
