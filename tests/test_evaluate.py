"""Evaluation metrics and driver on tiny hand-drawn videos (no model, no dataset module)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segue import evaluate as ev
from segue.errors import InputError

H, W, F = 48, 64, 9
RED = (220, 40, 40)


def background(seed: int = 0) -> np.ndarray:
    """A smooth, mildly noisy background so frames are not flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([60 + 60 * xx / W, 80 + 40 * yy / H, 120 + 0 * xx], -1)
    return np.clip(base + rng.normal(0, 3, (H, W, 3)), 0, 255)


def tracks() -> dict[str, np.ndarray]:
    t = np.linspace(0, 1, F)
    x = 8 + 48 * t
    return {
        "straight": np.stack([x, np.full(F, 24.0)], -1),
        "over": np.stack([x, 24 - 14 * np.sin(np.pi * t)], -1),
        "under": np.stack([x, 24 + 14 * np.sin(np.pi * t)], -1),
    }


def draw(track: np.ndarray, color=RED, half: float = 3.0, seed: int = 0) -> np.ndarray:
    """Video [F, H, W, 3] with a square of side ~2*half centred on each track point (x, y)."""
    bg = background(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.empty((len(track), H, W, 3), np.uint8)
    for i, (cx, cy) in enumerate(track):
        frame = bg.copy()
        frame[(np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)] = color
        out[i] = np.rint(frame).astype(np.uint8)
    return out


def make_clips() -> list[dict]:
    return [
        {"frames": draw(tr), "caption": f"a red square moves {name}", "path": name, "track": tr, "object_color": RED}
        for name, tr in tracks().items()
    ]


# ---------------------------------------------------------------------------------------------
# Metrics.


def test_psnr_known_values() -> None:
    a = np.random.default_rng(0).integers(20, 200, (H, W, 3)).astype(np.uint8)
    assert ev.psnr(a, a) == math.inf
    b = a + 10
    assert ev.psnr(a, b) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    assert ev.psnr(b, a) == ev.psnr(a, b)
    assert ev.psnr(a.astype(np.float32), b.astype(np.float64)) == pytest.approx(ev.psnr(a, b))
    with pytest.raises(InputError, match="shapes differ"):
        ev.psnr(a, a[:-1])


def _ssim_brute(a: np.ndarray, b: np.ndarray) -> float:
    """Window-by-window SSIM straight from the definition (independent of the separable filter)."""
    x, y = a @ ev.LUMA, b @ ev.LUMA
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_values() -> None:
    rng = np.random.default_rng(1)
    a = background(1)
    assert ev.ssim(a, a) == 1.0
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255) for s in (5, 15, 40)]
    scores = [ev.ssim(a, n) for n in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    assert ev.ssim(noisy[1], a) == pytest.approx(scores[1], abs=1e-12)
    small_a, small_b = a[:16, :20], noisy[1][:16, :20]
    assert ev.ssim(small_a, small_b) == pytest.approx(_ssim_brute(small_a, small_b), abs=1e-10)
    # Flat frames: variance terms vanish, SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 255) ** 2
    expect = (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1)
    assert ev.ssim(np.full((20, 20), 100.0), np.full((20, 20), 140.0)) == pytest.approx(expect, abs=1e-12)
    # Frames smaller than the window still work (the window shrinks).
    assert 0 < ev.ssim(a[:7, :9], noisy[1][:7, :9]) < 1


def test_video_metrics_pool_over_range() -> None:
    v = draw(tracks()["straight"])
    w = v.copy()
    w[3] = np.clip(w[3].astype(int) + 10, 0, 255)
    assert ev.video_psnr(v, w, 0, 3) == math.inf
    assert ev.video_ssim(v, w, 0, 3) == 1.0
    mse = np.mean((v[3].astype(float) - w[3]) ** 2)
    assert ev.video_psnr(v, w, 2, 5) == pytest.approx(10 * math.log10(255**2 / (mse / 3)))
    assert ev.video_ssim(v, w, 3, 4) == pytest.approx(ev.ssim(v[3], w[3]))
    with pytest.raises(InputError, match="empty frame range"):
        ev.video_psnr(v, w, 5, 5)


def test_crossfade() -> None:
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (H, W, 3)).astype(np.uint8) for _ in range(2))
    cf = ev.crossfade(a, b, 9)
    assert cf.shape == (9, H, W, 3) and cf.dtype == np.uint8
    np.testing.assert_array_equal(cf[0], a)
    np.testing.assert_array_equal(cf[-1], b)
    assert np.abs(cf[4] - (a.astype(float) + b) / 2).max() <= 0.5
    quarter = 0.75 * a.astype(float) + 0.25 * b
    assert np.abs(cf[2] - quarter).max() <= 0.5


