"""FSDP2 weight sharding for inference: the DiT and the umT5 encoder split over all ranks.

Each transformer block is one FSDP group, and so is each other top-level part (embeddings, head),
all over a 1-D mesh of the whole world. A group's weights are all-gathered just before its forward
and freed right after it (``reshard_after_forward=True``, the root included), so a rank holds its
1/world slice of every weight plus the full weights of the group that is running: for the 14B DiT one
block (~400M parameters, ~0.8 GB in bf16) on top of the shards. Nothing needs gradients: the models are
put in eval mode with ``requires_grad_(False)`` and FSDP registers no backward machinery.

Mixed dtypes. The DiT's dtype policy (``apply_dtype_policy``) leaves bf16 matmul weights and fp32
modulation/norms inside one block. FSDP2 (checked on torch 2.13) accepts that as long as no
parameter of the group requires grad: its "uniform original dtype" check only looks at trainable
parameters, and when a group's all-gather inputs have different dtypes it gathers their raw bytes
(one uint8 all-gather) and views each parameter back in its own dtype. The gather is bit-exact, so a
sharded mixed-dtype model computes exactly what the unsharded one does. Hence ``requires_grad_(False)``
must come before the first forward (``shard_dit`` does it); no regrouping or replication is needed.

Device placement. Pass a model whose weights sit on the CPU (e.g. ``segue.load(..., device="cpu")``)
or on the device: ``fully_shard`` moves one group at a time to ``state.device`` and keeps only this
rank's slice there, so the device never holds more than one full group during sharding. Alternatively
build the model on the meta device, shard it, and fill the shards with ``load_sharded_`` from a
(memory-mapped) state dict: then no rank ever materialises the full model.

Sequence parallel composes in either order: it swaps ``self_attn.attention`` (a plain attribute,
not a parameter, untouched by FSDP) and adds hooks that only reshape activations. FSDP registers its
unshard as a *prepended* forward pre-hook and its reshard as an appended forward hook, so parameters
are gathered before any other pre-hook runs and freed after the hooks registered before sharding.
Every rank must call the forward in lockstep (the all-gathers are collectives over the world), with
the same number of block calls.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..dist import ParallelState
from ..errors import CheckpointError
from ..weights import check_keys

try:  # public since torch 2.6
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.5
    from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch 2.5
    from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]


def fsdp_mesh(state: ParallelState):
    """A 1-D DeviceMesh over the world group on ``state.device``'s type (no new process group)."""
    from torch.distributed.device_mesh import DeviceMesh

    group = state.world_group or dist.group.WORLD
    return DeviceMesh.from_group(group, state.device.type, mesh_dim_names=("fsdp",))


def _is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def placement_kw(world: int) -> dict:
    """Shard on the first dim that splits evenly over ``world``, dim 0 (padded) when none does.

    FSDP pads an uneven dim 0 to equal rows per rank, so a [1, 6, C] modulation or [1, 514, C]
    position table would sit whole on every rank; sharding them along C avoids that.
    """
    if "shard_placement_fn" not in inspect.signature(fully_shard).parameters:  # torch 2.5
        return {}

    def place(p: nn.Parameter) -> Shard | None:
        if p.ndim == 0 or p.shape[0] % world == 0:
            return None  # the default, Shard(0)
        even = [d for d in range(1, p.ndim) if p.shape[d] % world == 0]
        return Shard(even[0]) if even else None

    return {"shard_placement_fn": place}


def shard_module(
    root: nn.Module,
    blocks: Iterable[nn.Module],
    state: ParallelState,
    *,
    others: Iterable[nn.Module] = (),
    prefetch: bool = False,
) -> nn.Module:
    """fully_shard each of ``blocks`` and ``others``, then ``root`` (whatever is left), for inference.

    ``prefetch`` gathers block i+1 while block i runs: overlaps communication with compute at the
    price of a second block of full weights in memory. ``others`` are extra groups outside the chain.
    """
    root.eval().requires_grad_(False)  # FSDP2 only accepts mixed dtypes in a group without grads
    if state.world_size == 1:  # nothing to shard: place it (a meta model waits for load_sharded_)
        return root if any(p.is_meta for p in root.parameters()) else root.to(state.device)
    if _is_sharded(root):
        raise ValueError(f"{type(root).__name__} is already sharded")
    mesh = fsdp_mesh(state)
    blocks = list(blocks)
    for m in [*others, *blocks]:
        fully_shard(m, mesh=mesh, reshard_after_forward=True, **placement_kw(state.world_size))
    # The root would keep its weights gathered after forward by default (a training heuristic).
    fully_shard(root, mesh=mesh, reshard_after_forward=True, **placement_kw(state.world_size))
    if prefetch:
        for block, nxt in zip(blocks, blocks[1:]):
            block.set_modules_to_forward_prefetch([nxt])
    return root


