"""Keyframe pairs: the held-out pairs folder, `segue eval --pairs` end to end, and the warning outside the
sizes a model was trained for."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from segue.cli import main
from segue.config import ModelConfig
from segue.errors import InputError
from segue.loader import DEFAULT_MODEL, load
from segue.pairs import fitted_keyframes, make_heldout_pairs, read_pairs, simple_scene
from segue.pipeline import untrained_note


def test_heldout_pairs_are_a_function_of_the_seed(tmp_path):
    names = make_heldout_pairs(tmp_path / "a", photos=2, scenes=2, seed=3)
    assert names == ["photo-00-camera", "photo-01-light", "scene-00", "scene-01"]
    make_heldout_pairs(tmp_path / "b", photos=2, scenes=2, seed=3)
    for n in names:
        for f in ("first.png", "last.png", "prompt.txt"):
            assert (tmp_path / "a" / n / f).read_bytes() == (tmp_path / "b" / n / f).read_bytes()
    first = np.asarray(Image.open(tmp_path / "a" / "scene-00" / "first.png"))
    assert first.shape == (64, 64, 3)
    video, caption = simple_scene(0)
    assert caption.startswith("the ") and "circle" in caption
    colours = np.unique(video[0].reshape(-1, 3), axis=0)
    assert len(colours) >= 2  # a disc over a flat sky (and its soft edge)


def test_read_pairs_names_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        read_pairs(tmp_path / "none")
    with pytest.raises(InputError, match="no pair folders"):
        read_pairs(tmp_path)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "first.png").write_bytes(b"")
    with pytest.raises(InputError, match="lacks last.png, prompt.txt"):
        read_pairs(tmp_path)


def test_eval_pairs_end_to_end_on_generated_and_given_frames(official_ckpt, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    assert main(["make-pairs", str(pairs), "--photos", "1", "--scenes", "1"]) == 0
    # a user's own output: its frames are scored as they are (here the keyframes themselves, then a cast)
    own = pairs / "own"
    shutil.copytree(pairs / "scene-00", own)
    (own / "frames").mkdir()
    first, last = np.asarray(Image.open(own / "first.png")), np.asarray(Image.open(own / "last.png"))
    Image.fromarray(first).save(own / "frames" / "00000.png")
    Image.fromarray(((first.astype(int) + last) // 2).astype(np.uint8)).save(own / "frames" / "00001.png")
    cast = np.clip(last.astype(int) + [40, 0, -40], 0, 255).astype(np.uint8)
    Image.fromarray(cast).save(own / "frames" / "00002.png")
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["eval", "--pairs", str(pairs), "--ckpt", str(official_ckpt), "--steps", "1", "--out", str(out)]) == 0
    means = json.loads(capsys.readouterr().out)
    s = json.loads((out / "pairs.json").read_text())
    rows = {r["name"]: r for r in s["pairs"]}
    assert set(rows) == {"own", "photo-00-camera", "scene-00"}
    assert rows["own"]["source"] == "frames" and rows["scene-00"]["source"] == "generated"
    assert rows["own"]["first_psnr"] == "inf" and rows["own"]["first_delta_e"] == 0.0
    assert rows["own"]["last_delta_e"] > 5 and rows["own"]["last_psnr"] < 25
    assert means["endpoint_psnr"] == pytest.approx((means["first_psnr"] + means["last_psnr"]) / 2)
    assert (out / "pairs_sheet.png").is_file() and "| **mean** |" in (out / "pairs.md").read_text()


def test_fitted_keyframes_follow_the_pipeline_and_keep_a_same_size_frame():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    keys = fitted_keyframes(img, img, 64, 64)
    assert keys.shape == (2, 64, 64, 3) and np.array_equal(keys[0], np.asarray(img))
    assert fitted_keyframes(img, img, 32, 48).shape == (2, 32, 48, 3)


def test_generation_outside_the_trained_size_warns_in_one_line(official_ckpt, caplog):
    pipe = load(official_ckpt)
    assert untrained_note(pipe.config.defaults, 33, 128, 128) is None  # nothing recorded: no warning
    d = replace(pipe.config.defaults, trained_frames=9, trained_size=(64, 64))
    note = untrained_note(d, 33, 128, 128)
    assert note == (
        "33 frames and 128x128 is outside what this model was trained for (9 frames at 64x64): expect a degraded video"
    )
    assert untrained_note(d, 9, 64, 64) is None and untrained_note(d, 9, 48, 64) is None
    pipe.config = replace(pipe.config, defaults=d)
    with caplog.at_level(logging.WARNING, logger="segue"):
        pipe.resolve((64, 64), 9, None, None, None, None, None, None, 0)
        assert not caplog.records
        pipe.resolve((64, 64), 13, None, (128, 128), None, None, None, None, 0)
    assert [r.getMessage() for r in caplog.records] == [untrained_note(d, 13, 128, 128)]
    # the bundle's config keeps what it records
    back = ModelConfig.from_dict(json.loads(json.dumps(pipe.config.to_dict())))
    assert back.defaults.trained_size == (64, 64) and back.defaults.trained_frames == 9


def test_the_built_in_model_warns_outside_the_clips_its_lineage_records(tmp_path):
    from segue.bundle import read_bundle_lineage, read_bundle_metadata, trained_clip

    config, _ = read_bundle_metadata(DEFAULT_MODEL)  # its config predates the fields: its lineage says it
    assert (config.defaults.trained_frames, config.defaults.trained_size) == (17, (64, 64))
    assert untrained_note(config.defaults, 17, 64, 64) is None
    assert untrained_note(config.defaults, 33, 128, 128) == (
        "33 frames and 128x128 is outside what this model was trained for (17 frames at 64x64): expect a degraded video"
    )
    lineage = read_bundle_lineage(DEFAULT_MODEL)
    assert trained_clip(lineage) == (17, (64, 64)) and trained_clip([]) is None
    # a record with a DiT stage of no steps (a decoder phase) says nothing; a malformed one stops the search
    stage = {"continuation": {"stage": {"frames": 9, "size": [32, 48]}}, "steps": 5}
    assert trained_clip([stage, {**stage, "steps": 0}]) == (9, (32, 48))
    assert trained_clip([{"continuation": {"stage": {"frames": "9", "size": [32, 48]}}, "steps": 5}]) is None


def test_in_between_frames_are_scored_against_the_true_clip_beside_a_crossfade(tmp_path):
    from segue.evaluate import crossfade
    from segue.pairs import score_pairs

    make_heldout_pairs(tmp_path / "pairs", photos=0, scenes=1, seed=0)
    scene = tmp_path / "pairs" / "scene-00"
    truth = np.stack([np.asarray(Image.open(f)) for f in sorted((scene / "truth").glob("*.png"))])
    assert truth.shape == (17, 64, 64, 3)
    assert np.array_equal(truth[0], np.asarray(Image.open(scene / "first.png")))
    # three users' videos of the pair: the crossfade itself, the true clip, and one with a texture in between
    fade = crossfade(truth[0], truth[-1], 17)
    noisy = truth.copy()
    noisy[1:-1] = np.random.default_rng(0).integers(0, 256, noisy[1:-1].shape)  # a texture of its own
    short = truth[::2]  # another length: no in-between score
    for name, video in (("fade", fade), ("true", truth), ("noisy", noisy), ("short", short)):
        d = tmp_path / "pairs" / name
        shutil.copytree(scene, d)
        (d / "frames").mkdir()
        for i, frame in enumerate(video):
            Image.fromarray(frame.astype(np.uint8)).save(d / "frames" / f"{i:05d}.png")
    shutil.rmtree(scene)
    s = score_pairs(read_pairs(tmp_path / "pairs"), None, tmp_path / "out")
    rows = {r["name"]: r for r in s["pairs"]}
    assert rows["fade"]["inbetween_gain"] == pytest.approx(0.0)
    assert rows["true"]["inbetween_psnr"] == float("inf") and rows["true"]["crossfade_psnr"] < 40
    assert rows["noisy"]["inbetween_gain"] < 0  # textures neither keyframe has fall below the crossfade
    assert "inbetween_psnr" not in rows["short"]
    assert s["means"]["inbetween_pairs"] == 3
    md = (tmp_path / "out" / "pairs.md").read_text()
    assert "3 pairs with their true clip" in md and "| short |" in md
