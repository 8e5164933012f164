"""Broad clips and the photos they draw: deterministic by index, 8-bit, the held-out photos never drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segue.data import broad, photos
from segue.data.broad import KINDS, BroadVideos, Mixed, color_name, render_broad
from segue.data.photos import PHOTOS, load_photo, photo_names
from segue.errors import InputError


def test_photo_split_is_by_image_and_every_photo_loads_from_its_package():
    train, held = photo_names("train"), photo_names("heldout")
    assert set(train).isdisjoint(held) and len(held) >= 3 and len(train) >= 5
    assert sorted(train + held) == sorted(p.name for p in PHOTOS if p.package in ("skimage", "sklearn"))
    everything = photo_names("train", "pypi+debian") + photo_names("heldout", "pypi+debian")
    assert sorted(everything) == sorted(p.name for p in PHOTOS) and len(set(everything)) == len(everything)
    assert set(photo_names("heldout")) < set(photo_names("heldout", "pypi+debian"))
    assert all(p.licence for p in PHOTOS)
    for name in held:
        img = load_photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
    with pytest.raises(InputError, match="unknown photo"):
        load_photo("nope")
    with pytest.raises(InputError, match="split"):
        photo_names("test")
    with pytest.raises(InputError, match=r"photos must be one of pypi, pypi\+debian, got 'flickr'"):
        photo_names("train", "flickr")


_PHOTO = {p.name: p for p in PHOTOS}


@pytest.fixture
def debian_root(tmp_path, monkeypatch):
    """A stand-in for / holding the Debian packages' photo files: (root, write(photo name, [w, h]))."""
    monkeypatch.setattr(photos, "DEBIAN_ROOT", tmp_path)
    photos.load_photo.cache_clear()
    rng = np.random.default_rng(0)

    def write(name: str, size: tuple[int, int]) -> np.ndarray:
        path = tmp_path / _PHOTO[name].loader
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
        return pixels

    yield tmp_path, write
    photos.load_photo.cache_clear()


def test_debian_photos_load_from_their_packages_paths_shrunk_where_large(debian_root):
    _, write = debian_root
    debian = [p for p in PHOTOS if p.collection == "debian"]
    assert {p.package for p in debian} == set(photos.DEBIAN_PACKAGES) and all(p.licence for p in debian)
    assert all(p.loader.startswith("usr/share/") and p.loader.endswith(".jpg") for p in debian)
    write("tuxpaint-cliff", (400, 300))
    small = load_photo("tuxpaint-cliff")
    assert small.shape == (300, 400, 3) and small.dtype == np.uint8
    write("lomiri-seeding", (3200, 1800))
    big = load_photo("lomiri-seeding")  # decoded at half scale: every side still >= 768
    assert big.shape == (900, 1600, 3)
    with pytest.raises(InputError, match=r"needs the Debian package mate-backgrounds \(apt-get install "
                       r"--no-install-recommends mate-backgrounds\): .*Garden.jpg is missing"):  # fmt: skip
        load_photo("mate-garden")


def test_broad_clips_of_debian_photos_name_the_packages_to_install_before_rendering(debian_root):
    with pytest.raises(InputError, match=r"need the Debian packages lomiri-wallpapers-16.04, mate-backgrounds, "
                       r"tuxpaint-data: apt-get install --no-install-recommends lomiri"):  # fmt: skip
        BroadVideos("train", photos="pypi+debian")
    _, write = debian_root
    for name in photo_names("train", "pypi+debian"):
        if _PHOTO[name].collection == "debian":
            write(name, (96, 80))
    data = BroadVideos("train", length=30, frames=3, size=(16, 16), mix={"camera": 1}, photos="pypi+debian")
    assert data.names == photo_names("train", "pypi+debian")
    assert BroadVideos("heldout", length=3, frames=3, size=(16, 16)).names == photo_names("heldout")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_renders_the_same_clip_from_the_same_seed(kind):
    a, cap_a = render_broad(7, kind, photo_names("train"), frames=5, size=(32, 32))
    b, cap_b = render_broad(7, kind, photo_names("train"), frames=5, size=(32, 32))
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and cap_a == cap_b and cap_a
    c, _ = render_broad(8, kind, photo_names("train"), frames=5, size=(32, 32))
    assert not np.array_equal(a, c)


