"""A submission (POST /v1/videos) checked whole before any job exists: the CLI's checks, the API's names.

Form values arrive as text. Each is parsed and checked alone first (so an error names its field: ``param``),
then together and against the model (``segue.settings``: the same one-line messages as ``segue generate``,
with the fields named as the form names them). Uploaded images are decoded here, capped in pixels, and kept as
8-bit RGB; the API writes them as PNG files under names it makes. A story's keyframe ``image`` values name
upload fields: they are looked up among the request's files and never used as paths.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..media import load_image
from ..settings import check_request, host_memory, resolve_settings
from ..story.schema import load_story
from .modelinfo import ModelInfo

INT_FIELDS = ("frames", "steps", "seed", "max_area", "guidance_steps")
FLOAT_FIELDS = ("guidance", "shift")
TEXT_FIELDS = ("prompt", "negative_prompt", "solver", "size", "color_match", "webhook_url", "story")
CLIP_FIELDS = (*TEXT_FIELDS, *INT_FIELDS, *FLOAT_FIELDS)
CLIP_FILES = ("first", "last")
MAX_PROMPT = 10_000  # characters
MAX_URL = 2048


class RequestError(InputError):
    """A bad request field: the message, and the field it concerns (``param``) when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Submission:
    kind: str  # "clip" or "story"
    settings: dict[str, Any]  # shown as the job's settings
    render: dict[str, Any]  # what the worker passes to the pipeline
    images: dict[str, Image.Image] = field(default_factory=dict)  # input file name -> image
    steps: int = 0
    webhook_url: str | None = None


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An uploaded image as upright 8-bit RGB; 422 for a file that is no image or has too many pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise RequestError(f"{name}: the image is {w}x{h} = {w * h} pixels; at most {max_pixels} are "
                                   "allowed (segue serve --max-pixels); scale it down first", name)  # fmt: skip
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"{name}: the image has more pixels than allowed (a decompression bomb?)", name) from None
    except UnidentifiedImageError:
        what = "is empty" if not data else "is not an image format segue reads (PNG, JPEG, WebP, BMP, TIFF, ...)"
        raise RequestError(f"{name}: the uploaded file {what}", name) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(f"{name}: cannot read the uploaded image ({e})", name) from None
    return load_image(im, name)


def _number(name: str, text: str) -> int | float:
    t = text.strip()
    if name in INT_FIELDS:
        if not re.fullmatch(r"[+-]?\d{1,30}", t):
            raise RequestError(f"{name} must be an integer, got {text!r:.40}", name)
        return int(t)
    try:
        return float(t)
    except ValueError:
        raise RequestError(f"{name} must be a number, got {text!r:.40}", name) from None


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", text)
    if not m:
        raise RequestError(f"size must look like 1280x720 (WIDTHxHEIGHT), got {text!r:.40}", "size")
    return int(m.group(1)), int(m.group(2))


def _bool(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(f"{name} must be true or false, got {text!r:.40}", name)


def check_webhook_url(text: str) -> str:
    u = urlsplit(text)
    if len(text) > MAX_URL or u.scheme not in ("http", "https") or not u.hostname:
        raise RequestError(f"webhook_url must be an http:// or https:// URL of at most {MAX_URL} characters, "
                           f"got {text!r:.60}", "webhook_url")  # fmt: skip
    return text


def _param_of(message: str) -> str | None:
    """The field a settings message concerns, from its first words (``frames 81: ...``, ``size 9x9: ...``)."""
    for name in ("frames", "size", "max area", "max_area", "steps", "guidance_steps", "guidance", "shift", "seed"):
        if message.startswith(name):
            return name.replace(" ", "_")
    return None


def parse(fields: Mapping[str, str], files: Mapping[str, bytes], model: ModelInfo, max_pixels: int) -> Submission:
    """Check a whole submission; RequestError (one line, with its field) for the first thing wrong."""
    story = fields.get("story") or None
    webhook = fields.get("webhook_url") or None
    webhook = check_webhook_url(webhook) if webhook is not None else None
    if story is not None:
        sub = parse_story(story, fields, files, model, max_pixels)
    else:
        sub = parse_clip(fields, files, model, max_pixels)
    sub.webhook_url = webhook
    return sub


def parse_clip(fields: Mapping[str, str], files: Mapping[str, bytes], model: ModelInfo, max_pixels: int) -> Submission:
    unknown = [k for k in fields if k not in CLIP_FIELDS] + [k for k in files if k not in CLIP_FILES]
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r:.40}; a clip takes: {', '.join(CLIP_FILES + CLIP_FIELDS)} "
                           "(a storyboard: story and the files its keyframes name)", unknown[0])  # fmt: skip
    if "first" not in files:
        raise RequestError("first: the first keyframe (an image file) is required", "first")
    values: dict[str, Any] = {}
    for name in (*INT_FIELDS, *FLOAT_FIELDS):
        text = fields.get(name, "")
        if text.strip():
            values[name] = _number(name, text)
    if fields.get("size", "").strip():
        values["size"] = _size(fields["size"])
    values["prompt"] = fields.get("prompt", "")
    values["negative_prompt"] = fields.get("negative_prompt") or None
    values["solver"] = fields.get("solver") or None
    for name in ("prompt", "negative_prompt"):
        if values[name] is not None and len(values[name]) > MAX_PROMPT:
            raise RequestError(f"{name} is {len(values[name])} characters; at most {MAX_PROMPT} are allowed", name)
    for name, value in values.items():  # alone first, so the message names its field
        try:
            check_request(**{name: value})
        except InputError as e:
            raise RequestError(str(e), name) from None
    try:
        request = check_request(**values)
    except InputError as e:
        raise RequestError(str(e), "size") from None  # the one check of two fields: size or max_area
    first = decode_image(files["first"], "first", max_pixels)
    last = decode_image(files["last"], "last", max_pixels) if "last" in files else None
    try:
        s = resolve_settings(request, model.config, (first.height, first.width), last is not None, host_memory())
    except InputError as e:
        raise RequestError(str(e), _param_of(str(e))) from None
    color = _bool("color_match", fields.get("color_match", ""))
    resolved = {"frames": s.frames, "size": [s.width, s.height], "steps": s.steps, "shift": s.shift,
                "guidance": s.guidance, "solver": s.solver, "seed": s.seed,
                "guidance_steps": s.guidance_steps}  # fmt: skip
    negative = request.negative_prompt
    settings = {"prompt": request.prompt, "negative_prompt": negative, **resolved, "size": f"{s.width}x{s.height}",
                "color_match": color, "last": last is not None}  # fmt: skip
    render = {"prompt": request.prompt, "negative_prompt": negative, **resolved, "color_match": color,
              "first": "first.png", "last": "last.png" if last is not None else None}  # fmt: skip
    images = {"first.png": first, **({"last.png": last} if last is not None else {})}
    return Submission("clip", settings, render, images, s.steps)


