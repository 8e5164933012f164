"""Parallel generation: formulas for the 14B model, and a measurement on CPU (gloo) per layout.

    python bench/parallel.py               # both parts
    python bench/parallel.py --formulas    # only the 14B tables (instant)

Part 1 prints, for FLF2V-14B at 720p and 480p (81 frames), memory per GPU and bytes sent per
sampling step for N = 1, 2, 4, 8, 16 GPUs (segue.parallel.cost), next to the reference's layout.
Part 2 runs one CFG sampling step of a small DiT on N CPU processes for each layout and reports
wall time, the part of it spent waiting in communication calls, and bytes sent per rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segue.config import DiTConfig, get_config
from segue.parallel import cost
from segue.testing import free_port, rendezvous_env

GB = 1e9


def formulas() -> None:
    cfg = get_config("flf2v-14b")
    for name, (h, w) in (("720p", (720, 1280)), ("480p", (480, 832))):
        n_tok = cost.tokens(cfg, 81, h, w)
        f = cost.dit_flops(cfg, n_tok)
        print(f"\n## FLF2V-14B {name}, 81 frames: {n_tok:,} tokens, {f['total']:.2e} FLOP per DiT forward")
        cols = ["GPUs", "layout", "DiT weights", "T5", "activations", "total / GPU", "reference total / GPU",
                "sent / rank / step"]  # fmt: skip
        print("| " + " | ".join(cols) + " |")
        print("|---|---|---|---|---|---|---|---|")
        for n in (1, 2, 4, 8, 16):
            lay = cost.Layout(n, ulysses=n, fsdp=n > 1)
            m = cost.memory_per_gpu(cfg, n_tok, lay)
            # the reference keeps fp32 DiT weights (bf16 autocast), FSDP-sharded over n when n > 1
            ref = cost.memory_per_gpu(cfg, n_tok, lay, weight_bytes=4)
            ref_total = ref["total"] - ref["activations"] + m["activations"]
            c = cost.comm_per_step(cfg, n_tok, lay)
            desc = f"ulysses {n}" + (" + fsdp" if lay.fsdp else "") if n > 1 else "single GPU"
            print(
                f"| {n} | {desc} | {m['dit'] / GB:.1f} GB | {m['t5'] / GB:.1f} GB | {m['activations'] / GB:.1f} GB "
                f"| {m['total'] / GB:.1f} GB | {ref_total / GB:.1f} GB | {c['total'] / GB:.1f} GB |"
            )
        print("\nAll-to-all volume per self-attention layer, per rank (Ulysses, bf16):")
        for n in (2, 4, 8, 16):
            print(f"  N={n}: {cost.ulysses_layer_volume(cfg, n_tok, n) / 1e6:.0f} MB")
        lay = cost.Layout(8, ulysses=4, ring=2)
        c = cost.comm_per_step(cfg, n_tok, lay)
        print(f"  ulysses 4 x ring 2 per step: all-to-all {c['ulysses'] / GB:.1f} GB, ring {c['ring'] / GB:.1f} GB")


# -- measurement -------------------------------------------------------------------------------------

LAYOUTS = {
    2: [dict(ulysses=2), dict(ring=2), dict(cfg=True), dict(fsdp=True)],
    4: [
        dict(ulysses=2, ring=2),
        dict(ulysses=4),
        dict(ring=4),
        dict(cfg=True, ulysses=2),
        dict(cfg=True, ring=2, fsdp=True),
    ],
}
BENCH_DIT = DiTConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, freq_dim=64, text_dim=64, text_len=64,
                      image_dim=160, image_pos_len=514)  # fmt: skip
GRID = (6, 12, 16)  # latent T, H, W -> 6 * 6 * 8 = 288 tokens


class Timed:
    """Wraps torch.distributed calls to add up the time spent inside them (exposed communication)."""

    NAMES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "send", "recv",
             "batch_isend_irecv", "broadcast", "all_reduce")  # fmt: skip

    def __init__(self) -> None:
        self.seconds = 0.0
        self.orig = {n: getattr(dist, n) for n in self.NAMES}

    def __enter__(self) -> Timed:
        for n, fn in self.orig.items():
            setattr(dist, n, self._wrap(fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for n, fn in self.orig.items():
            setattr(dist, n, fn)

    def _wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            self.seconds += time.perf_counter() - t
            # async ops (the ring's P2P): count the time the caller then waits, not the overlap
            if isinstance(out, list):
                return [_TimedWork(w, self) for w in out]
            return _TimedWork(out, self) if out is not None else None

        return timed


class _TimedWork:
    def __init__(self, work, timed: Timed) -> None:
        self.work, self.timed = work, timed

    def wait(self, *a):
        t = time.perf_counter()
        out = self.work.wait(*a)
        self.timed.seconds += time.perf_counter() - t
        return out

    def __getattr__(self, name: str):
        return getattr(self.work, name)


def _worker(rank: int, world: int, port: int, layout: dict, out: str) -> None:
    rendezvous_env(rank, world, port)
    torch.set_num_threads(1)
    from segue.dist import ParallelConfig, init_parallel
    from segue.models.dit import WanDiT
    from segue.parallel.sequence import apply_sequence_parallel, comm_stats, reset_comm_stats
    from segue.testing import randomize_

    state = init_parallel(ParallelConfig(**layout), "cpu")
    dit = randomize_(WanDiT(BENCH_DIT), 0).eval()
    if state.config.fsdp:
        from segue.parallel.fsdp import shard_dit

        shard_dit(dit, state)
    if state.sp_size > 1:
        apply_sequence_parallel(dit, state)
    g = torch.Generator().manual_seed(0)
    t_, h, w = GRID
    x, y = torch.randn(1, 16, t_, h, w, generator=g), torch.randn(1, 20, t_, h, w, generator=g)
    ctx, clip = torch.randn(1, 40, 64, generator=g), torch.randn(1, 514, 160, generator=g)
    t = torch.tensor([500])

    def step() -> None:
        with torch.no_grad():
            if state.config.cfg:
                v = dit(x, t, ctx, clip, y)
                both = [torch.empty_like(v) for _ in range(2)]
                dist.all_gather(both, v, group=state.cfg_group)
            else:
                dit(x, t, ctx, clip, y)
                dit(x, t, ctx * 0, clip, y)

    step()  # warm-up
    reset_comm_stats()
    dist.barrier()
    with Timed() as timed:
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        wall = (time.perf_counter() - t0) / 2
    sent = comm_stats()["total"] / 2
    if state.config.fsdp:  # FSDP all-gathers every block's shards each forward
        from segue.parallel.fsdp import local_param_bytes

        sent += local_param_bytes(dit) * (world - 1) * (1 if state.config.cfg else 2)
    if state.config.cfg:
        sent += x.numel() * 4
    torch.save({"wall": wall, "comm": timed.seconds / 2, "sent": sent}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def measure() -> None:
    from segue.models.dit import WanDiT
    from segue.testing import randomize_

    torch.set_num_threads(1)
    dit = randomize_(WanDiT(BENCH_DIT), 0).eval()
    g = torch.Generator().manual_seed(0)
    t_, h, w = GRID
    x, y = torch.randn(1, 16, t_, h, w, generator=g), torch.randn(1, 20, t_, h, w, generator=g)
    ctx, clip = torch.randn(1, 40, 64, generator=g), torch.randn(1, 514, 160, generator=g)
    with torch.no_grad():
        dit(x, torch.tensor([500]), ctx, clip, y)
        t0 = time.perf_counter()
        for _ in range(2):
            dit(x, torch.tensor([500]), ctx, clip, y)
            dit(x, torch.tensor([500]), ctx * 0, clip, y)
    single = (time.perf_counter() - t0) / 2
    n_tok = t_ * (h // 2) * (w // 2)
    print(f"\n## Measured on this machine: CPU, gloo, 1 thread per process, DiT dim {BENCH_DIT.dim}, "
          f"{BENCH_DIT.num_layers} layers, {n_tok} tokens, one CFG step (2 forwards)")  # fmt: skip
    print(f"single process: {single * 1000:.0f} ms per step ({os.cpu_count()} CPU cores on this machine)\n")
    print("| procs | layout | ms / step | waiting in communication | compute + overhead | sent / rank / step |")
    print("|---|---|---|---|---|---|")
    for world, layouts in LAYOUTS.items():
        for layout in layouts:
            with tempfile.TemporaryDirectory() as out:
                mp.start_processes(_worker, args=(world, free_port(), layout, out), nprocs=world, start_method="spawn")
                rows = [torch.load(Path(out) / f"{r}.pt", weights_only=True) for r in range(world)]
            wall = max(r["wall"] for r in rows)
            comm = sum(r["comm"] for r in rows) / world
            sent = max(r["sent"] for r in rows)
            name = ", ".join(f"{k} {v}" if v is not True else k for k, v in layout.items())
            print(f"| {world} | {name} | {wall * 1000:.0f} | {comm * 1000:.0f} ms ({comm / wall:.0%}) "
                  f"| {(wall - comm) * 1000:.0f} ms | {sent / 1e6:.2f} MB |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formulas", action="store_true", help="only the 14B formula tables")
    args = p.parse_args()
    formulas()
    if not args.formulas:
        measure()


if __name__ == "__main__":
    sys.exit(main())
