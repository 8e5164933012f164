"""The job queue: one small interface over SQL, kept in SQLite (one machine) or PostgreSQL (many).

Every state change is one statement on the jobs table, so it is atomic in both databases:

- a worker claims the oldest queued job with ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING *``
  (PostgreSQL adds ``FOR UPDATE SKIP LOCKED``, so workers on many machines never wait on each other);
- the claim gives the job a fresh token and a lease (``lease_until``) the worker keeps renewing; progress,
  completion and failure are written ``WHERE claim = <token> AND status = 'in_progress'`` and say whether
  they landed, so a worker that lost its job (cancelled, deleted, its lease expired and the job re-claimed)
  learns it at its next write and can never complete the job a second time;
- a job whose lease ran out, or whose worker the supervisor saw die, goes back to ``queued`` (attempts
  counted) or, after ``MAX_ATTEMPTS`` claims, ends ``failed`` with the reason.

Connections are per thread. The dialects (``queue_sqlite``, ``queue_pg``) give the connection, the schema and
the locking clause; ``segue.serve.command.open_queue`` picks one by the URL.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

from ..errors import InputError
from .jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, MAX_ATTEMPTS, QUEUED, Job

COLUMNS = (
    "id", "kind", "status", "spec", "created_at", "idempotency_key", "started_at", "finished_at", "step", "steps",
    "shot", "progress", "eta_s", "error", "attempts", "claim", "worker", "lease_until", "output", "report", "wait_s",
    "denoise_s", "sampled", "webhook_url", "webhook_state", "webhook_attempts", "webhook_next_at", "webhook_error",
)  # fmt: skip
# A job that ends with a webhook gets it queued in the same statement.
_WEBHOOK_DUE = "webhook_state = CASE WHEN webhook_url IS NULL THEN NULL ELSE 'pending' END, webhook_next_at = ?"


class Queue:
    """The queue's operations; a dialect subclass supplies ``connect``, ``SCHEMA`` and ``LOCK``."""

    LOCK = ""  # appended to the SELECT that picks a row to claim
    url = ""

    def __init__(self) -> None:
        self._local = threading.local()

    # -- dialect hooks -------------------------------------------------------------------------
    def connect(self) -> Any:  # pragma: no cover - each dialect defines it
        raise NotImplementedError

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[list[dict[str, Any]], int]:
        """Run one statement (autocommit): its rows as dicts and the row count."""
        raise NotImplementedError  # pragma: no cover

    def create_schema(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.connect()
        return conn

    def forget_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped anyway
                conn.close()

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return self.run(sql, params)[0]

    def count(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return self.run(sql, params)[1]

    def jobs(self, sql: str, params: tuple[Any, ...] = ()) -> list[Job]:
        return [Job.from_row(r) for r in self.rows(sql, params)]

    # -- submitting and reading ----------------------------------------------------------------
    def submit(self, job: Job) -> tuple[Job, bool]:
        """Insert ``job``; with an idempotency key already used, the existing job instead. -> (job, created)."""
        values = (job.id, job.kind, QUEUED, json.dumps(job.spec), job.created_at, job.idempotency_key,
                  job.webhook_url, job.steps)  # fmt: skip
        for _ in range(3):  # the job holding the key may be deleted between the insert and the read
            inserted = self.jobs(
                "INSERT INTO jobs (id, kind, status, spec, created_at, idempotency_key, webhook_url, steps) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING RETURNING *",
                values,
            )
            if inserted:
                return inserted[0], True
            existing = self.by_key(job.idempotency_key)
            if existing is not None:
                return existing, False
        raise RuntimeError("the idempotency key kept changing hands; try again")  # pragma: no cover

    def by_key(self, key: str | None) -> Job | None:
        """The job submitted with this idempotency key, or None."""
        found = self.jobs("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)) if key is not None else []
        return found[0] if found else None

    def get(self, job_id: str) -> Job | None:
        found = self.jobs("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return found[0] if found else None

    def list(self, status: str | None = None, limit: int = 20, after: str | None = None) -> tuple[list[Job], bool]:
        """Newest first; ``after``: the jobs older than that one. -> (jobs, whether more follow)."""
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if after is not None:
            anchor = self.rows("SELECT seq FROM jobs WHERE id = ?", (after,))
            if not anchor:
                raise InputError(f"after: no job {after} (it may have been deleted); list again from the start")
            where.append("seq < ?")
            params.append(anchor[0]["seq"])
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        found = self.jobs(f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return found[:limit], len(found) > limit

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys((QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED), 0)
        for r in self.rows("SELECT status, count(*) AS n FROM jobs GROUP BY status"):
            out[r["status"]] = int(r["n"])
        return out

    def stats(self) -> dict[str, float]:
        """Sums for the metrics: sampling seconds and steps of completed jobs, queue waits, job latencies."""
        r = self.rows(
            "SELECT count(*) AS done, sum(denoise_s) AS denoise_s, sum(sampled) AS steps, "
            "sum(finished_at - created_at) AS latency_s FROM jobs WHERE status = 'completed' AND denoise_s IS NOT NULL"
        )[0]
        w = self.rows("SELECT count(*) AS n, sum(wait_s) AS wait_s FROM jobs WHERE wait_s IS NOT NULL")[0]
        return {"done": int(r["done"] or 0), "denoise_s": float(r["denoise_s"] or 0), "steps": int(r["steps"] or 0),
                "latency_s": float(r["latency_s"] or 0), "waits": int(w["n"] or 0),
                "wait_s": float(w["wait_s"] or 0)}  # fmt: skip

    # -- what workers do -----------------------------------------------------------------------
    def claim(self, worker: str, claim: str, lease_s: float) -> Job | None:
        """Take the oldest queued job under ``claim`` with a lease of ``lease_s`` seconds, or None."""
        now = time.time()
        found = self.jobs(
            "UPDATE jobs SET status = 'in_progress', claim = ?, worker = ?, lease_until = ?, "
            "attempts = attempts + 1, started_at = ?, step = 0, progress = 0, eta_s = NULL, shot = NULL, "
            "wait_s = COALESCE(wait_s, ? - created_at) "
            f"WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1{self.LOCK}) "
            "AND status = 'queued' RETURNING *",
            (claim, worker, now + lease_s, now, now),
        )
        return found[0] if found else None

    def _held(self, sets: str, params: tuple[Any, ...], job_id: str, claim: str) -> bool:
        """Apply ``sets`` to a job only while ``claim`` still holds it in progress; whether it did."""
        sql = f"UPDATE jobs SET {sets} WHERE id = ? AND claim = ? AND status = 'in_progress'"
        return self.count(sql, (*params, job_id, claim)) == 1

    def heartbeat(self, job_id: str, claim: str, lease_s: float) -> bool:
        return self._held("lease_until = ?", (time.time() + lease_s,), job_id, claim)

    def progress(self, job_id: str, claim: str, step: int, steps: int, percent: int, eta_s: float | None,
                 shot: int | None) -> bool:  # fmt: skip
        return self._held("step = ?, steps = ?, progress = ?, eta_s = ?, shot = ?", (step, steps, percent, eta_s, shot),
                          job_id, claim)  # fmt: skip

    def complete(self, job_id: str, claim: str, report: dict[str, Any], denoise_s: float, sampled: int) -> bool:
        """Completed with its outputs in ``out-<claim>/``; ``denoise_s`` seconds of ``sampled`` sampling steps."""
        now = time.time()
        sets = (
            "status = 'completed', finished_at = ?, output = ?, report = ?, denoise_s = ?, sampled = ?, "
            f"step = steps, progress = 100, eta_s = 0, error = NULL, lease_until = NULL, {_WEBHOOK_DUE}"
        )
        return self._held(sets, (now, claim, json.dumps(report), denoise_s, sampled, now), job_id, claim)

    def fail(self, job: Job, claim: str, error: str, final: bool) -> bool:
        """End the attempt with ``error``: failed when ``final`` or out of attempts, else queued again."""
        if final or job.attempts >= MAX_ATTEMPTS:
            sets = f"status = 'failed', finished_at = ?, error = ?, eta_s = NULL, lease_until = NULL, {_WEBHOOK_DUE}"
            now = time.time()
            return self._held(sets, (now, error, now), job.id, claim)
        sets = "status = 'queued', error = ?, claim = NULL, worker = NULL, lease_until = NULL, eta_s = NULL"
        return self._held(sets, (error,), job.id, claim)

    def release(self, job_id: str, claim: str) -> bool:
        """Give a job back untouched (its worker is stopping): queued again, the attempt not counted."""
        sets = "status = 'queued', claim = NULL, worker = NULL, lease_until = NULL, attempts = attempts - 1"
        return self._held(sets, (), job_id, claim)

    def requeue_lost(self, job: Job, why: str) -> bool:
        """A job whose worker died: queued again, or failed after ``MAX_ATTEMPTS`` attempts."""
        if job.claim is None:
            return False
        error = f"attempt {job.attempts} of {MAX_ATTEMPTS} ended: {why}"
        return self.fail(job, job.claim, error if job.attempts < MAX_ATTEMPTS else f"{error}; giving up", final=False)

    def reap(self) -> list[str]:
        """Requeue (or fail) every job whose lease ran out; their ids."""
        expired = self.jobs("SELECT * FROM jobs WHERE status = 'in_progress' AND lease_until < ?", (time.time(),))
        return [j.id for j in expired if self.requeue_lost(j, "its worker stopped renewing the lease")]

    def release_worker(self, worker: str, why: str) -> list[str]:
        """Requeue (or fail) the jobs a dead worker held; their ids."""
        held = self.jobs("SELECT * FROM jobs WHERE status = 'in_progress' AND worker = ?", (worker,))
        return [j.id for j in held if self.requeue_lost(j, why)]

    # -- what clients do -----------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job (its worker stops at its next step); the job, or None if unknown."""
        now = time.time()
        found = self.jobs(
            f"UPDATE jobs SET status = 'cancelled', finished_at = ?, eta_s = NULL, lease_until = NULL, {_WEBHOOK_DUE} "
            "WHERE id = ? AND status IN ('queued', 'in_progress') RETURNING *",
            (now, now, job_id),
        )
        return found[0] if found else self.get(job_id)

    def delete(self, job_id: str) -> Job | None:
        found = self.jobs("DELETE FROM jobs WHERE id = ? RETURNING *", (job_id,))
        return found[0] if found else None

    # -- workers seen --------------------------------------------------------------------------
    def worker_beat(self, worker: str, host: str, pid: int, model: str, job: str | None) -> None:
        now = time.time()
        self.run(
            "INSERT INTO workers (id, host, pid, model, started_at, beat_at, job) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET beat_at = excluded.beat_at, job = excluded.job",
            (worker, host, pid, model, now, now, job),
        )

    def worker_gone(self, worker: str) -> None:
        self.run("DELETE FROM workers WHERE id = ?", (worker,))

    def workers(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM workers ORDER BY started_at")

    # -- webhooks ------------------------------------------------------------------------------
    def due_webhook(self, hold_s: float) -> Job | None:
        """Take the next webhook due for delivery (held ``hold_s`` seconds against other deliverers)."""
        now = time.time()
        found = self.jobs(
            "UPDATE jobs SET webhook_next_at = ?, webhook_attempts = webhook_attempts + 1 WHERE id = "
            "(SELECT id FROM jobs WHERE webhook_state = 'pending' AND webhook_next_at <= ? ORDER BY webhook_next_at "
            f"LIMIT 1{self.LOCK}) AND webhook_state = 'pending' RETURNING *",
            (now + hold_s, now),
        )
        return found[0] if found else None

    def webhook_done(self, job_id: str, state: str, next_at: float | None, error: str | None) -> None:
        self.run("UPDATE jobs SET webhook_state = ?, webhook_next_at = ?, webhook_error = ? WHERE id = ?",
                 (state, next_at, error, job_id))  # fmt: skip
