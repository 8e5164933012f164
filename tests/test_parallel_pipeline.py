"""Whole generations under torchrun on CPU (gloo): every parallel layout gives the single-process latent.

Each case is a real ``torchrun --nproc_per_node=N -m segue generate ...`` job; only rank 0 writes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from segue.media import read_video
from segue.testing import free_port


def _generate(ckpt, frames_dir, out_dir, nproc: int, *flags: str, size: str = "80x48"):
    out_dir.mkdir(parents=True, exist_ok=True)
    first, last = str(frames_dir / "first.png"), str(frames_dir / "last.png")
    args = ["generate", "--ckpt-dir", str(ckpt), "--first", first, "--last", last, "--prompt", "a ball",
            "--negative-prompt", "blur", "--frames", "9", "--steps", "3", "--seed", "5", "--size", size,
            "--guidance", "4.5", "--out", str(out_dir / "v.mp4"), "--save-latent", str(out_dir / "z.pt"),
            *flags]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "segue", "-q", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "segue", "-q", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out_dir / "z.pt", weights_only=True), r


@pytest.fixture(scope="module")
def single(official_ckpt, frames_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return {size: _generate(official_ckpt, frames_dir, d / size, 1, size=size)[0] for size in ("80x48", "64x48")}


CASES = [
    (2, ["--ulysses", "2"], "80x48"),  # 45 tokens: padded to 46
    (2, ["--ring", "2"], "64x48"),  # 36 tokens: even
    (2, ["--cfg-parallel"], "80x48"),
    (2, ["--fsdp"], "80x48"),
    (4, ["--ulysses", "2", "--ring", "2"], "80x48"),  # 45 tokens over 4: padded to 48
    (4, ["--cfg-parallel", "--ring", "2", "--fsdp"], "80x48"),
]


@pytest.mark.parametrize(
    ("nproc", "flags", "size"), CASES, ids=lambda v: "_".join(v) if isinstance(v, list) else str(v)
)
def test_parallel_layouts_match_single_process(official_ckpt, frames_dir, tmp_path, single, nproc, flags, size):
    z, r = _generate(official_ckpt, frames_dir, tmp_path / "run", nproc, *flags, size=size)
    diff = (z - single[size]).abs().max().item()
    assert diff < 1e-5, f"{flags}: max abs latent difference {diff:.2e}"
    frames = read_video(tmp_path / "run" / "v.mp4")
    w, h = (int(v) for v in size.split("x"))
    assert frames.shape == (9, h, w, 3)
    # only rank 0 wrote: one video, no leftovers from other ranks
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["v.mp4", "z.pt"]


def test_reference_padding_switch_changes_uneven_runs(official_ckpt, frames_dir, tmp_path, single):
    z, _ = _generate(official_ckpt, frames_dir, tmp_path / "ref", 2, "--ulysses", "2", "--sp-reference-padding")
    assert (z - single["80x48"]).abs().max().item() > 1e-4  # padded keys now take part in attention


def test_wrong_process_count_fails_cleanly(official_ckpt, frames_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m",
           "segue", "generate", "--ckpt-dir", str(official_ckpt), "--first", str(frames_dir / "first.png"),
           "--out", str(tmp_path / "v.mp4"), "--ulysses", "2", "--ring", "2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "needs (2 if --cfg-parallel else 1) x ring 2 x ulysses 2 = 4" in r.stderr
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_keeps_the_code_and_flushes(world):
    # a torchrun rank ends with os._exit (no interpreter finalization): buffered output must still come out
    code = "from segue.cli import exit_process; print('written', end=''); exit_process(3)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "WORLD_SIZE": world})  # fmt: skip
    assert (r.returncode, r.stdout) == (3, "written")
