"""Procedural captioned video clips: the training data of segue's built-in tiny FLF2V model.

A clip shows one main shape (sometimes with a second, smaller one) moving along a named path over a sky and
ground whose lighting or season changes, sometimes filmed by a panning or zooming camera. Everything is a pure
function of an integer seed; frames are drawn with numpy on whole [F, H, W] grids from anti-aliased signed
distances, so motion stays smooth at sub-pixel level even at 64x64. Ambiguous groups share the first and last
frame bit for bit and differ only in the path in between, so only the caption tells which path to draw.

Coordinates: x to the right, y down, in pixels; ``size`` is (H, W). World coordinates equal frame coordinates
while the camera rests; the camera maps ``frame = (world - centre) * zoom + frame_centre``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35), "green": (30, 170, 60), "blue": (35, 75, 235), "yellow": (250, 220, 30),
    "orange": (250, 135, 20), "purple": (140, 50, 200), "pink": (250, 115, 190), "white": (248, 248, 248),
    "black": (20, 20, 20), "cyan": (30, 215, 225),
}  # fmt: skip
SHAPES = ("square", "circle", "triangle", "star", "diamond", "hexagon")
TEXTURES = {"solid": "", "stripes": "striped", "checker": "checkered", "dots": "dotted"}  # kind -> adjective
SLIDE_PATHS = ("straight", "arc_over", "arc_under", "bounce", "zigzag", "wave")  # p0 -> p1, mostly sideways
LOOP_PATHS = ("circle_cw", "circle_ccw", "still")  # start and end at the same point
# share of the ambiguous groups that are loop groups (one clip per LOOP_PATHS); the held-out sets use this one
LOOP_GROUPS = 0.3
PATHS = SLIDE_PATHS + LOOP_PATHS
# Where a circle lies from its start point. "inward": its centre lies toward the frame's centre, so the first
# frame shows which way "clockwise" turns and the caption decides the path. "any": the centre in any
# direction, which the keyframes and the caption cannot tell, so clockwise and counterclockwise loops have the
# same distribution of positions (the data of every run before `default-r13`).
LOOP_CENTRES = ("inward", "any")
PATH_PHRASES: dict[str, tuple[str, ...]] = {
    "straight": ("in a straight line", "along a straight line"), "zigzag": ("in a zigzag", "along a zigzag line"),
    "arc_over": ("along an arc over the top", "in an arc over the top"), "wave": ("along a wavy line", "in a wave"),
    "arc_under": ("along an arc under the bottom", "in an arc under the bottom"),
    "bounce": ("bouncing {n} on the floor", "bouncing {n} off the floor"),  # {n}: once, twice, three times
    "circle_cw": ("around in a circle clockwise", "around a clockwise circle"),
    "circle_ccw": ("around in a circle counterclockwise", "around a counterclockwise circle"),
    "still": ("in place", "in the same place"),
}  # fmt: skip
BOUNCE_COUNTS = ("once", "twice", "three times")
SLIDE_VERBS = ("moves", "travels", "goes")
LOOP_VERBS = ("goes", "moves")

# Time of day: sky top and horizon colours, and the light that tints ground and objects.
TIMES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]] = {
    "day": ((70, 130, 225), (175, 215, 245), (1.0, 1.0, 1.0)),
    "dusk": ((70, 45, 120), (245, 140, 80), (1.0, 0.72, 0.58)),
    "night": ((6, 8, 30), (30, 40, 85), (0.32, 0.36, 0.58)),
    "dawn": ((115, 120, 195), (250, 195, 160), (0.95, 0.82, 0.8)),
}
TIME_WORDS = {"day": "day", "dusk": "evening", "night": "night", "dawn": "morning"}
SEASONS: dict[str, tuple[int, int, int]] = {  # ground colour
    "spring": (120, 205, 95), "summer": (55, 145, 45), "autumn": (185, 110, 35), "winter": (230, 236, 244),
}  # fmt: skip
TIME_CHANGES = (("day", "night"), ("night", "day"), ("day", "dusk"), ("dusk", "night"), ("night", "dawn"),
                ("dawn", "day"))  # fmt: skip
SEASON_CHANGES = (("spring", "summer"), ("summer", "autumn"), ("autumn", "winter"), ("winter", "spring"))
TIME_TEMPLATES = ("as the sky turns from {a} to {b}", "while {a} turns into {b}")
SEASON_TEMPLATES = ("as {a} turns into {b}", "while the season changes from {a} to {b}")
STATIC_TEMPLATES = ("on {art} {season} {time}", "on a quiet {season} {time}")
# Glue words: articles, directions, modifiers, second object, camera.
OTHER_WORDS = "the a an to right left upper lower while spinning turning slowly growing shrinking and stays still small"
OTHER_WORDS += " moves camera pans zooms in out"
SPLIT_OFFSETS = {"train": 0, "val": 1 << 40, "test": 2 << 40}  # disjoint seed ranges, 2**40 clips each
GROUP_SIZE = 3  # dataset items come in chunks of 3 that may form one ambiguous group


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    caption: str
    path: str
    track: np.ndarray  # float32 [F, 2]: main object's centre (x, y) in frame pixels
    object_color: tuple[int, int, int]  # nominal (daylight) colour of the main object
    group: int | None = None
    meta: dict = field(default_factory=dict)
    # float32 [F, 3]: the main object's colour as rendered in each frame (its nominal colour under that
    # frame's light); what a tracker must look for, since at night the nominal colour is far off
    object_colors: np.ndarray | None = None


@dataclass(frozen=True)
class Mover:
    """One shape and its motion; slide and loop geometry are both sampled so the path can be swapped."""

    shape: str
    color: str
    texture: str
    radius: float  # world pixels at scale 1
    path: str
    p0: tuple[float, float]
    p1: tuple[float, float]
    amp: float = 0.0  # arc / zigzag / wave height
    cycles: float = 1.0  # zigzag / wave periods
    loop_radius: float = 0.0
    loop_angle: float = 0.0  # angle of p0 seen from the loop centre
    hops: tuple[float, ...] = ()  # bounce: peak heights between floor contacts
    easing: str = "smooth"
    angle0: float = 0.0
    turns: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class Scene:
    seed: int
    frames: int
    size: tuple[int, int]
    main: Mover
    second: Mover | None
    times: tuple[str, str]
    seasons: tuple[str, str]
    horizon: tuple[float, float, float, float]  # mean y, hill amplitude, wavelength, phase
    clouds: tuple[tuple[float, float, float], ...]  # (x, y, rx)
    pan: float = 0.0  # camera centre moves this far in x over the clip
    zoom: tuple[float, float] = (1.0, 1.0)

    @property
    def floor_y(self) -> float:
        return 0.9 * self.size[0]


def _ease(t: np.ndarray, kind: str) -> np.ndarray:
    return t if kind == "linear" else t * t * (3.0 - 2.0 * t)


def _bounce_height(m: Mover, t: np.ndarray, h0: float, h1: float) -> np.ndarray:
    """Height above the floor: fall from rest, parabolic hops, rise to rest; contacts land on frames."""
    n = len(t)
    dur = np.array([np.sqrt(h0 + 1)] + [2 * np.sqrt(h + 1) for h in m.hops] + [np.sqrt(h1 + 1)])
    idx = np.round(np.cumsum(dur)[:-1] / dur.sum() * (n - 1)).astype(int)
    idx = np.minimum(np.maximum(idx, np.arange(1, len(idx) + 1)), n - 2)  # contacts inside (0, n-1)
    bounds = np.concatenate([[0.0], idx / (n - 1), [1.0]])
    seg = np.clip(np.searchsorted(bounds, t, side="right") - 1, 0, len(bounds) - 2)  # segment of each frame
    u = (t - bounds[seg]) / np.maximum(bounds[seg + 1] - bounds[seg], 1e-9)
    peaks = np.array([h0, *m.hops, h1])[seg]
    h = np.where(seg == 0, peaks * (1 - u * u), peaks * 4 * u * (1 - u))  # fall from rest, then hops
    h = np.where(seg == len(bounds) - 2, peaks * (1 - (1 - u) ** 2), h)  # last: rise to rest
    h[idx] = 0.0
    return h


def _camera(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre [F, 2] (world) and zoom [F]."""
    h, w = scene.size
    e = _ease(np.linspace(0.0, 1.0, scene.frames), "smooth")
    centre = np.stack([w / 2 + scene.pan * e, np.full_like(e, h / 2)], axis=1)
    return centre, scene.zoom[0] + (scene.zoom[1] - scene.zoom[0]) * e


