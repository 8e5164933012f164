"""Real photographs for training and held-out evaluation, from packages installed from registries only.

Two collections. ``pypi``: images inside scikit-image (``skimage.data``) and scikit-learn
(``sklearn.datasets``), both in the ``train`` extra (``pip install -e ".[train]"``). ``debian``: photographs
inside Debian packages of wallpapers and templates (``apt-get install --no-install-recommends
tuxpaint-data lomiri-wallpapers-16.04 mate-backgrounds``, ``DEBIAN_PACKAGES``), read from their installed
paths. Nothing is fetched at run time. Each image's licence, as its package documents it, is recorded below
and in docs/broad-data.md.

The split is by image, never by crop: the ``heldout`` images are never drawn by training data, so a score
on them says what a user's own picture gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError


@dataclass(frozen=True)
class Photo:
    name: str
    # "skimage" (skimage.data.<loader>), "sklearn" (load_sample_image(<loader>)), or a Debian package whose
    # file <loader> (a path under DEBIAN_ROOT) it is
    package: str
    loader: str
    licence: str
    split: str  # "train" or "heldout"

    @property
    def collection(self) -> str:
        return "pypi" if self.package in ("skimage", "sklearn") else "debian"


DEBIAN_ROOT = Path("/")
COLLECTIONS = {"pypi": ("pypi",), "pypi+debian": ("pypi", "debian")}  # what a recipe's ``photos`` names
_TUX, _LOMIRI, _MATE = "usr/share/tuxpaint/templates/", "usr/share/backgrounds/", "usr/share/backgrounds/mate/nature/"
_KENDRICK = "GPL-2+ (Bill Kendrick)"


def _debian(package: str, folder: str, files: str, licence: str, heldout: str = "") -> tuple[Photo, ...]:
    """Photos ``files`` (space-separated names without .jpg) of a Debian package's ``folder``, all under one
    licence; those in ``heldout`` are held out."""
    return tuple(Photo(f"{package.split('-')[0]}-{f.lower()}", package, f"{folder}{f}.jpg", licence,
                       "heldout" if f in heldout.split() else "train") for f in files.split())  # fmt: skip


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "astronaut", "public domain (NASA)", "train"),
    Photo("rocket", "skimage", "rocket", "public domain (SpaceX)", "train"),
    Photo("hubble", "skimage", "hubble_deep_field", "public domain (NASA)", "train"),
    Photo("retina", "skimage", "retina", "CC0 1.0 (Mikael Häggström)", "train"),
    Photo("china", "sklearn", "china.jpg", "CC BY 2.0 (danielbuechele, Flickr)", "train"),
    Photo("camera", "skimage", "camera", "CC0 (Lav Varshney)", "train"),
    Photo("coins", "skimage", "coins", "no known copyright restrictions (Brooklyn Museum)", "train"),
    Photo("brick", "skimage", "brick", "CC0 (CC0Textures)", "train"),
    Photo("grass", "skimage", "grass", "CC0 (linolafett, DeviantArt)", "train"),
    Photo("gravel", "skimage", "gravel", "CC0 (CC0Textures)", "train"),
    Photo("chelsea", "skimage", "chelsea", "CC0 (Stefan van der Walt)", "heldout"),
    Photo("coffee", "skimage", "coffee", "CC0 (Rachel Michetti)", "heldout"),
    Photo("flower", "sklearn", "flower.jpg", "CC BY 2.0 (vultilion, Flickr)", "heldout"),
    *_debian("tuxpaint-data", _TUX, "burnt_bark cliff corn_maze jellyfish lighthouse mossy_bark mossy_log mudstone "
             "ocean_splash ocean_waves redwoods_above rocks sheep spiders_web sun_behind_clouds sun_behind_leaves "
             "trees_above trees_at_dusk wool_mill_machine", _KENDRICK, heldout="sheep"),
    Photo("lomiri-bridge", "lomiri-wallpapers-16.04", _LOMIRI + "Bridge_by_Sander_Klootwijk.jpg",
          "CC-BY-SA-4.0 (Sander Klootwijk, 2018)", "train"),
    Photo("lomiri-dragonfly", "lomiri-wallpapers-16.04", _LOMIRI + "Dragonfly_by_Bolly.jpg",
          'CC-BY-SA-4.0 ("Bolly", 2018)', "train"),
    Photo("lomiri-fig", "lomiri-wallpapers-16.04", _LOMIRI + "Picture_0B_by_freespace.jpg",
          'CC-BY-4.0 (Trevor "Freespace", 2018)', "train"),
    Photo("lomiri-brushes", "lomiri-wallpapers-16.04", _LOMIRI + "Picture_1A_by_freespace.jpg",
          'CC-BY-4.0 (Trevor "Freespace", 2018)', "train"),
    Photo("lomiri-wine", "lomiri-wallpapers-16.04", _LOMIRI + "Wine_by_Jakkub_Mede.jpg",
          "CC-BY-4.0 (Jakub Mede, 2018)", "train"),
    Photo("lomiri-aitzgorri", "lomiri-wallpapers-16.04", _LOMIRI + "aitzgorri_by_Aitzol_Berasategi.jpg",
          "CC-BY-4.0 (Aitzol Berasategi, 2018)", "train"),
    Photo("lomiri-free", "lomiri-wallpapers-16.04", _LOMIRI + "free_by_Peter_Nerlich.jpg",
          "CC-BY-SA-4.0 (Peter Nerlich, 2018)", "train"),
    Photo("lomiri-friends", "lomiri-wallpapers-16.04", _LOMIRI + "friends_by_Aitzol_Berasategi.jpg",
          "CC-BY-4.0 (Aitzol Berasategi, 2018)", "heldout"),
    Photo("lomiri-greentock", "lomiri-wallpapers-16.04", _LOMIRI + "greentock_by_Peter_Nerlich.jpg",
          "CC-BY-SA-4.0 (Peter Nerlich, 2018)", "train"),
    Photo("lomiri-life", "lomiri-wallpapers-16.04", _LOMIRI + "life_by_Aitzol_Berasategi.jpg",
          "CC-BY-4.0 (Aitzol Berasategi, 2018)", "train"),
    Photo("lomiri-picos", "lomiri-wallpapers-16.04", _LOMIRI + "picosdeeuropa_by_Aitzol_Berasategi.jpg",
          "CC-BY-4.0 (Aitzol Berasategi, 2018)", "train"),
    Photo("lomiri-seeding", "lomiri-wallpapers-16.04", _LOMIRI + "seeding_by_Clements_Engelhardt.jpg",
          "CC0-1.0 (Clemens Engelhardt, 2018)", "train"),
    Photo("lomiri-sunset", "lomiri-wallpapers-16.04", _LOMIRI + "sunset_by_Aitzol_Berasategi.jpg",
          "CC-BY-4.0 (Aitzol Berasategi, 2018)", "train"),
    *(Photo(f"mate-{f.lower()}", "mate-backgrounds", f"{_MATE}{f}.jpg", f"GPL-2+ ({who})",
            "heldout" if f == "LadyBird" else "train")
      for f, who in (("Aqua", "Charles Barbin, 2008"), ("Blinds", "Lennart Poettering, Andrea Cimitan, 2008"),
                     ("Dune", "Marco Cogoni 2007, Hylke Bons 2008"), ("FreshFlower", "Jens Ansorg, 2005"),
                     ("Garden", "Charles Barbin, 2008"),
                     ("GreenMeadow", "Timothy Schellhase 2005, Lapo Calamandrei 2008"),
                     ("LadyBird", "Charles Barbin, 2008"), ("RainDrops", '"blackcombwhistler07", 2008'),
                     ("Storm", "Sergey Nazarov, 2008"), ("TwoWings", "Charles Barbin, Hylke Bons, 2008"),
                     ("Wood", "Jean-Francois Fortin Tam, 2008"), ("YellowFlower", "Charles Barbin, 2008"))),
)  # fmt: skip
DEBIAN_PACKAGES = tuple(sorted({p.package for p in PHOTOS if p.collection == "debian"}))
SPLITS = ("train", "heldout")


def photo_names(split: str, photos: str = "pypi") -> list[str]:
    """The names of the photos in ``split`` ("train" or "heldout") of the collections ``photos`` names (a key
    of ``COLLECTIONS``), in a fixed order."""
    if split not in SPLITS:
        raise InputError(f"photo split must be one of {SPLITS}, got {split!r}")
    if photos not in COLLECTIONS:
        raise InputError(f"photos must be one of {', '.join(COLLECTIONS)}, got {photos!r}")
    return [p.name for p in PHOTOS if p.split == split and p.collection in COLLECTIONS[photos]]


def missing_packages(names: list[str]) -> list[str]:
    """The Debian packages whose photos among ``names`` are not installed (checked before any work)."""
    return sorted({p.package for p in map(_photo, names) if p.collection == "debian"
                   and not (DEBIAN_ROOT / p.loader).is_file()})  # fmt: skip


def _photo(name: str) -> Photo:
    for p in PHOTOS:
        if p.name == name:
            return p
    raise InputError(f"unknown photo {name!r}; known: {', '.join(p.name for p in PHOTOS)}")


@cache
def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` as uint8 [H, W, 3] (grey images repeated over the three channels)."""
    p = _photo(name)
    if p.collection == "debian":
        return _debian_photo(p)
    try:
        if p.package == "skimage":
            import skimage.data

            img = getattr(skimage.data, p.loader)()
        else:
            from sklearn.datasets import load_sample_image

            img = load_sample_image(p.loader)
    except ImportError as e:
        raise InputError(f"photo {name!r} needs {p.package} (pip install -e '.[train]'): {e}") from None
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.dtype.kind == "f" else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    img.setflags(write=False)  # shared by every caller through the cache
    return img


def _debian_photo(p: Photo) -> np.ndarray:
    """A Debian package's photo, decoded at a reduced scale where it is large (JPEG draft mode: every short
    side stays >= 768, more than any view needs), uint8 [H, W, 3]."""
    path = DEBIAN_ROOT / p.loader
    if not path.is_file():
        raise InputError(f"photo {p.name!r} needs the Debian package {p.package} "
                         f"(apt-get install --no-install-recommends {p.package}): {path} is missing")  # fmt: skip
    with Image.open(path) as im:
        im.draft("RGB", (768, 768))
        img = np.asarray(im.convert("RGB"))
    img.setflags(write=False)
    return img
