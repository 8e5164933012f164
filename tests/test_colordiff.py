"""CIEDE2000 against the published test pairs (Sharma, Wu and Dalal 2005) and sRGB -> CIELAB anchors."""

from __future__ import annotations

import numpy as np
import pytest

from segue.colordiff import ciede2000, delta_e, srgb_to_lab
from segue.errors import InputError

# (L1, a1, b1, L2, a2, b2, dE00): pairs 1-4, 7, 13-17, 19-25 and 35 of the paper's table 1
SHARMA = [
    (50.0, 2.6772, -79.7751, 50.0, 0.0, -82.7485, 2.0425),
    (50.0, 3.1571, -77.2803, 50.0, 0.0, -82.7485, 2.8615),
    (50.0, 2.8361, -74.0200, 50.0, 0.0, -82.7485, 3.4412),
    (50.0, -1.3802, -84.2814, 50.0, 0.0, -82.7485, 1.0000),
    (50.0, 0.0, 0.0, 50.0, -1.0, 2.0, 2.3669),
    (50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0009, 7.1792),
    (50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0010, 7.1792),
    (50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0011, 7.2195),
    (50.0, 2.4900, -0.0010, 50.0, -2.4900, 0.0012, 7.2195),
    (50.0, -0.0010, 2.4900, 50.0, 0.0009, -2.4900, 4.8045),
    (50.0, -0.0010, 2.4900, 50.0, 0.0011, -2.4900, 4.7461),
    (50.0, 2.5, 0.0, 50.0, 0.0, -2.5, 4.3065),
    (50.0, 2.5, 0.0, 73.0, 25.0, -18.0, 27.1492),
    (50.0, 2.5, 0.0, 61.0, -5.0, 29.0, 22.8977),
    (50.0, 2.5, 0.0, 56.0, -27.0, -3.0, 31.9030),
    (50.0, 2.5, 0.0, 58.0, 24.0, 15.0, 19.4535),
    (50.0, 2.5, 0.0, 50.0, 3.1736, 0.5854, 1.0000),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
]


def test_ciede2000_matches_the_published_pairs_both_ways():
    t = np.array(SHARMA)
    got = ciede2000(t[:, 0:3], t[:, 3:6])
    np.testing.assert_allclose(got, t[:, 6], atol=5e-5)
    np.testing.assert_allclose(ciede2000(t[:, 3:6], t[:, 0:3]), t[:, 6], atol=5e-5)  # symmetric


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [((255, 255, 255), (100.0, 0.0, 0.0)), ((0, 0, 0), (0.0, 0.0, 0.0)), ((255, 0, 0), (53.24, 80.09, 67.20)),
     ((0, 0, 255), (32.30, 79.19, -107.86)), ((128, 128, 128), (53.59, 0.0, 0.0))],
)  # fmt: skip
def test_srgb_to_lab_anchors(rgb, lab):
    np.testing.assert_allclose(srgb_to_lab(np.array(rgb)), lab, atol=0.02)


def test_delta_e_of_images_is_the_mean_over_pixels_and_agrees_with_scikit_image():
    from skimage.color import deltaE_ciede2000, rgb2lab

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
    want = deltaE_ciede2000(rgb2lab(a), rgb2lab(b)).mean()
    assert delta_e(a, b) == pytest.approx(want, abs=1e-3)
    assert delta_e(a, a) == 0.0
    red, cast = np.full((4, 4, 3), (225, 30, 30), np.uint8), np.full((4, 4, 3), (144, 110, 15), np.uint8)
    assert delta_e(red, cast) > 20  # the VAE's cast of a red disc: far beyond visible
    with pytest.raises(InputError, match="shapes differ"):
        delta_e(a, a[:4])
