"""Storyboards: the general conditioning mask, film counting and joins, the shot cache, loops, reports, errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import segue
from segue.cli import main
from segue.recipe import conditioning_video, frame_mask
from segue.story.cache import ShotCache

ROOT = Path(__file__).resolve().parents[1]


def _keyframe(path: Path, seed: int, size: tuple[int, int] = (80, 64)) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / (5.0 + seed))], -1) * 255
    Image.fromarray(np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)).save(path)
    return path


def _write_story(folder: Path, n_keyframes: int = 3, loop: bool = False, frames: int = 9, **settings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"loop = {'true' if loop else 'false'}", "[settings]", "steps = 2", "seed = 3", f"frames = {frames}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    for i in range(n_keyframes):
        if not (folder / f"k{i}.png").exists():
            _keyframe(folder / f"k{i}.png", i + 1)
        lines += ["[[keyframes]]", f'image = "k{i}.png"']
    for i in range(n_keyframes if loop else n_keyframes - 1):
        lines += ["[[shots]]", f'prompt = "shot {i} moves right"']
    path = folder / "story.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(official_ckpt):
    return segue.load(official_ckpt)


# -- the general conditioning ------------------------------------------------------------------


def _flf2v_mask(frames: int, lat_t: int, lat_h: int, lat_w: int, has_last: bool) -> torch.Tensor:
    """The reference's FLF2V / I2V mask, written out as the reference does it."""
    m = torch.ones(1, frames, lat_h, lat_w)
    m[:, 1 : frames - 1 if has_last else frames] = 0
    m = torch.cat([m[:, :1].repeat_interleave(4, dim=1), m[:, 1:]], dim=1)
    return m.view(1, lat_t, 4, lat_h, lat_w).transpose(1, 2)[0]


def _flf2v_video(first: torch.Tensor, last: torch.Tensor | None, frames: int, h: int, w: int) -> torch.Tensor:
    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=(h, w), mode="bicubic").transpose(0, 1)

    parts = [resize(first), torch.zeros(3, frames - (2 if last is not None else 1), h, w)]
    return torch.cat(parts + ([resize(last)] if last is not None else []), dim=1)


