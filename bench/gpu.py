"""Full-size FLF2V-14B DiT (random weights) on one GPU: one CFG sampling step per speed option, 480p and 720p.

    python bench/gpu.py                      # 480p and 720p, 81 frames, every option, diffusers alongside
    python bench/gpu.py --cases 720p --options plain,lossless,diffusers
    python bench/gpu.py --small              # the same code on a small config (runs on CPU too)

Prints, per option: seconds per CFG step (two DiT forwards, or one batch of two), achieved TFLOP/s from
the closed-form FLOP count (segue.parallel.cost.dit_flops: Linear layers + self-attention), that as a
percentage of the measured bf16 matmul ceiling of this GPU, peak GPU memory, and the relative error of
the step's velocity against the plain bf16 path. diffusers' WanTransformer3DModel runs the same step on
the same weights in the same process. Without a GPU (and without --small) every row says "not measured".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from stepbench import (
    Case,
    Row,
    build_dit,
    diffusers_from,
    diffusers_step,
    make_inputs,
    matmul_ceiling,
    peak_gb,
    peak_reset,
    rel_err,
    segue_step,
    table,
    time_fn,
)

from segue.config import ModelConfig, get_config
from segue.pipeline import Pipeline

CASES = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
SMALL_CASES = {"480p": (9, 64, 96), "720p": (9, 96, 160)}

Undo = Callable[[], None]


def _attention(pipe: Pipeline, name: str | None = None) -> tuple[Undo, str]:
    from segue.accel.attention import best_backend, set_attention_backend

    name = name or best_backend(pipe.device, torch.bfloat16)
    set_attention_backend(pipe.dit, name)
    return (lambda: set_attention_backend(pipe.dit, "sdpa")), f"attention {name}"


def _fuse(pipe: Pipeline) -> tuple[Undo, str]:
    from segue.accel.fuse import fast_rope, fuse_qkv, remove_fast_rope, unfuse_qkv

    fuse_qkv(pipe.dit)
    fast_rope(pipe.dit)

    def undo() -> None:
        remove_fast_rope(pipe.dit)
        unfuse_qkv(pipe.dit)

    return undo, "fused QKV + fp32 RoPE"


def _compile(pipe: Pipeline) -> tuple[Undo, str]:
    from segue.accel.compile import compile_blocks, uncompile_blocks

    compile_blocks(pipe.dit)
    return (lambda: uncompile_blocks(pipe.dit)), "regional torch.compile"


def _cfg_batch(pipe: Pipeline) -> tuple[Undo, str]:
    pipe.cfg_batch = True

    def undo() -> None:
        pipe.cfg_batch = False

    return undo, "CFG as one batch of two"


def _chain(*parts: Callable[[Pipeline], tuple[Undo, str]]) -> Callable[[Pipeline], tuple[Undo, str]]:
    def apply(pipe: Pipeline) -> tuple[Undo, str]:
        undos, notes = [], []
        for part in parts:
            u, n = part(pipe)
            undos.append(u)
            notes.append(n)

        def undo() -> None:
            for u in reversed(undos):
                u()

        return undo, " + ".join(notes)

    return apply


def _block_swap(pipe: Pipeline) -> tuple[Undo, str]:
    from segue.placement.block_swap import BlockSwap

    swap = BlockSwap(pipe.dit.blocks, pipe.device, resident=0, prefetch=1)
    return (lambda: swap.remove(pipe.device)), "DiT blocks streamed from pinned CPU memory, 1 prefetched"


def _fp8(pipe: Pipeline) -> tuple[Undo, str]:
    from segue.accel.fp8 import quantize_fp8

    quantize_fp8(pipe.dit)
    return (lambda: None), "e4m3 weights, scaled matmul where supported (irreversible: runs last)"


# name -> (lossy, apply); the order is the run order (fp8 replaces the weights, so it comes last).
OPTIONS: dict[str, tuple[bool, Callable[[Pipeline], tuple[Undo, str]]]] = {
    "plain": (False, lambda pipe: ((lambda: None), "SDPA default dispatch")),
    "attention": (False, _attention),
    "fused": (False, _fuse),
    "cfg-batch": (False, _cfg_batch),
    "compile": (False, _compile),
    "lossless": (False, _chain(_attention, _fuse, _cfg_batch, _compile)),
    "sage": (True, lambda pipe: _attention(pipe, "sage")),
    "block-swap": (False, _block_swap),
    "fp8": (True, _fp8),
}


def run_case(cfg: ModelConfig, case: Case, device: torch.device, options: list[str], ceiling: float | None,
             warmup: int, iters: int, dtype: torch.dtype = torch.bfloat16) -> list[Row]:  # fmt: skip
    flop = case.step_flop(cfg)
    rows: list[Row] = []
    peak_reset(device)
    dit = build_dit(cfg, device, dtype)
    pipe = Pipeline(cfg, dit, None, None, None, device)
    x = make_inputs(cfg, case, device)
    reference: torch.Tensor | None = None

    def record(name: str, lossy: bool, step: Callable[[], torch.Tensor], note: str, warm: int) -> None:
        nonlocal reference
        peak_reset(device)
        seconds, out = time_fn(step, device, warm, iters)
        if reference is None:
            reference = out.float().clone()
        tf = flop / seconds / 1e12
        rows.append(Row(name, seconds, tf, 100 * tf / ceiling if ceiling else None, peak_gb(device),
                        rel_err(out.float(), reference), lossy, note))  # fmt: skip
        print(f"  {case.name} {name}: {seconds:.3f} s/step ({note})", file=sys.stderr)

    for name in [o for o in OPTIONS if o in options]:
        if name == "fp8" and "diffusers" in options:
            record_diffusers(cfg, dit, x, dtype, record, warmup)
        lossy, apply = OPTIONS[name]
        try:
            undo, note = apply(pipe)
        except Exception as e:  # an option this machine cannot run (kernel not installed, no Hopper...)
            rows.append(Row(name, lossy=lossy, note=f"not run: {e}"))
            print(f"  {case.name} {name}: not run ({e})", file=sys.stderr)
            continue
        record(name, lossy, segue_step(pipe, x), note, warmup + (2 if "compile" in note else 0))
        undo()
    if "diffusers" in options and "fp8" not in options:
        record_diffusers(cfg, dit, x, dtype, record, warmup)
    del pipe, dit
    peak_reset(device)
    return rows


def record_diffusers(cfg, dit, x, dtype, record, warmup: int) -> None:
    model = diffusers_from(dit, dtype)
    record("diffusers", False, diffusers_step(model, x, dtype, cfg.dit.text_len), "WanTransformer3DModel, SDPA", warmup)
    del model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="480p,720p")
    p.add_argument("--options", default=",".join([*OPTIONS, "diffusers"]))
    p.add_argument("--small", action="store_true", help="a small DiT (dim 256, 2 layers) at small sizes")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="fp32: checks the mapping")
    args = p.parse_args(argv)
    options = args.options.split(",")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = get_config("flf2v-14b")
    if args.small:
        from dataclasses import replace

        cfg = replace(cfg, dit=replace(cfg.dit, dim=256, ffn_dim=512, num_heads=2, num_layers=2))
    cases = [Case(n, *(SMALL_CASES if args.small else CASES)[n]) for n in args.cases.split(",")]
    measured = device.type == "cuda" or args.small
    ceiling = matmul_ceiling(device, torch.bfloat16, 8192 if device.type == "cuda" else 1024) if measured else None
    print(f"# {cfg.name} DiT ({'small' if args.small else '14B'}), one CFG step, {args.dtype}, {device}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"Measured bf16 matmul ceiling: {ceiling:.1f} TFLOP/s" if ceiling else "No GPU here: not measured.")
    for case in cases:
        n_tok = case.tokens(cfg)
        title = f"{case.name}: {case.width}x{case.height}, {case.frames} frames, {n_tok:,} tokens, "
        title += f"{case.step_flop(cfg):.2e} FLOP per CFG step"
        if measured:
            rows = run_case(cfg, case, device, options, ceiling, args.warmup, args.iters, getattr(torch, args.dtype))
        else:
            rows = [Row(o, lossy=OPTIONS[o][0] if o in OPTIONS else False) for o in options]
        print(table(rows, title))


if __name__ == "__main__":
    main()
