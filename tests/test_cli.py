"""The command line end to end on a tiny checkpoint, and its errors (one line, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segue.cli import main
from segue.media import read_video


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segue", *args], capture_output=True, text=True, timeout=300)


def test_generate_mp4_and_png_frames_end_to_end(official_ckpt, frames_dir, tmp_path):
    out = tmp_path / "clip.mp4"
    r = run_cli("generate", "--ckpt-dir", str(official_ckpt), "--first", str(frames_dir / "first.png"),
                "--last", str(frames_dir / "last.png"), "--prompt", "a ball rolls", "--frames", "9",
                "--steps", "3", "--seed", "3", "--out", str(out), "--frames-dir", str(tmp_path / "png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "3/3" in r.stderr  # the progress bar reached the last step
    # the bar closes at the last step; the VAE decode is timed on its own line, not in the bar's s/step
    assert r.stderr.index("decoded 9 frames 64x48") > r.stderr.rindex("3/3")
    frames = read_video(out)
    assert frames.shape == (9, 48, 64, 3)
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(9)]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [".segue-output", *(p.name for p in pngs)]
    # lossless frames and the lossy mp4 show the same picture
    png0 = np.asarray(Image.open(pngs[0]))
    assert np.abs(png0.astype(int) - frames[0].astype(int)).mean() < 12
    assert not list(tmp_path.glob(".*part*"))  # no temporary leftovers


@pytest.mark.parametrize("ext", [".gif", ".webm"])
def test_other_formats(official_ckpt, frames_dir, tmp_path, ext, capsys):
    out = tmp_path / f"clip{ext}"
    first, last = str(frames_dir / "first.png"), str(frames_dir / "last.png")
    args = ["--first", first, "--last", last, "--frames", "5", "--steps", "1", "--out", str(out)]
    code = main(["-q", "generate", "--ckpt-dir", str(official_ckpt), *args])
    assert code == 0
    assert read_video(out).shape[0] == 5


def _err(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    return captured.err.strip()


def test_errors_are_specific(official_ckpt, frames_dir, tmp_path, capsys):
    ck, first, last = str(official_ckpt), str(frames_dir / "first.png"), str(frames_dir / "last.png")
    out = str(tmp_path / "v.mp4")
    base = ["generate", "--ckpt-dir", ck, "--first", first, "--last", last, "--out", out]
    assert "first frame: file not found: nope.png" in _err(
        capsys, "generate", "--ckpt-dir", ck, "--first", "nope.png", "--out", out
    )
    msg = _err(capsys, *base, "--frames", "80")
    assert "4n+1" in msg and "77 or 81" in msg
    msg = _err(capsys, *base, "--size", "100x64")
    assert "width=100" in msg and "16" in msg
    msg = _err(capsys, *base, "--solver", "heun")
    assert "heun" in msg and "unipc, dpm++, euler" in msg
    msg = _err(capsys, "generate", "--ckpt-dir", ck, "--first", first, "--out", str(tmp_path / "v.avi"))
    assert ".avi" in msg and ".mp4" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _err(capsys, "generate", "--ckpt-dir", str(empty), "--first", first, "--out", out)
    assert "neither" in msg and "Wan2.1_VAE.pth" in msg and "model_index.json" in msg
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    assert "cannot read" in _err(capsys, "generate", "--ckpt-dir", ck, "--first", str(bad), "--out", out)
    assert not Path(out).exists()


def test_odd_image_modes_are_converted(official_ckpt, frames_dir, tmp_path):
    import segue

    rgb = np.asarray(Image.open(frames_dir / "first.png"))
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]))
    grey16 = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    assert rgba.mode == "RGBA" and grey16.mode == "I;16"
    paths = []
    for name, im in (("rgba.png", rgba), ("grey16.png", grey16), ("grey.png", Image.fromarray(rgb[..., 1]))):
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    pipe = segue.load(official_ckpt)
    for p in paths:
        v = pipe.generate(p, p, "x", frames=5, steps=1)
        assert v.frames.shape == (5, 48, 64, 3)
    from segue.media import load_image

    g = np.asarray(load_image(tmp_path / "grey16.png"))
    assert g.shape == rgb.shape and np.abs(g[..., 0].astype(int) - rgb[..., 0]).max() <= 1  # rescaled, not clipped


def test_info_reports_layout_sizes_and_missing(official_ckpt, diffusers_ckpt, tmp_path, capsys):
    assert main(["info", str(official_ckpt)]) == 0
    text = capsys.readouterr().out
    assert "layout: official" in text and "missing: nothing" in text and "model type: flf2v" in text
    assert "DiT:" in text and "keys ok" in text and "float32" in text
    assert main(["info", str(diffusers_ckpt)]) == 0
    assert "layout: diffusers" in capsys.readouterr().out


def test_outputs_get_the_usual_file_modes_not_the_temporary_files_private_ones(tmp_path):
    """Written via a private temporary name, the results still get what open()/mkdir() give under the umask."""
    import os

    from segue.media import write_frames, write_video

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    old = os.umask(0o022)
    try:
        video = write_video(frames, tmp_path / "v.mp4", fps=8)
        folder = write_frames(frames, tmp_path / "frames")
    finally:
        os.umask(old)
    assert video.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "00000.png").stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
