"""What the daemon shows of itself: /health's body, /ready's reasons, /metrics' gauges.

`Status` is the narrow object the HTTP surface is handed (as uvicorn hands its protocols
a `ServerState`, not the server): it reads the parts that hold state (engine, poller,
worker pool, fleet, SQS) and never the daemon, so the surface cannot reach into the
daemon's life and the daemon does not depend on its surface.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from watcher import __version__
from watcher.core.logs import scrubber
from watcher.core.metrics import Metrics
from watcher.core.settings import Settings
from watcher.engines.base import Engine, EngineState
from watcher.engines.supervisor import WorkerState
from watcher.intake.fleet import FleetDiscovery, Role
from watcher.intake.sqs import SqsSource
from watcher.pipeline.budget import PageBudget
from watcher.pipeline.isolation import Isolation
from watcher.service.poller import Poller
from watcher.service.workers import WorkerPool

# Documents in progress listed on /health (the status page shows as many).
IN_PROGRESS_SHOWN = 20


@dataclass
class Status:
    settings: Settings
    engine: Engine
    metrics: Metrics
    poller: Poller
    budget: PageBudget
    pool: WorkerPool | None = None
    fleet: FleetDiscovery | None = None
    sqs: SqsSource | None = None
    isolation: Isolation | None = None
    decoding: Engine | None = None  # the decode workers (pipeline/decode_workers.py)
    claims_probe: str = "not probed yet"
    draining: bool = False
    started_at: float = field(default_factory=time.monotonic)
    # Since when the VLM server has been unreachable (monotonic); from the start until it
    # first answers.
    vlm_down_since: float | None = None

    @property
    def inflight(self) -> int:
        return self.pool.inflight if self.pool is not None else 0

    def liveness_problem(self) -> str | None:
        """Why this container should be restarted, or None: a VLM server that start.sh runs
        here (WATCHER_VLM_MANAGED) and that stayed down past WATCHER_VLM_UNREACHABLE_LIMIT,
        restarts included; a server elsewhere only makes the daemon not ready."""
        engine, settings = self.engine, self.settings
        if not (settings.vlm_managed and engine.uses_vlm_server):
            return None
        now = time.monotonic()
        if engine.state is EngineState.READY and engine.unavailable is None:
            self.vlm_down_since = None
            return None
        if self.vlm_down_since is None:
            self.vlm_down_since = self.started_at if engine.warm_seconds is None else now
        down = now - self.vlm_down_since
        if down <= settings.vlm_unreachable_limit:
            return None
        return (f"the VLM server this container runs has not served for {down:.0f} s "
                f"(WATCHER_VLM_UNREACHABLE_LIMIT={settings.vlm_unreachable_limit:g}); "
                "restarting the container starts it afresh")

    def health(self) -> dict[str, Any]:
        engine, settings, poller = self.engine, self.settings, self.poller
        problem = self.liveness_problem()
        body = {
            "status": "healthy" if problem is None else "unhealthy",
            **({"problem": problem} if problem is not None else {}),
            # Operators' existing probes read this key; it carries the engine state.
            "paddleocr": engine.state.value,
            "engine": {
                "name": engine.name,
                "model": engine.model,
                "state": engine.state.value,
                "error": engine.error,
                "warm_seconds": engine.warm_seconds,
                "unavailable": engine.unavailable,
                **engine.snapshot(),
            },
            "decoding": self._decoding(),
            "s3": {"bucket": settings.s3_bucket, "reachable": poller.s3_reachable,
                   "error": poller.s3_error},
            "claims": {
                "mode": settings.claim_mode.value,
                "shard_index": settings.shard_index,
                "shard_count": settings.shard_count,
                "probe": self.claims_probe,
            },
            "discovery": {
                **(self.fleet.snapshot() if self.fleet else {"role": None, "lister": None}),
                "polls": poller.polls,
                "last_poll": poller.last_poll,
                "list_requests_per_second_budget": settings.list_requests_per_second,
            },
            "notifications": {
                "webhook": settings.webhook_token is not None,
                "sqs": self.sqs.snapshot() if self.sqs is not None else None,
            },
            "inflight_documents": self.inflight,
            # Pages done of pages total per document being read (the longest-running first,
            # bounded): a long PDF shows it moves.
            "in_progress": self._in_progress(),
            # A suspect (crashes on record) running alone, nothing else claimed meanwhile.
            "isolated": self._isolated(),
            "inflight_pages": self.budget.in_use,
            "pages_wanted": engine.pages_wanted(),
            "backlog_documents": poller.backlog,
            "draining": self.draining,
            "uptime_seconds": round(time.monotonic() - self.started_at, 1),
            "pid": os.getpid(),
            "version": __version__,
        }
        scrubbed: dict[str, Any] = scrubber.scrub(body)
        return scrubbed

    def _in_progress(self) -> dict[str, Any]:
        progress = self.metrics.progress
        done, total = progress.pages()
        return {"documents": len(progress), "pages_done": done, "pages_total": total,
                "shown": progress.snapshot(IN_PROGRESS_SHOWN)}

    def _decoding(self) -> dict[str, Any] | None:
        if self.decoding is None:
            return None
        return {"state": self.decoding.state.value, "error": self.decoding.error, **self.decoding.snapshot()}

    def _isolated(self) -> dict[str, str] | None:
        suspect = self.isolation.suspect if self.isolation is not None else None
        return {"key": suspect.key, "etag": suspect.etag} if suspect is not None else None

    def problems(self) -> list[str]:
        """Why the daemon is not ready; empty when it is."""
        problems = []
        engine, poller = self.engine, self.poller
        if engine.state is not EngineState.READY:
            detail = f": {engine.error}" if engine.error else ""
            problems.append(f"engine {engine.name} is {engine.state.value}{detail}")
        elif engine.unavailable:
            problems.append(f"engine {engine.name} is unreachable: {engine.unavailable}")
        decoding = self.decoding
        if decoding is not None and decoding.state is EngineState.FAILED:
            problems.append(f"the decode workers failed: {decoding.error}")
        if poller.s3_reachable is None:
            problems.append("S3 has not been checked yet")
        elif not poller.s3_reachable:
            problems.append(f"S3 is unreachable: {poller.s3_error}")
        down = self.pool.down() if self.pool is not None else 0
        if down:
            problems.append(f"{down} document worker(s) down, restarting")
        if self.draining:
            problems.append("shutting down")
        scrubbed: list[str] = scrubber.scrub(problems)
        return scrubbed

    def refresh_gauges(self) -> None:
        m, engine = self.metrics, self.engine
        m.inflight.set(self.inflight)
        m.backlog.set(self.poller.backlog)
        m.engine_ready.set(1 if engine.state is EngineState.READY else 0)
        m.lister.set(1 if self.fleet is not None and self.fleet.role is Role.LISTER else 0)
        wanted = engine.pages_wanted()
        if wanted is not None:
            m.pages_wanted.set(wanted)
        limit = engine.request_limit()
        if limit is not None:
            m.vlm_request_limit.set(limit)
        m.ready.set(0 if self.problems() else 1)
        m.s3_reachable.set(1 if self.poller.s3_reachable else 0)
        m.list_budget.set(self.settings.list_requests_per_second)
        self._engine_gauges(engine.snapshot())
        if self.sqs is not None and self.sqs.reachable is not None:
            m.notification_source_up.labels("sqs").set(1 if self.sqs.reachable else 0)

    def _engine_gauges(self, snapshot: dict[str, Any]) -> None:
        m = self.metrics
        states = Counter(w["state"] for w in snapshot.get("workers", []))
        for worker_state in WorkerState:
            m.engine_workers.labels(worker_state.value).set(states[worker_state.value])
        vlm = snapshot.get("vlm_requests")
        if vlm is not None:
            m.vlm_inflight.set(vlm["inflight"])
            for state in ("running", "waiting"):
                seen = vlm.get(f"server_{state}")
                if seen is not None:
                    m.vlm_server_requests.labels(state).set(seen)

    def metrics_text(self) -> bytes:
        self.refresh_gauges()
        return self.metrics.render()
