"""A continuation of the built-in model on a lent GPU, within a time budget, its bundle brought back in parts.

On the device machine (one call; the budget covers the latent cache and the DiT stage, the call's limit must
leave room for the start, the checkpoints and the bundle):

    python3 bench/gpu_continue.py --out $OUT --budget 450 --workers 12

runs ``segue train --continue-from src/segue/assets/default.safetensors --continuation default-g1 --device
cuda --time-budget 450 --workers 12`` in this process and leaves in --out: ``train.log`` (what it printed),
``budget.json`` (the steps it chose and why), ``continuation.json``, ``log.jsonl`` (loss per step) and the new
bundle as ``model.part-00``, ``model.part-01``, ... (the device tool brings back files of at most 16 MiB)
with ``model.sha256``. Back here:

    python bench/gpu_continue.py --join FOLDER --to RUN/model.safetensors

puts the bundle together and checks its sha256; then score it with ``segue eval --ckpt RUN/model.safetensors``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "src" / "segue" / "assets" / "default.safetensors"
PART_BYTES = 12 << 20  # under the 16 MiB a returned file may have


class Tee(io.TextIOBase):
    """Writes to a stream and to a file (the device tool returns only the end of the output)."""

    def __init__(self, stream: io.TextIOBase, path: Path) -> None:
        self.stream, self.file = stream, path.open("a")

    def write(self, s: str) -> int:
        self.file.write(s)
        self.file.flush()
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()


def split(path: Path, out: Path, part_bytes: int) -> list[Path]:
    """``path`` as ``out/model.part-NN`` files of at most ``part_bytes``, and ``out/model.sha256``."""
    data = path.read_bytes()
    parts = []
    for k, start in enumerate(range(0, len(data), part_bytes)):
        parts.append(out / f"model.part-{k:02d}")
        parts[-1].write_bytes(data[start : start + part_bytes])
    (out / "model.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    return parts


def join(folder: Path, to: Path) -> Path:
    """The bundle from ``folder``'s parts, checked against its sha256, written whole (a temporary name first)."""
    parts = sorted(folder.glob("model.part-*"))
    digest_file = folder / "model.sha256"
    if not parts or not digest_file.is_file():
        raise SystemExit(f"error: {folder} has no model.part-* files and model.sha256 to join")
    data = b"".join(p.read_bytes() for p in parts)
    expected = digest_file.read_text().strip()
    if hashlib.sha256(data).hexdigest() != expected:
        raise SystemExit(f"error: the {len(parts)} parts in {folder} do not give the sha256 in {digest_file}")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(to.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, to)
    return to


def run(args: argparse.Namespace) -> int:
    import torch

    from segue.cli import main as segue_main

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    if args.device.startswith("cuda"):
        # fp32 weights, TF32 matrix products: at batch 128 (41,000 tokens of width 192 through 12 blocks, about
        # 2-3 TFLOP a step) the DiT is compute-bound, and full-fp32 products skip the tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with contextlib.redirect_stderr(Tee(sys.stderr, log)), contextlib.redirect_stdout(Tee(sys.stdout, log)):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        print(f"torch {torch.__version__}, {gpu}, {os.cpu_count()} CPUs, TF32 {tf32}; budget {args.budget} s",
              file=sys.stderr)  # fmt: skip
        t0 = time.monotonic()
        rc = segue_main(["train", "--continue-from", str(args.bundle), "--continuation", args.continuation,
                         "--out", str(args.run), "--device", args.device, "--time-budget", str(args.budget),
                         "--workers", str(args.workers)])  # fmt: skip
        print(f"segue train exited {rc} after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if rc != 0:
        return rc
    from segue.train.continuation import CONTINUATIONS

    stage = CONTINUATIONS[args.continuation].stage.name
    for name in ("budget.json", "continuation.json", f"{stage}/log.jsonl"):
        if (args.run / name).is_file():
            shutil.copyfile(args.run / name, out / Path(name).name)
    parts = split(args.run / "model.safetensors", out, args.part_bytes)
    print(f"bundle in {len(parts)} parts in {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="folder the device tool brings back ($OUT)")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="the bundle to continue (the shipped one)")
    ap.add_argument("--continuation", default="default-g1")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the latent cache and the DiT stage")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=12, help="processes rendering clips and collating batches")
    ap.add_argument("--run", type=Path, default=Path("/tmp/segue-gpu-run"), help="the run folder (on the device)")
    ap.add_argument("--part-bytes", type=int, default=PART_BYTES)
    ap.add_argument("--join", type=Path, default=None, metavar="FOLDER", help="here: join the parts in FOLDER")
    ap.add_argument("--to", type=Path, default=None, help="with --join: the bundle to write")
    args = ap.parse_args(argv)
    if args.join is not None:
        if args.to is None:
            ap.error("--join needs --to FILE")
        print(join(args.join, args.to))
        return 0
    if args.out is None:
        ap.error("--out FOLDER is needed (or --join FOLDER --to FILE)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