def mover_track(scene: Scene, m: Mover) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre [F, 2], radius [F] and angle [F] of a mover, in frame coordinates (camera applied)."""
    t = np.linspace(0.0, 1.0, scene.frames)
    scale = m.scale[0] + (m.scale[1] - m.scale[0]) * _ease(t, "smooth")
    angle = m.angle0 + 2 * np.pi * m.turns * t
    p0, p1 = np.array(m.p0), np.array(m.p1)
    s = _ease(t, "linear" if m.path == "bounce" else m.easing)
    pos = (1 - s)[:, None] * p0 + s[:, None] * p1
    if m.path == "arc_over":
        pos[:, 1] -= m.amp * np.sin(np.pi * s)
    elif m.path == "arc_under":
        pos[:, 1] += m.amp * np.sin(np.pi * s)
    elif m.path == "zigzag":  # triangle wave, zero at both ends
        pos[:, 1] += m.amp * (2 / np.pi) * np.arcsin(np.sin(2 * np.pi * m.cycles * s))
    elif m.path == "wave":
        pos[:, 1] += m.amp * np.sin(2 * np.pi * m.cycles * s)
    elif m.path == "bounce":
        bottom = scene.floor_y - m.radius * scale  # centre height when touching the floor
        pos[:, 1] = bottom - _bounce_height(m, t, bottom[0] - p0[1], bottom[-1] - p1[1])
    elif m.path in ("circle_cw", "circle_ccw"):  # y down: increasing angle turns clockwise on screen
        theta = m.loop_angle + (2 if m.path == "circle_cw" else -2) * np.pi * s
        centre = p0 - m.loop_radius * np.array([np.cos(m.loop_angle), np.sin(m.loop_angle)])
        pos = centre + m.loop_radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    elif m.path == "still":
        pos[:] = p0
    pos[0], pos[-1] = p0, p1  # exact endpoints, so every path of a group shares its keyframes
    centre, zoom = _camera(scene)
    frame_centre = np.array([scene.size[1] / 2, scene.size[0] / 2])
    return (pos - centre) * zoom[:, None] + frame_centre, m.radius * scale * zoom, angle


def _sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in radius units) of a shape centred at the origin with radius about 1."""
    if shape == "circle":
        return np.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.82
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - 1.1) * 0.7071
    if shape == "triangle":  # apex up, centroid at the origin
        return np.maximum(v, np.abs(u) * 0.866 - v * 0.5) - 0.58
    if shape == "hexagon":
        a = np.abs(u)
        return np.maximum(a, np.maximum(np.abs(0.5 * a + 0.866 * v), np.abs(0.5 * a - 0.866 * v))) - 0.9
    # five-pointed star, point up: boundary radius interpolates between tips and notches
    rho = np.sqrt(u * u + v * v)
    sector = 2 * np.pi / 5
    a = np.mod(np.arctan2(v, u) + np.pi / 2 + sector / 2, sector) - sector / 2
    return (rho - (0.5 + 0.65 * (1 - np.abs(a) / (sector / 2)))) * 0.6


