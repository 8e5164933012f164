"""The built-in default model: shipped in the package, loads with ``segue.load()``, keeps its keyframes.

Thresholds sit below what the shipped weights measure (docs/training.md) with a margin, and far above
what an untrained model of the same size gives, so a broken bundle, loader or conditioning fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import segue
from segue.cli import main
from segue.data.synthetic import SyntheticVideos
from segue.evaluate import crossfade, psnr, video_psnr
from segue.loader import DEFAULT_MODEL
from segue.media import read_video

# measured on held-out clip 0 with seed 0 at the bundle's defaults (3 steps, guidance 2 since r25; docs/training.md,
# "Session 14"); the session-7 model at its 25 steps and guidance 4 scored 20.57 dB on frames 1-15, below the
# crossfade's 20.81; the models since are above it, and the test says so.
# (clip 0 is a circle, so it changed with the inward circles of session 14; r11 scores 28.65, 29.07, 23.02 on it)
ENDPOINT_DB = 25.5  # measured 28.40 (first), 29.52 (last) with r25 (r20h: 28.52, 29.68)
MIDDLE_DB = 21.0  # measured 24.40 with r25, 24.32 with r20h (frames 1-15; the crossfade scores 20.68)


@pytest.fixture(scope="module")
def pipe():
    return segue.load()


@pytest.fixture(scope="module")
def clip():
    return SyntheticVideos("test", length=1, frames=17, size=(64, 64), ambiguous_fraction=0.0).clip(0)


def test_the_file_ships_within_the_size_limit_with_its_config():
    from safetensors import safe_open

    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.stat().st_size <= 25 * 2**20
    with safe_open(str(DEFAULT_MODEL), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["segue_config"])
    assert config["name"] == "segue-default"
    # its lineage: the default preset's run 2, then the default-r3 to -r13 continuations on top of it (r12 was
    # measured and not shipped: r13 continued from r11), then r17 to r19 and r20h (r14 to r16 were
    # measured and not shipped; r17 continued from r13, r18 from r17, r19 from r18, r20h from r19), then r25 on r20h
    lineage = json.loads(meta["segue_lineage"])
    assert lineage[0]["preset"] == "default"
    names = [f"default-r{k}" for k in (*range(3, 12), 13, 17, 18, 19, "20h", 25)]
    assert [e["continuation"]["name"] for e in lineage[1:]] == names
    assert lineage[2]["continuation"]["vae_steps"] == 4000 and lineage[2]["steps"] == 3000
    assert lineage[3]["phase_steps"] == {"vae": 0, "dit": 5000, "decoder": 1000}
    assert lineage[3]["continuation"]["ambiguous_fraction"] == 0.5
    assert lineage[4]["phase_steps"] == {"vae": 0, "dit": 2500, "decoder": 500}
    assert lineage[4]["continuation"]["sampling"] == [["steps", 3], ["guidance", 1.0], ["shift", 3.0]]
    # r7: the shapes weighted 4x, then 2x from step 1750; a 1000-step cooldown
    assert lineage[5]["phase_steps"] == {"vae": 0, "dit": 3500, "decoder": 500}
    assert lineage[5]["continuation"]["object_weights"] == [[0, 4.0], [1750, 2.0]]
    assert lineage[5]["continuation"]["stage"]["cooldown"] == 1000
    # r8: the DiT grown from 6 to 9 blocks (an identity block behind blocks 1, 3 and 5), then trained on
    assert lineage[6]["phase_steps"] == {"vae": 0, "dit": 3000, "decoder": 300}
    assert lineage[6]["continuation"]["insert_blocks"] == [1, 3, 5]
    # r9: 9 to 12 blocks (behind blocks 2, 5 and 8), 1600 steps; the decoder with the keyframes weighted 4x
    assert lineage[7]["phase_steps"] == {"vae": 0, "dit": 1600, "decoder": 300}
    assert lineage[7]["continuation"]["insert_blocks"] == [2, 5, 8]
    assert lineage[7]["continuation"]["decoder_endpoint_weight"] == 4.0
    # r10: the 12 blocks trained on, without growing, 1800 steps; the decoder again with the keyframes at 4x
    assert lineage[8]["phase_steps"] == {"vae": 0, "dit": 1800, "decoder": 300}
    assert lineage[8]["continuation"]["insert_blocks"] == []
    assert lineage[8]["continuation"]["decoder_seed"] == 9
    assert lineage[8]["continuation"]["decoder_endpoint_weight"] == 4.0
    assert config["dit"]["num_layers"] == 12
    # r11: no DiT stage; the decoder widened from base width 16 to 24 (the same encoder, so the same latents),
    # 2400 steps with the keyframes at 4x and a cooldown over the last 1000
    assert lineage[9]["phase_steps"] == {"vae": 0, "dit": 0, "decoder": 2400}
    assert lineage[9]["continuation"]["decoder_dim"] == 24 and lineage[9]["continuation"]["decoder_cooldown"] == 1000
    assert lineage[9]["continuation"]["decoder_seed"] == 10
    assert config["vae"]["dim"] == 16 and config["vae"]["decoder_dim"] == 24
    # r13: the DiT trained on clips whose circles lie inward (their caption decides their path), 1800 steps with
    # a cooldown over the last 700; no decoder phase (r11's decoder as it is)
    assert lineage[10]["phase_steps"] == {"vae": 0, "dit": 1800, "decoder": 0}
    assert lineage[10]["continuation"]["loops"] == "inward" and lineage[10]["continuation"]["stage"]["cooldown"] == 700
    # r17 to r20: the DiT trained only at noise levels >= 0.5 (where the 3-step sampler asks it), each on its own
    # window of fresh clips, 1800 steps with a cooldown over the last 700
    for entry, start in zip(lineage[11:15], (24000, 26001, 52002, 54003), strict=True):
        assert entry["phase_steps"] == {"vae": 0, "dit": 1800, "decoder": 0}
        assert entry["continuation"]["sigma_min"] == 0.5 and entry["continuation"]["cache_start"] == start
    # r20h: r20's stage, its trained parts shipped half-way from r19's (the mean of the two runs' weights)
    assert [e["continuation"].get("stage_blend", 1.0) for e in lineage[13:15]] == [1.0, 0.5]  # r19: before the field
    # r25: no DiT stage; the decoder trained on the latents r20h generates at guidance 2 (fresh clips from 67104),
    # shipped half-way from r20h's decoder, and guidance 2 as the sampling default
    r25 = lineage[15]["continuation"]
    assert lineage[15]["phase_steps"] == {"vae": 0, "dit": 0, "decoder": 1200}
    assert (r25["decoder_generated"], r25["generated_start"], r25["decoder_blend"]) == (1000, 67104, 0.5)
    assert r25["sampling"] == [["steps", 3], ["guidance", 2.0], ["shift", 3.0]]


def test_defaults_are_the_native_clip(pipe):
    d = pipe.config.defaults
    assert (d.frames, d.max_area, d.fps) == (17, 64 * 64, 8)
    # the sampling chosen on the val split (bench/sampling_sweep.py, segue eval --guidance), written by the
    # default-r6 to -r20h continuations and, with guidance 2, by default-r25
    assert (d.steps, d.guidance, d.shift, d.solver, d.guidance_steps) == (3, 2.0, 3.0, "unipc", None)


@pytest.fixture(scope="module")
def held_out_frames(pipe, clip):
    first, last = Image.fromarray(clip.frames[0]), Image.fromarray(clip.frames[-1])
    return pipe.generate(first, last, clip.caption, seed=0).frames


def test_held_out_clip_keeps_its_keyframes_and_moves(held_out_frames, clip):
    frames = held_out_frames
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    assert psnr(frames[0], clip.frames[0]) >= ENDPOINT_DB
    assert psnr(frames[-1], clip.frames[-1]) >= ENDPOINT_DB
    assert video_psnr(frames, clip.frames, 1, 16) >= MIDDLE_DB
    fade = crossfade(clip.frames[0], clip.frames[-1], 17)
    assert video_psnr(frames, clip.frames, 1, 16) > video_psnr(fade, clip.frames, 1, 16)  # beats a crossfade here
    # not a crossfade: the in-between frames differ from the blend of the two keyframes
    assert video_psnr(frames, fade, 4, 13) < 40


def test_the_same_frames_give_the_same_mp4_file(held_out_frames, tmp_path):
    """With x264's adaptive B-frames, the mp4 of this model's videos varied from write to write (bytes and
    decoded pixels; in about 1 write in 15 for this clip, more for others). Written without B-frames it
    does not: 40 writes, one file."""
    import hashlib

    from segue.media import write_video

    paths = [write_video(held_out_frames, tmp_path / f"{k}.mp4", fps=8) for k in range(40)]
    assert len({hashlib.sha256(p.read_bytes()).digest() for p in paths}) == 1
    back = read_video(paths[0]).astype(np.float64)
    assert back.shape == held_out_frames.shape
    assert psnr(back, held_out_frames) > 35  # crf 17: close to the frames


def test_generate_without_a_checkpoint_writes_the_video(tmp_path, capsys, clip):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(clip.frames[0]).resize((256, 256)).save(a)  # any size is fitted to the native one
    Image.fromarray(clip.frames[-1]).resize((256, 256)).save(b)
    out = tmp_path / "v.mp4"
    assert (
        main(["-q", "generate", "--first", str(a), "--last", str(b), "--prompt", clip.caption, "--out", str(out)]) == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    video = read_video(out)
    assert video.shape == (17, 64, 64, 3)


def test_a_missing_built_in_model_is_a_clear_error(tmp_path, monkeypatch):
    import segue.loader
    from segue.errors import InputError

    monkeypatch.setattr(segue.loader, "DEFAULT_MODEL", tmp_path / "absent.safetensors")
    with pytest.raises(InputError, match="no checkpoint given and no built-in model is installed"):
        segue.load()
