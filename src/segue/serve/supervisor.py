"""The supervisor: starts N worker processes, replaces any that dies, and returns the jobs it held.

Workers are fresh interpreters (``python -m segue worker ...``, never a fork of a process that imported torch),
each in its own session so a Ctrl-C at the terminal reaches only the server, which then stops them in order
(SIGTERM, then SIGKILL after ``grace`` seconds). When a worker process ends on its own, the jobs it held go
back to the queue at once (attempts counted) and a new worker takes its place; a worker that keeps dying at
start is restarted with a growing pause, and one that exits 2 (bad options: nothing will change) is not.

Every second the supervisor also requeues jobs whose lease ran out (``Queue.reap``) and the jobs of workers
recorded on this machine whose process is gone (a server killed with its workers, then restarted).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import new_claim
from .queue import Queue

log = logging.getLogger("segue.serve")
CONFIG_ERROR = 2  # a worker's exit code for options it cannot use


@dataclass
class Slot:
    index: int
    worker_id: str = ""
    proc: subprocess.Popen | None = None
    started: float = 0.0
    quick_deaths: int = 0  # deaths within a minute of starting, in a row
    next_start: float = 0.0
    given_up: bool = False
    log_tail: list[str] = field(default_factory=list)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: the signal test is all there is
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


class Supervisor(threading.Thread):
    """Keeps ``n`` workers running (``command(worker_id)`` is a worker's argv) and the queue's leases honest."""

    def __init__(self, queue: Queue, n: int, command: Callable[[str], list[str]], grace: float = 30.0,
                 tick: float = 0.5, env: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(name="segue-supervisor", daemon=True)
        self.queue, self.command, self.grace, self.tick = queue, command, grace, tick
        self.env = env
        self.slots = [Slot(i) for i in range(n)]
        self.host = socket.gethostname()
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def pids(self) -> list[int]:
        with self.lock:
            return [s.proc.pid for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def start_worker(self, slot: Slot) -> None:
        slot.worker_id = f"{self.host}:{os.getpid()}:{slot.index}:{new_claim()[:8]}"
        slot.proc = subprocess.Popen(self.command(slot.worker_id), start_new_session=True, env=self.env,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d, %s)", slot.index, slot.proc.pid, slot.worker_id)

    def run(self) -> None:
        last_sweep = 0.0
        while not self.stopping.is_set():
            try:
                with self.lock:
                    for slot in self.slots:
                        self.tend(slot)
                if time.monotonic() - last_sweep > 1.0:
                    self.sweep()
                    last_sweep = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the database may be away for a moment: keep supervising
                log.warning("supervisor: %s", e)
            self.stopping.wait(self.tick)

    def tend(self, slot: Slot) -> None:
        if slot.given_up or self.stopping.is_set():
            return
        if slot.proc is None:
            if time.monotonic() >= slot.next_start:
                self.start_worker(slot)
            return
        rc = slot.proc.poll()
        if rc is None:
            return
        how = describe_exit(rc)
        released = self.queue.release_worker(slot.worker_id, f"its worker process {how}")
        self.queue.worker_gone(slot.worker_id)
        log.warning("worker %d (pid %d) %s%s", slot.index, slot.proc.pid, how,
                    f"; requeued {', '.join(released)}" if released else "")  # fmt: skip
        slot.proc = None
        if rc == CONFIG_ERROR:
            slot.given_up = True
            log.error("worker %d could not start (its error is above); not restarting it", slot.index)
            return
        quick = time.monotonic() - slot.started < 60
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        slot.next_start = time.monotonic() + min(30.0, 0.5 * 2 ** max(0, slot.quick_deaths - 1))

    def sweep(self) -> None:
        """Requeue expired leases, and the jobs of this machine's recorded workers whose process is gone."""
        self.queue.reap()
        mine = {s.worker_id for s in self.slots}
        for w in self.queue.workers():
            if w["host"] == self.host and w["id"] not in mine and not pid_alive(int(w["pid"])):
                released = self.queue.release_worker(w["id"], "its worker process is gone")
                self.queue.worker_gone(w["id"])
                if released:
                    log.warning("requeued %s (worker %s is gone)", ", ".join(released), w["id"])

    def stop(self) -> None:
        """Stop supervising, then stop every worker: SIGTERM (each gives its job back), SIGKILL after ``grace``."""
        self.stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in self.slots:
            if s.worker_id:
                try:
                    self.queue.release_worker(s.worker_id, "the server stopped")
                    self.queue.worker_gone(s.worker_id)
                except Exception:  # noqa: BLE001 - stopping anyway; leases return what is left
                    pass


def worker_command(flags: list[str], options: list[str]) -> Callable[[str], list[str]]:
    """A worker's argv: ``python -m segue [flags] worker [options]``, with this process as its parent."""
    parent = os.getpid()

    def command(worker_id: str) -> list[str]:
        return [sys.executable, "-m", "segue", *flags, "worker", *options, "--worker-id", worker_id,
                "--parent-pid", str(parent)]  # fmt: skip

    return command