def _texture(kind: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray | None:
    """Weight in [0, 1] of the texture's second colour, None for solid.

    Coarse patterns (two or three bands across the shape) with edges about one pixel wide: a signed
    pattern value is scaled by its pixel slope and clipped, so stripes, squares and dots stay smooth
    under sub-pixel motion and rotation (r: the shape's radius in pixels, [F, 1, 1])."""
    if kind == "stripes":
        return np.clip(0.5 + np.sin(np.pi * 1.4 * u) * r / (np.pi * 1.4), 0.0, 1.0)
    if kind == "checker":
        a, b = np.sin(np.pi * 1.2 * u), np.sin(np.pi * 1.2 * v)
        return np.clip(0.5 + a * b * r / (np.pi * 1.2 * 0.5), 0.0, 1.0)
    if kind == "dots":
        du, dv = u * 1.2 - np.round(u * 1.2), v * 1.2 - np.round(v * 1.2)
        return np.clip(0.5 + (0.3 - np.sqrt(du * du + dv * dv)) * r / 1.2, 0.0, 1.0)
    return None


def _lerp3(a, b, e: np.ndarray) -> np.ndarray:
    a, b = np.array(a, np.float32), np.array(b, np.float32)
    return (a + (b - a) * e[:, None])[:, None, None, :]  # [F, 1, 1, 3]


def _light(scene: Scene) -> np.ndarray:
    """The light per frame, eased from the first time of day to the second. [F, 1, 1, 3]"""
    e = _ease(np.linspace(0.0, 1.0, scene.frames), "smooth").astype(np.float32)
    return _lerp3(TIMES[scene.times[0]][2], TIMES[scene.times[1]][2], e)


def object_lighting(scene: Scene) -> np.ndarray:
    """Per-frame factor on the shapes' colours: lit less strongly than the scenery, so they stay visible
    at night. [F, 1, 1, 3]"""
    return 0.45 + 0.55 * _light(scene)


def render_frames(scene: Scene, with_objects: bool = True) -> np.ndarray:
    """Float32 frames [F, H, W, 3] in [0, 255] (before rounding)."""
    (h, w), n = scene.size, scene.frames
    e = _ease(np.linspace(0.0, 1.0, n), "smooth").astype(np.float32)
    centre, zoom = _camera(scene)
    xs, ys = np.arange(w, dtype=np.float32) + 0.5, np.arange(h, dtype=np.float32) + 0.5  # pixel centres
    xw = ((xs[None] - w / 2) / zoom[:, None] + centre[:, :1]).astype(np.float32)  # [F, W] world x per column
    yw = ((ys[None] - h / 2) / zoom[:, None] + centre[:, 1:]).astype(np.float32)  # [F, H]
    (ta, tb), (sa, sb) = scene.times, scene.seasons
    light = _light(scene)
    hy, amp, wavelength, phase = scene.horizon
    frac = np.clip(yw / hy, 0.0, 1.0)[:, :, None, None]  # [F, H, 1, 1]
    top, bottom = _lerp3(TIMES[ta][0], TIMES[tb][0], e), _lerp3(TIMES[ta][1], TIMES[tb][1], e)
    img = np.broadcast_to(top + (bottom - top) * frac, (n, h, w, 3)).copy()  # [F, H, W, 3]
    for cx, cy, rx in scene.clouds:
        d = ((xw[:, None, :] - cx) / rx) ** 2 + ((yw[:, :, None] - cy) / (0.4 * rx)) ** 2  # [F, H, W]
        alpha = np.clip(1.2 * (1.0 - d), 0.0, 0.75)[..., None]
        img += (255.0 * light - img) * alpha * 0.8
    hill = hy + amp * np.sin(2 * np.pi * xw / wavelength + phase)  # [F, W]
    g = np.clip((yw[:, :, None] - hill[:, None, :]) * zoom[:, None, None] + 0.5, 0.0, 1.0)[..., None]
    rows = 0.5 + 0.5 * np.sin(np.pi * xw / (0.1 * w))  # world-anchored, smooth field rows make pans visible
    depth = 0.8 + 0.2 * np.clip((yw - hy) / (h - hy), 0.0, 1.0)
    shade = (1.0 - 0.07 * rows[:, None, :]) * depth[:, :, None]  # [F, H, W]
    ground = _lerp3(SEASONS[sa], SEASONS[sb], e) * light * shade[..., None]
    img += (ground - img) * g
    if not with_objects:
        return img
    lit = object_lighting(scene)
    for m in (scene.second, scene.main):
        if m is None:
            continue
        pos, rad, angle = (a.astype(np.float32) for a in mover_track(scene, m))
        c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        r = rad[:, None, None]
        dx = xs[None, None, :] - pos[:, 0, None, None]  # [F, 1, W]
        dy = ys[None, :, None] - pos[:, 1, None, None]  # [F, H, 1]
        u, v = (c * dx + s * dy) / r, (c * dy - s * dx) / r  # [F, H, W] in the shape's rotating frame
        alpha = np.clip(0.5 - _sdf(m.shape, u, v) * r, 0.0, 1.0)[..., None]
        base = np.array(COLORS[m.color], np.float32)
        tex = _texture(m.texture, u, v, r)
        second = base * 0.5 if base.mean() > 90 else base + (255 - base) * 0.5  # darker, or lighter for black
        col = base if tex is None else base + (second - base) * tex[..., None]
        img += (col * lit - img) * alpha
    return img


def object_mask(scene: Scene, scenery: np.ndarray | None = None) -> np.ndarray:
    """Bool [F, H, W]: the pixels the scene's shapes change (their anti-aliased edges included). ``scenery``:
    ``render_frames(scene, with_objects=False)`` when the caller has it already."""
    if scenery is None:
        scenery = render_frames(scene, with_objects=False)
    return np.abs(render_frames(scene) - scenery).max(axis=-1) > 0.5


def _fits(scene: Scene, paths: tuple[str, ...]) -> bool:
    """Every object stays fully inside the frame for every listed main path."""
    h, w = scene.size
    movers = [dataclasses.replace(scene.main, path=p) for p in paths] + [scene.second] * (scene.second is not None)
    for m in movers:
        pos, rad, _ = mover_track(scene, m)
        ext = (1.2 * rad + 0.5)[:, None]
        if np.any(pos - ext < 0) or np.any(pos + ext > np.array([w, h])):
            return False
    return True


def _pick_color(rng: np.random.Generator, scene_colors: list[np.ndarray], lights, exclude: tuple[str, ...]) -> str:
    """A colour far from every background colour under every light (falls back to the farthest)."""
    best, best_d = "", -1.0
    for name in rng.permutation(list(COLORS)):
        if name in exclude:
            continue
        lit = [np.array(COLORS[name]) * (0.45 + 0.55 * np.array(li)) for li in lights]
        d = min(float(np.linalg.norm(a - b)) for a in lit for b in scene_colors)
        if d > 90:
            return str(name)
        if d > best_d:
            best, best_d = str(name), d
    return best


# A mover's draws that neither its keyframes nor its caption show (bench/oracle_inbetween.py redraws them from
# these same ranges to find what any model could best predict).
EASINGS = ("smooth", "linear")
TURNS = (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0)  # whole turns of a spin: |turns| >= 0.5 reads "spinning"
AMP_RANGE = (0.2, 0.27)  # height of an arc, zigzag or wave, times the frame's height
CYCLES = (1.0, 1.5, 2.0)  # periods of a zigzag or wave
HOP_RANGE, HOP_DECAY = (0.4, 0.8), 0.8  # bounce hop j: a uniform share of the room, times HOP_DECAY**j
LOOP_RADIUS_RANGE = (0.16, 0.24)  # a circle's radius, times the frame's shorter side


def mover_margin(radius: float, scale: tuple[float, float]) -> float:
    """How far (px) a mover's centre must stay from the frame's edges and floor."""
    return 1.2 * radius * max(scale) + 1.0


def _sample_mover(rng, size, floor_y, family: str, color: str, small: bool = False, loops: str = "inward") -> Mover:
    h, w = size
    radius = float(rng.uniform(0.06, 0.08) if small else rng.uniform(0.09, 0.13)) * min(h, w)
    scale = (1.0, 1.0)
    if not small and rng.random() < 0.35:
        scale = (1.0, 1.5) if rng.random() < 0.5 else (1.5, 1.0)
    ext = mover_margin(radius, scale)
    shape = str(rng.choice(SHAPES))
    texture = "solid" if small else str(rng.choice(list(TEXTURES), p=[0.4, 0.2, 0.2, 0.2]))
    turns = 0.0 if small or rng.random() < 0.4 else float(rng.choice(TURNS))
    if shape == "circle" and texture == "solid":
        turns = 0.0  # a plain disc cannot be seen to spin
    common = dict(shape=shape, color=color, texture=texture, radius=radius, scale=scale, turns=turns,
                  angle0=float(rng.uniform(0, 2 * np.pi)) if turns else 0.0,
                  easing=str(rng.choice(EASINGS)))  # fmt: skip
    if family == "loop":
        lr = min(float(rng.uniform(*LOOP_RADIUS_RANGE)) * min(h, w), (floor_y - 2 * ext) / 2 - 0.5)
        cx = rng.uniform(ext + lr, w - ext - lr)
        cy = rng.uniform(ext + lr, floor_y - ext - lr)
        a = float(rng.uniform(0, 2 * np.pi))  # drawn either way: the rest of the scene stays the same
        if loops == "inward":  # the start point lies on the far side of the centre from the frame's centre
            a = float(np.arctan2(cy - h / 2, cx - w / 2))
        p = (float(cx + lr * np.cos(a)), float(cy + lr * np.sin(a)))
        return Mover(path="circle_cw", p0=p, p1=p, loop_radius=lr, loop_angle=a, **common)
    amp = 0.0 if small else float(rng.uniform(*AMP_RANGE)) * h
    lo, hi = ext + amp, floor_y - ext - amp
    if hi < lo:
        lo = hi = (ext + floor_y - ext) / 2
        amp = max(0.0, (floor_y - 2 * ext) / 2 - 1)
    x0, x1 = rng.uniform(ext, 0.3 * w), rng.uniform(0.7 * w, w - ext)
    if rng.random() < 0.5:
        x0, x1 = w - x0, w - x1
    y0 = float(rng.uniform(lo, hi))
    y1 = y0 if small or rng.random() < 0.4 else float(rng.uniform(lo, hi))
    room = floor_y - 2 * ext
    hops = tuple(float(rng.uniform(*HOP_RANGE) * room * HOP_DECAY**j) for j in range(int(rng.integers(0, 3))))
    return Mover(path="straight", p0=(float(x0), y0), p1=(float(x1), y1), amp=amp,
                 cycles=float(rng.choice(CYCLES)), hops=hops, **common)  # fmt: skip


def check_loops(loops: str, where: str = "") -> None:
    """ValueError unless ``loops`` is one of ``LOOP_CENTRES``; ``where`` prefixes the message."""
    if loops not in LOOP_CENTRES:
        raise ValueError(f"{where}loops must be one of {LOOP_CENTRES}, got {loops!r}")


def check_loop_groups(loop_groups: float, where: str = "") -> None:
    """ValueError unless ``loop_groups`` (the share of ambiguous groups that are loop groups) is in [0, 1]."""
    if not 0.0 <= loop_groups <= 1.0:
        raise ValueError(f"{where}loop_groups must be in [0, 1], got {loop_groups}")


def sample_scene(seed: int, frames: int = 17, size: tuple[int, int] = (64, 64), path: str | None = None,
                 camera: bool = True, group_paths: tuple[str, ...] = (), loops: str = "inward") -> Scene:  # fmt: skip
    """The scene of seed; ``path`` forces the main path, ``group_paths`` must all fit with the camera;
    ``loops`` places circles (``LOOP_CENTRES``)."""
    if frames < 3 or min(size) < 16:
        raise ValueError(f"need frames >= 3 and size >= 16x16, got frames={frames} size={size}")
    check_loops(loops)
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    rng = np.random.default_rng([seed, 0])
    h, w = size
    roll = rng.random()
    if roll < 0.5:
        times, seasons = TIME_CHANGES[rng.integers(len(TIME_CHANGES))], (str(rng.choice(list(SEASONS))),) * 2
    elif roll < 0.8:
        times, seasons = (str(rng.choice(["day", "day", "dusk", "dawn"])),) * 2, SEASON_CHANGES[rng.integers(4)]
    else:
        times, seasons = (str(rng.choice(list(TIMES))),) * 2, (str(rng.choice(list(SEASONS))),) * 2
    horizon = (float(rng.uniform(0.55, 0.68) * h), float(rng.uniform(0.02, 0.06) * h),
               float(rng.uniform(0.5, 1.0) * w), float(rng.uniform(0, 2 * np.pi)))  # fmt: skip
    clouds = tuple((float(rng.uniform(0, w)), float(rng.uniform(0.08, 0.3) * h), float(rng.uniform(0.1, 0.18) * w))
                   for _ in range(int(rng.integers(0, 3))))  # fmt: skip
    bg = [np.array(TIMES[t][k]) for t in times for k in (0, 1)]
    bg += [np.array(SEASONS[s]) * np.array(TIMES[t][2]) for s in seasons for t in times]
    lights = [TIMES[t][2] for t in times]
    path = path or str(rng.choice(PATHS, p=[0.14, 0.14, 0.14, 0.14, 0.1, 0.1, 0.08, 0.08, 0.08]))
    family = "loop" if path in LOOP_PATHS else "slide"
    floor_y = 0.9 * h
    main_color = _pick_color(rng, bg, lights, ())
    main = dataclasses.replace(_sample_mover(rng, size, floor_y, family, main_color, loops=loops), path=path)
    second = None
    if rng.random() < 0.35:
        second = _sample_mover(rng, size, floor_y, "slide", _pick_color(rng, bg, lights, (main_color,)), small=True)
        if rng.random() < 0.4:
            second = dataclasses.replace(second, path="still", p1=second.p0)
    scene = Scene(seed, frames, (h, w), main, second, tuple(times), tuple(seasons), horizon, clouds)
    paths = group_paths or (path,)
    kind = rng.choice(["none", "pan", "zoom", "both"], p=[0.5, 0.25, 0.15, 0.1]) if camera else "none"
    pan = float(rng.choice([-1, 1]) * rng.uniform(0.08, 0.15) * w) if kind in ("pan", "both") else 0.0
    zoom = (1.0, 1.2) if rng.random() < 0.5 else (1.2, 1.0)
    for shrink in (1.0, 0.6, 0.3):  # weaken the camera move until every object stays in frame
        z = 1 + (zoom[0] - 1) * shrink, 1 + (zoom[1] - 1) * shrink
        moved = dataclasses.replace(scene, pan=pan * shrink, zoom=z if kind in ("zoom", "both") else (1.0, 1.0))
        if kind != "none" and _fits(moved, paths):
            return moved
    return scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, wording_seed: int | None = None) -> str:
    """Plain lower-case English without punctuation; wording comes from its own random stream, so the
    members of an ambiguous group (same wording seed) differ only in the path phrase."""
    rng = np.random.default_rng([scene.seed if wording_seed is None else wording_seed, 2])
    pick = rng.random(8)  # all choices drawn up front: same draws whatever the path

    def choose(options, k: int):
        return options[int(pick[k] * len(options))]

    m, h = scene.main, scene.size[0]
    adjective = TEXTURES[m.texture]
    subject = " ".join(["the", m.color] + ([adjective] if adjective else []) + [m.shape])
    phrase = choose(PATH_PHRASES[m.path], 0).replace("{n}", BOUNCE_COUNTS[min(len(m.hops), 2)])
    if m.path == "still":
        text = f"{subject} stays {phrase}"
    elif m.path in LOOP_PATHS:
        text = f"{subject} {choose(LOOP_VERBS, 1)} {phrase}"
    else:
        dx, dy = m.p1[0] - m.p0[0], m.p1[1] - m.p0[1]
        side = "right" if dx > 0 else "left"
        vert = "" if abs(dy) < 0.12 * h else ("upper " if dy < 0 else "lower ")
        text = f"{subject} {choose(SLIDE_VERBS, 1)} to the {vert}{side} {phrase}"
    mods = ["spinning"] if abs(m.turns) >= 0.5 else ["turning slowly"] if m.turns else []
    mods += ["growing"] if m.scale[1] > m.scale[0] else ["shrinking"] if m.scale[1] < m.scale[0] else []
    if mods:
        text += " " + " and ".join(mods)
    if scene.second is not None:
        o = scene.second
        action = "stays still" if o.path == "still" else f"moves to the {'right' if o.p1[0] > o.p0[0] else 'left'}"
        text += f" while a small {o.color} {o.shape} {action}"
    (ta, tb), (sa, sb) = scene.times, scene.seasons
    if ta != tb:
        text += " " + choose(TIME_TEMPLATES, 2).format(a=ta, b=tb)
    elif sa != sb:
        text += " " + choose(SEASON_TEMPLATES, 3).format(a=sa, b=sb)
    else:
        text += " " + choose(STATIC_TEMPLATES, 4).format(art=_article(sa), season=sa, time=TIME_WORDS[ta])
    camera = [f"pans to the {'right' if scene.pan > 0 else 'left'}"] if scene.pan else []
    camera += [] if scene.zoom[0] == scene.zoom[1] else ["zooms in" if scene.zoom[1] > scene.zoom[0] else "zooms out"]
    if camera:
        text += " and the camera " + " and ".join(camera)
    return text


