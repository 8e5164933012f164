"""A worker process: loads the model once, then claims and renders jobs until it is stopped.

A heartbeat thread renews the lease of the job in hand (every quarter lease) and the worker's own row in the
workers table; when a renewal finds the job gone (cancelled, deleted, re-claimed) it marks the job lost, and
the pipeline's next progress call stops the run. The outcome of a job:

- rendered and still held: outputs in ``jobs/<id>/out-<claim>/``, then ``completed`` (fenced on the claim);
- lost: its outputs folder is removed, nothing else is written;
- a bad input the submission checks could not see (``InputError``): ``failed`` at once, with the message;
- any other error (out of memory, a driver error): queued again for another attempt, ``failed`` after the
  third, with the error;
- SIGTERM or Ctrl-C: the job is given back (queued, the attempt not counted) and the worker exits.

A worker started by ``segue serve`` exits as soon as that process is gone (it is checked at each heartbeat),
so a killed server leaves no worker behind; the leases of its jobs run out and the jobs run again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from .jobs import Job, JobFiles, new_claim
from .queue import Queue
from .render import JobLost, Progress, render

log = logging.getLogger("segue.serve")


class Worker:
    def __init__(self, queue: Queue, data: Path, pipe: Any, worker_id: str, lease_s: float = 30.0,
                 poll_s: float = 0.2, parent_pid: int | None = None) -> None:  # fmt: skip
        self.queue, self.data, self.pipe = queue, Path(data), pipe
        self.id, self.lease_s, self.poll_s, self.parent_pid = worker_id, lease_s, poll_s, parent_pid
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.model = getattr(getattr(pipe, "config", None), "name", "")
        # the job in hand, its claim, and the flag that stops it: one flag per job, so a heartbeat of the job
        # before (read just before it ended) can never stop the next one
        self.current: tuple[Job, str, threading.Event] | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    # -- the heartbeat -------------------------------------------------------------------------
    def beat(self) -> None:
        """Renew the lease of the job in hand and this worker's row; notice a lost job or a dead parent."""
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("worker %s: segue serve (pid %d) is gone; exiting", self.id, self.parent_pid)
            os._exit(1)  # the main thread may be deep in a step: leave now, the lease returns the job
        with self.lock:
            current = self.current
        if current is not None and not self.queue.heartbeat(current[0].id, current[1], self.lease_s):
            current[2].set()
        self.queue.worker_beat(self.id, self.host, self.pid, self.model, current[0].id if current else None)

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.lease_s / 4):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - a database hiccup: the next beat tries again
                log.warning("worker %s: heartbeat failed: %s", self.id, e)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, max_jobs: int | None = None) -> None:
        """Claim and render jobs until ``stop()`` (or ``max_jobs`` jobs); SIGTERM/Ctrl-C give the job back."""
        self.beat()
        beats = threading.Thread(target=self.heartbeat_loop, name="segue-heartbeat", daemon=True)
        beats.start()
        done, last_reap = 0, 0.0
        try:
            while not self.stopping.is_set() and (max_jobs is None or done < max_jobs):
                if time.monotonic() - last_reap > self.lease_s / 2:
                    self.queue.reap()
                    last_reap = time.monotonic()
                claim = new_claim()
                job = self.queue.claim(self.id, claim, self.lease_s)
                if job is None:
                    self.stopping.wait(self.poll_s)
                    continue
                self.process(job, claim)
                done += 1
        finally:
            self.stopping.set()
            with contextlib.suppress(Exception):  # leaving anyway; the row's heartbeat goes stale
                self.queue.worker_gone(self.id)

    def stop(self) -> None:
        self.stopping.set()

    def process(self, job: Job, claim: str) -> None:
        files = JobFiles(self.data, job.id)
        out = files.outputs(claim)
        lost = threading.Event()
        with self.lock:
            self.current = (job, claim, lost)
        log.info("worker %s: job %s (%s, attempt %d)", self.id, job.id, job.kind, job.attempts)

        def write(step: int, total: int, percent: int, eta: float | None, shot: int | None) -> bool:
            return self.queue.progress(job.id, claim, step, total, percent, eta, shot)

        progress = Progress(write, lost)
        files.remove_other_outputs(claim)  # earlier attempts' folders: theirs can never complete
        try:
            out.mkdir()
        except FileNotFoundError:  # deleted before it started
            self._forget()
            return
        try:
            report = render(self.pipe, job, files, out, self.data / "shot-cache", progress)
        except JobLost:
            log.info("worker %s: job %s is no longer this worker's; stopped", self.id, job.id)
            shutil.rmtree(out, ignore_errors=True)
        except InputError as e:
            shutil.rmtree(out, ignore_errors=True)
            self.queue.fail(job, claim, str(e), final=True)
        except KeyboardInterrupt:
            shutil.rmtree(out, ignore_errors=True)
            self.queue.release(job.id, claim)
            raise
        except Exception as e:  # noqa: BLE001 - any other failure: retried, up to the attempts allowed
            log.exception("worker %s: job %s failed", self.id, job.id)
            shutil.rmtree(out, ignore_errors=True)
            self.queue.fail(job, claim, f"{type(e).__name__}: {e}", final=False)
        else:
            if not self.queue.complete(job.id, claim, report, progress.sampling_s, progress.sampled):
                shutil.rmtree(out, ignore_errors=True)
            else:
                log.info("worker %s: job %s completed", self.id, job.id)
        finally:
            self._forget()

    def _forget(self) -> None:
        with self.lock:
            self.current = None
