"""Command line: the parser of every ``segue`` subcommand (``generate``, ``story``, ``serve``, ``worker``,
``info``, ``train``, ``eval``, ``make-pairs``, ``sweep``, ``calibrate-cache``, ``make-tiny``), and ``main``,
which runs one (``segue.commands``) and turns every failure into one line. Also runs as ``python -m segue``.

Logs and progress go to stderr; errors the user can fix are one line (``error: ...``, exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from . import commands as cmd
from .errors import SegueError

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
    tr.add_argument(
        "--recipe",
        required=True,
        help="a shipped recipe's name (default, gpu, broad, keyframes) or a recipe file (TOML)",
    )
    tr.add_argument("--out", type=Path, required=True, help="run folder (one folder per stage, checkpoints, logs)")
    tr.add_argument("--from", dest="start", type=Path, default=None, metavar="BUNDLE",
                    help="the bundle a recipe without [scratch] continues (default: the recipe's `from`)")  # fmt: skip
    tr.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps and clips")
    tr.add_argument("--install", action="store_true", help="copy the result into the package as the built-in model")
    tr.add_argument("--device", default="cpu", help="where the models train: cpu, cuda, cuda:1, ...")
    tr.add_argument("--time-budget", default=None, metavar="DURATION",
                    help="each DiT stage of a continuation runs the steps that fit (420, 7m, 1.5h)")  # fmt: skip
    tr.add_argument("--workers", type=int, default=0,
                    help="processes that render clips and collate batches (a GPU, or spare cores)")  # fmt: skip

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
    sv.add_argument("--allow-private-webhooks", action="store_true",
                    help="webhook_url may name loopback and private hosts (default: public only)")  # fmt: skip
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
    commands = {
        "generate": cmd.cmd_generate,
        "story": cmd.cmd_story,
        "info": cmd.cmd_info,
        "make-tiny": cmd.cmd_make_tiny,
        "train": cmd.cmd_train,
        "eval": cmd.cmd_eval,
        "make-pairs": cmd.cmd_make_pairs,
        "sweep": cmd.cmd_sweep,
        "calibrate-cache": cmd.cmd_calibrate_cache,
        "serve": cmd.cmd_serve,
        "worker": cmd.cmd_worker,
    }
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
        rank = os.environ.get("RANK") if cmd.several_ranks() else None
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
    if cmd.several_ranks():
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