def vocabulary() -> list[str]:
    """Every word a caption can contain (sorted)."""
    parts = [*COLORS, *SHAPES, *TEXTURES.values(), *SLIDE_VERBS, *LOOP_VERBS, *BOUNCE_COUNTS,
             *TIMES, *TIME_WORDS.values(), *SEASONS, *TIME_TEMPLATES, *SEASON_TEMPLATES, *STATIC_TEMPLATES,
             OTHER_WORDS]  # fmt: skip
    parts += [p for phrases in PATH_PHRASES.values() for p in phrases]
    return sorted({w for p in parts for w in p.split() if w and "{" not in w})


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Rendered float frames in [0, 255] rounded to the uint8 frames a clip holds."""
    return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


def render_scene(scene: Scene, group: int | None = None, wording_seed: int | None = None) -> Clip:
    frames = to_uint8(render_frames(scene))
    track, rad, _ = mover_track(scene, scene.main)
    m = scene.main
    speed = float(np.linalg.norm(np.diff(track, axis=0), axis=1).mean())
    meta = {
        "seed": scene.seed, "shape": m.shape, "color_name": m.color, "texture": m.texture,
        "radius_px": rad.astype(np.float32), "turns": m.turns, "scale": m.scale, "speed_px": speed,
        "easing": "linear" if m.path == "bounce" else m.easing, "bounces": (len(m.hops) + 1) * (m.path == "bounce"),
        "times": scene.times, "seasons": scene.seasons, "camera": {"pan": scene.pan, "zoom": scene.zoom},
        "floor_y": scene.floor_y, "second": None if scene.second is None else dataclasses.asdict(scene.second),
    }  # fmt: skip
    colors = (np.array(COLORS[m.color], np.float32) * object_lighting(scene)).reshape(scene.frames, 3)  # [F, 3]
    return Clip(frames, caption(scene, wording_seed), m.path, track.astype(np.float32), COLORS[m.color], group, meta,
                colors)  # fmt: skip


def make_clip(seed: int, frames: int = 17, size: tuple[int, int] = (64, 64), loops: str = "inward") -> Clip:
    """One clip, a pure function of (seed, frames, size, loops); ``size`` is (H, W)."""
    return render_scene(sample_scene(seed, frames, size, loops=loops))


def _group_scenes(
    seed: int, frames: int, size: tuple[int, int], n_paths: int, loops: str = "inward", loop_groups: float = LOOP_GROUPS
) -> list[Scene]:
    rng = np.random.default_rng([seed, 1])
    loop = n_paths <= len(LOOP_PATHS) and rng.random() < loop_groups  # the same draw for any share
    family = LOOP_PATHS if loop else SLIDE_PATHS
    if not 2 <= n_paths <= len(family):
        raise ValueError(f"n_paths must be in 2..{len(SLIDE_PATHS)}, got {n_paths}")
    kinds = tuple(str(k) for k in rng.choice(family, n_paths, replace=False))
    base = sample_scene(seed, frames, size, path=kinds[0], group_paths=kinds, loops=loops)
    return [dataclasses.replace(base, main=dataclasses.replace(base.main, path=k)) for k in kinds]


def make_ambiguous_group(
    seed: int, frames: int = 17, size: tuple[int, int] = (64, 64), n_paths: int = 3, loops: str = "inward"
) -> list[Clip]:
    """Clips with bit-identical first and last frames and background, differing only in the main path."""
    scenes = _group_scenes(seed, frames, size, n_paths, loops)
    return [render_scene(s, group=seed, wording_seed=seed) for s in scenes]


def ambiguous_groups(
    n: int, frames: int = 17, size: tuple[int, int] = (64, 64), split: str = "test"
) -> list[list[Clip]]:
    """The first ``n`` ambiguous groups of a split's seed range (``val`` for tuning, ``test`` for reporting)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {tuple(SPLIT_OFFSETS)}, got {split!r}")
    return [make_ambiguous_group(SPLIT_OFFSETS[split] + GROUP_SIZE * k, frames, size, GROUP_SIZE) for k in range(n)]


