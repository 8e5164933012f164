"""Every generate setting is checked for type and range in one place, before any model work.

The Python API raises ``InputError`` naming the argument and what is allowed; the CLI prints the same as one
line with exit code 2, before it imports torch (model-free checks) or before it loads weights (checks against
the model's config).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

import segue
from segue.errors import InputError
from segue.settings import check_request


@pytest.fixture(scope="module")
def pipe(official_ckpt):
    p = segue.load(official_ckpt)

    def no_model_work(*args, **kwargs):
        raise AssertionError("model work started before the settings were checked")

    p.encode_text = no_model_work
    return p


BAD = [  # wrong types and values out of range, each with the words its message must hold
    ({"negative_prompt": 3}, ["negative_prompt", "string"]),
    ({"frames": "9"}, ["frames", "integer"]),
    ({"frames": True}, ["frames", "integer"]),
    ({"frames": 9.0}, ["frames", "integer"]),
    ({"frames": 1}, ["frames", "first and a last frame need at least 5"]),
    ({"size": (64,)}, ["size", "(width, height)"]),
    ({"size": "64x48"}, ["size", "(width, height)"]),
    ({"size": (64, 48.5)}, ["size", "integer", "height"]),
    ({"size": (100000, 100000)}, ["size", "at most 16384x16384", "position table"]),
    ({"size": (8192, 8192), "frames": 4093}, ["GiB", "decoded clip", "this machine has"]),
    ({"frames": 4097}, ["frames", "at most 4093 frames"]),
    ({"seed": 1.5}, ["seed", "integer in [0, 9223372036854775807]"]),
    ({"seed": -1}, ["seed", "integer in [0"]),
    ({"seed": False}, ["seed", "integer"]),
    ({"steps": 0}, ["steps", "integer in [1, 1000]"]),
    ({"steps": 1001}, ["steps", "integer in [1, 1000]"]),
    ({"steps": 2.0}, ["steps", "integer"]),
    ({"guidance": math.nan}, ["guidance", "finite number in [0, 50]", "nan"]),
    ({"guidance": math.inf}, ["guidance", "finite number in [0, 50]"]),
    ({"guidance": -1.0}, ["guidance", "[0, 50]", "-1"]),
    ({"guidance": "5"}, ["guidance", "number"]),
    ({"shift": 0.0}, ["shift", "(0, 100]"]),
    ({"shift": math.nan}, ["shift", "finite"]),
    ({"guidance_steps": 0}, ["guidance_steps", "integer in [1, 1000]"]),
    ({"max_area": 0}, ["max_area", "integer >= 1"]),
    ({"max_area": 4096, "size": (64, 48)}, ["size", "max_area", "not both"]),
    ({"progress": 5}, ["progress", "callable"]),
    ({"decode": "yes"}, ["decode", "True or False"]),
]


@pytest.mark.parametrize(("kwargs", "words"), BAD, ids=[str(k) for k, _ in BAD])
def test_generate_refuses_a_wrong_type_or_range_before_any_model_work(pipe, frames_dir, kwargs, words):
    kwargs = {"prompt": "x", **kwargs}
    with pytest.raises(InputError) as e:
        pipe.generate(frames_dir / "first.png", frames_dir / "last.png", **kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert "\n" not in str(e.value)


def test_numbers_of_any_integer_or_real_type_are_accepted_and_normalised():
    import numpy as np

    r = check_request(frames=np.int64(9), seed=np.uint32(3), guidance=np.float32(2.5), size=[np.int16(64), 48])
    assert (r.frames, r.seed, r.guidance, r.size) == (9, 3, 2.5, (64, 48))
    assert type(r.frames) is int and type(r.guidance) is float


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from segue.cli import main; rc = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--guidance", "nan"], ["--guidance", "finite number in [0, 50]"]),
        (["--guidance", "-2"], ["--guidance", "[0, 50]"]),
        (["--frames", "10"], ["--frames", "4n+1"]),
        (["--steps", "0"], ["--steps", "[1, 1000]"]),
        (["--seed", "-5"], ["--seed", "integer in [0"]),
        (["--shift", "inf"], ["--shift", "finite"]),
        (["--solver", "heun"], ["--solver", "unipc"]),
        (["--guidance-steps", "0"], ["--guidance-steps", "[1, 1000]"]),
    ],
)
def test_cli_setting_errors_come_before_torch_is_imported(frames_dir, tmp_path, args, words):
    out = tmp_path / "v.mp4"
    r = _cli("generate", "--ckpt-dir", str(tmp_path / "not-read-yet"), "--first", str(frames_dir / "first.png"),
             "--out", str(out), *args)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and all(w in line for w in words), line
    assert r.stdout.strip() == "False"  # torch was never imported
    assert not out.exists()


def test_cli_size_beyond_the_model_is_refused_before_the_weights_load(official_ckpt, frames_dir, tmp_path):
    r = _cli("generate", "--ckpt-dir", str(official_ckpt), "--first", str(frames_dir / "first.png"),
             "--out", str(tmp_path / "v.mp4"), "--size", "100000x100000")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "100000x100000" in line and "at most 16384x16384" in line, line
    assert "loaded" not in r.stderr


def test_help_and_argument_errors_do_not_import_torch():
    for args in (["--help"], ["generate", "--help"], ["generate", "--frames", "x"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "segue", *args], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
        assert r.returncode in (0, 2)
        assert "torch" not in imported and "transformers" not in imported, args
        assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "segue", "generate", "--frames", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: argument --frames")


def test_the_size_help_and_the_size_error_name_the_same_step(official_ckpt):
    from segue.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    (size,) = [a for a in generate._actions if "--size" in a.option_strings]
    assert "16 for Wan2.1 14B, 8 for the built-in model" in size.help
    from segue.loader import DEFAULT_MODEL, checkpoint_plan

    if DEFAULT_MODEL.is_file():
        from segue.settings import check_request, resolve_settings

        with pytest.raises(InputError, match="not divisible by 8"):
            resolve_settings(check_request(size=(100, 64)), checkpoint_plan(None).config, (64, 64), True)
    with pytest.raises(InputError, match="not divisible by 16"):
        resolve_settings(check_request(size=(100, 64)), checkpoint_plan(official_ckpt).config, (64, 64), True)
