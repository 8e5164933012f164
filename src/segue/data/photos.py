"""Real photographs for training and held-out evaluation, from packages installed from PyPI only.

The images ship inside scikit-image (``skimage.data``) and scikit-learn (``sklearn.datasets``): nothing is
fetched at run time. Both are in the ``train`` extra (``pip install -e ".[train]"``). Each image's licence,
as its package documents it, is recorded below and in docs/training.md.

The split is by image, never by crop: the ``heldout`` images are never drawn by training data, so a score
on them says what a user's own picture gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Photo:
    name: str
    package: str  # "skimage" (skimage.data.<loader>) or "sklearn" (load_sample_image(<loader>))
    loader: str
    licence: str
    split: str  # "train" or "heldout"


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
)
SPLITS = ("train", "heldout")


def photo_names(split: str) -> list[str]:
    """The names of the photos in ``split`` ("train" or "heldout"), in a fixed order."""
    if split not in SPLITS:
        raise InputError(f"photo split must be one of {SPLITS}, got {split!r}")
    return [p.name for p in PHOTOS if p.split == split]


def _photo(name: str) -> Photo:
    for p in PHOTOS:
        if p.name == name:
            return p
    raise InputError(f"unknown photo {name!r}; known: {', '.join(p.name for p in PHOTOS)}")


@cache
def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` as uint8 [H, W, 3] (grey images repeated over the three channels)."""
    p = _photo(name)
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
