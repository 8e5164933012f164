"""Helpers of the segue serve tests: a real ``segue serve`` on loopback (a free port), a real HTTP client,
keyframe images, and waiting for jobs. Nothing here mocks the server, the queue or the workers."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

# Tiny settings on the built-in model: a job is a second or two on a 2-core machine.
TINY = {"frames": "5", "steps": "2", "size": "16x16"}
PG_ENV = "SEGUE_TEST_PG_URL"  # a PostgreSQL server for the tests (set by .ci/run)
PG_REQUIRED_ENV = "SEGUE_TEST_PG_REQUIRED"  # set: a missing server fails the PostgreSQL tests instead of skipping


def png(seed: int, w: int = 24, h: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, np.full((h, w), (seed % 7) / 7)], -1) * 255
    img = np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """``segue serve`` in a child process: its URL once it listens, a client, and ways to stop or kill it."""

    def __init__(self, data: Path, *args: str, token: str | None = None, env: dict[str, str] | None = None) -> None:
        self.data, self.args, self.token = Path(data), list(args), token
        self.log_path = self.data.parent / f"{self.data.name}-serve-{time.monotonic_ns()}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 90) -> Server:
        cmd = [sys.executable, "-m", "segue", "serve", "--port", "0", "--data", str(self.data), *self.args]
        if self.token:
            cmd += ["--token", self.token]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - open for the life of the server
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"segue serve: (http://127\.0\.0\.1:\d+/)", self.log_path.read_text())
            if m:
                self.url = m.group(1).rstrip("/")
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"segue serve exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"segue serve did not start:\n{self.log_path.read_text()}")
        return self

    def client(self, token: str | None = "default") -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        with self.client() as c:
            wait_for(lambda: c.get("/health").json()["workers_alive"] >= n, timeout, f"{n} workers alive")

    def worker_pids(self) -> list[int]:
        """The pids of the workers recorded in the SQLite queue."""
        with sqlite3.connect(self.data / "queue.db") as db:
            return [int(r[0]) for r in db.execute("SELECT pid FROM workers")]

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill9(self) -> list[int]:
        """SIGKILL the server and every worker it started (the whole service dies at once); their pids."""
        assert self.proc is not None
        pids = [self.proc.pid, *self.worker_pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()
        return pids

    def output(self) -> str:
        return self.log_path.read_text()


def wait_for(check: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def submit(c: httpx.Client, seed: int = 0, files: dict[str, bytes] | None = None, **fields: str) -> dict[str, Any]:
    files = files if files is not None else {"first": png(seed), "last": png(seed + 100)}
    r = c.post("/v1/videos", data={**TINY, "seed": str(seed), **fields},
               files={k: (f"{k}.png", v, "image/png") for k, v in files.items()})  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()


def wait_done(c: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = c.get(f"/v1/videos/{job_id}").json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    return wait_for(ended, timeout, f"job {job_id} to end", every=0.2)


def pg_url_or_skip() -> str:
    import pytest

    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get(PG_REQUIRED_ENV):
            pytest.fail(f"{PG_ENV} is not set but {PG_REQUIRED_ENV} is: the PostgreSQL tests must run here")
        pytest.skip(f"no PostgreSQL server ({PG_ENV} unset)")
    return url


def pg_schema_url(url: str) -> str:
    """A fresh schema on the test server; the URL whose connections use it (tests never share tables)."""
    import secrets
    from urllib.parse import quote

    import psycopg

    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