def parse_story(
    text: str, fields: Mapping[str, str], files: Mapping[str, bytes], model: ModelInfo, max_pixels: int
) -> Submission:
    extra = [k for k in fields if k not in ("story", "color_match", "webhook_url")]
    if extra:
        raise RequestError(f"{extra[0]!r:.40}: a storyboard takes its settings inside story (its [settings] table "
                           "or a shot); beside it only color_match and webhook_url", extra[0])  # fmt: skip
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"story: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}", "story") from None
    if not isinstance(data, dict):
        raise RequestError(f"story must be a JSON object, got {type(data).__name__}", "story")
    keyframes = data.get("keyframes")
    images: dict[str, Image.Image] = {}
    given = dict(data)
    if isinstance(keyframes, list):
        given["keyframes"] = []
        for i, kf in enumerate(keyframes):
            if not isinstance(kf, dict) or not isinstance(kf.get("image"), str):
                given["keyframes"].append(kf)  # load_story names what is wrong
                continue
            name = kf["image"]
            if name not in files:
                have = ", ".join(files) or "none"
                raise RequestError(f"story: keyframes[{i}] image names the upload field {name!r:.40}, which this "
                                   f"request does not have (its files: {have})", "story")  # fmt: skip
            image = decode_image(files[name], name, max_pixels)
            images[f"keyframe-{i}.png"] = image
            given["keyframes"].append({**kf, "image": image})
    unused = [k for k in files if k not in {kf.get("image") for kf in keyframes or [] if isinstance(kf, dict)}]
    if unused:
        raise RequestError(f"file field {unused[0]!r:.40} is not named by any keyframe of the story", unused[0])
    try:
        story = load_story(given)
    except InputError as e:
        raise RequestError(str(e), "story") from None
    steps = check_story_settings(story, model)
    color = _bool("color_match", fields.get("color_match", ""))
    render = {"story": {**data, "keyframes": [{"image": f"keyframe-{i}.png"} for i in range(len(images))]},
              "color_match": color}  # fmt: skip
    return Submission("story", {"story": data, "color_match": color}, render, images, steps)


def check_story_settings(story: Any, model: ModelInfo) -> int:
    """Every shot's settings against the model, as ``segue story`` checks them before rendering; the steps."""
    first = story.keyframes[0]
    base = story.shots[0].settings
    steps, film = 0, 0
    size = base.get("size")
    for shot in story.shots:
        st = shot.settings
        frames = st.get("frames") or model.config.defaults.frames
        carry = shot.carry if shot.index > 0 else 0
        lead = carry - 1 if carry else 0
        tail = lead if story.loop and shot.index == len(story.shots) - 1 and carry else 0
        if carry > film:
            raise RequestError(f"story: shots[{shot.index}]: carry = {carry} needs {carry} frames before the shot; "
                               f"the film has {film}", "story")  # fmt: skip
        try:
            request = check_request(
                frames=frames + lead + tail, size=size, max_area=base.get("max_area") if size is None else None,
                steps=st.get("steps"), shift=st.get("shift"), guidance=st.get("guidance"), solver=st.get("solver"),
                seed=st.get("seed", 0), guidance_steps=st.get("guidance_steps"),
            )  # fmt: skip
            s = resolve_settings(request, model.config, (first.height, first.width), True, host_memory())
        except InputError as e:
            raise RequestError(f"story: shots[{shot.index}]: {e}", "story") from None
        size = (s.width, s.height)
        steps += s.steps
        film += frames - (1 if shot.index > 0 else 0)
    return steps
