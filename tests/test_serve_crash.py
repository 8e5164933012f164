"""Crashes, with real SIGKILLs: a worker killed mid-job (the job completes on its retry, the worker is replaced),
then the whole service killed with jobs queued and running and started again (every job completes once);
and a SIGTERM, which gives the running job back untouched."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from serve_support import Server, submit, wait_done, wait_for

ARGS = ("--workers", "1", "--threads", "1", "--lease", "10")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("serve-crash") / "data", *ARGS).start()
    s.wait_workers(1)
    yield s
    s.stop()


def outputs(data: Path, job_id: str) -> list[str]:
    return sorted(p.name for p in (data / "jobs" / job_id).glob("out-*"))


def recorded_output(data: Path, job_id: str) -> str:
    with sqlite3.connect(data / "queue.db") as db:
        return db.execute("SELECT output FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie is dead, only not yet reaped


def test_a_worker_killed_mid_job_is_replaced_and_the_job_completes_on_retry(server: Server) -> None:
    with server.client() as c:
        job = submit(c, seed=1, steps="200")  # long enough to be caught mid-run on any machine
        wait_for(lambda: c.get(f"/v1/videos/{job['id']}").json()["step"] >= 2, 60, "the job to run")
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        done = wait_done(c, job["id"], timeout=180)
        assert done["status"] == "completed" and done["attempts"] == 2 and done["error"] is None
        assert c.get(f"/v1/videos/{job['id']}/content").status_code == 200
        assert outputs(server.data, job["id"]) == [f"out-{recorded_output(server.data, job['id'])}"]  # one folder
        assert c.get("/health").json()["workers_alive"] == 1
        assert pid not in server.worker_pids()  # a new worker took its place
    assert "killed by SIGKILL" in server.output()


def test_the_whole_service_killed_then_restarted_completes_every_job_once(server: Server) -> None:
    data = server.data
    with server.client() as c:
        before = {j["id"] for j in c.get("/v1/videos", params={"limit": 100}).json()["data"]}
        jobs = [submit(c, seed=10 + i, steps="200" if i == 0 else "2")["id"] for i in range(4)]
        wait_for(lambda: c.get(f"/v1/videos/{jobs[0]}").json()["step"] >= 2, 60, "the first job to run")
        states = {j: c.get(f"/v1/videos/{j}").json()["status"] for j in jobs}
    assert states[jobs[0]] == "in_progress" and "queued" in states.values()
    killed = server.kill9()
    wait_for(lambda: not any(alive(pid) for pid in killed), 10, "the killed processes to end")

    again = Server(data, *ARGS).start()
    try:
        with again.client() as c:
            done = {j: wait_done(c, j, timeout=180) for j in jobs}
            assert all(d["status"] == "completed" and d["error"] is None for d in done.values())
            assert done[jobs[0]]["attempts"] == 2  # the running one ran again
            assert all(done[j]["attempts"] == 1 for j in jobs[1:])
            listed = [j["id"] for j in c.get("/v1/videos", params={"limit": 100}).json()["data"]]
            assert sorted(listed) == sorted(before | set(jobs))  # none lost, none duplicated
            for j in jobs:
                assert outputs(data, j) == [f"out-{recorded_output(data, j)}"]
            finished = {j: c.get(f"/v1/videos/{j}").json()["finished_at"] for j in jobs}
            assert finished == {j: d["finished_at"] for j, d in done.items()}  # each completed once

            # SIGTERM, by contrast, gives the running job back untouched and leaves no file behind
            last = submit(c, seed=20, steps="200")["id"]
            wait_for(lambda: c.get(f"/v1/videos/{last}").json()["step"] >= 2, 60, "the last job to run")
    finally:
        rc = again.stop()
    assert rc == 143 and "terminated (SIGTERM)" in again.output()
    with sqlite3.connect(data / "queue.db") as db:
        assert db.execute("SELECT status, attempts FROM jobs WHERE id = ?", (last,)).fetchone() == ("queued", 0)
        assert db.execute("SELECT count(*) FROM workers").fetchone() == (0,)
    assert outputs(data, last) == []
    assert not [p for p in data.rglob("*") if ".part" in p.name]
