"""The operator's HTTP surface on WATCHER_HTTP_PORT: /health, /ready, /metrics.

It starts before anything else and only reads a `Status` (service/status.py), an
in-memory snapshot, so it answers within milliseconds while the engine warms or pages
are being recognised; `POST /events` hands notifications to the event intake.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from watcher.intake.events import BadEvent, EventIntake
from watcher.service.status import Status


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


@dataclass(frozen=True)
class Webhook:
    """`POST /events`: where notifications go, the token they must carry, the size limit."""

    intake: EventIntake
    token: str
    max_bytes: int


class HealthServer:
    def __init__(self, status: Status, host: str, port: int, webhook: Webhook | None = None) -> None:
        self.status = status
        self.host = host
        self.port = port
        self.webhook = webhook
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        # The whole body of a POST is read (chunked ones too) up to this size; past it
        # aiohttp answers 413 itself.
        app = web.Application(client_max_size=self.webhook.max_bytes if self.webhook else 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        if self.webhook is not None:
            app.router.add_post("/events", self.post_events)
        return app

    async def post_events(self, request: web.Request) -> web.Response:
        hook = self.webhook
        assert hook is not None
        counted = self.status.metrics.notifications
        if not hook.intake.authorised(request.headers.get("Authorization"), hook.token):
            counted.labels("webhook", "unauthorised").inc()
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        too_large = web.json_response({"error": f"body over {hook.max_bytes} bytes"}, status=413)
        if (request.content_length or 0) > hook.max_bytes:
            return too_large
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large
        try:
            intake = hook.intake.take(body)
        except BadEvent as exc:
            counted.labels("webhook", "bad").inc()
            return web.json_response({"error": str(exc)}, status=400)
        for result, count in (("accepted", intake.accepted), ("ignored", intake.ignored),
                              ("refused", len(intake.refused))):
            counted.labels("webhook", result).inc(count)
        answer: dict[str, object] = {"accepted": intake.accepted, "ignored": intake.ignored}
        if intake.refused:
            answer["refused"] = intake.refused
        return web.json_response(answer)

    async def health(self, _request: web.Request) -> web.Response:
        body = self.status.health()
        return web.json_response(body, status=200 if body["status"] == "healthy" else 503)

    async def ready(self, _request: web.Request) -> web.Response:
        problems = self.status.problems()
        if problems:
            return web.json_response({"status": "not_ready", "reasons": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.status.metrics_text(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        self._runner, self.port = await serve_app(self.app(), self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