def test_dataset_items_are_8_bit_videos_and_a_function_of_the_index():
    data = BroadVideos("train", length=12, frames=5, size=(32, 32))
    item = data[3]
    assert item["video"].shape == (3, 5, 32, 32) and isinstance(item["caption"], str)
    u8 = ((item["video"] + 1) * 127.5).round()
    assert torch.equal(u8 / 127.5 - 1, item["video"])  # what the latent cache requires
    assert torch.equal(BroadVideos("train", length=12, frames=5, size=(32, 32))[3]["video"], item["video"])
    assert {data.kind_of(i) for i in range(12)} <= set(KINDS)
    with pytest.raises(InputError, match="kinds"):
        BroadVideos(mix={"fog": 1.0})


def test_held_out_photos_are_never_drawn_for_training(monkeypatch):
    drawn = []
    real = broad._base

    def spy(name, *a):
        drawn.append(name)
        return real(name, *a)

    monkeypatch.setattr(broad, "_base", spy)
    data = BroadVideos("train", length=40, frames=3, size=(16, 16), mix={"camera": 1, "morph": 1, "parallax": 1})
    for i in range(40):
        data.clip(i)
    assert drawn and set(drawn) <= set(photo_names("train"))
    drawn.clear()
    BroadVideos("heldout", length=3, frames=3, size=(16, 16), mix={"morph": 1}).clip(0)
    assert drawn and set(drawn) <= set(photo_names("heldout"))


def test_colours_cover_the_gamut_and_get_vocabulary_names():
    rng = np.random.default_rng(0)
    cols = np.array([broad.random_color(rng) for _ in range(400)])
    assert cols.min() == 0 and cols.max() == 255  # black and white corners are drawn
    assert color_name((225, 30, 30)) == "red" and color_name((5, 5, 5)) == "black"


def test_mixed_marks_the_first_dataset_as_anchored():
    a = [{"video": torch.zeros(1), "caption": "a"}] * 50
    b = [{"video": torch.ones(1), "caption": "b"}] * 50
    m = Mixed(a, b, share_b=0.5, seed=1)
    items = [m[i] for i in range(50)]
    assert all(it["anchor"] == (it["caption"] == "a") for it in items)
    assert 10 < sum(it["caption"] == "b" for it in items) < 40
    assert [it["caption"] for it in items] == [Mixed(a, b, 0.5, seed=1)[i]["caption"] for i in range(50)]


def test_recoloured_photos_keep_their_structure_in_other_colours():
    grey = np.repeat(load_photo("camera")[:64, :64, :1], 3, axis=2).astype(np.float32)
    a = broad.recoloured(grey, np.random.default_rng(3))
    assert a.shape == grey.shape and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 255
    assert np.array_equal(a, broad.recoloured(grey, np.random.default_rng(3)))
    # a grey photo comes out tinted, its pattern in place (brightness follows the original's)
    assert np.abs(a - a.mean(-1, keepdims=True)).mean() > 2
    assert np.corrcoef(a.mean(-1).ravel(), grey[..., 0].ravel())[0, 1] > 0.8
    # over many draws the tints cover the gamut: each channel is sometimes the strongest
    strongest = {int(np.argmax(broad.recoloured(grey, np.random.default_rng(s)).mean((0, 1)))) for s in range(30)}
    assert strongest == {0, 1, 2}


@pytest.mark.parametrize("kind", ["camera", "morph", "flat"])
def test_recolour_changes_photo_clips_only_and_recolour_0_draws_nothing(kind, monkeypatch):
    names = photo_names("train")
    plain, cap = render_broad(5, kind, names, frames=3, size=(16, 16))
    monkeypatch.setattr(broad, "recoloured", lambda img, rng: pytest.fail("recoloured at recolour 0"))
    assert np.array_equal(render_broad(5, kind, names, frames=3, size=(16, 16), recolour=0.0)[0], plain)
    monkeypatch.undo()
    coloured, cap2 = render_broad(5, kind, names, frames=3, size=(16, 16), recolour=1.0)
    assert cap2 == cap
    assert np.array_equal(coloured, plain) == (kind == "flat")


def test_recolour_is_a_share():
    data = BroadVideos("train", length=8, frames=3, size=(16, 16), mix={"camera": 1}, recolour=1.0)
    assert not torch.equal(data[0]["video"], BroadVideos("train", length=8, frames=3, size=(16, 16),
                                                         mix={"camera": 1})[0]["video"])  # fmt: skip
    with pytest.raises(InputError, match=r"recolour is a share of photos, in \[0, 1\]; got 1.5"):
        BroadVideos(recolour=1.5)
