"""Webhooks: when a job ends (completed, failed, cancelled), POST its JSON to the URL it was submitted with.

The body is the job as GET /v1/videos/{id} returns it. Header ``Segue-Signature: sha256=<hex>`` is the
HMAC-SHA256 of the raw body under the server's secret (``--webhook-secret``, else a random one kept in
``DATA/webhook-secret``, mode 0600); ``Segue-Delivery`` is ``<job id>.<attempt>``. A receiver recomputes the
HMAC over the bytes it got and compares in constant time (``verify``).

Delivery is durable: the job's row says a webhook is pending when the job ends (in the same statement), and
a deliverer thread in each API process takes due ones (``Queue.due_webhook``, held against other deliverers),
POSTs with a timeout, and on anything but a 2xx answer tries again after ``backoff * 2**(attempt-1)`` seconds,
up to ``retries`` attempts, then marks it failed with the last error. It is delivered at least once: a crash
between the POST and the write of its result sends it again; receivers dedupe by job id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

import httpx

from ..io import atomic_path
from .queue import Queue

log = logging.getLogger("segue.serve")
HEADER = "Segue-Signature"
SECRET_FILE = "webhook-secret"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, body), signature)


def load_secret(data: Path, given: str | None) -> str:
    """The signing secret: ``given``, else the one kept in the data folder (made once, readable by its owner only)."""
    if given:
        return given
    path = Path(data) / SECRET_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    with atomic_path(path) as tmp:
        tmp.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o600)
    os.chmod(path, 0o600)
    return path.read_text(encoding="utf-8").strip()


class Deliverer(threading.Thread):
    """Delivers due webhooks until ``stop()``."""

    def __init__(self, queue: Queue, secret: str, retries: int = 5, backoff: float = 2.0, timeout: float = 10.0,
                 poll: float = 0.5) -> None:  # fmt: skip
        super().__init__(name="segue-webhooks", daemon=True)
        self.queue, self.secret = queue, secret
        self.retries, self.backoff, self.timeout, self.poll = retries, backoff, timeout, poll
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            while not self.stopping.is_set():
                try:
                    if not self.deliver_one(client):
                        self.stopping.wait(self.poll)
                except Exception as e:  # noqa: BLE001 - the database may be away for a moment: try again later
                    log.warning("webhooks: %s", e)
                    self.stopping.wait(self.poll * 4)

    def deliver_one(self, client: httpx.Client) -> bool:
        """Deliver the next due webhook; False when none was due."""
        job = self.queue.due_webhook(hold_s=self.timeout + 5)
        if job is None:
            return False
        body = json.dumps(job.public()).encode()
        headers = {"Content-Type": "application/json", HEADER: sign(self.secret, body),
                   "Segue-Delivery": f"{job.id}.{job.webhook_attempts}", "User-Agent": "segue-serve"}  # fmt: skip
        error = None
        try:
            answer = client.post(job.webhook_url or "", content=body, headers=headers)
            if not 200 <= answer.status_code < 300:
                error = f"answered {answer.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        if error is None:
            self.queue.webhook_done(job.id, "delivered", None, None)
        elif job.webhook_attempts >= self.retries:
            log.warning("webhook of %s failed after %d attempts: %s", job.id, job.webhook_attempts, error)
            self.queue.webhook_done(job.id, "failed", None, error)
        else:
            delay = self.backoff * 2 ** (job.webhook_attempts - 1)
            self.queue.webhook_done(job.id, "pending", time.time() + delay, error)
        return True
