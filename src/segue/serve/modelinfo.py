"""What the API process knows of the model without loading it: its config and generation defaults.

The API checks every request against the model (frame steps, size step, position table, memory) before a job
exists, as ``segue generate`` does before it loads weights. Reading a checkpoint's plan imports torch, which the
API process never does: ``describe`` runs ``python -m segue.serve.modelinfo`` once at start-up and reads the
config it prints as JSON (``--few-step`` already folded into the defaults, as the CLI folds it into unset flags).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import InputError


@dataclass(frozen=True)
class ModelInfo:
    config: ModelConfig
    source: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def size_step(self) -> int:
        """Widths and heights must be multiples of this (VAE stride times the DiT's patch)."""
        return self.config.vae.spatial_factor * self.config.dit.patch_size[1]

    def public(self) -> dict[str, Any]:
        """The model part of GET /health: its name and the defaults a request falls back to."""
        d = self.config.defaults
        defaults = {"frames": d.frames, "max_area": d.max_area, "steps": d.steps, "shift": d.shift,
                    "guidance": d.guidance, "solver": d.solver, "fps": d.fps, "negative_prompt": d.negative_prompt,
                    "guidance_steps": d.guidance_steps}  # fmt: skip
        temporal = self.config.vae.temporal_factor
        return {"name": self.name, "source": self.source, "defaults": defaults, "size_step": self.size_step,
                "frame_step": temporal}  # fmt: skip


def describe(ckpt_dir: Path | None, few_step: bool = False, timeout: float = 300) -> ModelInfo:
    """The model's config, read by a short child process (which imports torch; this one does not)."""
    cmd = [sys.executable, "-m", "segue.serve.modelinfo"]
    if ckpt_dir is not None:
        cmd += ["--ckpt-dir", str(ckpt_dir)]
    if few_step:
        cmd.append("--few-step")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        raise InputError(lines[-1].removeprefix("error: ") if lines else f"cannot read the model ({cmd})")
    data = json.loads(done.stdout)
    return ModelInfo(ModelConfig.from_dict(data["config"]), data["source"])


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from ..errors import SegueError
    from ..loader import checkpoint_plan

    p = argparse.ArgumentParser(prog="python -m segue.serve.modelinfo")
    p.add_argument("--ckpt-dir", type=Path)
    p.add_argument("--few-step", action="store_true")
    args = p.parse_args(argv)
    try:
        plan = checkpoint_plan(args.ckpt_dir)
    except SegueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = plan.config
    if args.few_step:
        from ..lora import FEW_STEP

        config = replace(config, defaults=replace(config.defaults, **FEW_STEP))
    print(json.dumps({"config": config.to_dict(), "source": str(plan.folder)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
