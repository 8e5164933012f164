"""What each ``segue`` subcommand does, once its arguments are parsed (``segue.cli`` parses them and turns
errors into one line). Heavy imports (torch, the model, the server) happen inside each command, so
``segue --help`` and argument errors stay fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .errors import InputError

log = logging.getLogger("segue")


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
    if not asked and not several_ranks():
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


def several_ranks() -> bool:
    """Whether this process is one rank of a torchrun job of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
