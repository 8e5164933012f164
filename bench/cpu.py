"""CPU benchmark at small sizes: DiT CFG step per speed option and VAE decode, time and peak RSS, vs diffusers.

    python bench/cpu.py                 # both tables (a few minutes on 2 cores)
    python bench/cpu.py --part dit      # or --part vae

Every measurement runs in its own spawned process, so its peak resident memory (ru_maxrss) is its own
(the import baseline of a bare process is printed too). DiT: a reduced-width FLF2V DiT (dim 512, 4 blocks,
the real head size 128) on a 17-frame 128x128 clip (320 tokens), fp32 and bf16, the same weights in
segue and in diffusers' WanTransformer3DModel. VAE: the real Wan2.1 VAE size (dim 96, random weights)
decoding a 17-frame 128x128 clip, whole and in row bands, against diffusers' AutoencoderKLWan (whole
and its own tiling).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

DIT_OPTIONS = ["plain", "fused", "cfg-batch", "compile", "lossless", "fp8", "diffusers"]
VAE_OPTIONS = ["segue", "segue-tiled", "diffusers", "diffusers-tiled"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dit_child(option: str, dtype_name: str, iters: int, out_path: str, q) -> None:
    from gpu import OPTIONS
    from stepbench import Case, build_dit, diffusers_from, diffusers_step, make_inputs, segue_step, time_fn

    from segue.config import get_config
    from segue.pipeline import Pipeline

    torch.manual_seed(0)
    base = get_config("flf2v-14b")
    cfg = replace(base, dit=replace(base.dit, dim=512, ffn_dim=1536, num_heads=4, num_layers=4))
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    dit = build_dit(cfg, device, dtype)
    x = make_inputs(cfg, Case("small", 17, 128, 128), device)
    rss0 = _rss_mb()
    try:
        if option == "diffusers":
            step, note = diffusers_step(diffusers_from(dit, dtype), x, dtype, cfg.dit.text_len), "WanTransformer3DModel"
        else:
            pipe = Pipeline(cfg, dit, None, None, None, device)
            _, note = OPTIONS[option][1](pipe)
            step = segue_step(pipe, x)
        warm = 3 if option in ("compile", "lossless") else 1
        seconds, out = time_fn(step, device, warm, iters)
        torch.save(out.float(), out_path)
        q.put({"seconds": seconds, "rss": _rss_mb(), "rss_before": rss0, "note": note})
    except Exception as e:  # noqa: BLE001 - reported in the table
        q.put({"error": f"{type(e).__name__}: {e}"})


def _vae_child(option: str, iters: int, out_path: str, q) -> None:
    from segue.config import VAEConfig
    from segue.models.vae import WanVAE
    from segue.testing import randomize_

    torch.manual_seed(0)
    vae = randomize_(WanVAE(VAEConfig()), 1).eval()
    z = torch.randn(1, 16, 5, 16, 16)  # 17 frames at 128x128
    try:
        if option.startswith("diffusers"):
            from diffusers import AutoencoderKLWan

            from segue.adapters.vae import config_to_diffusers, native_to_diffusers

            model = AutoencoderKLWan.from_config(config_to_diffusers(vae.cfg)).eval()
            model.load_state_dict(native_to_diffusers(vae.state_dict()))
            if option.endswith("tiled"):
                model.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                                    tile_sample_stride_width=48)  # fmt: skip
            del vae

            def run() -> torch.Tensor:
                return model.decode(z, return_dict=False)[0].clamp(-1, 1)
        elif option == "segue-tiled":
            from segue.placement.tiled_vae import tiled_decode

            def run() -> torch.Tensor:
                return tiled_decode(vae, z, band_rows=8, normalized=False)
        else:

            def run() -> torch.Tensor:
                return vae.decode(z, normalized=False)

        rss0 = _rss_mb()
        times, out = [], None
        with torch.no_grad():
            for _ in range(iters):
                t0 = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - t0)
        torch.save(out, out_path)
        q.put({"seconds": min(times), "rss": _rss_mb(), "rss_before": rss0, "note": VAE_NOTES.get(option, "")})
    except Exception as e:  # noqa: BLE001
        q.put({"error": f"{type(e).__name__}: {e}"})


def _spawn(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _rows(results: dict[str, dict], outputs: Path, prefix: str, reference: str) -> None:
    """Table rows: time, ratio to diffusers, peak RSS, error of each output against ``reference``'s."""
    ref = torch.load(outputs / f"{prefix}-{reference}.pt", weights_only=True)
    base = results["diffusers"].get("seconds")
    for opt, r in results.items():
        if "error" in r:
            print(f"| {opt} | not run | - | - | - | {r['error'][:90]} |")
            continue
        ratio = f"{base / r['seconds']:.2f}x" if base else "-"
        err = _rel(torch.load(outputs / f"{prefix}-{opt}.pt", weights_only=True), ref)
        print(f"| {opt} | {r['seconds']:.3f} | {ratio} | {r['rss']:.0f} | {err:.1e} | {r['note']} |")


def dit_table(iters: int, tmp: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        print(f"\n### DiT CFG step, dim 512 x 4 blocks, 320 tokens, {dtype}, {torch.get_num_threads()} threads\n")
        print("| option | s / CFG step | vs diffusers | peak RSS MB | rel. err vs plain | note |")
        print("|---|---|---|---|---|---|")
        results = {}
        for opt in DIT_OPTIONS:
            results[opt] = _spawn(_dit_child, opt, dtype, iters, str(tmp / f"dit-{opt}.pt"))
            print(f"  {dtype} {opt}: {results[opt]}", file=sys.stderr)
        _rows(results, tmp, "dit", "plain")


VAE_NOTES = {"segue-tiled": "2 row bands of 8 latent rows + 13-row halos", "diffusers-tiled": "64 px tiles, blended"}


def vae_table(iters: int, tmp: Path) -> None:
    print(f"\n### VAE decode, Wan2.1 VAE size (dim 96), 17 frames 128x128, fp32, {torch.get_num_threads()} threads\n")
    print("| decoder | seconds | vs diffusers | peak RSS MB | rel. err vs segue whole | note |")
    print("|---|---|---|---|---|---|")
    results = {o: _spawn(_vae_child, o, iters, str(tmp / f"vae-{o}.pt")) for o in VAE_OPTIONS}
    _rows(results, tmp, "vae", "segue")


def main(argv: list[str] | None = None) -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["dit", "vae", "both"], default="both")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    print(f"# segue CPU benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, bare process {_rss_mb():.0f} MB")
    with tempfile.TemporaryDirectory() as d:
        if args.part in ("dit", "both"):
            dit_table(args.iters, Path(d))
        if args.part in ("vae", "both"):
            vae_table(args.iters, Path(d))


if __name__ == "__main__":
    main()
