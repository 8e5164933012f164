"""Colour: sRGB -> CIELAB (D65), CIEDE2000, and colour matching anchored at keyframes.

CIEDE2000 (Sharma, Wu and Dalal 2005) is the colour difference the eye sees: about 1 is the smallest
visible step, 2-3 a small but clear one. Colour matching corrects drift in a shot: at each of its two
keyframes an affine map per RGB channel takes the output frame's mean and spread to the input keyframe's;
frames in between get the two maps blended by their place in the shot. Where the output keyframes already
have the input's statistics both maps are the identity and every pixel comes back unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# sRGB (D65) linear -> XYZ, and the D65 white point (IEC 61966-2-1)
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: Any) -> np.ndarray:
    """CIELAB [..., 3] of 8-bit sRGB values [..., 3] (uint8 or float in 0..255)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE_D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of CIELAB arrays [..., 3] (kL = kC = kH = 1)."""
    l1, a1, b1 = np.moveaxis(np.asarray(lab1, np.float64), -1, 0)
    l2, a2, b2 = np.moveaxis(np.asarray(lab2, np.float64), -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dlp, dcp = l2 - l1, c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    dhp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)
    lp_bar, cp_bar = (l1 + l2) / 2, (c1p + c2p) / 2
    hsum = h1p + h2p
    hp_bar = np.where(np.abs(h1p - h2p) > 180, np.where(hsum < 360, hsum + 360, hsum - 360), hsum) / 2
    hp_bar = np.where(c1p * c2p == 0, hsum, hp_bar)
    t = (1 - 0.17 * np.cos(np.radians(hp_bar - 30)) + 0.24 * np.cos(np.radians(2 * hp_bar))
         + 0.32 * np.cos(np.radians(3 * hp_bar + 6)) - 0.20 * np.cos(np.radians(4 * hp_bar - 63)))  # fmt: skip
    d_theta = 30 * np.exp(-(((hp_bar - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    s_l = 1 + 0.015 * (lp_bar - 50) ** 2 / np.sqrt(20 + (lp_bar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    return np.sqrt((dlp / s_l) ** 2 + (dcp / s_c) ** 2 + (dhp / s_h) ** 2 + r_t * (dcp / s_c) * (dhp / s_h))


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    """Mean CIEDE2000 over the pixels of two uint8 images [H, W, 3] of one size."""
    return float(ciede2000(srgb_to_lab(a), srgb_to_lab(b)).mean())


def mean_color_delta_e(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per frame [T]: CIEDE2000 between each frame's mean CIELAB colour and ``reference``'s (one image)."""
    means = srgb_to_lab(frames).reshape(len(frames), -1, 3).mean(axis=1)  # [T, 3]
    ref = srgb_to_lab(reference).reshape(-1, 3).mean(axis=0)
    return ciede2000(means, ref[None])


def channel_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per RGB channel [3] of a uint8 image [H, W, 3]."""
    x = np.asarray(image, np.float64).reshape(-1, 3)
    return x.mean(axis=0), x.std(axis=0)


def _anchor(output: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel taking ``output``'s mean and spread to ``target``'s."""
    (mo, so), (mt, st) = channel_stats(output), channel_stats(target)
    # a flat channel has no spread to match: keep it, and never stretch noise more than 2x either way
    scale = np.where(so > 1e-6, np.clip(st / np.maximum(so, 1e-6), 0.5, 2.0), 1.0)
    scale = np.where(np.abs(so - st) == 0, 1.0, scale)  # equal spreads: exactly 1, so no drift changes nothing
    return scale, mt - mo * scale


def color_match(
    frames: np.ndarray, start: int, end: int, out_start: np.ndarray, out_end: np.ndarray,
    target_start: np.ndarray, target_end: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Colour-matched copy of ``frames[start:end + 1]`` ([n, H, W, 3] uint8), a shot whose keyframes' output
    frames are ``out_start`` / ``out_end`` and whose input keyframes (fitted to the size) ``target_*``."""
    s0, o0 = _anchor(out_start, target_start)
    s1, o1 = _anchor(out_end, target_end)
    n = end - start
    out = []
    for i, frame in enumerate(frames[start : end + 1]):
        w = i / n if n else 0.0
        x = frame.astype(np.float64)
        y = (1 - w) * (x * s0 + o0) + w * (x * s1 + o1)
        out.append(np.clip(np.rint(y), 0, 255).astype(np.uint8))
    return np.stack(out)
