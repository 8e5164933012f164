"""The generic training loop: AdamW, warmup + constant/cosine, clipping, EMA, bf16, logs, exact resume,
data parallel / FSDP2 under torchrun.

What is trained is a dict of modules (``model_parts``); the loss is a function ``loss_fn(parts, batch)``
returning the mean loss of the batch it is given (``segue.train.flow.FLF2VObjective``,
``segue.train.vae_loss.VAEObjective``). Every parameter with ``requires_grad`` is optimised and has an
EMA copy; the EMA weights are what gets shipped (``ema_state_dicts``, ``out_dir/ema.pt``).

Determinism. The data order is a function of the step: a map-style dataset is read in a seeded random
permutation per epoch, sample ``pos`` of the stream at ``permutation(epoch)[pos % len]``; an iterable
is read in order (and skipped forward on resume). Each sample also gets a seed derived from the run
seed and its stream position (``batch["seed"]``) for the loss's own randomness (noise, sigma, mode), so
a sample's draws do not depend on the batch split or on restarts. A checkpoint holds the weights, EMA,
optimiser, scheduler, step and every rank's torch/numpy/python RNG states, so a resumed run takes the
same steps bit for bit.

Distributed. Each of the ``world`` ranks takes a contiguous slice of the global batch, backpropagates
its mean loss scaled by ``world * local / global`` and the gradients are averaged over the ranks (an
all-reduce, or FSDP2's reduce-scatter when the parts are sharded): the same gradient as one process on
the whole batch. The logged loss is the share-weighted sum over ranks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from ..dist import ParallelState
from ..errors import CheckpointError, InputError
from ..io import atomic_torch_save, atomic_write_text
from .checkpoints import latest_checkpoint_path, load_training_checkpoint, rng_state, set_rng_state, with_ema

LossFn = Callable[[Mapping[str, nn.Module], Any], Tensor]


@dataclass
class TrainConfig:
    """Training hyper-parameters. ``batch_size`` is global (over all ranks)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup: int = 0
    # "constant"; "cosine" (to min_lr_ratio * lr at the last step); "wsd" (constant, then linear to
    # min_lr_ratio * lr over the last ``cooldown`` steps: the run can be lengthened before its cooldown)
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    cooldown: int = 0
    grad_clip: float | None = 1.0  # global norm; None: no clipping (the norm is still logged)
    ema_decay: float = 0.999
    # decay min(ema_decay, (1 + step) / (10 + step)): early EMA weights follow the model instead of keeping
    # the random init (with 0.999 a 1500-step stage ships 22% of its init)
    ema_warmup: bool = False
    dtype: str = "fp32"  # or "bf16": autocast of the forward, fp32 weights and optimiser
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    seed: int = 0
    out_dir: str = "runs/train"
    num_workers: int = 0  # DataLoader workers for a map-style dataset
    # a map-style dataset is shuffled in blocks of this many consecutive items, kept in order (the synthetic
    # data's 3-clip chunks: an ambiguous group's clips then meet in one batch, unless a batch ends inside it)
    keep_together: int = 1
    resume: bool = True  # continue from out_dir/ckpt when a checkpoint is there

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_ckpts", "keep_together"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"bad lr {self.lr}, warmup {self.warmup} or ema_decay {self.ema_decay}")
        if self.schedule not in ("constant", "cosine", "wsd"):
            raise ValueError(f"schedule must be 'constant', 'cosine' or 'wsd', got {self.schedule!r}")
        if self.schedule == "wsd" and not 1 <= self.cooldown <= self.steps - self.warmup:
            raise ValueError(
                f"wsd cooldown must be 1..{self.steps - self.warmup} (steps - warmup), got {self.cooldown}"
            )
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be 'fp32' or 'bf16', got {self.dtype!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the update of (0-based) ``step``: linear warmup, then constant, cosine
    down to ``min_lr_ratio``, or constant with a linear cooldown to ``min_lr_ratio`` (wsd)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = cfg.steps - cfg.cooldown  # the first cooldown step; the last step is at min_lr_ratio
        progress = min(1.0, max(0, step - start + 1) / cfg.cooldown)
        return 1.0 - (1 - cfg.min_lr_ratio) * progress
    span = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sample_seed(run_seed: int, position: int) -> int:
    """The seed of the sample at ``position`` of the data stream (a 63-bit mix of both numbers)."""
    x = (run_seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % 2**64
    return (x ^ (x >> 32)) % 2**63


def _split(total: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of ``total`` items (the first ranks get one more)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Trainer:
    """Trains ``model_parts`` on ``data`` with ``loss_fn``; ``run()`` goes to ``cfg.steps``.

    ``data`` is a map-style dataset (``__len__`` and ``__getitem__``; items collated with
    ``default_collate``) or any re-iterable of items. ``state`` comes from ``segue.dist.init_data_parallel``
    (None: one process).
    """

    def __init__(
        self,
        model_parts: Mapping[str, nn.Module],
        loss_fn: LossFn,
        data: Iterable[Any],
        cfg: TrainConfig,
        state: ParallelState | None = None,
    ) -> None:
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.data = data
        self.state = state
        self.rank = state.rank if state is not None else 0
        self.world = state.world_size if state is not None else 1
        if state is not None and (state.config.sp_size > 1 or state.config.cfg):
            raise InputError("training runs data parallel (optionally FSDP) only: no sequence or CFG parallel")
        if cfg.batch_size < self.world:
            raise InputError(f"global batch {cfg.batch_size} is smaller than the {self.world} ranks")
        self.sharded = state is not None and self.world > 1 and state.config.fsdp
        first = next(p for m in model_parts.values() for p in m.parameters())
        self.device = state.device if state is not None else first.device
        self.parts = dict(model_parts)
        self.module = nn.ModuleDict(self.parts)  # one tree for state dicts (keys "part.param")
        if self.sharded:
            self._shard()
        else:
            self.module.to(self.device)
        self.module.train()
        self.named_params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise InputError("nothing to train: no parameter of model_parts requires grad")
        decay = [p for _, p in self.named_params if p.ndim >= 2]
        no_decay = [p for _, p in self.named_params if p.ndim < 2]  # biases and norm gains
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.ema = {n: p.detach().clone() for n, p in self.named_params}
        self.step = 0
        self.history: list[float] = []
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "ckpt"
        self._map_style = hasattr(data, "__getitem__") and hasattr(data, "__len__")
        self._iter: Iterator[Any] | None = None
        self._times: list[float] = []

    # -- setup ---------------------------------------------------------------------------------
    def _shard(self) -> None:
        """FSDP2 over all ranks for the parts with ``.blocks`` (the DiT): each block is a group, then the
        part itself. The other parts (small encoders, which their objectives call through methods other
        than ``forward``, so FSDP's hooks would not gather them) stay replicated, data parallel."""
        from ..parallel.fsdp import fsdp_mesh, fully_shard, placement_kw

        assert self.state is not None
        mesh = fsdp_mesh(self.state)
        kw = placement_kw(self.world)
        for part in self.parts.values():
            blocks = getattr(part, "blocks", None)
            if not isinstance(blocks, nn.ModuleList) or not any(p.requires_grad for p in part.parameters()):
                part.to(self.device)
                continue
            for block in blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=True, **kw)
            fully_shard(part, mesh=mesh, **kw)

    @property
    def group(self) -> Any:
        return self.state.world_group if self.state is not None else None

    # -- data ----------------------------------------------------------------------------------
    def _positions(self, step: int) -> range:
        """Stream positions of this rank's slice of the global batch of ``step``."""
        b = self.cfg.batch_size
        start, stop = _split(b, self.world, self.rank)
        return range(step * b + start, step * b + stop)

    def _dataset_index(self, position: int) -> int:
        n = len(self.data)  # type: ignore[arg-type]
        epoch, offset = divmod(position, n)
        perm = getattr(self, "_perm", None)
        if perm is None or perm[0] != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.cfg.seed, -1 - epoch))
            # whole blocks [j*k, j*k + k) in a shuffled order, the last one maybe short (k = 1: randperm(n) as ever)
            k = self.cfg.keep_together
            blocks = torch.randperm(-(-n // k), generator=g).tolist()
            perm = (epoch, [i for j in blocks for i in range(j * k, min(n, j * k + k))])
            self._perm = perm
        return perm[1][offset]

    def _batches(self, start_step: int) -> Iterator[Any]:
        """Collated local batches for steps start_step, start_step + 1, ..."""
        if self._map_style:
            sampler = ([self._dataset_index(p) for p in self._positions(s)] for s in range(start_step, self.cfg.steps))
            if self.cfg.num_workers > 0:
                yield from DataLoader(
                    self.data,  # type: ignore[arg-type]
                    batch_sampler=list(sampler),
                    num_workers=self.cfg.num_workers,
                    collate_fn=default_collate,
                    # its own generator: seeding the workers must not draw from torch's global RNG
                    generator=torch.Generator().manual_seed(self.cfg.seed),
                )
            else:
                for idx in sampler:
                    yield default_collate([self.data[i] for i in idx])  # type: ignore[index]
            return
        # an iterable: read in order, skip what earlier steps consumed, keep this rank's slice
        it = iter(self.data)
        b = self.cfg.batch_size
        for _ in range(start_step * b):
            next(it)
        start, stop = _split(b, self.world, self.rank)
        while True:
            items = [next(it) for _ in range(b)]
            yield default_collate(items[start:stop])

    def _next_batch(self) -> Any:
        if self._iter is None:
            self._iter = self._batches(self.step)
        batch = next(self._iter)
        if isinstance(batch, dict):
            batch["seed"] = torch.tensor([sample_seed(self.cfg.seed, p) for p in self._positions(self.step)])
        return batch

    # -- one step ------------------------------------------------------------------------------
    def _reduce_grads(self) -> None:
        """Average the gradients of replicated parameters over the ranks (FSDP already reduce-scattered
        the sharded ones in backward)."""
        if self.world == 1:
            return
        grads = [p.grad for _, p in self.named_params if not _is_dtensor(p)]
        bucket_elems = 1 << 24
        i = 0
        while i < len(grads):
            j, size = i, 0
            while j < len(grads) and (size == 0 or size + grads[j].numel() <= bucket_elems):
                size += grads[j].numel()
                j += 1
            flat = torch.cat([g.reshape(-1) for g in grads[i:j]])
            dist.all_reduce(flat, group=self.group)
            flat /= self.world
            offset = 0
            for g in grads[i:j]:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            i = j

    @torch.no_grad()
    def _clip(self) -> float:
        """Global gradient norm over all trainable parameters (shards summed over ranks); scales the
        gradients down to ``grad_clip`` when above it (the rule of torch's clip_grad_norm_)."""
        local = torch.zeros((), dtype=torch.float64, device=self.device)  # squares of this rank's shards
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        for _, p in self.named_params:
            if _is_dtensor(p.grad):
                local += p.grad.to_local().double().square().sum()
            else:
                replicated += p.grad.double().square().sum()
        if self.sharded:
            dist.all_reduce(local, group=self.group)
        norm = float((local + replicated).sqrt())
        if self.cfg.grad_clip and norm > 0:
            coef = self.cfg.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                for _, p in self.named_params:
                    p.grad.mul_(coef)
        return norm

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay applied after optimiser step ``step`` (1-based)."""
        decay = self.cfg.ema_decay
        return min(decay, (1 + step) / (10 + step)) if self.cfg.ema_warmup else decay

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.ema_decay_at(self.step + 1)
        for n, p in self.named_params:
            self.ema[n].lerp_(p.detach(), 1.0 - decay)

    def train_step(self, batch: Any) -> tuple[float, float, float]:
        """One optimiser step on this rank's batch; returns (global loss, grad norm, lr used)."""
        cfg = self.cfg
        local = len(self._positions(self.step))
        share = local / cfg.batch_size
        lr = self.optimizer.param_groups[0]["lr"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            loss = self.loss_fn(self.parts, batch)
        loss = loss.float()
        (loss * (share * self.world)).backward()
        for _, p in self.named_params:  # parts a batch did not use still step (consistently over ranks)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._reduce_grads()
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        total = loss.detach() * share
        if self.world > 1:
            dist.all_reduce(total, group=self.group)
        return float(total), grad_norm, lr

    def run(self, stop_at: int | None = None) -> list[float]:
        """Train until ``cfg.steps`` (or ``stop_at``, for tests and staged runs); returns the losses of the
        steps taken. Resumes from the latest checkpoint first when ``cfg.resume``."""
        cfg = self.cfg
        if cfg.resume and self.step == 0 and self.latest_checkpoint() is not None:
            self.load_checkpoint()
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        losses = []
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        while self.step < end:
            batch_s, train_s, loss, grad_norm, lr = self._take_step()
            seconds = batch_s + train_s
            losses.append(loss)
            self.history.append(loss)
            self._log(loss, lr, grad_norm, seconds)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        if self.step == cfg.steps:
            self.close()
            ema = self.ema_state_dicts()
            if self.rank == 0:
                atomic_torch_save(self.out_dir / "ema.pt", ema)
        return losses

    def _take_step(self) -> tuple[float, float, float, float, float]:
        """The next step of the stream: (seconds getting its batch, seconds training on it, loss, grad norm, lr).
        ``train_step`` returns floats, so the device has finished when the clock is read."""
        t0 = time.perf_counter()
        batch = self._next_batch()
        t1 = time.perf_counter()
        loss, grad_norm, lr = self.train_step(batch)
        self.step += 1
        return t1 - t0, time.perf_counter() - t1, loss, grad_norm, lr

    def time_steps(self, n: int) -> list[tuple[float, float]]:
        """Take ``n`` steps as ``run`` does, without logging or saving; for each, the seconds spent getting its
        batch and the seconds training on it."""
        return [self._take_step()[:2] for _ in range(n)]

    def close(self) -> None:
        """Stop the data pipeline (DataLoader workers); a later ``run`` restarts it at the current step."""
        if self._iter is not None:
            self._iter.close()
            self._iter = None

    def _log(self, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        self._times.append(seconds)
        if self.rank != 0:
            return
        rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "seconds": seconds}
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
            recent = self._times[-self.cfg.log_every :]
            per = sum(recent) / len(recent)
            eta = fmt_seconds(per * (self.cfg.steps - self.step))
            print(
                f"step {self.step}/{self.cfg.steps}  loss {loss:.4f}  lr {lr:.2e}  |g| {grad_norm:.3f}  "
                f"{per:.2f} s/step  eta {eta}",
                file=sys.stderr,
                flush=True,
            )

    # -- weights -------------------------------------------------------------------------------
    def _full(self, t: Tensor) -> Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()

    def model_state_dicts(self) -> dict[str, dict[str, Tensor]]:
        """{part: full state dict} (collective under FSDP)."""
        return {name: {k: self._full(v) for k, v in part.state_dict().items()} for name, part in self.parts.items()}

    def ema_state_dicts(self) -> dict[str, dict[str, Tensor]]:
        """{part: full state dict with the EMA weights}: what gets shipped (collective under FSDP)."""
        return with_ema(self.model_state_dicts(), ((n, self._full(t)) for n, t in self.ema.items()))

    # -- checkpoints ---------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint_path(self.ckpt_dir)

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, self.optimizer, options=opts)

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt/step-XXXXXXXX.pt`` (temp file + rename) and point ``ckpt/latest`` at it; keeps
        the newest ``keep_ckpts``. Every rank must call it (gathers under FSDP and the RNG states)."""
        model, optim = self.model_state_dicts(), self._optimizer_state()
        ema = {n: self._full(t) for n, t in self.ema.items()}
        rng = [rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state(), group=self.group)
        path = self.ckpt_dir / f"step-{self.step:08d}.pt"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "step": self.step,
                "model": model,
                "ema": ema,
                "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng,
                "data": {"position": self.step * self.cfg.batch_size, "map_style": self._map_style},
                "world": self.world,
                "config": asdict(self.cfg),
            }
            atomic_torch_save(path, state)
            atomic_write_text(self.ckpt_dir / "latest", path.name)
            old = sorted(self.ckpt_dir.glob("step-*.pt"))[: -self.cfg.keep_ckpts]
            for p in old:
                p.unlink()
        if self.world > 1:
            dist.barrier(group=self.group)
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> int:
        """Restore everything from ``path`` (default: the latest); returns the step to continue from."""
        path = Path(path) if path is not None else self.latest_checkpoint()
        if path is None or not path.exists():
            raise CheckpointError(f"no checkpoint at {path or self.ckpt_dir}")
        ck = load_training_checkpoint(path)
        if ck["config"]["batch_size"] != self.cfg.batch_size or ck["config"]["seed"] != self.cfg.seed:
            raise CheckpointError("the checkpoint's global batch size or seed differ from this run's (data order)")
        if self.sharded:
            self._load_sharded(ck)
        else:
            for name, part in self.parts.items():
                part.load_state_dict(ck["model"][name])
            self.optimizer.load_state_dict(ck["optimizer"])
            with torch.no_grad():
                for n, t in self.ema.items():
                    t.copy_(ck["ema"][n])
        self.scheduler.load_state_dict(ck["scheduler"])
        rng = ck["rng"]
        set_rng_state(rng[self.rank] if len(rng) == self.world else rng[0])
        self.step = ck["step"]
        self._iter = None
        self._trim_log()
        return self.step

    def _load_sharded(self, ck: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.tensor import distribute_tensor

        opts = StateDictOptions(full_state_dict=True)
        model = {f"{name}.{k}": v for name, sd in ck["model"].items() for k, v in sd.items()}
        set_model_state_dict(self.module, model, options=opts)
        set_optimizer_state_dict(self.module, self.optimizer, ck["optimizer"], options=opts)
        with torch.no_grad():
            for n, t in self.ema.items():
                full = ck["ema"][n].to(self.device)
                if hasattr(t, "device_mesh"):
                    full = distribute_tensor(full, t.device_mesh, t.placements)
                t.copy_(full)

    def _trim_log(self) -> None:
        """Drop log lines of steps after the checkpoint: they are about to be run again."""
        log = self.out_dir / "log.jsonl"
        if self.rank != 0 or not log.exists():
            return
        keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
        atomic_write_text(log, "".join(ln + "\n" for ln in keep))
