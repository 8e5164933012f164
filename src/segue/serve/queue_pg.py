"""The shared queue: PostgreSQL, for workers on many machines (``--db postgresql://...``).

Workers claim with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside the claiming ``UPDATE``: two workers never
take the same job and never wait on each other's row. A worker that dies stops renewing its lease; whoever
looks next (any worker before it claims, any API process every second) puts the job back in the queue.
Times are each machine's clock: keep the machines in sync (NTP); the lease (seconds) dwarfs their skew.
A connection that broke (the server restarted) is opened again once before the error is raised.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from .queue import Queue

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    idempotency_key TEXT UNIQUE,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    shot INTEGER,
    progress INTEGER NOT NULL DEFAULT 0,
    eta_s DOUBLE PRECISION,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    claim TEXT,
    worker TEXT,
    lease_until DOUBLE PRECISION,
    output TEXT,
    report TEXT,
    wait_s DOUBLE PRECISION,
    denoise_s DOUBLE PRECISION,
    sampled INTEGER,
    webhook_url TEXT,
    webhook_state TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at DOUBLE PRECISION,
    webhook_error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs (webhook_state, webhook_next_at);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    model TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    beat_at DOUBLE PRECISION NOT NULL,
    job TEXT
);
"""
SCHEMA_LOCK = 7_105_633  # advisory lock key: processes starting together create the tables one at a time


class PostgresQueue(Queue):
    LOCK = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[list[dict[str, Any]], int]:
        sql = sql.replace("?", "%s")
        for attempt in (0, 1):
            try:
                with self.connection().cursor() as cur:
                    cur.execute(sql, params)
                    rows = list(cur.fetchall()) if cur.description else []
                    return rows, cur.rowcount
            except psycopg.OperationalError:
                self.forget_connection()
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def create_schema(self) -> None:
        with self.connection().transaction(), self.connection().cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            cur.execute(SCHEMA)