@pytest.mark.parametrize("frames", [5, 9, 17, 81])
def test_flf2v_mask_and_video_are_the_general_ones_special_case(frames):
    lat_t = (frames - 1) // 4 + 1
    g = torch.Generator().manual_seed(frames)
    first, last = torch.rand(3, 50, 70, generator=g) * 2 - 1, torch.rand(3, 50, 70, generator=g) * 2 - 1
    for has_last in (True, False):
        ref = _flf2v_mask(frames, lat_t, 6, 8, has_last)
        positions = [0, frames - 1] if has_last else [0]
        assert torch.equal(frame_mask(frames, lat_t, 6, 8, positions), ref)
        assert torch.equal(frame_mask(frames, lat_t, 6, 8, has_last), ref)
        given = {0: first, **({frames - 1: last} if has_last else {})}
        ref_video = _flf2v_video(first, last if has_last else None, frames, 48, 64)
        assert torch.equal(conditioning_video(given, None, frames, 48, 64), ref_video)
        assert torch.equal(conditioning_video(first, last if has_last else None, frames, 48, 64), ref_video)
    # any other set of positions: exactly those frames are marked and filled
    m = frame_mask(frames, lat_t, 2, 2, [0, 1, 2, frames // 2])[:, :, 0, 0]  # [4, T_lat]
    assert m[:, 0].tolist() == [1.0] * 4  # the first latent stands for frame 0 alone
    marked = {1 + 4 * (t - 1) + c for t in range(1, lat_t) for c in range(4) if m[c, t]}
    assert marked == {1, 2, frames // 2}
    video = conditioning_video({0: first, frames // 2: last}, None, frames, 48, 64)
    filled = {i for i in range(frames) if video[:, i].abs().sum() > 0}
    assert filled == {0, frames // 2}


def test_given_frames_outside_the_clip_are_refused(tiny, tmp_path):
    k = _keyframe(tmp_path / "k.png", 1)
    with pytest.raises(segue.InputError, match=r"positions \[9\] outside the clip's 9 frames"):
        tiny.generate(k, k, frames=9, steps=1, given={9: np.zeros((64, 80, 3), np.uint8)})


# -- films: counting, joins, one shot equals generate ------------------------------------------


def test_one_shot_story_equals_generate_byte_for_byte(official_ckpt, tmp_path, capsys):
    story = _write_story(tmp_path / "s", n_keyframes=2)
    s = tmp_path / "s"
    code = main(["-q", "story", str(story), "--out", str(tmp_path / "film.mp4"), "--frames-dir",
                 str(tmp_path / "film"), "--ckpt-dir", str(official_ckpt)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    code = main(["-q", "generate", "--ckpt-dir", str(official_ckpt), "--first", str(s / "k0.png"), "--last",
                 str(s / "k1.png"), "--prompt", "shot 0 moves right", "--frames", "9", "--steps", "2", "--seed", "3",
                 "--out", str(tmp_path / "clip.mp4"), "--frames-dir", str(tmp_path / "clip")])  # fmt: skip
    assert code == 0
    assert (tmp_path / "film.mp4").read_bytes() == (tmp_path / "clip.mp4").read_bytes()
    names = sorted(p.name for p in (tmp_path / "clip").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "film").glob("*.png")) and len(names) == 9
    for name in names:
        assert (tmp_path / "film" / name).read_bytes() == (tmp_path / "clip" / name).read_bytes()
    assert (tmp_path / ".segue-cache").is_dir()  # the default cache sits beside the output


@pytest.mark.parametrize("carry", [0, 5])
def test_counting_joins_and_carried_frames(tiny, tmp_path, carry):
    story = _write_story(tmp_path, n_keyframes=3, carry=carry)
    calls = []
    generate = tiny.generate

    def spy(*args, **kw):
        calls.append(kw)
        return generate(*args, **kw)

    tiny.generate = spy
    try:
        video = tiny.story(story)
    finally:
        del tiny.generate
    report = video.info["report"]
    assert video.frames.shape[0] == 9 + 9 - 1 == report["frames"]
    assert [k["frame"] for k in report["keyframes"]] == [0, 8, 16]
    assert [j["frame"] for j in report["joins"]] == [8]
    assert [s["keyframes"] for s in report["shots"]] == [[0, 1], [1, 2]]
    assert [c["frames"] for c in calls] == [9, 9 + max(carry - 1, 0)]
    given = calls[1].get("given") or {}
    assert sorted(given) == list(range(carry))
    for p, frame in given.items():  # the film's last `carry` frames, ending on the shared keyframe
        assert np.array_equal(frame, video.frames[8 - carry + 1 + p])
    assert len(report["drift"]) == 17 and all(isinstance(x, float) for x in report["drift"])


def test_loop_counting(tiny, tmp_path):
    for carry in (0, 5):
        video = tiny.story(_write_story(tmp_path / f"c{carry}", n_keyframes=2, loop=True, carry=carry))
        report = video.info["report"]
        assert video.frames.shape[0] == 9 + 9 - 2  # a loop's last frame is not a repeat of its first
        assert [k["frame"] for k in report["keyframes"]] == [0, 8]
        assert [j["frame"] for j in report["joins"]] == [0, 8]
        assert [s["keyframes"] for s in report["shots"]] == [[0, 1], [1, 0]]
    with_carry = tiny.story(_write_story(tmp_path / "c5", n_keyframes=2, loop=True, carry=5))
    shot = with_carry.info["report"]["settings"]["shots"][1]
    assert shot["window"] == 9 + 4 + 4  # carried frames before, the film's first frames after


def test_one_keyframe_loop_moves():
    """The built-in model: a loop of one keyframe gets a middle keyframe and its shape travels."""
    from segue.data.synthetic import SPLIT_OFFSETS, render_scene, sample_scene
    from segue.evaluate import track_object

    pipe = segue.load()
    scene = sample_scene(SPLIT_OFFSETS["test"] + 31_100, 17, (64, 64), path="circle_cw", camera=False)
    steady = {"times": (scene.times[0],) * 2, "seasons": (scene.seasons[0],) * 2, "second": None}
    main = dataclasses.replace(scene.main, texture="solid", scale=(1.0, 1.0))
    clip = render_scene(dataclasses.replace(scene, main=main, **steady))
    story = {"loop": True, "keyframes": [{"image": clip.frames[0]}], "shots": [{"prompt": clip.caption}]}
    video = pipe.story(story)
    assert video.frames.shape[0] == 16
    assert video.info["report"]["settings"]["shots"][0]["middle_keyframe"] is True
    track = track_object(video.frames, clip.object_colors[0], tol=90)
    found = track[~np.isnan(track).any(axis=1)]
    assert len(found) >= 8, track
    travel = np.linalg.norm(found - found[0], axis=-1).max()
    away = np.abs(video.frames.astype(float) - clip.frames[0]).mean(axis=(1, 2, 3)).max()
    assert travel > 4 and away > 2, (travel, away)


# -- the shot cache ----------------------------------------------------------------------------


def test_editing_the_last_keyframe_rerenders_one_shot(tiny, tmp_path):
    story = _write_story(tmp_path / "s", n_keyframes=3)
    cache = tmp_path / "cache"
    before = tiny.story(story, cache_dir=cache)
    assert [s["reused"] for s in before.info["report"]["shots"]] == [False, False]
    _keyframe(tmp_path / "s" / "k2.png", 99)  # edit the last keyframe
    calls = []
    generate = tiny.generate
    tiny.generate = lambda *a, **k: calls.append(k) or generate(*a, **k)
    try:
        after = tiny.story(story, cache_dir=cache)
    finally:
        del tiny.generate
    assert [s["reused"] for s in after.info["report"]["shots"]] == [True, False]
    assert len(calls) == 1  # only the second shot was rendered
    assert np.array_equal(after.frames[:9], before.frames[:9])  # the first shot's frames, byte for byte
    assert not np.array_equal(after.frames[9:], before.frames[9:])
    again = tiny.story(story, cache_dir=cache)
    assert [s["reused"] for s in again.info["report"]["shots"]] == [True, True]
    assert np.array_equal(again.frames, after.frames)


def test_a_corrupt_or_partial_cache_entry_is_rendered_again(tiny, tmp_path):
    story = _write_story(tmp_path / "s", n_keyframes=2)
    cache = tmp_path / "cache"
    first = tiny.story(story, cache_dir=cache)
    (entry,) = list(cache.rglob("*.safetensors"))
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:-9] + bytes(9 * [7]), lambda b: b""):
        entry.write_bytes(damage(entry.read_bytes()))
        assert ShotCache(cache).get(entry.stem) is None
        video = tiny.story(story, cache_dir=cache)
        assert [s["reused"] for s in video.info["report"]["shots"]] == [False]
        assert np.array_equal(video.frames, first.frames)
        assert ShotCache(cache).get(entry.stem) is not None  # replaced by a whole entry
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]


def test_two_concurrent_runs_share_one_cache(official_ckpt, tmp_path):
    story = _write_story(tmp_path / "s", n_keyframes=3)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "segue", "-q", "story", str(story), "--ckpt-dir", str(official_ckpt),
           "--cache-dir", str(cache)]  # fmt: skip
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"film{i}.mp4"), "--frames-dir", str(tmp_path / f"f{i}")],
                              stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    a, b = (sorted((tmp_path / f"f{i}").glob("*.png")) for i in range(2))
    assert [x.read_bytes() for x in a] == [x.read_bytes() for x in b]
    entries = list(cache.rglob("*.safetensors"))
    assert len(entries) == 2 and all(ShotCache(cache).get(e.stem) is not None for e in entries)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]


