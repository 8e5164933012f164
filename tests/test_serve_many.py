"""Fifty jobs from eight concurrent clients, two workers on the built-in model: every job completes, once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_support import Server, png, wait_done

JOBS, CLIENTS = 50, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("serve-many") / "data", "--workers", "2", "--threads", "1").start()
    s.wait_workers(2)
    yield s
    assert s.stop() in (0, 143)


def test_fifty_jobs_from_eight_clients_all_complete_once(server: Server) -> None:
    def client(n: int) -> list[str]:
        ids = []
        with server.client() as c:
            for i in range(n, JOBS, CLIENTS):
                r = c.post("/v1/videos", data={"frames": "5", "steps": "1", "size": "16x16", "seed": str(i)},
                           files={"first": ("a.png", png(i), "image/png")},
                           headers={"Idempotency-Key": f"client-{n}-job-{i}"})  # fmt: skip
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            return [wait_done(c, job_id, timeout=300)["id"] for job_id in ids]

    with ThreadPoolExecutor(CLIENTS) as pool:
        done = [i for ids in pool.map(client, range(CLIENTS)) for i in ids]
    assert len(done) == JOBS and len(set(done)) == JOBS
    with server.client() as c:
        jobs = c.get("/v1/videos", params={"limit": 100}).json()["data"]
        assert sorted(j["id"] for j in jobs) == sorted(done)  # none lost, none duplicated
        assert all(j["status"] == "completed" and j["attempts"] == 1 for j in jobs)
        assert {j["settings"]["seed"] for j in jobs} == set(range(JOBS))
        assert all(len(list((server.data / "jobs" / j["id"]).glob("out-*"))) == 1 for j in jobs)
        metrics = c.get("/metrics").text
        assert f'segue_jobs{{status="completed"}} {JOBS}.0' in metrics
        assert f"segue_step_seconds_count {JOBS}.0" in metrics
