"""Run a recipe: its stages in order, each in its own folder of the run, each from the bundle the one before
wrote; resumable (a stage with its bundle written is skipped; an interrupted one resumes from its
checkpoints). The last stage's bundle is copied to ``OUT/model.safetensors``.

    segue train --recipe default --out runs/default            # the built-in model, from scratch
    segue train --recipe default --out runs/check --steps-scale 0.001

``run.json`` records the recipe and the scale a run folder was started with; resuming it with another
recipe or scale is refused (its stages would mix two runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import InputError
from ..io import atomic_path, atomic_write_text
from .continuation import continue_from_bundle
from .recipe import Recipe, without_later_defaults
from .scratch import train_scratch

log = logging.getLogger("segue")


def _check_run_folder(out: Path, record: dict) -> None:
    """Start ``out``'s record, or check that a resumed run is the same run."""
    path = out / "run.json"
    record = json.loads(json.dumps(record))  # as it reads back: tuples are lists
    if path.is_file():
        before = without_later_defaults(json.loads(path.read_text()))
        record = without_later_defaults(record)  # type: ignore[assignment]
        if before != record:
            changed = sorted(k for k in record if before.get(k) != record[k])
            raise InputError(f"{out} holds a run of another recipe or settings ({', '.join(changed)} differ); "
                             "resume it with the same ones, or give another --out")  # fmt: skip
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2))


def _start_bundle(recipe: Recipe, start: Path | None) -> Path | None:
    """The bundle the chain's first continuation starts from (None: the chain starts from scratch)."""
    if recipe.scratch is not None:
        if start is not None:
            raise InputError(f"recipe {recipe.name!r} trains from scratch ([scratch]); --from is for a recipe "
                             "without it")  # fmt: skip
        return None
    if start is None and recipe.start == "builtin":
        from ..loader import DEFAULT_MODEL

        start = DEFAULT_MODEL
    if start is None:
        raise InputError(f"recipe {recipe.name!r} has no [scratch] and no `from`: give --from BUNDLE")
    if not Path(start).is_file():
        raise InputError(f"--from: no such bundle file: {start}")
    return Path(start)


def train_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    steps_scale: float = 1.0,
    start: str | Path | None = None,
    time_budget: float | None = None,
    workers: int = 0,
) -> Path:
    """Run ``recipe`` into ``out_dir`` (resuming where it stopped); returns ``out_dir/model.safetensors``.

    ``steps_scale`` multiplies every phase's steps and the clips it caches or generates (at least 1 each): a
    small one runs the whole chain as a quick check. ``start``: the bundle a recipe without
    ``[scratch]`` continues (default: its ``from``). ``time_budget`` (seconds from this call): each
    continuation's DiT stage runs the steps that fit the time left. ``workers``: processes that render and
    collate the continuations' clips."""
    if not steps_scale > 0:
        raise InputError(f"--steps-scale must be positive, got {steps_scale}")
    if workers < 0:
        raise InputError(f"--workers must be >= 0, got {workers}")
    if time_budget is not None and not time_budget > 0:
        raise InputError(f"--time-budget must be positive seconds, got {time_budget}")
    if recipe.scratch is not None and (time_budget is not None or workers):
        raise InputError("--time-budget and --workers are for the continuations of a recipe without [scratch]")
    deadline = None if time_budget is None else time.monotonic() + time_budget
    bundle = _start_bundle(recipe, None if start is None else Path(start))
    from ..placement.tensors import resolve_device

    resolve_device(device)  # a missing GPU is refused before anything is written
    out = Path(out_dir)
    _check_run_folder(out, {"recipe": asdict(recipe), "steps_scale": steps_scale,
                            "from": None if bundle is None else str(bundle)})  # fmt: skip
    for n, stage in enumerate(recipe.stages()):
        folder = out / stage.name
        done = folder / "model.safetensors"
        if done.is_file():
            log.info("stage %d/%d %s: done", n + 1, len(recipe.stages()), stage.name)
        elif n == 0 and recipe.scratch is not None:
            log.info("stage %d/%d %s: from scratch", n + 1, len(recipe.stages()), stage.name)
            train_scratch(recipe, folder, device=device, steps_scale=steps_scale)
        else:
            log.info("stage %d/%d %s: from %s", n + 1, len(recipe.stages()), stage.name, bundle)
            continue_from_bundle(bundle, stage, recipe.vae, folder, device=device, steps_scale=steps_scale,
                                 deadline=deadline, workers=workers)  # fmt: skip
        bundle = done
    final = out / "model.safetensors"
    with atomic_path(final) as tmp:
        shutil.copyfile(bundle, tmp)
    return final


def command(args: argparse.Namespace) -> int:
    """``segue train``: run the recipe, install the result when asked, print its path."""
    from ..loader import DEFAULT_MODEL
    from .budget import parse_duration
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    budget = None if args.time_budget is None else parse_duration(args.time_budget)
    path = train_recipe(recipe, args.out, device=args.device, steps_scale=args.steps_scale, start=args.start,
                        time_budget=budget, workers=args.workers)  # fmt: skip
    if args.install:
        with atomic_path(DEFAULT_MODEL) as tmp:
            shutil.copyfile(path, tmp)
        log.info("installed %s as the built-in model (%s)", path, DEFAULT_MODEL)
    print(path)
    return 0
