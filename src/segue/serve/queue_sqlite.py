"""The embedded queue: SQLite in the data folder, in WAL mode (readers never wait for the writer).

For one machine: the API process and its workers open the same file. Every commit is synced to disk
(``synchronous=FULL``), so a job the API answered 201 for survives a crash of the machine, not only of the
processes. Concurrent writers wait for each other (``busy_timeout``) instead of failing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ..errors import InputError
from .queue import Queue

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    idempotency_key TEXT UNIQUE,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    shot INTEGER,
    progress INTEGER NOT NULL DEFAULT 0,
    eta_s REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    claim TEXT,
    worker TEXT,
    lease_until REAL,
    output TEXT,
    report TEXT,
    wait_s REAL,
    denoise_s REAL,
    sampled INTEGER,
    webhook_url TEXT,
    webhook_state TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at REAL,
    webhook_error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs (webhook_state, webhook_next_at);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    model TEXT NOT NULL,
    started_at REAL NOT NULL,
    beat_at REAL NOT NULL,
    job TEXT
);
"""


class SqliteQueue(Queue):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        if not self.path.parent.is_dir():
            raise InputError(f"queue database {self.path}: folder {self.path.parent} does not exist")

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[list[dict[str, Any]], int]:
        cur = self.connection().execute(sql, params)
        rows = [dict(r) for r in cur.fetchall()] if cur.description else []
        return rows, cur.rowcount

    def create_schema(self) -> None:
        self.connection().executescript(SCHEMA)
