"""A job of ``segue serve``: its states, its row in the queue, its public JSON and its files.

A job is born ``queued``; a worker claims it (``in_progress``) under a lease it keeps renewing; it ends
``completed``, ``failed`` or ``cancelled``. A job whose worker died (its lease ran out, or the supervisor saw
the process end) goes back to ``queued`` with its attempts counted; after ``MAX_ATTEMPTS`` it is ``failed``
with the reason. Every claim gets a fresh random ``claim`` token: a worker's progress, completion and
failure are written only while the job still holds its token, so a worker that lost its job (cancelled,
deleted, or re-claimed after its lease ran out) can never complete it, and a job completes once.

Files live under the data folder: ``jobs/<id>/`` holds the inputs (PNG keyframes written by the API) and
one ``out-<claim>/`` folder per attempt that wrote outputs; the job records the one it completed with.
Ids and claim tokens are random hex made here; a name from a client never becomes a path.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
TERMINAL = (COMPLETED, FAILED, CANCELLED)
MAX_ATTEMPTS = 3  # claims of one job before a worker death fails it

ID_PREFIX = "video_"
_ID = re.compile(r"^video_[0-9a-f]{24}$")
_CLAIM = re.compile(r"^[0-9a-f]{16}$")

# The outputs of a completed job, by the ``variant`` of GET /v1/videos/{id}/content.
VARIANTS = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
            "frames": ("frames.zip", "application/zip")}  # fmt: skip
REPORT_FILE = "report.json"


def new_id() -> str:
    """A random job id (96 bits): ids cannot be guessed or enumerated."""
    return ID_PREFIX + secrets.token_hex(12)


def new_claim() -> str:
    return secrets.token_hex(8)


def valid_id(text: str) -> bool:
    return bool(_ID.match(text))


@dataclass
class Job:
    """One row of the jobs table (times are Unix seconds)."""

    id: str
    seq: int
    kind: str  # "clip" or "story"
    status: str
    spec: dict[str, Any]  # what to render: settings resolved at submission, input file names
    created_at: float
    idempotency_key: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    steps: int = 0
    shot: int | None = None
    progress: int = 0
    eta_s: float | None = None
    error: str | None = None
    attempts: int = 0
    claim: str | None = None
    worker: str | None = None
    lease_until: float | None = None
    output: str | None = None  # the claim whose out-<claim>/ folder holds the outputs
    report: dict[str, Any] | None = None
    wait_s: float | None = None  # created -> first claimed
    denoise_s: float | None = None  # seconds of the sampling steps of the completing attempt
    sampled: int | None = None  # its sampling steps (a storyboard's reused shots run none)
    webhook_url: str | None = None
    webhook_state: str | None = None  # pending, delivered, failed (None: no webhook, or not ended yet)
    webhook_attempts: int = 0
    webhook_next_at: float | None = None
    webhook_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        data = dict(row)
        for key in ("spec", "report"):
            if isinstance(data.get(key), str):
                data[key] = json.loads(data[key])
        data["spec"] = data.get("spec") or {}
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def public(self) -> dict[str, Any]:
        """The job as the API shows it (GET /v1/videos/{id}, events, webhooks)."""
        return {
            "id": self.id, "object": "video", "kind": self.kind, "status": self.status,
            "progress": 100 if self.status == COMPLETED else self.progress, "step": self.step, "steps": self.steps,
            "shot": self.shot, "eta_s": None if self.eta_s is None else round(self.eta_s, 2), "error": self.error,
            "attempts": self.attempts, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "settings": self.spec.get("settings", {}), "report": self.report,
            "webhook": None if self.webhook_url is None else
            {"url": self.webhook_url, "state": self.webhook_state, "attempts": self.webhook_attempts},
        }  # fmt: skip


def progress_percent(step: int, steps: int) -> int:
    """0-99 while running: 100 is kept for a completed job (decoding and writing come after the last step)."""
    return 0 if steps <= 0 else min(99, int(100 * step / steps))


# ---------------------------------------------------------------------------------------------
# Files.


class JobFiles:
    """The folder of one job under the data folder; every path is built from a checked id or claim."""

    def __init__(self, data: Path, job_id: str) -> None:
        if not valid_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        self.root = Path(data) / "jobs" / job_id

    def input(self, name: str) -> Path:
        """An input written by the API: ``first.png``, ``last.png`` or ``keyframe-<i>.png``."""
        if not re.match(r"^(first|last|keyframe-\d{1,4})\.png$", name):
            raise ValueError(f"not an input name: {name!r}")
        return self.root / "inputs" / name

    def outputs(self, claim: str) -> Path:
        if not _CLAIM.match(claim):
            raise ValueError(f"not a claim token: {claim!r}")
        return self.root / f"out-{claim}"

    def output(self, job: Job, variant: str) -> Path | None:
        """The file of ``variant`` of a completed job, or None."""
        if job.output is None or variant not in VARIANTS:
            return None
        path = self.outputs(job.output) / VARIANTS[variant][0]
        return path if path.is_file() else None

    def remove_other_outputs(self, claim: str) -> None:
        """Remove the outputs folders of earlier attempts (a worker killed mid-write leaves one behind)."""
        for folder in self.root.glob("out-*"):
            if folder.name != f"out-{claim}":
                shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