# -- reports and colour ------------------------------------------------------------------------

REPORT_KEYS = {"frames", "fps", "width", "height", "seconds", "settings", "model", "shots", "keyframes", "joins",
               "drift"}  # fmt: skip


def _strict(path: Path) -> dict:
    def no_constants(name: str):
        raise AssertionError(f"{path} holds {name}, not JSON")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_reports_of_story_and_generate(official_ckpt, tmp_path):
    story = _write_story(tmp_path / "s", n_keyframes=3)
    assert main(["-q", "story", str(story), "--out", str(tmp_path / "f.mp4"), "--report", str(tmp_path / "r.json"),
                 "--ckpt-dir", str(official_ckpt), "--no-cache"]) == 0  # fmt: skip
    r = _strict(tmp_path / "r.json")
    assert set(r) == REPORT_KEYS and r["frames"] == 17 and (r["width"], r["height"]) == (64, 48)
    assert set(r["shots"][0]) == {"index", "frames", "reused", "seconds", "keyframes"}
    assert set(r["keyframes"][0]) == {"index", "frame", "psnr", "delta_e"} and len(r["keyframes"]) == 3
    assert set(r["joins"][0]) == {"frame", "seam_ratio"} and len(r["drift"]) == 17
    assert not (tmp_path / ".segue-cache").exists()
    s = tmp_path / "s"
    assert main(["-q", "generate", "--ckpt-dir", str(official_ckpt), "--first", str(s / "k0.png"), "--last",
                 str(s / "k1.png"), "--frames", "5", "--steps", "1", "--out", str(tmp_path / "c.mp4"),
                 "--report", str(tmp_path / "c.json")]) == 0  # fmt: skip
    c = _strict(tmp_path / "c.json")
    assert set(c) == REPORT_KEYS and c["joins"] == [] and [k["frame"] for k in c["keyframes"]] == [0, 4]
    assert c["shots"][0]["keyframes"] == [0, 1]


