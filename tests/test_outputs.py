"""Outputs are safe: never onto an input, written whole or not at all, one line for every failure.

CLI cases run ``python -m segue`` in a subprocess with a private TMPDIR; machine conditions (a full disk,
a read-only folder, a signal in the middle of writing) are made real inside that process by a
``sitecustomize`` hook: the encoder writes to /dev/full, the folder refuses new files, the process signals
itself. Each case checks the exit code, the one-line message, that the inputs are byte-identical and that
no stray file is left anywhere.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segue
from segue.errors import InputError, OutputError
from segue.io import MARKER
from segue.media import gif_durations, write_video
from segue.testing import make_tiny_checkpoint

HOOK = textwrap.dedent("""
    import errno, os, signal, tempfile
    from pathlib import Path

    fault = os.environ.get("SEGUE_TEST_FAULT", "")
    if fault:
        import segue.media as media

        if fault == "enospc-video":  # a partial file, then the encoder's own ENOSPC
            real_av = media._write_av

            def _write_av(frames, path, fmt, codec, fps):
                Path(path).write_bytes(b"partial")
                real_av(frames, Path("/dev/full"), fmt, codec, fps)

            media._write_av = _write_av
        elif fault in ("enospc-frames", "sigterm-frames", "sigint-frames"):
            real_png = media.write_png_frames
            # Ctrl-C as in a terminal, even where the test runs with SIGINT ignored (a background job)
            signal.signal(signal.SIGINT, signal.default_int_handler)

            def write_png_frames(frames, folder):
                real_png(frames[:2], folder)  # two frames written whole, then the fault
                if fault == "enospc-frames":
                    from PIL import Image

                    Image.fromarray(frames[2]).save("/dev/full", format="PNG")
                os.kill(os.getpid(), signal.SIGTERM if fault == "sigterm-frames" else signal.SIGINT)
                real_png(frames, folder)

            media.write_png_frames = write_png_frames
        elif fault.startswith("readonly:"):  # a read-only mount: no new file or folder under it
            root = fault.split(":", 1)[1]
            real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

            def refuse(kw, real, *a):
                if str(Path(kw.get("dir") or ".").resolve()).startswith(root):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
                return real(*a, **kw)

            tempfile.mkstemp = lambda *a, **kw: refuse(kw, real_mkstemp, *a)
            tempfile.mkdtemp = lambda *a, **kw: refuse(kw, real_mkdtemp, *a)
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory, frames_dir) -> dict[str, Path]:
    """Keyframes (a PNG and a GIF) in a folder of inputs, a hook folder, and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("outputs")
    inputs = root / "inputs"
    inputs.mkdir()
    Image.open(frames_dir / "first.png").save(inputs / "first.gif")
    Image.open(frames_dir / "last.png").save(inputs / "last.png")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    ckpt = make_tiny_checkpoint(root / "ckpt", layout="official", seed=0)
    return {"root": root, "inputs": inputs, "hook": hook, "ckpt": ckpt}


def _tree(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` with its sha256 (inputs must stay byte-identical)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


def run_cli(work, tmp_path: Path, *args: str, fault: str = "", stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    path = os.pathsep.join(p for p in (str(work["hook"]), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": path, "SEGUE_TEST_FAULT": fault}
    r = subprocess.run([sys.executable, "-m", "segue", *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                       env=env, timeout=300)  # fmt: skip
    assert not list(tmpdir.iterdir()), "stray files in TMPDIR"
    return r


def _one_line(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    last = lines[-1]
    for w in words:
        assert w in last, (w, last)
    return last


def _generate(work, out: Path, *extra: str) -> list[str]:
    first, last = str(work["inputs"] / "first.gif"), str(work["inputs"] / "last.png")
    return ["-q", "generate", "--ckpt-dir", str(work["ckpt"]), "--first", first, "--last", last, "--frames", "5",
            "--steps", "1", "--out", str(out), *extra]  # fmt: skip


def _no_stray(folder: Path) -> None:
    stray = [p.name for p in folder.rglob("*") if ".part" in p.name or ".old" in p.name or "probe" in p.name]
    assert not stray, stray


# ---------------------------------------------------------------------------------------------
# Refused before any work: outputs onto inputs, mixed folders, missing folders (no model is loaded).


def test_outputs_that_are_inputs_are_refused_and_inputs_stay_byte_identical(work, tmp_path):
    before = _tree(work["inputs"], work["ckpt"])
    first, last = work["inputs"] / "first.gif", work["inputs"] / "last.png"
    cases = [
        (["--out", str(first)], ["first frame", str(first), "never overwrites an input"]),
        (["--out", str(work["ckpt"] / "v.mp4")], ["checkpoint folder", "never overwrites an input"]),
        (["--save-latent", str(last)], ["latent file", "last frame"]),
        (["--frames-dir", str(work["inputs"])], ["frames folder", "holds the first frame"]),
        (["--frames-dir", str(work["inputs"]), "--overwrite"], ["frames folder", "holds the first frame"]),
        (["--frames-dir", str(work["ckpt"] / "png")], ["frames folder", "checkpoint"]),
    ]
    link = tmp_path / "link.gif"
    link.symlink_to(first)
    cases.append((["--out", str(link)], ["first frame"]))
    hard = tmp_path / "hard.gif"
    os.link(first, hard)
    cases.append((["--out", str(hard)], ["first frame"]))
    for extra, words in cases:
        out = tmp_path / "v.mp4"
        args = _generate(work, out)
        if "--out" in extra:
            args[args.index("--out") + 1] = extra[1]
            extra = extra[2:]
        r = run_cli(work, tmp_path, *args, *extra)
        _one_line(r, 2, "error:", *words)
        assert not out.exists()
    assert _tree(work["inputs"], work["ckpt"]) == before
    _no_stray(work["root"])
    _no_stray(tmp_path)


def test_a_folder_segue_did_not_write_is_never_mixed_and_paths_are_checked_first(work, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (user / "00000.png").write_bytes(b"my own frame")
    before = _tree(user)
    out = tmp_path / "v.mp4"
    r = run_cli(work, tmp_path, *_generate(work, out, "--frames-dir", str(user)))
    _one_line(r, 2, "frames folder", str(user), "not empty and was not written by segue", "--overwrite")
    r = run_cli(work, tmp_path, *_generate(work, tmp_path / "no" / "such" / "v.mp4"))
    _one_line(r, 2, "does not exist", "only the last folder")
    assert not (tmp_path / "no").exists()
    r = run_cli(work, tmp_path, *_generate(work, out, "--save-latent", str(tmp_path)))
    _one_line(r, 2, "latent file", "is a folder")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    loud = _generate(work, out, "--frames-dir", str(read_only / "png"))[1:]  # without -q: logs show a load
    r = run_cli(work, tmp_path, *loud, fault=f"readonly:{read_only.resolve()}")
    _one_line(r, 2, "frames folder", "not writable", "Read-only file system")
    assert "model ready" not in r.stderr  # found before the model loads, not after the generation
    assert _tree(user) == before and not out.exists()
    _no_stray(tmp_path)


def test_make_tiny_refuses_a_folder_that_holds_files(work, tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "config.json").write_text('{"mine": true}')
    before = _tree(dest)
    r = run_cli(work, tmp_path, "make-tiny", str(dest))
    _one_line(r, 2, "error:", str(dest), "not an empty folder")
    assert _tree(dest) == before


# ---------------------------------------------------------------------------------------------
# Machine conditions while writing: one line, exit code 2 (130 Ctrl-C, 143 SIGTERM), nothing left.


@pytest.mark.parametrize(
    ("fault", "code", "words"),
    [
        ("enospc-video", 2, ["error: cannot write", "v.mp4", "No space left on device"]),
        ("enospc-frames", 2, ["error: cannot write", "png", "No space left on device"]),
        ("sigterm-frames", 143, ["terminated (SIGTERM)"]),
        ("sigint-frames", 130, ["interrupted"]),
    ],
)
def test_a_full_disk_or_a_signal_while_writing_leaves_nothing_half_written(work, tmp_path, fault, code, words):
    before = _tree(work["inputs"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run_cli(work, tmp_path, *_generate(work, out_dir / "v.mp4", "--frames-dir", str(out_dir / "png"),
                                           "--save-latent", str(out_dir / "z.pt")), fault=fault)  # fmt: skip
    _one_line(r, code, *words)
    assert list(out_dir.iterdir()) == []  # no video, no frames, no latent, no temporary file
    assert _tree(work["inputs"]) == before


def test_a_closed_stdout_is_one_line_not_a_traceback(work, tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader went away (`segue info ... | head` that has exited)
    try:
        r = run_cli(work, tmp_path, "info", str(work["ckpt"]), stdout=write)
        _one_line(r, 2, "error:", "standard output was closed")
        out = tmp_path / "v.mp4"
        r = run_cli(work, tmp_path, *_generate(work, out), stdout=write)
        _one_line(r, 2, "error:", "standard output was closed")
        assert out.is_file()  # the video itself was written whole before the result line
    finally:
        os.close(write)


def test_frames_folder_is_swapped_in_whole_and_a_rerun_replaces_its_own(work, tmp_path):
    png = tmp_path / "png"
    out = tmp_path / "v.mp4"
    r = run_cli(work, tmp_path, *_generate(work, out, "--frames-dir", str(png)))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in png.iterdir()) == [MARKER, *(f"{i:05d}.png" for i in range(5))]
    args = _generate(work, out, "--frames-dir", str(png))
    args[args.index("--frames") + 1] = "1"
    args.remove("--last")
    args.remove(str(work["inputs"] / "last.png"))
    r = run_cli(work, tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in png.iterdir()) == [MARKER, "00000.png"]  # replaced whole, never mixed
    _no_stray(tmp_path)


# ---------------------------------------------------------------------------------------------
# The same guarantees in Python (Video.save), on one generated clip.


@pytest.fixture(scope="module")
def clip(work):
    pipe = segue.load(work["ckpt"])
    return pipe.generate(work["inputs"] / "first.gif", work["inputs"] / "last.png", "x", frames=5, steps=1)


def test_video_save_refuses_inputs_and_replaces_only_its_own_folders(work, clip, tmp_path):
    before = _tree(work["inputs"], work["ckpt"])
    with pytest.raises(InputError, match="first frame"):
        clip.save(work["inputs"] / "first.gif")
    with pytest.raises(InputError, match="checkpoint"):
        clip.save(work["ckpt"] / "v.mp4")
    with pytest.raises(InputError, match="inside the frames folder"):
        clip.save(tmp_path / "png" / "v.mp4", frames_dir=tmp_path / "png")
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("a")
    with pytest.raises(InputError, match="not written by segue"):
        clip.save(tmp_path / "v.mp4", frames_dir=user)
    assert (user / "a.txt").read_text() == "a" and not (tmp_path / "v.mp4").exists()
    clip.save(tmp_path / "v.mp4", frames_dir=user, overwrite=True)  # asked for: replaced whole
    assert sorted(p.name for p in user.iterdir()) == [MARKER, *(f"{i:05d}.png" for i in range(5))]
    (user / "sub").mkdir()
    (user / MARKER).unlink()
    with pytest.raises(InputError, match="holds folders"):
        clip.save(tmp_path / "v.mp4", frames_dir=user, overwrite=True)
    new = tmp_path / "new" / "v.mp4"  # one missing level is created, two are not
    assert clip.save(new, latent_path=tmp_path / "new" / "z.pt") == new and (tmp_path / "new" / "z.pt").is_file()
    with pytest.raises(InputError, match="only the last folder"):
        clip.save(tmp_path / "a" / "b" / "v.mp4")
    assert not (tmp_path / "a").exists()
    assert _tree(work["inputs"], work["ckpt"]) == before
    _no_stray(tmp_path)


def test_a_full_disk_in_python_is_an_output_error_and_leaves_nothing(clip, tmp_path, monkeypatch):
    import segue.media as media

    real = media.write_png_frames

    def full(frames, folder):
        real(frames[:2], folder)
        Image.fromarray(frames[2]).save("/dev/full", format="PNG")

    monkeypatch.setattr("segue.video.write_png_frames", full)
    with pytest.raises(OutputError, match="No space left on device"):
        clip.save(tmp_path / "v.mp4", frames_dir=tmp_path / "png", latent_path=tmp_path / "z.pt")
    assert list(tmp_path.iterdir()) == []


def test_gif_frame_timing_keeps_the_frame_rate():
    assert sum(gif_durations(9, 8)) == 1120 and set(gif_durations(9, 8)) == {120, 130}  # 1125 ms to 10 ms
    assert gif_durations(4, 16) == [60, 60, 70, 60]


def test_gif_read_back_has_the_asked_frame_rate(tmp_path):
    frames = np.stack([np.full((16, 16, 3), 25 * i, np.uint8) for i in range(8)])
    path = write_video(frames, tmp_path / "v.gif", fps=8)
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert len(durations) == 8 and sum(durations) == 1000  # 8 frames at 8 fps: one second, not 0.96 s