def ambiguous_test_groups(n: int, frames: int = 17, size: tuple[int, int] = (64, 64)) -> list[list[Clip]]:
    """Held-out ambiguous groups (test seed range) for evaluation."""
    return ambiguous_groups(n, frames, size, "test")


class SyntheticVideos(torch.utils.data.Dataset):
    """Item i is a deterministic function of (split, i). Items come in chunks of 3 consecutive indices; a
    chunk is an ambiguous group (one member per index) with probability ``ambiguous_fraction``, and such a group
    is a loop group with probability ``loop_groups``. ``loops`` places the circles (``LOOP_CENTRES``)."""

    def __init__(
        self, split: str = "train", length: int = 10000, frames: int = 17, size: tuple[int, int] = (64, 64),
        ambiguous_fraction: float = 0.25, loops: str = "inward", loop_groups: float = LOOP_GROUPS,
    ) -> None:  # fmt: skip
        if split not in SPLIT_OFFSETS or not 0 < length <= 1 << 40 or not 0.0 <= ambiguous_fraction <= 1.0:
            raise ValueError(f"need split in {tuple(SPLIT_OFFSETS)}, 0 < length <= 2**40, ambiguous_fraction in "
                             f"[0, 1]; got {split!r}, {length}, {ambiguous_fraction}")  # fmt: skip
        check_loops(loops)
        check_loop_groups(loop_groups)
        self.split, self.length, self.frames, self.size = split, length, frames, tuple(size)
        self.ambiguous_fraction, self.loops, self.loop_groups = ambiguous_fraction, loops, loop_groups

    def __len__(self) -> int:
        return self.length

    def seed_of(self, index: int) -> int:
        return SPLIT_OFFSETS[self.split] + index

    def group_of(self, index: int) -> int | None:
        """The seed of the ambiguous group item ``index`` belongs to, or None (a clip of its own)."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        chunk_seed = self.seed_of(index - index % GROUP_SIZE)
        return chunk_seed if np.random.default_rng([chunk_seed, 3]).random() < self.ambiguous_fraction else None

    def scene(self, index: int) -> Scene:
        """The scene item ``index`` renders."""
        group = self.group_of(index)
        if group is None:
            return sample_scene(self.seed_of(index), self.frames, self.size, loops=self.loops)
        scenes = _group_scenes(group, self.frames, self.size, GROUP_SIZE, self.loops, self.loop_groups)
        return scenes[index % GROUP_SIZE]

    def clip(self, index: int) -> Clip:
        group = self.group_of(index)
        return render_scene(self.scene(index), group=group, wording_seed=group)

    def __getitem__(self, index: int) -> dict:
        c = self.clip(index)
        video = torch.from_numpy(c.frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, F, H, W]
        group = -1 if c.group is None else c.group
        return {"video": video, "caption": c.caption, "path": c.path, "track": torch.from_numpy(c.track),
                "group": group}  # fmt: skip