# -- bad input ---------------------------------------------------------------------------------


def _err(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and "\n" not in err
    return err


def test_bad_stories_fail_in_one_line_and_write_nothing(official_ckpt, tmp_path, capsys):
    s = tmp_path / "s"
    _write_story(s, n_keyframes=3)
    out = tmp_path / "out" / "film.mp4"

    def err(text: str, name: str = "story.toml") -> str:
        (s / name).write_text(text)
        outs = ["--report", str(tmp_path / "out" / "r.json"), "--frames-dir", str(tmp_path / "out" / "png")]
        return _err(capsys, "story", str(s / name), "--out", str(out), "--ckpt-dir", str(official_ckpt), *outs)

    good = (s / "story.toml").read_text()
    msg = err(good.replace('image = "k1.png"', 'image = "missing.png"'))
    assert "keyframes[1]" in msg and "file not found" in msg and "missing.png" in msg
    (s / "bad.png").write_bytes(b"not an image")
    msg = err(good.replace('image = "k1.png"', 'image = "bad.png"'))
    assert "keyframes[1]" in msg and "cannot read" in msg
    msg = err(good + '[[shots]]\nprompt = "one too many"\n')
    assert "3 keyframes need 2 shots" in msg and "found 3" in msg
    msg = err(good.replace("loop = false", "loop = true"))
    assert "need 3 shots in a loop" in msg and "found 2" in msg
    msg = err(good.replace("seed = 3", "seed = 3\nsede = 4"))
    assert "unknown key 'sede'" in msg and "allowed keys:" in msg and "seed" in msg and "guidance_steps" in msg
    msg = err(good.replace('prompt = "shot 1 moves right"', 'prompt = "shot 1"\nprompt_2 = "x"'))
    assert "shots[1]" in msg and "unknown key 'prompt_2'" in msg and "carry" in msg
    msg = err(good.replace("steps = 2", "steps = = 2"))
    assert "TOML syntax error at line 3, column" in msg
    msg = err('{"keyframes": [\n  {"image": "k0.png"},\n  {"image" "k1.png"}\n]}', "story.json")
    assert "JSON syntax error at line 3, column 12" in msg
    msg = err(good.replace('prompt = "shot 1 moves right"', 'prompt = "shot 1"\nframes = 16'))
    assert "shots[1]" in msg and "4n+1" in msg and "13 or 17" in msg
    msg = err(good.replace("steps = 2", 'steps = "two"'))
    assert "steps must be an integer" in msg
    # a value only the model can check, in the second shot: still nothing rendered, nothing cached
    msg = err(good.replace('prompt = "shot 1 moves right"', 'prompt = "shot 1"\nsolver = "heun"'))
    assert "shots[1]" in msg and "heun" in msg
    msg = err(good.replace("[settings]", "[settings]\ncarry = 3"))
    assert "carry must be 0 or 4n+1" in msg
    assert not (tmp_path / "out").exists() and not (s / ".segue-cache").exists()
    (s / "story.toml").write_text(good)
    msg = _err(capsys, "story", str(s / "story.toml"), "--out", str(s / "k0.png"))
    assert "k0.png" in msg and (".mp4" in msg or "input" in msg)
    msg = _err(capsys, "story", str(s / "story.toml"), "--out", str(out), "--report", str(s / "k1.png"))
    assert "never overwrites an input" in msg
