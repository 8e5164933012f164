"""The job queue on real databases: SQLite in a folder and PostgreSQL (SEGUE_TEST_PG_URL, each test in its own
schema). Claims are exclusive under concurrency, every write of a worker is fenced on its claim, leases expire
into retries and then failure, and webhooks wait their backoff."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from segue.errors import InputError
from segue.serve.command import open_queue
from segue.serve.jobs import MAX_ATTEMPTS, Job, new_claim, new_id
from segue.serve.queue import Queue
from serve_support import pg_schema_url, pg_url_or_skip


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Queue:
    if request.param == "sqlite":
        q = open_queue(None, tmp_path)
    else:
        q = open_queue(pg_schema_url(pg_url_or_skip()), tmp_path)
    q.create_schema()
    return q


def new_job(key: str | None = None, webhook: str | None = None) -> Job:
    return Job(id=new_id(), seq=0, kind="clip", status="queued", spec={"settings": {"seed": 1}}, created_at=time.time(),
               idempotency_key=key, steps=4, webhook_url=webhook)  # fmt: skip


def test_claims_are_exclusive_under_concurrency(queue: Queue) -> None:
    ids = {queue.submit(new_job())[0].id for _ in range(24)}
    got: list[str] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        while True:
            job = queue.claim(f"w{n}", new_claim(), 30)
            if job is None:
                return
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(got) == Counter(ids)  # every job claimed, none twice
    assert queue.counts()["in_progress"] == 24


def test_claims_are_oldest_first_and_a_stale_claim_writes_nothing(queue: Queue) -> None:
    first, second = queue.submit(new_job())[0], queue.submit(new_job())[0]
    a = new_claim()
    job = queue.claim("w", a, 30)
    assert job is not None and job.id == first.id and job.attempts == 1 and job.status == "in_progress"
    assert queue.progress(job.id, a, 1, 4, 25, 3.0, None)
    assert not queue.progress(job.id, new_claim(), 2, 4, 50, 2.0, None)  # another token
    assert queue.cancel(job.id).status == "cancelled"
    assert not queue.progress(job.id, a, 2, 4, 50, 2.0, None)  # the worker learns at its next write
    assert not queue.complete(job.id, a, {"frames": 5}, 1.0, 2)
    assert queue.get(job.id).status == "cancelled" and queue.get(job.id).report is None
    assert queue.get(second.id).status == "queued"


def test_expired_leases_retry_then_fail_with_the_reason(queue: Queue) -> None:
    job = queue.submit(new_job())[0]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claim = new_claim()
        held = queue.claim("w", claim, lease_s=0.05)
        assert held is not None and held.attempts == attempt
        time.sleep(0.1)
        assert queue.reap() == [job.id]
        assert not queue.complete(job.id, claim, {}, 1.0, 1)  # a worker whose lease ran out cannot complete
    end = queue.get(job.id)
    assert end.status == "failed" and end.attempts == MAX_ATTEMPTS
    assert "lease" in end.error and "giving up" in end.error
    assert queue.claim("w", new_claim(), 30) is None


def test_a_dead_workers_jobs_return_and_a_release_does_not_count(queue: Queue) -> None:
    job = queue.submit(new_job())[0]
    claim = new_claim()
    queue.claim("w1", claim, 30)
    assert queue.release_worker("w1", "its worker process killed by SIGKILL") == [job.id]
    back = queue.get(job.id)
    assert back.status == "queued" and back.attempts == 1 and "SIGKILL" in back.error
    claim = new_claim()
    assert queue.claim("w2", claim, 30).attempts == 2
    assert queue.release(job.id, claim)  # a worker stopping gives it back untouched
    assert queue.get(job.id).attempts == 1
    claim = new_claim()
    queue.claim("w3", claim, 30)
    assert queue.complete(job.id, claim, {"frames": 5}, 0.5, 2)
    done = queue.get(job.id)
    assert done.status == "completed" and done.output == claim and done.report == {"frames": 5} and done.error is None
    assert not queue.complete(job.id, claim, {"frames": 5}, 0.5, 2)  # completes once


def test_errors_retry_unless_final(queue: Queue) -> None:
    job = queue.submit(new_job())[0]
    claim = new_claim()
    held = queue.claim("w", claim, 30)
    assert queue.fail(held, claim, "RuntimeError: CUDA error", final=False)
    assert queue.get(job.id).status == "queued"
    claim = new_claim()
    held = queue.claim("w", claim, 30)
    assert queue.fail(held, claim, "first frame: bad", final=True)
    end = queue.get(job.id)
    assert end.status == "failed" and end.error == "first frame: bad" and end.finished_at is not None


def test_idempotency_keys_give_one_job_even_in_a_race(queue: Queue) -> None:
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def send() -> None:
        job, created = queue.submit(new_job(key="order-17"))
        with lock:
            results.append((job.id, created))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({i for i, _ in results}) == 1 and sum(c for _, c in results) == 1
    assert queue.counts()["queued"] == 1


def test_listing_pages_newest_first(queue: Queue) -> None:
    ids = [queue.submit(new_job())[0].id for _ in range(5)]
    page, more = queue.list(limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and more
    page2, more2 = queue.list(limit=2, after=page[-1].id)
    page3, more3 = queue.list(limit=2, after=page2[-1].id)
    assert [j.id for j in page2 + page3] == ids[::-1][2:] and more2 and not more3
    queue.cancel(ids[0])
    assert [j.id for j in queue.list(status="cancelled")[0]] == [ids[0]]
    assert queue.delete(ids[1]).id == ids[1] and queue.get(ids[1]) is None
    with pytest.raises(InputError, match="after: no job"):
        queue.list(after=ids[1])


def test_webhooks_are_due_when_a_job_ends_and_wait_their_backoff(queue: Queue) -> None:
    job = queue.submit(new_job(webhook="http://127.0.0.1:9/hook"))[0]
    assert queue.due_webhook(10) is None  # not ended yet
    queue.cancel(job.id)
    due = queue.due_webhook(10)
    assert due is not None and due.id == job.id and due.webhook_attempts == 1
    assert queue.due_webhook(10) is None  # held against other deliverers
    queue.webhook_done(job.id, "pending", time.time() + 0.3, "answered 500")
    assert queue.due_webhook(10) is None
    time.sleep(0.35)
    again = queue.due_webhook(10)
    assert again is not None and again.webhook_attempts == 2
    queue.webhook_done(job.id, "delivered", None, None)
    assert queue.get(job.id).webhook_state == "delivered"


def test_workers_table_and_metrics_sums(queue: Queue) -> None:
    queue.worker_beat("w1", "host", 123, "segue-default", None)
    queue.worker_beat("w1", "host", 123, "segue-default", "video_x")
    assert [(w["id"], w["job"]) for w in queue.workers()] == [("w1", "video_x")]
    queue.worker_gone("w1")
    assert queue.workers() == []
    job = queue.submit(new_job())[0]
    claim = new_claim()
    queue.claim("w", claim, 30)
    queue.complete(job.id, claim, {}, 1.5, 3)
    s = queue.stats()
    assert s["done"] == 1 and s["steps"] == 3 and s["denoise_s"] == pytest.approx(1.5) and s["waits"] == 1


def test_a_heartbeat_of_the_job_before_never_stops_the_next_one(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from segue.serve.worker import Worker

    lost_x, lost_y = threading.Event(), threading.Event()
    y = (SimpleNamespace(id="y"), "claim-y", lost_y)

    class Renewals:
        def heartbeat(self, job_id: str, claim: str, lease_s: float) -> bool:
            worker.current = y  # while the renewal of x is on its way, x completes and the worker takes y
            return job_id != "x"  # x is completed: its lease is not renewed

        def worker_beat(self, *args: object) -> None:
            pass

    worker = Worker(Renewals(), tmp_path, None, "w")  # type: ignore[arg-type]
    worker.current = (SimpleNamespace(id="x"), "claim-x", lost_x)  # type: ignore[assignment]
    worker.beat()
    assert lost_x.is_set() and not lost_y.is_set()  # only x is marked lost; y runs on
