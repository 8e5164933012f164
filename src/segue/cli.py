"""Command line: ``segue generate``, ``info``, ``train``, ``eval``, ``sweep``, ``calibrate-cache``, ``make-tiny``.
Also runs as ``python -m segue``.

Logs and progress go to stderr; errors the user can fix are one line (``error: ...``, exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from .errors import InputError, SegueError

log = logging.getLogger("segue")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1280x720 (WIDTHxHEIGHT), got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with segue's one-line errors (``error: ...``, exit code 2) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="segue", description="Two keyframes and a prompt in, a video out.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make a video from a first (and last) frame and a prompt")
    g.add_argument("--first", required=True, help="first frame (image file)")
    g.add_argument("--last", help="last frame (image file); without it, first-frame-only generation")
    g.add_argument("--prompt", default="", help="what happens between the frames")
    g.add_argument("--negative-prompt", default=None, help="what to avoid (default: the model's)")
    g.add_argument("--frames", type=int, help="frame count, 4n+1 (default: the model's, 81 for 14B)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--max-area", type=int, help="pixel area; the first frame's aspect is kept")
    size.add_argument(
        "--size",
        type=_size,
        help="exact output size WIDTHxHEIGHT, multiples of the model's size step (16 for Wan2.1 14B, 8 for the "
        "built-in model)",
    )
    g.add_argument("--steps", type=int, help="sampling steps, 1 to 1000 (default: the model's)")
    g.add_argument("--shift", type=float, help="timestep shift, above 0 up to 100 (default: the model's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale, 0 to 50 (1 = off)")
    g.add_argument("--guidance-steps", type=int, help="guide only the first N steps (default: the model's; all)")
    g.add_argument("--solver", help="unipc (default), dpm++, euler, or lcm (stochastic, for 4-step distilled LoRAs)")
    g.add_argument("--seed", type=int, default=0, help="noise seed, 0 to 2**63-1")
    g.add_argument("--out", type=Path, required=True,
                   help="output video: .mp4, .webm or .gif (never an input; its folder is created if only that "
                   "last level is missing)")  # fmt: skip
    g.add_argument("--frames-dir", type=Path,
                   help="also write PNG frames (a new folder, or one segue wrote: replaced whole)")  # fmt: skip
    g.add_argument("--overwrite", action="store_true",
                   help="let --frames-dir replace a folder of files that segue did not write")  # fmt: skip
    g.add_argument("--save-latent", type=Path, help="also save the final latent [z, T, h, w] (torch .pt)")
    g.add_argument("--report", type=Path, help="also write a JSON report: keyframe PSNR/CIEDE2000, colour drift")
    add_model_options(g)

    st = sub.add_parser("story", help="make one film from many keyframes and the shots between them (a TOML/JSON file)")
    st.add_argument("story", type=Path, help="story file (.toml, or .json): docs/storyboard.md")
    st.add_argument("--out", type=Path, required=True, help="output film: .mp4, .webm or .gif")
    st.add_argument("--frames-dir", type=Path,
                    help="also write PNG frames (a new folder, or one segue wrote: replaced whole)")  # fmt: skip
    st.add_argument("--overwrite", action="store_true",
                    help="let --frames-dir replace a folder of files that segue did not write")  # fmt: skip
    st.add_argument("--report", type=Path, help="also write a JSON report: shots reused, keyframe fidelity, seams")
    st.add_argument("--cache-dir", type=Path, help="shot cache (default: .segue-cache/ beside --out)")
    st.add_argument("--no-cache", action="store_true", help="render every shot, keep nothing")
    st.add_argument("--color-match", action="store_true", help="anchor each shot's colours at its two keyframes")
    add_model_options(st)

    i = sub.add_parser("info", help="describe a checkpoint folder: layout, components, sizes, what is missing")
    i.add_argument("ckpt_dir", type=Path)

    tr = sub.add_parser("train", help="run a training recipe: a chain of stages, resumable (docs/training.md)")
    tr.add_argument("--recipe", required=True, help="a shipped recipe's name (default, gpu) or a recipe file (TOML)")
    tr.add_argument("--out", type=Path, required=True, help="run folder (one folder per stage, checkpoints, logs)")
    tr.add_argument("--from", dest="start", type=Path, default=None, metavar="BUNDLE",
                    help="the bundle a recipe without [scratch] continues (default: the recipe's `from`)")  # fmt: skip
    tr.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps and clips")
    tr.add_argument("--install", action="store_true", help="copy the result into the package as the built-in model")
    tr.add_argument("--device", default="cpu", help="where the models train: cpu, cuda, cuda:1, ...")
    tr.add_argument("--time-budget", default=None, metavar="DURATION",
                    help="each DiT stage of a continuation runs the steps that fit (420, 7m, 1.5h)")  # fmt: skip
    tr.add_argument("--workers", type=int, default=0,
                    help="processes that render clips and collate batches (for a GPU)")  # fmt: skip

    ev = sub.add_parser("eval", help="score a model on the held-out procedural clips against a crossfade")
    ev.add_argument("--ckpt", type=Path, default=None, help="model (default: the built-in one)")
    ev.add_argument("--out", type=Path, default=Path("eval"), help="folder for eval.json, eval.md, contact_sheet.png")
    ev.add_argument("--clips", type=int, default=32, help="held-out clips")
    ev.add_argument("--groups", type=int, default=16, help="ambiguous groups (same keyframes, different paths)")
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ev.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    ev.add_argument("--guidance-steps", type=int, default=None, help="guide only the first N steps")
    ev.add_argument("--shift", type=float, default=None, help="timestep shift (default: the model's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--split", choices=("test", "val"), default="test",
                    help="clips to score: test (reported numbers) or val (for tuning settings)")  # fmt: skip
    ev.add_argument("--pairs", type=Path, default=None, metavar="DIR",
                    help="score keyframe pairs DIR/NAME/{first.png,last.png,prompt.txt} (and NAME/frames/ if "
                         "there): endpoint PSNR and colour difference per pair, and a contact sheet")  # fmt: skip

    mp = sub.add_parser("make-pairs", help="write the held-out keyframe pairs (photos, simple scenes) for eval --pairs")
    mp.add_argument("dest", type=Path)
    mp.add_argument("--photos", type=int, default=6, help="photo pairs (held-out photos; needs the train extra)")
    mp.add_argument("--scenes", type=int, default=6, help="simple scenes (a saturated disc over a flat sky)")
    mp.add_argument("--seed", type=int, default=0)

    sw = sub.add_parser("sweep", help="score a grid of sampling settings on held-out val clips (one table row each)")
    sw.add_argument("--ckpt", type=Path, default=None, help="model (default: the built-in one)")
    sw.add_argument("--steps", default="4,25", help="sampling step counts, comma-separated")
    sw.add_argument("--guidance", default="1,4", help="guidance scales, comma-separated")
    sw.add_argument("--guidance-steps", default="all", help="guided steps from the first: all, or counts (all,1,2)")
    sw.add_argument("--shift", default="3", help="timestep shifts, comma-separated")
    sw.add_argument("--clips", type=int, default=8, help="held-out clips")
    sw.add_argument("--groups", type=int, default=8, help="ambiguous groups")
    sw.add_argument("--split", choices=("val", "test"), default="val")
    sw.add_argument("--seed", type=int, default=0)

    cc = sub.add_parser("calibrate-cache", help="calibrate --step-cache for a model and measure its fidelity")
    ccs = cc.add_mutually_exclusive_group()
    ccs.add_argument("--ckpt", type=Path, help="checkpoint folder or bundle (default: the built-in model)")
    ccs.add_argument("--tiny", action="store_true", help="a tiny random-weight model (no download, CPU)")
    cc.add_argument("--first", type=Path, help="first frame (required unless --tiny)")
    cc.add_argument("--last", type=Path)
    cc.add_argument("--prompt", default="a red fox runs through fresh snow, cinematic")
    cc.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20 with --tiny)")
    cc.add_argument("--frames", type=int)
    cc.add_argument("--max-area", type=int)
    cc.add_argument("--seed", type=int, default=0)
    cc.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    cc.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)")
    cc.add_argument("--teacache", default="0.05,0.1,0.2,0.3", help="TeaCache thresholds, comma-separated")
    cc.add_argument("--magcache", default="0.06,0.12,0.24", help="MagCache thresholds, comma-separated")
    cc.add_argument("--warmup", type=int, default=2, help="calls per branch always computed at the start")
    cc.add_argument("--out", type=Path, default=Path("cache_calibration.json"), help="calibration JSON")
    cc.add_argument("--fp8", action="store_true", help="also measure one-step fp8 errors")

    add_serve_commands(sub)

    t = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (for tests and demos)")
    t.add_argument("dest", type=Path)
    t.add_argument("--layout", choices=("official", "diffusers"), default="official")
    t.add_argument("--model", default="tiny-flf2v", help="registry size to build (tiny-flf2v, tiny-i2v)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shards", type=int, default=2, help="DiT shard count (>1 writes an index)")
    return p


def add_model_options(g: argparse.ArgumentParser, parallel: bool = True) -> None:
    """The model and speed options of ``generate``, ``story``, ``serve`` and ``worker`` (and the parallel ones)."""
    g.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (official or diffusers layout)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)")
    sp = g.add_argument_group("speed and memory (docs/performance.md)")
    sp.add_argument(
        "--memory",
        default="auto",
        metavar="PROFILE",
        help="auto (from free GPU memory), gpu, offload, block-swap, fp8 (lossy) or low (lossy)",
    )
    sp.add_argument(
        "--attention",
        default="auto",
        metavar="KERNEL",
        help="auto, sdpa, flash, cudnn, efficient, math, fa3, sage (lossy)",
    )
    sp.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT blocks")
    sp.add_argument(
        "--cfg-batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run both CFG passes as one batch of two (default: on GPU when it fits)",
    )
    sp.add_argument(
        "--exact",
        action="store_true",
        help="the reference's arithmetic on GPU too: no fused QKV/fp32 RoPE, SDPA, two CFG passes",
    )
    sp.add_argument("--step-cache", choices=("teacache", "magcache"), help="reuse DiT residuals across steps (lossy)")
    sp.add_argument("--cache-threshold", type=float, help="higher skips more steps")
    sp.add_argument("--cache-calibration", help="calibration JSON from segue calibrate-cache")
    sp.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA (diffusers, official or kohya names); repeat to stack",
    )
    sp.add_argument(
        "--few-step",
        action="store_true",
        help="settings of 4-step distilled LoRAs (lightx2v/CausVid): 4 steps, no CFG, shift 5, lcm",
    )
    sp.add_argument("--text-encoder-cpu", action="store_true", help="run the text encoder on the CPU")  # fmt: skip
    if not parallel:
        return
    par = g.add_argument_group("parallel (start with torchrun --nproc_per_node=N -m segue generate ...)")
    par.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence-parallel degree (heads all-to-all)")
    par.add_argument("--ring", type=int, default=1, help="ring-attention sequence-parallel degree")
    par.add_argument("--cfg-parallel", action="store_true", help="conditional/unconditional passes on two halves")
    par.add_argument("--fsdp", action="store_true", help="shard DiT and text-encoder weights over all ranks")
    par.add_argument("--no-vae-parallel", action="store_true", help="decode on rank 0 only")
    par.add_argument(
        "--sp-reference-padding",
        action="store_true",
        help="leave padded tokens unmasked in attention, as the reference's distributed run does",
    )


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    """``segue serve`` (the HTTP API and its workers) and ``segue worker`` (workers alone): docs/serve.md."""
    sv = sub.add_parser("serve", help="run the HTTP API with a persistent job queue and worker processes")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: --token required)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--token", default=os.environ.get("SEGUE_TOKEN") or None,
                    help="every API request must send Authorization: Bearer TOKEN (default: $SEGUE_TOKEN)")  # fmt: skip
    sv.add_argument("--workers", type=int, default=1, help="worker processes, each loading the model once (0: none)")
    sv.add_argument("--max-upload-mb", type=float, default=64.0, help="largest request body, MiB")
    sv.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest uploaded image, pixels")
    sv.add_argument("--webhook-secret", default=os.environ.get("SEGUE_WEBHOOK_SECRET") or None,
                    help="webhook signing key (default: $SEGUE_WEBHOOK_SECRET, else DATA/webhook-secret)")  # fmt: skip
    sv.add_argument("--webhook-retries", type=int, default=5, help="deliveries tried per webhook")
    sv.add_argument("--webhook-backoff", type=float, default=2.0, help="seconds before the first retry (doubling)")
    wk = sub.add_parser("worker", help="run workers alone (no API) on a queue shared with segue serve")
    wk.add_argument("--workers", type=int, default=1, help="worker processes, each loading the model once")
    wk.add_argument("--worker-id", default=None, help=argparse.SUPPRESS)  # as the supervisor starts one
    wk.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    for p in (sv, wk):
        p.add_argument("--data", type=Path, default=Path("segue-data"),
                       help="folder of the queue (SQLite), inputs and outputs; shared by every machine")  # fmt: skip
        p.add_argument("--db", default=None,
                       help="postgresql://USER@HOST/DB: one queue for many machines (default: SQLite)")  # fmt: skip
        p.add_argument("--lease", type=float, default=30.0,
                       help="seconds a job stays claimed without a heartbeat before it runs again")  # fmt: skip
        p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
        add_model_options(p, parallel=False)


class _Progress:
    """A tqdm bar on stderr (step, it/s, ETA), opened at the first step so it knows the total."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __call__(self, i: int, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=n, unit="step", file=sys.stderr, dynamic_ncols=True, desc="denoising")
        self.bar.update(i - self.bar.n)
        if i >= n:  # close at the last step: the VAE decode that follows is logged on its own line
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_generate(args: argparse.Namespace) -> int:
    from .settings import check_request, host_memory, resolve_settings

    # Everything that can be checked is checked before the model loads: first what needs no torch
    # (settings, output paths, keyframes), then what needs the model's config (read without its weights).
    def request():
        a = args
        return check_request(a.prompt, a.negative_prompt, a.frames, a.max_area, a.size, a.steps, a.shift, a.guidance,
                             a.solver, a.seed, a.guidance_steps, flags=True)  # fmt: skip

    request()
    from .io import Protected, check_output_file
    from .media import check_outputs, load_image

    protected = Protected().add(args.first, "first frame").add(args.last, "last frame")
    protected.add(args.ckpt_dir, "checkpoint").add(args.cache_calibration, "cache calibration")
    check_outputs(args.out, args.frames_dir, args.save_latent, protected, args.overwrite)
    if args.report is not None:
        check_output_file(args.report, "report", protected)
    first = load_image(args.first, "first frame")
    if args.last is not None:
        load_image(args.last, "last frame")

    t0 = time.perf_counter()
    plan, parallel, speed = _model_plan(args, protected)
    out, _, _ = check_outputs(args.out, args.frames_dir, args.save_latent, protected, args.overwrite)
    resolve_settings(request(), plan.config, (first.height, first.width), args.last is not None, host_memory(),
                     flags=True)  # fmt: skip
    pipe, main_rank = _load_pipeline(args, plan, parallel, speed)
    log.info("model ready in %.1fs", time.perf_counter() - t0)
    progress = _Progress(enabled=not args.quiet and main_rank)
    try:
        video = pipe.generate(
            args.first, args.last, args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
            max_area=args.max_area, size=args.size, steps=args.steps, shift=args.shift,
            guidance=args.guidance, solver=args.solver, seed=args.seed, progress=progress,
            guidance_steps=args.guidance_steps,
        )  # fmt: skip
    finally:
        progress.close()
    if video is None:  # another rank of a parallel run: rank 0 writes
        return 0
    video.save(out, frames_dir=args.frames_dir, latent_path=args.save_latent, overwrite=args.overwrite,
               protected=protected)  # fmt: skip
    if args.report is not None:
        from .story.report import clip_report, write_report

        write_report(clip_report(pipe, video, args.first, args.last), args.report)
    t, h, w, _ = video.frames.shape
    log.info("wrote %s: %d frames %dx%d at %d fps (%.1fs total)", out, t, w, h, video.fps, time.perf_counter() - t0)
    print(out, flush=True)
    return 0


