"""The story: keyframes and the shots between them, from a TOML or JSON file or a Python dict (one schema).

```toml
loop = false            # true: one more shot returns from the last keyframe to the first
[settings]              # optional: any `segue generate` setting, and carry / color_match
seed = 1
[[keyframes]]
image = "a.png"         # relative to the story file
[[shots]]               # shot i runs from keyframes[i] to keyframes[i+1] (with loop, the last to keyframes[0])
prompt = "the ball rolls to the right"
frames = 17             # any setting may be set per shot and overrides [settings]
```

Everything here is checked before a model loads: unknown keys (named, with the allowed ones), types, shot
counts, frame counts (4n+1, naming the shot), carry, and every keyframe image (found and readable).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError
from ..media import load_image

# Settings of `segue generate` a story may set, with their types (bool is not an int here).
GENERATE_SETTINGS: dict[str, tuple[type, ...]] = {
    "seed": (int,), "steps": (int,), "guidance": (int, float), "shift": (int, float), "solver": (str,),
    "frames": (int,), "max_area": (int,), "size": (str, list, tuple), "negative_prompt": (str,),
    "guidance_steps": (int,),
}  # fmt: skip
# Story settings: frames carried from the shot before (0: none) and colour matching at the keyframes.
STORY_SETTINGS: dict[str, tuple[type, ...]] = {"carry": (int,), "color_match": (bool,)}
SETTINGS = {**GENERATE_SETTINGS, **STORY_SETTINGS}
FILM_ONLY = ("size", "max_area")  # the film has one size: set in [settings], not per shot
TOP_KEYS = ("loop", "settings", "keyframes", "shots")
KEYFRAME_KEYS = ("image",)
SHOT_KEYS = ("prompt", *(k for k in SETTINGS if k not in FILM_ONLY))
TEMPORAL = 4  # frames per latent frame in every Wan2.1 VAE: shots are 4n+1 frames long
# The default carry, chosen by measurement on held-out synthetic paths (docs/storyboard.md): the join frame as
# the shot before rendered it gave lower seam ratios and jerk than the input keyframe (0) at equal keyframe PSNR.
DEFAULT_CARRY = 1


@dataclass
class Shot:
    index: int
    start: int  # keyframe index
    end: int  # keyframe index (0 for a loop's last shot)
    prompt: str
    settings: dict[str, Any]  # generate settings after [settings] and the shot's own (None: model default)
    carry: int = DEFAULT_CARRY
    color_match: bool = False


@dataclass
class Story:
    keyframes: list[Image.Image]  # 8-bit RGB
    keyframe_names: list[str]  # file names (or "keyframes[i]") for messages and the report
    shots: list[Shot]
    loop: bool = False
    where: str = "story"  # the file name, or "story" for a dict, at the head of every message
    inputs: list[Path] = field(default_factory=list)  # files the story reads (never to be overwritten)


def read_story_file(path: str | Path) -> dict[str, Any]:
    """The story file's data: TOML by default, JSON for a .json name. Syntax errors give line and column."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"story file not found: {p}" if not p.exists() else f"story file is not a file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read the story file ({e})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"{p}: TOML syntax error {_toml_position(e)}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: the story must be a table (a JSON object), got {type(data).__name__}")
    return data


def _toml_position(e: tomllib.TOMLDecodeError) -> str:
    """'at line L, column C: message' from tomllib's error (whose text ends '(at line L, column C)')."""
    msg = str(e)
    lineno, colno = getattr(e, "lineno", None), getattr(e, "colno", None)
    if lineno is None and "(at line " in msg:
        msg, _, pos = msg.rpartition(" (at line ")
        lineno, _, colno = pos.rstrip(")").partition(", column ")
    elif lineno is not None:
        msg = getattr(e, "msg", msg).split(" (at line ")[0]
    if lineno is None:
        return f"({msg})"
    return f"at line {lineno}, column {colno}: {msg}"


def load_story(story: dict[str, Any] | str | Path) -> Story:
    """A checked Story from a dict or a TOML/JSON file; keyframe paths are relative to the file."""
    if isinstance(story, str | Path):
        where, base, data = str(story), Path(story).parent, read_story_file(story)
    elif isinstance(story, dict):
        where, base, data = "story", Path("."), story
    else:
        raise InputError(f"a story is a dict or the path of a TOML/JSON file, got {type(story).__name__}")
    _check_keys(data, TOP_KEYS, where)
    loop = data.get("loop", False)
    if not isinstance(loop, bool):
        raise InputError(f"{where}: loop must be true or false, got {loop!r}")
    base_settings = data.get("settings", {})
    if not isinstance(base_settings, dict):
        raise InputError(f"{where}: settings must be a table, got {type(base_settings).__name__}")
    base_settings = dict(base_settings)  # checked copies: the caller's dict stays as given
    _check_keys(base_settings, tuple(SETTINGS), f"{where}: settings")
    _check_settings(base_settings, f"{where}: settings")

    keyframes, names, inputs = _load_keyframes(data, where, base)
    shot_list = _list_of_tables(data, "shots", where)
    n_kf, want = len(keyframes), len(keyframes) if loop else len(keyframes) - 1
    if len(shot_list) != want:
        kind = "a loop" if loop else "an open film"
        hint = "(a loop has one shot per keyframe)" if loop else "(one shot between each two keyframes)"
        raise InputError(f"{where}: {n_kf} keyframe{'s' * (n_kf != 1)} need {want} shot{'s' * (want != 1)} "
                         f"in {kind} {hint}, found {len(shot_list)}")  # fmt: skip
    if want == 0:
        raise InputError(f"{where}: one keyframe makes no film; add a second keyframe and a shot, or set loop = true")
    shots = [_load_shot(i, dict(sh), base_settings, n_kf, where) for i, sh in enumerate(shot_list)]
    return Story(keyframes, names, shots, loop, where, inputs)


