"""GET /metrics: Prometheus text exposition (prometheus_client), read from the queue at each scrape.

Every number comes from the database, so any API process of a many-machine deployment answers for all of
them: jobs by status; completed jobs' sampling seconds and steps (their ratio is the seconds per step);
queue waits (submission to first claim) and job latencies (submission to completion); workers alive.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from .queue import Queue


class QueueCollector:
    """A prometheus_client collector whose samples are read from the queue when scraped."""

    def __init__(self, queue: Queue, lease_s: float) -> None:
        self.queue, self.lease_s = queue, lease_s

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        jobs = GaugeMetricFamily("segue_jobs", "Jobs in the queue by status.", labels=["status"])
        for status, n in self.queue.counts().items():
            jobs.add_metric([status], n)
        yield jobs
        s = self.queue.stats()
        yield SummaryMetricFamily(
            "segue_step_seconds", "Sampling seconds per step of completed jobs (sum over jobs, count of steps).",
            count_value=s["steps"], sum_value=s["denoise_s"],
        )  # fmt: skip
        yield SummaryMetricFamily(
            "segue_queue_wait_seconds", "Seconds from submission to a worker's first claim.",
            count_value=s["waits"], sum_value=s["wait_s"],
        )  # fmt: skip
        yield SummaryMetricFamily(
            "segue_job_seconds", "Seconds from submission to completion of completed jobs.",
            count_value=s["done"], sum_value=s["latency_s"],
        )  # fmt: skip
        done = CounterMetricFamily("segue_jobs_completed", "Jobs completed (still in the queue's table).")
        done.add_metric([], s["done"])
        yield done
        now = time.time()
        alive = sum(1 for w in self.queue.workers() if w["beat_at"] > now - self.lease_s)
        yield GaugeMetricFamily("segue_workers_alive", "Workers whose heartbeat is within the lease.", value=alive)


def render_metrics(queue: Queue, lease_s: float) -> tuple[bytes, str]:
    """(body, content type) of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(queue, lease_s))
    return generate_latest(registry), CONTENT_TYPE_LATEST
