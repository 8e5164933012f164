"""segue serve on the built-in model: throughput, latency for N clients, and the queue's overhead per job.

    python bench/serve.py                              # 1 worker; 1 and 4 clients (a few minutes on 2 cores)
    python bench/serve.py --workers 2 --clients 1,8 --jobs 40

1. bare and served, in rounds: this process (the model loaded once, the same torch threads as a worker) makes
   one warm ``pipe.generate`` call and writes what a worker writes after it (mp4, thumbnail, zip of PNG
   frames, report), then ``segue serve`` (a child process) runs the same request as a job. A job's service
   time is its claim to its completion (server timestamps: the worker's whole cost per job in a backlog).
   Overhead = service time - bare call, its ratio to the bare call stated (the target at 1 worker: < 5%).
2. clients: N threads each submitting a job and waiting for it (Server-Sent Events), ``--jobs`` jobs in all:
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


class Bare:
    """The model loaded in this process: one ``pipe.generate`` call as a worker makes it, and the files a worker
    writes after it (mp4, thumbnail, zip of PNG frames, report)."""

    def __init__(self, threads: int, fields: dict[str, str]) -> None:
        import torch

        import segue

        torch.set_num_threads(threads)
        self.pipe = segue.load()
        self.first, self.last = Image.open(io.BytesIO(keyframe(1))), Image.open(io.BytesIO(keyframe(2)))
        self.kw = {k: int(v) for k, v in fields.items() if k in ("frames", "steps")}
        self.prompt = fields.get("prompt", "")
        self.tmp = tempfile.TemporaryDirectory()
        self.run(0)  # warm-up

    def run(self, seed: int) -> tuple[float, float]:
        """(seconds of the generate call, seconds of writing what a worker writes)."""
        from segue.serve.render import write_outputs
        from segue.story.report import clip_report

        t0 = time.perf_counter()
        video = self.pipe.generate(self.first, self.last, self.prompt, seed=seed, **self.kw)
        t1 = time.perf_counter()
        out = Path(self.tmp.name) / f"j{seed}"
        out.mkdir()
        write_outputs(video.frames, video.fps, clip_report(self.pipe, video, self.first, self.last), out)
        return t1 - t0, time.perf_counter() - t1


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


def interleaved(svc: Service, bare: Bare, jobs: int, fields: dict[str, str]) -> dict[str, float]:
    """Rounds of one bare call then one served job (so a change of the machine's load hits both alike): mean
    seconds of the bare call, of its output files, and of the served job from its claim to its completion."""
    gen, files, served = [], [], []
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        for i in range(jobs):
            g, f = bare.run(1000 + i)
            job = svc.wait(c, svc.submit(c, 1000 + i, fields))
            gen.append(g)
            files.append(f)
            served.append(job["finished_at"] - job["started_at"])
    return {"gen": statistics.mean(gen), "files": statistics.mean(files), "served": statistics.mean(served)}


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
    p.add_argument("--jobs", type=int, default=12, help="jobs per measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker and for the bare run (default: cores / workers)")  # fmt: skip
    p.add_argument("--frames", default="17")
    p.add_argument("--steps", default="3")
    args = p.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)  # what segue serve gives each worker
    fields = {"frames": args.frames, "steps": args.steps, "prompt": "a ball rolls to the right"}
    bare = Bare(threads, fields)
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(args.workers, threads, Path(tmp) / "data")
        try:
            svc.wait(httpx.Client(base_url=svc.url, timeout=60), svc.submit(httpx.Client(base_url=svc.url), 0, fields))
            t = interleaved(svc, bare, args.jobs, fields)
            rows = [(n, *clients(svc, n, args.jobs, fields)) for n in (int(x) for x in args.clients.split(","))]
        finally:
            svc.stop()
    print(f"segue serve, built-in model, {args.frames} frames x {args.steps} steps at 64x64, {args.workers} "
          f"worker(s) x {threads} torch thread(s), {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print()
    print("| measure | seconds per job |")
    print("|---|---|")
    over = t["served"] - t["gen"]
    print(f"| bare pipe.generate (this process) | {t['gen']:.3f} |")
    print(f"| served job, claim to completion (a worker) | {t['served']:.3f} |")
    print(f"| queue overhead per job (served - bare) | {over:.3f} ({100 * over / t['gen']:+.1f}% of bare) |")
    print(f"| of which the output files (mp4, thumbnail, zip, report; timed on the bare run) | {t['files']:.3f} |")
    print()
    print("| clients | jobs/min | p50 latency (s) | p95 latency (s) |")
    print("|---|---|---|---|")
    for n, rate, p50, p95 in rows:
        print(f"| {n} | {rate:.1f} | {p50:.2f} | {p95:.2f} |")


if __name__ == "__main__":
    main()
