"""The operator's HTTP surface on WATCHER_HTTP_PORT: /health, /ready, /metrics, and the
status page at / when it is on (service/page.py).

It starts before anything else and only reads a `Status` (service/status.py), an
in-memory snapshot, so it answers within milliseconds while the engine warms or pages
are being recognised; `POST /events` hands notifications to the event intake.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from watcher.intake.events import BadEvent, EventIntake
from watcher.service import page
from watcher.service.hooks import RecentWork
from watcher.service.status import Status

RESULTS_PATH = "/results/"
_TYPES = {".json": "application/json", ".md": "text/markdown"}


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


@dataclass
class StatusPage:
    """The status page's parts: the token it asks for (/events' one), the recent work it
    lists, and how a result it links to is read (set once S3 is reached; None before)."""

    token: str | None
    recent: RecentWork
    read_output: Callable[[str], Awaitable[bytes | None]] | None = field(default=None)


class HealthServer:
    def __init__(self, status: Status, host: str, port: int, webhook: Webhook | None = None,
                 status_page: StatusPage | None = None) -> None:
        self.status = status
        self.host = host
        self.port = port
        self.webhook = webhook
        self.status_page = status_page
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
        if self.status_page is not None:
            app.router.add_get("/", self.page)
            app.router.add_get("/status/live", self.live)
            app.router.add_get("/static/{name}", self.static)
            app.router.add_get("/favicon.ico", self.favicon)
            app.router.add_get(RESULTS_PATH + "{key:.+}", self.result)
        return app

    # --- the status page -----------------------------------------------------------------
    def _page_allowed(self, request: web.Request) -> bool:
        token = self.status_page.token if self.status_page is not None else None
        return token is None or EventIntake.authorised(request.headers.get("Authorization"), token)

    def _live(self) -> str:
        assert self.status_page is not None
        return page.live(self.status.health(), self.status_page.recent,
                         self.status.metrics.progress.pages_read, RESULTS_PATH)

    async def page(self, request: web.Request) -> web.Response:
        allowed = self._page_allowed(request)
        # Without the token the page is only its frame and a form: no document names.
        return _page_response(page.page(self._live() if allowed else None), 200 if allowed else 401)

    async def live(self, request: web.Request) -> web.Response:
        if not self._page_allowed(request):
            return _page_response("a token is needed", 401)
        return _page_response(self._live())

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kinds = {"status.js": "text/javascript", "status.css": "text/css", "favicon.svg": "image/svg+xml"}
        if name not in kinds:
            raise web.HTTPNotFound()
        return web.Response(body=page.static_file(name), content_type=kinds[name], charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def favicon(self, _request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/static/favicon.svg")

    async def result(self, request: web.Request) -> web.Response:
        """A result or error record the page links to, read from S3 with the daemon's
        credentials; only the output prefix's JSON and Markdown (service/daemon.py)."""
        if not self._page_allowed(request):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        key = request.match_info["key"]
        read = self.status_page.read_output if self.status_page is not None else None
        kind = next((t for suffix, t in _TYPES.items() if key.endswith(suffix)), None)
        body = await read(key) if read is not None and kind is not None else None
        if body is None:
            return web.json_response({"error": f"no result {key!r} to show"}, status=404)
        return web.Response(body=body, content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    # --- notifications -------------------------------------------------------------------

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

    # --- probes --------------------------------------------------------------------------
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


def _page_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": page.CSP, "Cache-Control": "no-store",
                                 "X-Content-Type-Options": "nosniff"})
