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


def _debian(package: str, folder: str, photos: tuple[tuple[str, str, str], ...], heldout: str) -> tuple[Photo, ...]:
    """The photos of a Debian package: (short name, file in ``folder`` without .jpg, licence) each, named
    ``<package's first word>-<short name>``; the one named ``heldout`` is held out."""
    prefix = package.split("-")[0]
    return tuple(Photo(f"{prefix}-{short}", package, f"{folder}{file}.jpg", licence,
                       "heldout" if short == heldout else "train") for short, file, licence in photos)  # fmt: skip


_TUXPAINT = ("burnt_bark", "cliff", "corn_maze", "jellyfish", "lighthouse", "mossy_bark", "mossy_log", "mudstone",
             "ocean_splash", "ocean_waves", "redwoods_above", "rocks", "sheep", "spiders_web", "sun_behind_clouds",
             "sun_behind_leaves", "trees_above", "trees_at_dusk", "wool_mill_machine")  # fmt: skip
_LOMIRI = (("bridge", "Bridge_by_Sander_Klootwijk", "CC-BY-SA-4.0 (Sander Klootwijk, 2018)"),
           ("dragonfly", "Dragonfly_by_Bolly", 'CC-BY-SA-4.0 ("Bolly", 2018)'),
           ("fig", "Picture_0B_by_freespace", 'CC-BY-4.0 (Trevor "Freespace", 2018)'),
           ("brushes", "Picture_1A_by_freespace", 'CC-BY-4.0 (Trevor "Freespace", 2018)'),
           ("wine", "Wine_by_Jakkub_Mede", "CC-BY-4.0 (Jakub Mede, 2018)"),
           ("aitzgorri", "aitzgorri_by_Aitzol_Berasategi", "CC-BY-4.0 (Aitzol Berasategi, 2018)"),
           ("free", "free_by_Peter_Nerlich", "CC-BY-SA-4.0 (Peter Nerlich, 2018)"),
           ("friends", "friends_by_Aitzol_Berasategi", "CC-BY-4.0 (Aitzol Berasategi, 2018)"),
           ("greentock", "greentock_by_Peter_Nerlich", "CC-BY-SA-4.0 (Peter Nerlich, 2018)"),
           ("life", "life_by_Aitzol_Berasategi", "CC-BY-4.0 (Aitzol Berasategi, 2018)"),
           ("picos", "picosdeeuropa_by_Aitzol_Berasategi", "CC-BY-4.0 (Aitzol Berasategi, 2018)"),
           ("seeding", "seeding_by_Clements_Engelhardt", "CC0-1.0 (Clemens Engelhardt, 2018)"),
           ("sunset", "sunset_by_Aitzol_Berasategi", "CC-BY-4.0 (Aitzol Berasategi, 2018)"))  # fmt: skip
_MATE = (("Aqua", "Charles Barbin, 2008"), ("Blinds", "Lennart Poettering, Andrea Cimitan, 2008"),
         ("Dune", "Marco Cogoni 2007, Hylke Bons 2008"), ("FreshFlower", "Jens Ansorg, 2005"),
         ("Garden", "Charles Barbin, 2008"), ("GreenMeadow", "Timothy Schellhase 2005, Lapo Calamandrei 2008"),
         ("LadyBird", "Charles Barbin, 2008"), ("RainDrops", '"blackcombwhistler07", 2008'),
         ("Storm", "Sergey Nazarov, 2008"), ("TwoWings", "Charles Barbin, Hylke Bons, 2008"),
         ("Wood", "Jean-Francois Fortin Tam, 2008"), ("YellowFlower", "Charles Barbin, 2008"))  # fmt: skip

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
    *_debian("tuxpaint-data", "usr/share/tuxpaint/templates/",
             tuple((f, f, "GPL-2+ (Bill Kendrick)") for f in _TUXPAINT), heldout="sheep"),
    *_debian("lomiri-wallpapers-16.04", "usr/share/backgrounds/", _LOMIRI, heldout="friends"),
    *_debian("mate-backgrounds", "usr/share/backgrounds/mate/nature/",
             tuple((f.lower(), f, f"GPL-2+ ({who})") for f, who in _MATE), heldout="ladybird"),
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


def install_command(packages: list[str]) -> str:
    """The command that installs the Debian ``packages`` with the photos alone (no recommended extras)."""
    return f"apt-get install --no-install-recommends {' '.join(packages)}"


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
                         f"({install_command([p.package])}): {path} is missing")  # fmt: skip
    with Image.open(path) as im:
        im.draft("RGB", (768, 768))
        img = np.asarray(im.convert("RGB"))
    img.setflags(write=False)
    return img