def shard_dit(dit: nn.Module, state: ParallelState, *, prefetch: bool = False) -> nn.Module:
    """Shard a WanDiT over all ranks: one group per block and one per other top-level part.

    The parts outside the blocks (patch/text/time embeddings, time projection, head, image embedding;
    ~2% of the weights, the fp32 time projection alone 157M parameters at 14B) are groups of their own
    rather than one root group, so each is gathered only while it runs, not for the whole forward.
    """
    others = [m for name, m in dit.named_children() if name != "blocks" and any(True for _ in m.parameters())]
    return shard_module(dit, dit.blocks, state, others=others, prefetch=prefetch)


def shard_text_encoder(enc: nn.Module, state: ParallelState, *, prefetch: bool = False) -> nn.Module:
    """Shard a TextEncoder's umT5 over all ranks: one group per block, one for the token embedding,
    the root for the rest (the final norm). Returns ``enc`` (its ``.model`` is sharded in place).

    The embedding (~1B of the 5.7B parameters) gets its own group so it is gathered only for the
    lookup, not for the whole forward. umT5 ties ``shared`` and ``encoder.embed_tokens`` (two modules,
    one Parameter); FSDP would shard the two names as separate parameters if they stayed in different
    groups, so the encoder's module is pointed at ``shared`` first: one module, one sharded tensor.
    """
    model = enc.model
    stack = model.encoder
    if state.world_size > 1 and not _is_sharded(model):
        embeds = [model.shared]
        if stack.embed_tokens is not model.shared:
            if stack.embed_tokens.weight is model.shared.weight:
                stack.embed_tokens = model.shared  # tied: make it one module
            else:
                embeds.append(stack.embed_tokens)  # untied: `shared` is unused, both stay sharded
    else:
        embeds = []
    shard_module(model, stack.block, state, others=embeds, prefetch=prefetch)
    enc.eval().requires_grad_(False)
    return enc


def _shard_dim(p: DTensor) -> int:
    (placement,) = p.placements
    return placement.dim


# ---------------------------------------------------------------------------------------------
# Loading into a model sharded on the meta device.


@torch.no_grad()
def load_sharded_(
    module: nn.Module, tensors: Mapping[str, Tensor], device: torch.device | str, component: str = "model"
) -> nn.Module:
    """Fill a (meta-built, sharded) module from full tensors: each rank copies only its own rows.

    ``tensors`` maps every state-dict key to a full CPU tensor; it is only indexed, never copied
    whole, so memory-mapped tensors (``torch.load(mmap=True)``) are read only where this rank's slice
    lies. Parameters keep the dtype the module gave them (cast on copy). Keys and shapes are checked
    first. Works on an unsharded module too (every parameter copied whole).
    """
    check_keys(module, tensors, component)
    meta_buffers = {name for name, b in module.named_buffers() if b.is_meta}
    if meta_buffers or any(p.is_meta for p in module.parameters()):
        module.to_empty(device=device)
    for name, p in module.named_parameters():
        full = tensors[name]
        if isinstance(p, DTensor):
            local = p.to_local()  # this rank's unpadded slice, a view into FSDP's shard storage
            if local.numel() > 0:
                dim, n, rank = _shard_dim(p), p.device_mesh.size(), p.device_mesh.get_local_rank()
                start = rank * math.ceil(full.shape[dim] / n)  # FSDP's torch.chunk layout
                local.copy_(full.narrow(dim, start, local.shape[dim]))
        else:
            p.copy_(full)
    for name, b in module.named_buffers():
        if name in tensors:
            b.copy_(tensors[name])
        elif name in meta_buffers:  # a non-persistent buffer: nothing to restore it from
            raise CheckpointError(f"{component}: buffer {name} was on meta and is not in the state dict")
    return module


# ---------------------------------------------------------------------------------------------
# Accounting.


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage this rank holds: its (padded) shards, and whole unsharded params."""
    total = 0
    for p in module.parameters():
        if isinstance(p, DTensor):
            dim, n = _shard_dim(p), p.device_mesh.size()
            # FSDP pads an uneven dim to the same size on every rank
            total += math.ceil(p.shape[dim] / n) * p.numel() // p.shape[dim] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def full_param_bytes(module: nn.Module) -> int:
    """Bytes of all parameters at their global sizes (sharded or not)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
