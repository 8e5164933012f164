"""Broad captioned clips: shapes of any colour over any background, real photos under camera moves,
cut-out layers in parallax, lighting changes and morphs between unrelated photos.

The procedural clips of ``synthetic`` draw a narrow palette of shapes over skies; a model trained on them
alone turns colours outside that palette (and real pictures) into its own. These clips cover the whole RGB
gamut (black and white included) and real photographs (``photos``, by split: the held-out photos are never
drawn for training), with captions from the same vocabulary as ``synthetic`` (the built-in tokenizer's).

Item ``i`` of a split is a deterministic function of (split, i), so a run resumes on the same data.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from .photos import install_command, load_photo, missing_packages, photo_names

KINDS = ("flat", "shape", "camera", "parallax", "light", "morph")
# the share of each kind in a split's clips
DEFAULT_MIX: dict[str, float] = {
    "flat": 0.1,
    "shape": 0.3,
    "camera": 0.25,
    "parallax": 0.1,
    "light": 0.1,
    "morph": 0.15,
}
SPLIT_SEEDS = {"train": 0xB40AD, "heldout": 0x4E1D}
BASE_SIDE = 384  # a view's short side is at most 5 x 64 = 320 pixels
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
# names of colours in the caption vocabulary, with their sRGB anchors (the nearest one names a colour)
COLOR_NAMES: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (240, 140, 20), "yellow": (235, 220, 40), "green": (40, 170, 50),
    "cyan": (40, 200, 220), "blue": (30, 60, 210), "purple": (130, 40, 180), "pink": (240, 130, 190),
    "white": (245, 245, 245), "black": (15, 15, 15),
}  # fmt: skip


def color_name(rgb: np.ndarray) -> str:
    """The vocabulary's name nearest to an RGB colour (0..255)."""
    names = list(COLOR_NAMES)
    anchors = np.array([COLOR_NAMES[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((anchors - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def random_color(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (float 0..255) from the whole gamut: a third of the time a corner or edge of the cube
    (saturated primaries, black, white), else uniform."""
    if rng.random() < 0.35:
        c = rng.choice([0.0, 255.0], size=3)
        c[rng.integers(3)] = rng.choice([0.0, rng.uniform(0, 255), 255.0])
        return c
    return rng.uniform(0, 255, size=3)


@cache
def _base(name: str, side: int = BASE_SIDE) -> np.ndarray:
    """The photo shrunk once so its short side is at most ``side`` (every view is smaller: cheaper resizes)."""
    img = load_photo(name)
    s = side / min(img.shape[:2])
    if s >= 1:
        return img
    size = (round(img.shape[1] * s), round(img.shape[0] * s))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def fit_short_side(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` (uint8 [h, w, 3]) resized with Lanczos so its short side is ``side``: float32 [H, W, 3]."""
    h, w = img.shape[:2]
    s = side / min(h, w)
    size = (max(side, round(w * s)), max(side, round(h * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


def photo_view(rng: np.random.Generator, names: list[str], side: int, recolour: float = 0.0,
               paint: np.random.Generator | None = None) -> np.ndarray:  # fmt: skip
    """A random photo of ``names`` resized (with antialiasing) so its short side is ``side``, a share
    ``recolour`` of the time with its colours changed (``recoloured``, drawn from ``paint``: apart from
    ``rng``, so a recoloured clip is the same clip in other colours): float32 [H, W, 3]."""
    out = fit_short_side(_base(names[int(rng.integers(len(names)))]), side)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if recolour > 0 and paint is not None and paint.random() < recolour:
        out = recoloured(out, paint)
    return np.ascontiguousarray(out)


def _axis_rotation(angle: float) -> np.ndarray:
    """The 3x3 rotation by ``angle`` about the grey axis (1, 1, 1) of RGB: a hue rotation."""
    k = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def recoloured(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``img`` (float [H, W, 3], 0..255) in other colours: its channels reordered, its hue rotated, its
    saturation scaled (0.4-1.8x), each channel's gain drawn from 0.6-1.4 (grey photos come out tinted) and a
    gamma from exp(-0.4)-exp(0.4). The training photos, several of them grey, cover few of the colours a
    user's pictures have; this spreads their textures over the gamut."""
    u = img[..., rng.permutation(3)] / 255.0
    grey = u.mean(-1, keepdims=True)
    chroma = (u - grey) @ _axis_rotation(rng.uniform(0, 2 * math.pi)).T * rng.uniform(0.4, 1.8)
    u = np.clip(np.clip(grey + chroma, 0, 1) * rng.uniform(0.6, 1.4, size=3), 0, 1)
    return (u ** math.exp(rng.uniform(-0.4, 0.4)) * 255.0).astype(np.float32)


def _affine_frames(img: np.ndarray, thetas: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames [F, H, W, 3] sampled from ``img`` [h, w, 3] through affine maps ``thetas`` [F, 2, 3] (the
    normalised output -> input coordinates of ``F.affine_grid``), border pixels repeated outside."""
    src = torch.from_numpy(img).permute(2, 0, 1)[None].float()  # [1, 3, h, w]
    theta = torch.from_numpy(thetas).float()
    grid = F.affine_grid(theta, [len(thetas), 3, *size], align_corners=False)
    out = F.grid_sample(src.expand(len(thetas), -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # fmt: skip
    return out.permute(0, 2, 3, 1).numpy()


def _ease(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def _camera_path(rng: np.random.Generator, frames: int, size: tuple[int, int], aspect: float) -> tuple[np.ndarray, str]:
    """Affine maps [F, 2, 3] of a camera that pans, zooms or turns over an image of width/height ``aspect``,
    and the caption of the move."""
    t = np.linspace(0, 1, frames)
    e = _ease(t) if rng.random() < 0.5 else t
    move = rng.choice(["pan", "zoom", "turn", "pan+zoom"])
    z0 = rng.uniform(0.45, 0.85)
    z1 = z0
    cx0, cy0 = rng.uniform(-0.2, 0.2, size=2)
    cx1, cy1 = cx0, cy0
    rot0 = rot1 = 0.0
    words = []
    if "pan" in move:
        d = rng.uniform(0.15, 0.4) * rng.choice([-1, 1])
        cx1 = cx0 + d
        cy1 = cy0 + rng.uniform(-0.1, 0.1)
        words.append(f"pans to the {'right' if d > 0 else 'left'}")
    if "zoom" in move:
        z1 = z0 * rng.uniform(0.55, 0.8) if rng.random() < 0.5 else min(0.95, z0 / rng.uniform(0.55, 0.8))
        words.append("zooms in" if z1 < z0 else "zooms out")
    if move == "turn":
        rot1 = rng.uniform(0.15, 0.5) * rng.choice([-1, 1])
        words.append("pans " + ("to the right" if rot1 > 0 else "to the left") + " turning slowly")
    z = z0 + (z1 - z0) * e
    cx, cy = cx0 + (cx1 - cx0) * e, cy0 + (cy1 - cy0) * e
    rot = rot0 + (rot1 - rot0) * e
    h, w = size
    thetas = np.zeros((frames, 2, 3))
    for k in range(frames):
        c, s = math.cos(rot[k]), math.sin(rot[k])
        # the view: a window of ``z`` of the image's short side, centred at (cx, cy) of the free room
        sx = z[k] * (w / h) / max(aspect, 1e-6) if aspect >= 1 else z[k] * (w / h)
        sy = z[k] if aspect >= 1 else z[k] * aspect
        room_x, room_y = max(0.0, 1 - sx), max(0.0, 1 - sy)
        thetas[k] = [[sx * c, -sy * s, cx[k] * room_x], [sx * s, sy * c, cy[k] * room_y]]
    return thetas, "the camera " + " and ".join(words)


def shape_mask(shape: str, size: tuple[int, int], cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Soft coverage [H, W] in 0..1 of a shape of radius ``r`` pixels centred at (cx, cy), turned by ``angle``."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    u, v = (x - cx) / r, (y - cy) / r
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * u + s * v, -s * u + c * v
    if shape == "circle":
        d = np.hypot(u, v) - 1
    elif shape == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.8
    elif shape == "diamond":
        d = np.abs(u) + np.abs(v) - 1
    else:  # regular polygons and a star, from the angle around the centre
        n = {"triangle": 3, "hexagon": 6, "star": 5}[shape]
        a = np.arctan2(v, u) + math.pi / 2
        sector = (a % (2 * math.pi / n)) - math.pi / n
        rad = np.hypot(u, v)
        edge = math.cos(math.pi / n) / np.cos(sector)
        if shape == "star":
            edge = 0.45 + 0.55 * np.abs(sector) / (math.pi / n)
        d = rad - edge
    return np.clip(0.5 - d * r, 0.0, 1.0)


def _background(rng: np.random.Generator, frames: int, size: tuple[int, int], names: list[str],
                recolour: float = 0.0, paint: np.random.Generator | None = None) -> np.ndarray:  # fmt: skip
    """A still background [F, H, W, 3]: a flat colour, a gradient between two colours, or a photo crop."""
    h, w = size
    kind = rng.choice(["flat", "gradient", "photo"], p=[0.4, 0.3, 0.3])
    if kind == "flat":
        bg = np.broadcast_to(random_color(rng), (h, w, 3))
    elif kind == "gradient":
        a, b = random_color(rng), random_color(rng)
        ang = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        t = np.clip((math.cos(ang) * (x - 0.5) + math.sin(ang) * (y - 0.5)) + 0.5, 0, 1)[..., None]
        bg = a * (1 - t) + b * t
    else:
        img = photo_view(rng, names, int(rng.integers(h, 3 * h)), recolour, paint)
        top, left = int(rng.integers(img.shape[0] - h + 1)), int(rng.integers(img.shape[1] - w + 1))
        bg = img[top : top + h, left : left + w]
    return np.broadcast_to(np.asarray(bg, dtype=np.float32), (frames, h, w, 3))


def _light_curve(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, str]:
    """Per-frame RGB gains [F, 3] of a lighting change, and its caption."""
    dusk, night = np.array([1.0, 0.62, 0.4]), np.array([0.28, 0.32, 0.55])
    day = np.ones(3)
    pick = rng.choice(["day to dusk", "day to night", "night to day", "dawn"])
    a, b, caption = {"day to dusk": (day, dusk, "day turns into dusk"),
                     "day to night": (day, night, "the sky turns from day to night"),
                     "night to day": (night, day, "night turns into day"),
                     "dawn": (np.array([0.5, 0.42, 0.55]), day, "dawn turns into day")}[pick]  # fmt: skip
    t = _ease(np.linspace(0, 1, frames))[:, None]
    return a * (1 - t) + b * t, caption


def render_broad(
    seed: int, kind: str, names: list[str], frames: int = 17, size: tuple[int, int] = (64, 64), recolour: float = 0.0
) -> tuple[np.ndarray, str]:
    """One clip of ``kind`` drawn from ``seed`` with photos from ``names`` (a share ``recolour`` of them in
    other colours: ``recoloured``): uint8 [F, H, W, 3] and a caption."""
    if kind not in KINDS:
        raise InputError(f"unknown broad clip kind {kind!r}; known: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    paint = np.random.default_rng([seed, 0xC0]) if recolour > 0 else None  # the recolouring's own draws
    h, w = size
    t = np.linspace(0, 1, frames)
    if kind == "flat":
        a, b = random_color(rng), (random_color(rng) if rng.random() < 0.7 else None)
        b = a if b is None else b
        e = _ease(t)[:, None, None, None]
        video = np.broadcast_to(a * (1 - e) + b * e, (frames, h, w, 3))
        caption = (
            f"the {color_name(a)} place stays still"
            if b is a
            else f"the place changes from {color_name(a)} to {color_name(b)}"
        )
    elif kind == "shape":
        bg = _background(rng, frames, size, names, recolour, paint)
        color, shape = random_color(rng), str(rng.choice(SHAPES))
        r0 = rng.uniform(0.1, 0.3) * min(h, w)
        r1 = r0 * rng.uniform(0.6, 1.6) if rng.random() < 0.4 else r0
        x0, x1 = rng.uniform(r0, w - r0, size=2)
        y0, y1 = rng.uniform(r0, h - r0, size=2)
        a0, a1 = rng.uniform(0, 2 * math.pi), 0.0
        a1 = a0 + (rng.uniform(0.5, 2.0) * rng.choice([-1, 1]) if rng.random() < 0.3 else 0.0)
        e = _ease(t)
        frames_out = []
        for k in range(frames):
            m = shape_mask(shape, size, x0 + (x1 - x0) * e[k], y0 + (y1 - y0) * e[k], r0 + (r1 - r0) * e[k],
                            a0 + (a1 - a0) * e[k])[..., None]  # fmt: skip
            frames_out.append(bg[k] * (1 - m) + color * m)
        video = np.stack(frames_out)
        verb = f"moves to the {'right' if x1 > x0 else 'left'}"
        extra = " growing" if r1 > r0 * 1.1 else " shrinking" if r1 < r0 / 1.1 else ""
        extra += " spinning" if a1 != a0 else ""
        caption = f"the {color_name(color)} {shape} {verb}{extra}"
    elif kind in ("camera", "light"):
        img = photo_view(rng, names, int(rng.integers(int(1.3 * min(size)), 5 * min(size))), recolour, paint)
        thetas, caption = _camera_path(rng, frames, size, img.shape[1] / img.shape[0])
        if kind == "light":
            thetas = thetas if rng.random() < 0.5 else np.repeat(thetas[:1], frames, axis=0)
        video = _affine_frames(img, thetas, size)
        if kind == "light":
            gains, light = _light_curve(rng, frames)
            video = video * gains[:, None, None, :]
            caption = light if (thetas[0] == thetas[-1]).all() else f"{light} and {caption}"
    elif kind == "parallax":
        img = photo_view(rng, names, int(rng.integers(int(1.5 * min(size)), 4 * min(size))), recolour, paint)
        thetas, caption = _camera_path(rng, frames, size, img.shape[1] / img.shape[0])
        video = _affine_frames(img, thetas, size)
        # a cut-out layer nearer the camera: moves further than the background, the other way or faster
        layer = photo_view(rng, names, int(rng.integers(min(size), 3 * min(size))), recolour, paint)
        top, left = int(rng.integers(layer.shape[0] - h + 1)), int(rng.integers(layer.shape[1] - w + 1))
        layer = layer[top : top + h, left : left + w]
        shape = str(rng.choice(SHAPES))
        r = rng.uniform(0.18, 0.35) * min(h, w)
        x0, y0 = rng.uniform(r, w - r), rng.uniform(r, h - r)
        dx = (thetas[-1, 0, 2] - thetas[0, 0, 2]) * -w * rng.uniform(1.5, 3.0) + rng.uniform(-4, 4)
        e = _ease(t)
        out = []
        for k in range(frames):
            shift = int(round(dx * e[k]))
            m = shape_mask(shape, size, x0 + shift, y0, r, 0.0)[..., None]
            moved = np.roll(layer, shift, axis=1)
            out.append(video[k] * (1 - m) + moved * m)
        video = np.stack(out)
    else:  # morph: one photo becomes an unrelated one, each under a slow camera move
        a = photo_view(rng, names, int(rng.integers(int(1.3 * min(size)), 4 * min(size))), recolour, paint)
        b = photo_view(rng, names, int(rng.integers(int(1.3 * min(size)), 4 * min(size))), recolour, paint)
        ta, _ = _camera_path(rng, frames, size, a.shape[1] / a.shape[0])
        tb, _ = _camera_path(rng, frames, size, b.shape[1] / b.shape[0])
        va, vb = _affine_frames(a, ta, size), _affine_frames(b, tb, size)
        e = _ease(np.clip((t - 0.2) / 0.6, 0, 1))[:, None, None, None]
        video = va * (1 - e) + vb * e
        caption = "the place changes"
    return np.clip(np.asarray(video), 0, 255).round().astype(np.uint8), caption


class BroadVideos(torch.utils.data.Dataset):
    """Item i: a broad clip of ``split`` (its photos: ``photos.photo_names(split, photos)``, a share
    ``recolour`` of them in other colours), its kind drawn with the weights of ``mix``; ``video`` [3, F, H,
    W] in [-1, 1] (8-bit steps) and ``caption``."""

    def __init__(self, split: str = "train", length: int = 10_000, frames: int = 17, size: tuple[int, int] = (64, 64),
                 mix: dict[str, float] | None = None, recolour: float = 0.0, photos: str = "pypi") -> None:  # fmt: skip
        if split not in SPLIT_SEEDS:
            raise InputError(f"broad clip split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
        if not 0.0 <= recolour <= 1.0:
            raise InputError(f"broad clips: recolour is a share of photos, in [0, 1]; got {recolour}")
        mix = dict(DEFAULT_MIX if mix is None else mix)
        bad = [k for k in mix if k not in KINDS]
        if bad or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0 or length < 1:
            raise InputError(f"broad clips need kinds from {KINDS} with weights >= 0 and length >= 1; got {mix}")
        self.split, self.length, self.frames, self.size, self.mix = split, length, frames, tuple(size), mix
        self.names, self.recolour, self.photos = photo_names(split, photos), recolour, photos
        missing = missing_packages(self.names)
        if missing:  # before any clip is rendered
            raise InputError(f"broad clips of photos {photos!r} need the Debian packages {', '.join(missing)}: "
                             f"{install_command(missing)}")  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def kind_of(self, index: int) -> str:
        kinds = list(self.mix)
        p = np.array([self.mix[k] for k in kinds], dtype=np.float64)
        rng = np.random.default_rng([SPLIT_SEEDS[self.split], index, 1])
        return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]

    def clip(self, index: int) -> tuple[np.ndarray, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        seed = np.random.default_rng([SPLIT_SEEDS[self.split], index, 2]).integers(1 << 62)
        kind, size = self.kind_of(index), self.size
        return render_broad(int(seed), kind, self.names, self.frames, size, self.recolour)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        frames, caption = self.clip(index)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, F, H, W]
        return {"video": video, "caption": caption}


class Mixed(torch.utils.data.Dataset):
    """Two datasets interleaved: item i is ``b``'s when a fixed draw from i falls under ``share_b``, else
    ``a``'s; each keeps its own index (i), so the mix is a function of i alone. Items keep ``video`` and
    ``caption`` (what the latent cache and the VAE need), and ``anchor``: True for ``a``'s items (the data a
    trained model already knows: ``train.anchored_vae``)."""

    def __init__(self, a: torch.utils.data.Dataset, b: torch.utils.data.Dataset, share_b: float, seed: int = 0) -> None:
        if not 0.0 <= share_b <= 1.0:
            raise InputError(f"share_b must be in [0, 1], got {share_b}")
        self.a, self.b, self.share_b, self.seed = a, b, share_b, seed
        self.length = min(len(a), len(b))  # type: ignore[arg-type]
        self.size = getattr(a, "size", None)

    def __len__(self) -> int:
        return self.length

    def from_b(self, index: int) -> bool:
        return bool(np.random.default_rng([self.seed, index, 7]).random() < self.share_b)

    def __getitem__(self, index: int) -> dict:
        item = (self.b if self.from_b(index) else self.a)[index]
        return {"video": item["video"], "caption": item["caption"], "anchor": not self.from_b(index)}