def _model_plan(args: argparse.Namespace, protected):
    """The checkpoint's plan (its config, no weights yet), the parallel layout and the speed options, checked.
    ``--few-step`` fills the sampling settings the command line left unset."""
    from .accel.options import SpeedOptions
    from .loader import checkpoint_plan

    parallel = _parallel_config(args)
    speed = SpeedOptions.from_args(args)
    for lora, _ in speed.loras:
        protected.add(lora, "LoRA")
    if args.few_step:
        from .lora import FEW_STEP

        for key, value in FEW_STEP.items():
            if hasattr(args, key) and getattr(args, key) is None:  # story files hold their own settings
                setattr(args, key, value)
    if parallel is not None:
        given = [f for f, v in (("--memory", args.memory != "auto"), ("--attention", args.attention != "auto"),
                 ("--compile", args.compile), ("--cfg-batch", args.cfg_batch is not None), ("--exact", args.exact),
                 ("--step-cache", args.step_cache), ("--lora", args.lora),
                 ("--text-encoder-cpu", args.text_encoder_cpu)) if v]  # fmt: skip
        if given:
            raise InputError(f"{', '.join(given)}: one-process options; a parallel run saves memory with --fsdp")
    plan = checkpoint_plan(args.ckpt_dir)
    protected.add(plan.folder, "checkpoint")
    return plan, parallel, speed