def test_endpoint_and_inbetween() -> None:
    v = draw(tracks()["over"])
    fid = ev.endpoint_fidelity(v, v[0], v[-1])
    assert fid == {"first_psnr": math.inf, "last_psnr": math.inf}
    w = v.copy()
    w[-1] = np.clip(w[-1].astype(int) - 10, 0, 255)
    assert ev.endpoint_fidelity(w, v[0], v[-1])["last_psnr"] < 30
    acc = ev.inbetween_accuracy(w, v)  # the changed last frame is not an in-between frame
    assert acc == {"psnr": math.inf, "ssim": 1.0}
    cf = ev.crossfade(v[0], v[-1], F)
    acc = ev.inbetween_accuracy(cf, v)
    assert 10 < acc["psnr"] < 40 and acc["ssim"] < 1


# ---------------------------------------------------------------------------------------------
# Tracking and compliance.


def test_track_object_centre() -> None:
    centres = np.array([[20.3, 30.7], [41.0, 12.0], [10.5, 20.5]])
    video = draw(centres, half=4.0)
    got = ev.track_object(video, RED, tol=40)
    # Pixels with |j - cx| <= 4: their mean lies within 0.5 px of cx.
    assert np.abs(got - centres).max() <= 0.5
    # A small colour drift is still found; an absent colour gives NaN.
    shifted = np.clip(video.astype(int) + np.array([-15, 12, 10]), 0, 255).astype(np.uint8)
    assert np.abs(ev.track_object(shifted, RED, tol=40) - centres).max() <= 0.5
    assert np.isnan(ev.track_object(video, (0, 255, 0), tol=40)).all()
    blank = video.copy()
    blank[1] = background()
    got = ev.track_object(blank, RED, tol=40)
    assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()


def test_track_object_follows_a_colour_that_changes_per_frame() -> None:
    # The object darkens as a night falls: its nominal colour is lost after a few frames, the colour as
    # rendered in each frame is found in every one.
    tr = tracks()["over"]
    shade = np.linspace(1.0, 0.4, F)[:, None]  # [F, 1]
    lit = np.rint(np.array(RED, np.float64) * shade)  # [F, 3]
    video = draw(tr)
    for f in range(F):
        video[f][np.all(video[f] == RED, axis=-1)] = lit[f]
    nominal = ev.track_object(video, RED, tol=60)
    assert np.isnan(nominal[-1]).all() and not np.isnan(nominal[0]).any()
    per_frame = ev.track_object(video, lit, tol=60)
    assert np.abs(per_frame - tr).max() <= 0.5
    assert ev.path_compliance(video, list(tracks().values()), lit) == 1
    with pytest.raises(InputError, match=r"one per frame \[9, 3\], got shape \(4, 3\)"):
        ev.track_object(video, lit[:4])


