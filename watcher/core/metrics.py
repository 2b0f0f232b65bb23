"""Prometheus metrics, one registry per daemon (tests run several in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from watcher.core.progress import Progress

STAGES = ("claim", "fetch", "decode", "engine", "render", "publish", "settle", "document")
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.documents = Counter(
            "watcher_documents", "Documents finished, by outcome.", ["outcome"], registry=r
        )
        self.pages = Counter("watcher_pages", "Pages recognised.", registry=r)
        self.stage_seconds = Histogram(
            "watcher_stage_seconds", "Time spent per stage.", ["stage"], buckets=_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("watcher_inflight_documents", "Documents being processed.", registry=r)
        self.backlog = Gauge(
            "watcher_backlog_documents", "Documents discovered and waiting for a worker.", registry=r
        )
        self.engine_ready = Gauge("watcher_engine_ready", "1 when the engine is warm.", registry=r)
        self.s3_errors = Counter(
            "watcher_s3_unavailable", "S3 operations that failed after retries.", registry=r
        )
        self.polls = Counter("watcher_discovery_polls", "Discovery listings completed.", registry=r)
        self.poll_seconds = Histogram(
            "watcher_discovery_poll_seconds",
            "Time one discovery poll took (a listing, or a follower's manifest read).",
            buckets=_BUCKETS, registry=r,
        )
        self.s3_requests = Counter(
            "watcher_s3_requests", "S3 requests sent, by operation (retries included).", ["op"],
            registry=r,
        )
        self.lister = Gauge(
            "watcher_discovery_lister", "1 while this replica lists the bucket for the fleet.", registry=r
        )
        self.vlm_request_limit = Gauge(
            "watcher_vlm_request_limit",
            "Requests the daemon lets be in flight to the VLM server now (adaptive).", registry=r,
        )
        self.pages_wanted = Gauge(
            "watcher_pages_wanted", "Rendered pages the engine wants in flight now.", registry=r
        )
        self.worker_restarts = Counter(
            "watcher_worker_restarts", "Document worker loops that ended and were restarted.",
            registry=r,
        )
        self.engine_restarts = Counter(
            "watcher_engine_restarts", "Engine worker processes replaced, by reason.", ["reason"],
            registry=r,
        )
        self.ready = Gauge(
            "watcher_ready", "1 when /ready answers 200 (engine warm, S3 reachable, not draining).",
            registry=r,
        )
        self.s3_reachable = Gauge(
            "watcher_s3_reachable", "1 while the last S3 request of discovery succeeded.", registry=r
        )
        self.pickup_seconds = Histogram(
            "watcher_pickup_seconds",
            "From a source's Last-Modified to its first lease (clock skew clamped at 0).",
            buckets=(*_BUCKETS, 1800, 3600, 7200), registry=r,
        )
        self.engine_workers = Gauge(
            "watcher_engine_workers", "Engine worker processes, by state.", ["state"], registry=r
        )
        self.vlm_inflight = Gauge(
            "watcher_vlm_requests_inflight", "Requests of this daemon in flight to the VLM server now.",
            registry=r,
        )
        self.vlm_server_requests = Gauge(
            "watcher_vlm_server_requests",
            "The VLM server's own gauges, last read: requests running and waiting (all clients).",
            ["state"], registry=r,
        )
        self.list_budget = Gauge(
            "watcher_list_requests_per_second_budget",
            "WATCHER_LIST_REQUESTS_PER_SECOND: the LIST rate discovery keeps under.", registry=r,
        )
        self.callbacks = Counter(
            "watcher_callbacks", "Result callbacks, by how they ended (sent, failed, dropped).",
            ["result"], registry=r,
        )
        self.notifications = Counter(
            "watcher_notifications",
            "S3 event notifications taken in, by source (webhook, sqs) and result.",
            ["source", "result"], registry=r,
        )
        self.notification_source_up = Gauge(
            "watcher_notification_source_up",
            "1 while a notification source (sqs) answers, 0 after it failed.", ["source"], registry=r,
        )
        self.pages_in_progress = Gauge(
            "watcher_document_pages",
            "Pages of the documents being read now: `total` known so far and `done`.", ["state"],
            registry=r,
        )
        self.documents_in_progress = Gauge(
            "watcher_documents_in_progress", "Documents claimed and being read now.", registry=r
        )
        # Read at scrape time from the documents being read (core/progress.py).
        self.progress = Progress()
        self.pages_in_progress.labels("done").set_function(lambda: self.progress.pages()[0])
        self.pages_in_progress.labels("total").set_function(lambda: self.progress.pages()[1])
        self.documents_in_progress.set_function(lambda: len(self.progress))
        for source, result in (("webhook", "accepted"), ("sqs", "received")):
            self.notifications.labels(source, result)
        for reason in ("timeout", "crash", "memory"):
            self.engine_restarts.labels(reason)
        for outcome in ("done", "error", "skipped", "held", "retry", "refused"):
            self.documents.labels(outcome)
        for op in ("list", "head", "get", "put", "delete", "copy"):
            self.s3_requests.labels(op)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for result in ("sent", "failed", "dropped"):
            self.callbacks.labels(result)
        for state in ("running", "waiting"):
            self.vlm_server_requests.labels(state)

    def timer(self) -> StageTimer:
        """A stopwatch for one document's run."""
        return StageTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StageTimer:
    """One document's time per stage: each stage timed once, observed into
    watcher_stage_seconds and summed here for the result's `timings`. Pages of one
    document overlap, so a stage's sum can exceed the document's wall time."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if self.metrics is not None and name in STAGES:
                self.metrics.stage_seconds.labels(name).observe(elapsed)