def _load_pipeline(args: argparse.Namespace, plan, parallel, speed):
    """The pipeline the model options ask for, and whether this process is the one that writes (rank 0)."""
    import torch

    from .loader import load_plan

    if parallel is not None:
        from .parallel.apply import load_parallel

        pipe = load_parallel(args.ckpt_dir, parallel, device=args.device, dtype=args.dtype)
        main_rank = pipe.parallel.is_main
        if not main_rank:
            logging.getLogger().setLevel(logging.WARNING)  # one voice: rank 0 logs and shows progress
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_plan(plan, device=device, dtype=args.dtype, speed=speed)
        main_rank = True
    return pipe, main_rank


def cmd_story(args: argparse.Namespace) -> int:
    from .io import Protected, check_output_file
    from .media import check_outputs
    from .story.report import write_report
    from .story.schema import load_story

    # every check that needs no model first: the story file, its keyframes, the outputs
    story = load_story(args.story)
    protected = Protected().add(args.story, "story file")
    for i, path in enumerate(story.inputs):
        protected.add(path, f"keyframes[{i}] image")
    protected.add(args.ckpt_dir, "checkpoint").add(args.cache_calibration, "cache calibration")
    check_outputs(args.out, args.frames_dir, None, protected, args.overwrite)
    if args.report is not None:
        check_output_file(args.report, "report", protected)
    t0 = time.perf_counter()
    plan, parallel, speed = _model_plan(args, protected)
    out, _, _ = check_outputs(args.out, args.frames_dir, None, protected, args.overwrite)
    pipe, main_rank = _load_pipeline(args, plan, parallel, speed)
    if args.few_step:
        from .lora import FEW_STEP

        for shot in story.shots:
            for key, value in FEW_STEP.items():
                shot.settings.setdefault(key, value)
    log.info("model ready in %.1fs", time.perf_counter() - t0)
    cache_dir = None if args.no_cache else args.cache_dir or out.parent / ".segue-cache"
    progress = _Progress(enabled=not args.quiet and main_rank)
    try:
        video = pipe.story(story, cache_dir=cache_dir, progress=progress, color_match=args.color_match)
    finally:
        progress.close()
    if video is None:  # another rank of a parallel run: rank 0 writes
        return 0
    video.save(out, frames_dir=args.frames_dir, overwrite=args.overwrite, protected=protected)
    if args.report is not None:
        write_report(video.info["report"], args.report)
    reused = sum(s["reused"] for s in video.info["report"]["shots"])
    t, h, w, _ = video.frames.shape
    log.info("wrote %s: %d frames %dx%d at %d fps, %d of %d shots reused (%.1fs total)", out, t, w, h, video.fps,
             reused, len(story.shots), time.perf_counter() - t0)  # fmt: skip
    print(out, flush=True)
    return 0


