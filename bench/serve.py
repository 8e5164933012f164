"""segue serve on the built-in model: throughput, latency for N clients, and the queue's overhead per job.

    python bench/serve.py                              # 1 worker; 1 and 4 clients (about 3 min on 2 idle cores)
    python bench/serve.py --workers 2 --clients 1,8 --jobs 40

1. bare: in this process, the model loaded once, ``pipe.generate`` on the same request (warm, ``--jobs``
   times): seconds per call; and the same call followed by what a worker writes (mp4, thumbnail, zip of
   PNG frames, report).
2. queue overhead: ``segue serve`` (a child process, ``--workers`` workers with the same torch threads)
   given ``--jobs`` jobs at once; a job's service time is the span from the first job's start to the last
   one's finish over the jobs (server timestamps), per worker. Overhead = service time - bare generate;
   its ratio to the bare call is stated (the target at 1 worker: under 5%).
3. clients: N threads each submitting a job and waiting for it (Server-Sent Events), ``--jobs`` jobs in all:
   jobs per minute over the wall time, and p50/p95 of the latency (submission to completion, server
   timestamps).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def keyframe(seed: int, w: int = 64, h: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w, yy / h, np.full((h, w), 0.4)], -1) * 255 + rng.integers(0, 25, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bare(jobs: int, threads: int, fields: dict[str, str]) -> tuple[float, float]:
    """(seconds per warm ``pipe.generate``, seconds per generate + the worker's output files)."""
    import torch

    import segue
    from segue.serve.render import write_outputs
    from segue.story.report import clip_report

    torch.set_num_threads(threads)
    pipe = segue.load()
    first, last = Image.open(io.BytesIO(keyframe(1))), Image.open(io.BytesIO(keyframe(2)))
    kw = {k: int(v) for k, v in fields.items() if k in ("frames", "steps")}
    pipe.generate(first, last, fields.get("prompt", ""), **kw)  # warm-up
    gen, full = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(jobs):
            t0 = time.perf_counter()
            video = pipe.generate(first, last, fields.get("prompt", ""), seed=i, **kw)
            t1 = time.perf_counter()
            out = Path(tmp) / f"j{i}"
            out.mkdir()
            write_outputs(video.frames, video.fps, clip_report(pipe, video, first, last), out)
            t2 = time.perf_counter()
            gen.append(t1 - t0)
            full.append(t2 - t0)
    return statistics.mean(gen), statistics.mean(full)


class Service:
    def __init__(self, workers: int, threads: int, data: Path) -> None:
        self.log = data.parent / "serve.log"
        cmd = [sys.executable, "-m", "segue", "serve", "--port", "0", "--data", str(data), "--workers", str(workers),
               "--threads", str(threads)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (m := re.search(r"segue serve: (http://\S+/)", self.log.read_text())):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"segue serve did not start:\n{self.log.read_text()}")
            time.sleep(0.2)
        self.url = m.group(1).rstrip("/")
        with httpx.Client(base_url=self.url) as c:
            while c.get("/health").json()["workers_alive"] < workers:
                time.sleep(0.5)

    def submit(self, c: httpx.Client, seed: int, fields: dict[str, str]) -> str:
        files = {"first": ("a.png", keyframe(1), "image/png"), "last": ("b.png", keyframe(2), "image/png")}
        r = c.post("/v1/videos", data={**fields, "seed": str(seed)}, files=files)
        r.raise_for_status()
        return r.json()["id"]

    def wait(self, c: httpx.Client, job_id: str) -> dict:
        with c.stream("GET", f"/v1/videos/{job_id}/events", timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    job = json.loads(line[6:])
        if job["status"] != "completed":
            raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
        return job

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def backlog(svc: Service, jobs: int, workers: int, fields: dict[str, str]) -> float:
    """Seconds of service per job per worker, ``jobs`` jobs submitted at once."""
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        ids = [svc.submit(c, 1000 + i, fields) for i in range(jobs)]
        done = [svc.wait(c, i) for i in ids]
    span = max(j["finished_at"] for j in done) - min(j["started_at"] for j in done)
    return span * workers / jobs


def clients(svc: Service, n: int, jobs: int, fields: dict[str, str]) -> tuple[float, float, float]:
    """(jobs per minute, p50 latency, p95 latency) for ``n`` clients submitting ``jobs`` jobs in all."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(jobs))

    def client() -> None:
        with httpx.Client(base_url=svc.url, timeout=60) as c:
            for i in counter:
                job = svc.wait(c, svc.submit(c, 2000 + i, fields))
                with lock:
                    latencies.append(job["finished_at"] - job["created_at"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return 60 * len(latencies) / wall, statistics.median(latencies), q[18]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clients", default="1,4", help="client counts, comma-separated")
    p.add_argument("--jobs", type=int, default=20, help="jobs per measurement")
    p.add_argument("--frames", default="17")
    p.add_argument("--steps", default="3")
    args = p.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.workers)  # what segue serve gives each worker
    fields = {"frames": args.frames, "steps": args.steps, "prompt": "a ball rolls to the right"}
    t_gen, t_full = bare(args.jobs, threads, fields)
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(args.workers, threads, Path(tmp) / "data")
        try:
            svc.wait(httpx.Client(base_url=svc.url, timeout=60), svc.submit(httpx.Client(base_url=svc.url), 0, fields))
            per_job = backlog(svc, args.jobs, args.workers, fields)
            rows = [(n, *clients(svc, n, args.jobs, fields)) for n in (int(x) for x in args.clients.split(","))]
        finally:
            svc.stop()
    print(f"segue serve, built-in model, {args.frames} frames x {args.steps} steps at 64x64, {args.workers} "
          f"worker(s) x {threads} torch thread(s), {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print()
    print("| measure | seconds per job |")
    print("|---|---|")
    print(f"| bare pipe.generate (this process) | {t_gen:.3f} |")
    print(f"| bare pipe.generate + output files | {t_full:.3f} |")
    print(f"| served, backlog, per job per worker | {per_job:.3f} |")
    over = per_job - t_gen
    print(f"| queue overhead per job (served - bare generate) | {over:.3f} ({100 * over / t_gen:+.1f}% of bare) |")
    print(f"| of which output files (bare + files - bare) | {t_full - t_gen:.3f} |")
    print()
    print("| clients | jobs/min | p50 latency (s) | p95 latency (s) |")
    print("|---|---|---|---|")
    for n, rate, p50, p95 in rows:
        print(f"| {n} | {rate:.1f} | {p50:.2f} | {p95:.2f} |")


if __name__ == "__main__":
    main()