@pytest.mark.parametrize("truth", ["straight", "over", "under"])
def test_path_compliance_picks_followed_path(truth: str) -> None:
    tr = tracks()
    candidates = [tr["straight"], tr["over"], tr["under"]]
    video = draw(tr[truth])
    assert ev.path_compliance(video, candidates, RED) == list(tr).index(truth)
    # Dropping the object in a middle frame (NaN) does not change the answer.
    video[F // 2] = np.rint(background()).astype(np.uint8)
    assert ev.path_compliance(video, candidates, RED) == list(tr).index(truth)
    # Candidates sampled at another frame rate are resampled in time.
    t = np.linspace(0, 1, 2 * F - 1)
    dense = [np.stack([np.interp(t, np.linspace(0, 1, F), c[:, k]) for k in range(2)], -1) for c in candidates]
    assert ev.path_compliance(video, dense, RED) == list(tr).index(truth)


def test_path_compliance_object_missing_and_fraction() -> None:
    video = np.rint(np.repeat(background()[None], F, 0)).astype(np.uint8)
    assert ev.path_compliance(video, list(tracks().values()), RED) == -1
    assert ev.caption_compliance([True, False, True, True]) == 0.75
    assert ev.caption_compliance([(0, 0), (1, 2)]) == 0.5
    assert ev.caption_compliance([{"correct": True}]) == 1.0
    assert math.isnan(ev.caption_compliance([]))


# ---------------------------------------------------------------------------------------------
# Driver.


def _truth_fn(clips: list[dict]):
    by_caption = {c["caption"]: c["frames"] for c in clips}
    calls = []

    def fn(first: np.ndarray, last: np.ndarray, caption: str, frames: int) -> np.ndarray:
        calls.append(caption)
        video = by_caption[caption]
        assert frames == len(video)
        np.testing.assert_array_equal(first, video[0])
        np.testing.assert_array_equal(last, video[-1])
        return video.copy()

    return fn, calls


def test_evaluate_model_true_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clips = make_clips()
    fn, calls = _truth_fn(clips)
    s = ev.evaluate_model(fn, clips, [clips], tmp_path, sheet_every=3, sheet_scale=1)
    assert len(calls) == 6  # 3 held-out clips + one generation per caption of the group
    m = s["means"]
    assert m["model_psnr"] > m["crossfade_psnr"] + 3
    assert m["model_ssim"] > m["crossfade_ssim"]
    assert m["model_compliance"] == 1.0 and m["crossfade_compliance"] < 1.0
    assert s["pass"] and all(t["pass"] for t in s["thresholds"].values())
    assert [r["model_predicted"] for r in s["groups"][0]["results"]] == [0, 1, 2]
    assert "[eval]" in capsys.readouterr().err

    data = json.loads((tmp_path / "eval.json").read_text())  # strict JSON: inf is written as "inf"
    assert data["means"]["model_psnr"] == "inf" and float(data["means"]["model_psnr"]) == math.inf
    assert data["n_clips"] == 3 and data["groups"][0]["results"][2]["path"] == "under"
    md = (tmp_path / "eval.md").read_text()
    assert "| metric | model | crossfade | difference |" in md and "FAIL" not in md
    with Image.open(tmp_path / "contact_sheet.png") as im:
        cols = len(ev.sheet_columns(F, 3))  # 0, 3, 6, 8
        assert cols == 4
        expect_w = ev.SHEET_LABEL_W + cols * (W + ev.SHEET_GAP) + ev.SHEET_GAP
        expect_h = 9 * (H + ev.SHEET_GAP) + ev.SHEET_GAP  # 3 clips x (true, crossfade, model)
        assert im.size == (expect_w, expect_h) and im.mode == "RGB"
        sheet = np.asarray(im)
    # The model row of clip 0 shows the true frame 3 in column 1.
    y0, x0 = ev.SHEET_GAP + 2 * (H + ev.SHEET_GAP), ev.SHEET_LABEL_W + ev.SHEET_GAP + (W + ev.SHEET_GAP)
    np.testing.assert_array_equal(sheet[y0 : y0 + H, x0 : x0 + W], clips[0]["frames"][3])
    assert not list(tmp_path.glob(".*part*"))  # no temporaries left behind


def test_evaluate_model_crossfade_is_zero_gain(tmp_path: Path) -> None:
    clips = make_clips()
    s = ev.evaluate_model(lambda a, b, c, f: ev.crossfade(a, b, f), clips[:2], [clips], tmp_path, verbose=False)
    m = s["means"]
    assert m["psnr_gain_db"] == 0.0 and m["model_psnr"] == m["crossfade_psnr"]
    assert all(c["psnr_gain_db"] == 0.0 for c in s["clips"])
    assert m["model_compliance"] == m["crossfade_compliance"] < 0.8
    th = s["thresholds"]
    assert th["endpoint PSNR (dB)"]["pass"]  # a crossfade keeps its endpoints exactly
    assert not th["in-between gain over crossfade (dB)"]["pass"] and not s["pass"]
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["pass"] is False and data["means"]["psnr_gain_db"] == 0.0
    md = (tmp_path / "eval.md").read_text()
    assert "FAIL" in md
    # A crossfade keeps its endpoints exactly: the table says so, and no "-inf" difference appears.
    assert "| endpoint PSNR first (dB) | exact | exact | n/a |" in md
    assert "| in-between PSNR (dB) |" in md and "| +0.00 |" in md and "inf" not in md
    with Image.open(tmp_path / "contact_sheet.png") as im:
        # Defaults: every ceil(8 / 7) = 2 frames -> 5 columns, cells upscaled 2x to reach 96 px.
        assert im.size == (ev.SHEET_LABEL_W + 5 * (2 * W + ev.SHEET_GAP) + ev.SHEET_GAP, 6 * (96 + 4) + 4)


def test_evaluate_model_rejects_wrong_shape(tmp_path: Path) -> None:
    clips = make_clips()
    with pytest.raises(InputError, match=r"clip 0: generate_fn returned shape \(9, 48, 32, 3\)"):
        ev.evaluate_model(lambda a, b, c, f: np.zeros((f, H, W // 2, 3), np.uint8), clips, [], tmp_path, verbose=False)
    assert not (tmp_path / "eval.json").exists()