def _load_shot(i: int, sh: dict[str, Any], base_settings: dict[str, Any], n_kf: int, where: str) -> Shot:
    what = f"{where}: shots[{i}]"
    _check_keys(sh, SHOT_KEYS, what, film_only=FILM_ONLY)
    _check_settings(sh, what)
    prompt = sh.get("prompt", "")
    if not isinstance(prompt, str):
        raise InputError(f"{what}: prompt must be a string, got {type(prompt).__name__}")
    merged = {**base_settings, **{k: v for k, v in sh.items() if k != "prompt"}}
    carry = merged.pop("carry", DEFAULT_CARRY)
    color_match = merged.pop("color_match", False)
    if carry and (carry - 1) % TEMPORAL:
        lo = (carry - 1) // TEMPORAL * TEMPORAL + 1
        raise InputError(f"{what}: carry must be 0 or 4n+1 (1, 5, 9, ...) so the shot stays 4n+1 frames long; "
                         f"got {carry}, nearest valid: {lo} or {lo + TEMPORAL}")  # fmt: skip
    frames = merged.get("frames")
    if frames is not None and (frames < 1 or (frames - 1) % TEMPORAL):
        lo = max(1, (frames - 1) // TEMPORAL * TEMPORAL + 1)
        raise InputError(f"{what}: frames must be 4n+1 (5, 9, ..., 81); got {frames}, nearest valid: "
                         f"{lo} or {lo + TEMPORAL}")  # fmt: skip
    end = (i + 1) % n_kf
    return Shot(i, i, end, prompt, merged, carry, color_match)


def _load_keyframes(data: dict[str, Any], where: str, base: Path) -> tuple[list[Image.Image], list[str], list[Path]]:
    kf_list = _list_of_tables(data, "keyframes", where)
    if not kf_list:
        raise InputError(f"{where}: a story needs at least one keyframe ([[keyframes]] with image = ...)")
    keyframes, names, inputs = [], [], []
    for i, kf in enumerate(kf_list):
        _check_keys(kf, KEYFRAME_KEYS, f"{where}: keyframes[{i}]")
        if "image" not in kf:
            raise InputError(f"{where}: keyframes[{i}] has no image")
        image = kf["image"]
        if isinstance(image, str):
            path = Path(image) if Path(image).is_absolute() else base / image
            keyframes.append(load_image(path, f"{where}: keyframes[{i}] image"))
            names.append(image)
            inputs.append(path)
        elif isinstance(image, Image.Image | np.ndarray):
            arr = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image
            keyframes.append(load_image(arr, f"{where}: keyframes[{i}] image"))
            names.append(f"keyframes[{i}]")
        else:
            raise InputError(f"{where}: keyframes[{i}] image must be a file name, got {type(image).__name__}")
    return keyframes, names, inputs


def _list_of_tables(data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise InputError(f"{where}: {key} must be a list of tables ([[{key}]] in TOML, a list of objects in JSON)")
    return value


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], what: str, film_only: tuple[str, ...] = ()) -> None:
    for key in table:
        if key in film_only:
            raise InputError(f"{what}: {key} is set for the whole film in [settings], not per shot")
        if key not in allowed:
            raise InputError(f"{what}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


_TYPE_NAMES = {
    (int,): "an integer",
    (int, float): "a number",
    (str,): "a string",
    (bool,): "true or false",
    (str, list, tuple): 'a string "WIDTHxHEIGHT" or a list [width, height]',
}


def _check_settings(table: dict[str, Any], what: str) -> None:
    for key, value in table.items():
        types = SETTINGS.get(key)
        if types is None:
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise InputError(f"{what}: {key} must be {_TYPE_NAMES[types]}, got {value!r}")
        if key in ("carry", "frames", "steps", "guidance_steps", "max_area") and value < 0:
            raise InputError(f"{what}: {key} must not be negative, got {value}")
    if "size" in table:
        table["size"] = parse_size(table["size"], what)


def parse_size(value: Any, what: str) -> tuple[int, int]:
    """(width, height) from "832x480" or [832, 480]."""
    try:
        if isinstance(value, str):
            w, h = value.lower().split("x")
            return int(w), int(h)
        if isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int for v in value):
            return int(value[0]), int(value[1])
    except ValueError:
        pass
    raise InputError(f'{what}: size must look like "832x480" (WIDTHxHEIGHT) or [832, 480], got {value!r}')
