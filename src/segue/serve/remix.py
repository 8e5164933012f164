"""A remix (POST /v1/videos/{id}/remix): a new job from an earlier job's inputs and settings, some changed.

The earlier job's request is rebuilt as the form it would have been (its settings, as resolved at
submission, and its keyframes read back from its own input files, which the API wrote under names it made)
and the overrides are laid over it; the result goes through the same checks as a submission, so a bad
override gets the same one-line message and field. A client never names a file here: only the job id,
which is checked before any path is made from it. A clip takes every override in ``CLIP_OVERRIDES``; a
storyboard only the film-wide ones in ``STORY_OVERRIDES``, which replace the value in its ``[settings]`` and
in every shot that set its own (a new seed is new for every shot).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .jobs import Job, JobFiles
from .submit import RequestError

CLIP_OVERRIDES = ("prompt", "negative_prompt", "seed", "steps", "guidance", "shift", "solver", "frames",
                  "guidance_steps", "color_match", "webhook_url")  # fmt: skip
STORY_OVERRIDES = ("seed", "steps", "guidance", "shift", "solver", "guidance_steps", "color_match", "webhook_url")
SETTING_FIELDS = ("prompt", "negative_prompt", "frames", "size", "steps", "seed", "guidance", "shift", "solver",
                  "guidance_steps", "color_match")  # fmt: skip


def form_text(value: Any) -> str:
    """A JSON value as the form would have carried it (null: empty, the model's default)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_overrides(job: Job, body: Any) -> dict[str, Any]:
    """The overrides of a remix body (a JSON object, or nothing); RequestError for a key or type not allowed."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise RequestError(f"the remix body must be a JSON object of settings, got {type(body).__name__}")
    allowed = STORY_OVERRIDES if job.kind == "story" else CLIP_OVERRIDES
    for key, value in body.items():
        if key not in allowed:
            what = "a storyboard's remix" if job.kind == "story" else "a remix"
            raise RequestError(f"unknown field {key!r:.40}; {what} takes: {', '.join(allowed)}", key)
        if not isinstance(value, str | int | float | bool | None):
            raise RequestError(f"{key} must be a number, text or true/false, got {type(value).__name__}", key)
    return body


def remix_request(job: Job, files_of: JobFiles, overrides: dict[str, Any]) -> tuple[dict[str, str], dict[str, bytes]]:
    """The form fields and files of a submission remaking ``job`` with ``overrides``."""
    settings = job.spec.get("settings", {})
    webhook = overrides.get("webhook_url")
    extra = {"webhook_url": webhook} if isinstance(webhook, str) and webhook else {}
    if job.kind == "story":
        story = copy.deepcopy(settings.get("story") or {})
        changed = {k: v for k, v in overrides.items() if k not in ("color_match", "webhook_url")}
        if changed:
            story["settings"] = {**(story.get("settings") or {}), **changed}
            for shot in story.get("shots") or []:  # checked at submission: a list of tables
                for key in changed:
                    shot.pop(key, None)
            story["settings"] = {k: v for k, v in story["settings"].items() if v is not None}
        color = overrides.get("color_match", settings.get("color_match", False))
        files: dict[str, bytes] = {}
        for i, kf in enumerate(story.get("keyframes") or []):
            files.setdefault(kf["image"], read_input(job, files_of, f"keyframe-{i}.png"))
        fields = {"story": json.dumps(story), "color_match": form_text(color), **extra}
        return fields, files
    fields = {name: form_text(settings.get(name)) for name in SETTING_FIELDS}
    fields.update({name: form_text(value) for name, value in overrides.items() if name != "webhook_url"})
    fields = {k: v for k, v in fields.items() if v != "" or k == "prompt"}
    files = {"first": read_input(job, files_of, "first.png")}
    if settings.get("last"):
        files["last"] = read_input(job, files_of, "last.png")
    return {**fields, **extra}, files


class MissingInput(Exception):
    """A job whose input file is gone from the data folder."""


def read_input(job: Job, files_of: JobFiles, name: str) -> bytes:
    path = files_of.input(name)
    try:
        return path.read_bytes()
    except OSError:
        raise MissingInput(f"job {job.id}: its input {name} is missing from the data folder") from None
