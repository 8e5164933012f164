"""CIEDE2000, colour matching at keyframes, seam ratio and drift on synthetic frames."""

from __future__ import annotations

import numpy as np
import pytest

from segue.data.synthetic import render_scene, sample_scene
from segue.story.color import ciede2000, color_match, delta_e, srgb_to_lab
from segue.story.report import drift, seam_ratios


@pytest.mark.parametrize(
    "lab1, lab2, expected",
    [  # Sharma, Wu and Dalal (2005), table 1: pairs 1, 7, 17, 25
        ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
        ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
        ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
        ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ],
)
def test_ciede2000_matches_the_published_pairs(lab1, lab2, expected):
    assert ciede2000(np.array(lab1), np.array(lab2)) == pytest.approx(expected, abs=1e-4)
    assert ciede2000(np.array(lab2), np.array(lab1)) == pytest.approx(expected, abs=1e-4)


def test_lab_of_white_and_black():
    assert np.allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=1e-3)
    assert np.allclose(srgb_to_lab(np.array([0, 0, 0])), [0, 0, 0], atol=1e-6)


def _clip() -> np.ndarray:
    return render_scene(sample_scene(7, frames=17, size=(64, 64), path="straight", camera=False)).frames


def test_color_match_changes_nothing_without_drift():
    frames = _clip()
    out = color_match(frames, 0, 16, frames[0], frames[16], frames[0], frames[16])
    assert np.array_equal(out, frames)


def test_color_match_removes_a_drift_toward_the_end():
    truth = _clip()
    ramp = np.linspace(0, 1, 17)[:, None, None, None]
    drifted = np.clip(truth * (1 - 0.25 * ramp * np.array([0.0, 0.6, 1.0])) + 12 * ramp, 0, 255).astype(np.uint8)
    fixed = color_match(drifted, 0, 16, drifted[0], drifted[16], truth[0], truth[16])
    before, after = delta_e(drifted[16], truth[16]), delta_e(fixed[16], truth[16])
    assert before > 5 and after < before / 3, (before, after)
    mid_before, mid_after = delta_e(drifted[8], truth[8]), delta_e(fixed[8], truth[8])
    assert mid_after < mid_before
    assert np.array_equal(fixed[0], drifted[0])  # no drift at the first keyframe: nothing to correct there


def test_seam_ratio_sees_a_jump_and_drift_sees_a_tint():
    frames = _clip()
    smooth = seam_ratios(frames, [8])[0]
    jumped = np.concatenate([frames[:9], np.roll(frames[9:], 8, axis=1)])
    assert smooth < 2 and seam_ratios(jumped, [8])[0] > 3 * smooth
    d = drift(frames, [0, 16], [frames[0], frames[16]])
    assert d[0] == 0 and d[16] == 0 and len(d) == 17
    tinted = frames.copy()
    tinted[10:] = np.clip(tinted[10:].astype(int) + [30, 0, 0], 0, 255).astype(np.uint8)
    assert min(drift(tinted, [0, 16], [frames[0], frames[16]])[10:]) > 3
