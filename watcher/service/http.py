"""The operator's HTTP surface on WATCHER_HTTP_PORT: /health, /ready, /metrics.

It starts before anything else and only reads in-memory state, so it answers within
milliseconds while the engine warms or pages are being recognised.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from watcher import __version__
from watcher.engines.base import EngineState
from watcher.intake.events import BadEvent, EventIntake

if TYPE_CHECKING:
    from watcher.service.daemon import Daemon


def health_body(daemon: Daemon) -> dict[str, Any]:
    engine = daemon.engine
    return {
        "status": "healthy",
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
        "s3": {
            "bucket": daemon.settings.s3_bucket,
            "reachable": daemon.s3_reachable,
            "error": daemon.s3_error,
        },
        "claims": {
            "mode": daemon.settings.claim_mode.value,
            "shard_index": daemon.settings.shard_index,
            "shard_count": daemon.settings.shard_count,
            "probe": daemon.claims_probe,
        },
        "discovery": {
            **(daemon.fleet.snapshot() if daemon.fleet else {"role": None, "lister": None}),
            "polls": daemon.polls,
            "last_poll": daemon.last_poll,
            "list_requests_per_second_budget": daemon.settings.list_requests_per_second,
        },
        "notifications": {
            "webhook": daemon.settings.webhook_token is not None,
            "sqs": daemon.sqs.snapshot() if daemon.sqs is not None else None,
        },
        "inflight_documents": daemon.inflight,
        "inflight_pages": daemon.pages.in_use,
        "pages_wanted": engine.pages_wanted(),
        "backlog_documents": daemon.backlog,
        "draining": daemon.draining,
        "uptime_seconds": round(time.monotonic() - daemon.started_at, 1),
        "pid": os.getpid(),
        "version": __version__,
    }


def readiness_problems(daemon: Daemon) -> list[str]:
    problems = []
    engine = daemon.engine
    if engine.state is not EngineState.READY:
        detail = f": {engine.error}" if engine.error else ""
        problems.append(f"engine {engine.name} is {engine.state.value}{detail}")
    elif engine.unavailable:
        problems.append(f"engine {engine.name} is unreachable: {engine.unavailable}")
    if daemon.s3_reachable is None:
        problems.append("S3 has not been checked yet")
    elif not daemon.s3_reachable:
        problems.append(f"S3 is unreachable: {daemon.s3_error}")
    if daemon.workers_down():
        problems.append(f"{daemon.workers_down()} document worker(s) down, restarting")
    if daemon.draining:
        problems.append("shutting down")
    return problems


async def serve_app(
    app: web.Application, host: str, port: int, reuse_address: bool | None = None
) -> tuple[web.AppRunner, int]:
    """Start `app` on host:port; returns its runner and the bound port (port 0 = any free)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=reuse_address)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, (sockets[0].getsockname()[1] if sockets else port)


class HealthServer:
    def __init__(self, daemon: Daemon, host: str, port: int, events: EventIntake | None = None) -> None:
        self.daemon = daemon
        self.host = host
        self.port = port
        self.events = events
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        if self.events is not None and self.daemon.settings.webhook_token is not None:
            app.router.add_post("/events", self.post_events)
        return app

    async def post_events(self, request: web.Request) -> web.Response:
        settings = self.daemon.settings
        assert self.events is not None and settings.webhook_token is not None
        token = settings.webhook_token.get_secret_value()
        if not self.events.authorised(request.headers.get("Authorization"), token):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        limit = settings.webhook_max_bytes
        if (request.content_length or 0) > limit:
            return web.json_response({"error": f"body over {limit} bytes"}, status=413)
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            return web.json_response({"error": f"body over {limit} bytes"}, status=413)
        try:
            intake = self.events.take(body)
        except BadEvent as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"accepted": intake.accepted, "ignored": intake.ignored})

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response(self.daemon.scrub(health_body(self.daemon)))

    async def ready(self, _request: web.Request) -> web.Response:
        problems = readiness_problems(self.daemon)
        if problems:
            body = {"status": "not_ready", "reasons": problems}
            return web.json_response(self.daemon.scrub(body), status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, _request: web.Request) -> web.Response:
        self.daemon.refresh_gauges()
        return web.Response(
            body=self.daemon.metrics.render(),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def start(self) -> None:
        self._runner, self.port = await serve_app(self.app(), self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