def _parallel_config(args: argparse.Namespace):
    """A ParallelConfig when a parallel flag is set or torchrun started several processes, else None."""
    from .dist import ParallelConfig

    asked = args.ulysses > 1 or args.ring > 1 or args.cfg_parallel or args.fsdp
    if not asked and not _several_ranks():
        return None
    return ParallelConfig(
        ulysses=args.ulysses, ring=args.ring, cfg=args.cfg_parallel, fsdp=args.fsdp,
        vae=not args.no_vae_parallel, reference_padding=args.sp_reference_padding,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.command import serve

    return serve(args)


def cmd_worker(args: argparse.Namespace) -> int:
    from .serve.command import worker

    return worker(args)


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import describe

    print(describe(args.ckpt_dir))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.chain import command

    return command(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .tools.sweep import run

    return run(args)


def cmd_calibrate_cache(args: argparse.Namespace) -> int:
    from .tools.calibrate_cache import run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_model, held_out_set, jsonable, pipeline_generate_fn
    from .io import Protected, check_output_file
    from .loader import DEFAULT_MODEL, load
    from .settings import check_request

    if args.pairs is not None:
        return _eval_pairs(args)
    if args.clips < 1 or args.groups < 0:
        raise InputError(f"--clips must be >= 1 and --groups >= 0, got {args.clips} and {args.groups}")
    check_request(steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
                  guidance_steps=args.guidance_steps, flags=True)  # fmt: skip
    protected = Protected().add(args.ckpt if args.ckpt is not None else DEFAULT_MODEL, "checkpoint")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give the folder for eval.json, eval.md, contact_sheet.png")
    for name in ("eval.json", "eval.md", "contact_sheet.png"):
        check_output_file(args.out / name, "report", protected)
    pipe = load(args.ckpt)
    clips, groups = held_out_set(pipe.config.defaults, args.clips, args.groups, args.split)
    generate = pipeline_generate_fn(pipe, steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
                                    guidance_steps=args.guidance_steps)  # fmt: skip
    summary = evaluate_model(generate, clips, groups, args.out)
    print(json.dumps(jsonable({"means": summary["means"], "pass": summary["pass"]}), indent=2, allow_nan=False))
    return 0


def _eval_pairs(args: argparse.Namespace) -> int:
    from .pairs import read_pairs, score_pairs

    pairs = read_pairs(args.pairs)  # checked before a model loads
    generate = None
    if any(p.frames is None for p in pairs):
        from .loader import load

        pipe = load(args.ckpt)
        settings = {"steps": args.steps, "guidance": args.guidance, "shift": args.shift, "seed": args.seed,
                    "guidance_steps": args.guidance_steps}  # fmt: skip

        def generate(first, last, prompt):  # noqa: ANN001, ANN202
            return pipe.generate(first, last, prompt, **settings).frames

    summary = score_pairs(pairs, generate, args.out)
    print(json.dumps(summary["means"], indent=2))
    return 0


def cmd_make_pairs(args: argparse.Namespace) -> int:
    from .pairs import make_heldout_pairs

    if args.photos < 0 or args.scenes < 0 or args.photos + args.scenes < 1:
        raise InputError(f"--photos and --scenes must be >= 0 and not both 0, got {args.photos} and {args.scenes}")
    names = make_heldout_pairs(args.dest, args.photos, args.scenes, args.seed)
    print(f"{len(names)} pairs in {args.dest}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .testing import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dest, layout=args.layout, model=args.model, seed=args.seed, shards=args.shards))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so the same cleanup runs (temporary files
    and folders of segue.io removed) and the process ends with one line."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    commands = {"generate": cmd_generate, "story": cmd_story, "info": cmd_info, "make-tiny": cmd_make_tiny,
                "train": cmd_train, "eval": cmd_eval, "make-pairs": cmd_make_pairs, "sweep": cmd_sweep,
                "calibrate-cache": cmd_calibrate_cache, "serve": cmd_serve, "worker": cmd_worker}  # fmt: skip
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    ok = False
    try:
        rc = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below, not at interpreter exit
        ok = True
        return rc
    except SegueError as e:
        # in a torchrun job every rank validates the same input and fails the same way; torchrun then
        # stops the job. Say which rank spoke when there are several.
        rank = os.environ.get("RANK") if _several_ranks() else None
        return _fail(f"error{f' (rank {rank})' if rank else ''}: {e}", 2)
    except Terminated:
        return _fail("terminated (SIGTERM); nothing was left half-written", 143)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was left half-written", 130)
    except BrokenPipeError:
        # the reader of stdout went away (`segue info ... | head`): quiet the interpreter's final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _fail("error: standard output was closed before segue printed its result", 2)
    except MemoryError:
        return _fail("error: out of memory; ask for fewer frames, a smaller size or a lighter --memory profile", 2)
    except OSError as e:  # a machine condition outside the writes that segue.io already reports
        where = f" ({e.filename})" if e.filename else ""
        return _fail(f"error: {e.strerror or e}{where}", 2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _leave_process_group(wait_for_peers=ok)


def _fail(line: str, rc: int) -> int:
    with contextlib.suppress(OSError):  # stderr closed too: the exit code still says it
        print(line, file=sys.stderr, flush=True)
    return rc


def _several_ranks() -> bool:
    """Whether this process is one rank of a torchrun job of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _leave_process_group(wait_for_peers: bool) -> None:
    """Leave a torchrun job's process groups. After a run that went well, every rank first waits for the
    others (rank 0 may still be writing the video), so no rank tears its connections down under a peer."""
    if "torch" not in sys.modules:  # an argument error: torch was never imported, no group was joined
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(rc: int) -> None:
    """End the process with ``rc``. A rank of a torchrun job skips the interpreter's finalization, where
    gloo's threads can abort the process ("terminate called without an active exception", SIGABRT; seen
    once in CI on a 4-process generate, and in PyTorch's own gloo tests at module teardown) and so fail a
    job whose work is done. Its files are written and closed by then; the streams are flushed here."""
    if _several_ranks():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def run() -> None:
    """The ``segue`` console script."""
    exit_process(main())


if __name__ == "__main__":
    run()
