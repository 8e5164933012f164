"""The PostgreSQL queue with the service around it: an API process and two worker processes (two "machines"
running ``segue worker``) share one queue and one data folder; one machine is killed mid-job with SIGKILL and
the other finishes its job once the lease runs out. Needs SEGUE_TEST_PG_URL (.ci/run starts a server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from serve_support import Server, pg_schema_url, pg_url_or_skip, submit, wait_done, wait_for

LEASE = "4"


def machine(url: str, data: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "segue", "worker", "--db", url, "--data", str(data), "--workers", "1",
           "--threads", "1", "--lease", LEASE]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_worker_machines_share_a_postgresql_queue(tmp_path: Path) -> None:
    url = pg_schema_url(pg_url_or_skip())
    data = tmp_path / "data"
    api = Server(data, "--db", url, "--workers", "0", "--lease", LEASE).start()
    machines = [machine(url, data, tmp_path / f"machine-{i}.log") for i in range(2)]
    try:
        api.wait_workers(2)
        with api.client() as c:
            long = submit(c, seed=1, steps="40")["id"]
            short = [submit(c, seed=2 + i)["id"] for i in range(5)]
            wait_for(lambda: c.get(f"/v1/videos/{long}").json()["step"] >= 2, 60, "the long job to run")
            with psycopg.connect(url) as db:
                (pid,) = db.execute("SELECT w.pid FROM jobs j JOIN workers w ON w.id = j.worker WHERE j.id = %s",
                                    (long,)).fetchone()  # fmt: skip
            victim = next(m for m in machines if _parent(pid) == m.pid)
            os.kill(victim.pid, signal.SIGKILL)  # the machine's supervisor and its worker die together
            os.kill(pid, signal.SIGKILL)
            victim.wait()
            done = {j: wait_done(c, j, timeout=180) for j in [long, *short]}
            assert all(d["status"] == "completed" and d["error"] is None for d in done.values())
            assert done[long]["attempts"] == 2 and all(done[j]["attempts"] == 1 for j in short)
            assert len(c.get("/v1/videos", params={"limit": 100}).json()["data"]) == 6
            for j in done:
                assert len(list((data / "jobs" / j).glob("out-*"))) == 1
                assert c.get(f"/v1/videos/{j}/content").status_code == 200
        with psycopg.connect(url) as db:
            workers = {r[0] for r in db.execute("SELECT DISTINCT worker FROM jobs")}
        assert len(workers) >= 1
    finally:
        for m in machines:
            if m.poll() is None:
                m.send_signal(signal.SIGTERM)
                m.wait(timeout=60)
        api.stop()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
