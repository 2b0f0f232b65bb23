"""A GPU-capacity simulator behind the OpenAI chat-completions protocol.

It models what matters for keeping a vLLM GPU busy, not the model: a fixed number of
concurrent sequence slots S and a service time per request. Requests beyond S wait
inside the simulator, as they wait in vLLM's scheduler queue. It records busy
slot-seconds, so that utilisation = busy / (S x wall time) says how well a client keeps
the "GPU" fed. The warm-up page (640 x 200) is served but left out of the figures.

Batching mode (`per_running` > 0): a request's service time is service_time +
per_running x (requests running when it starts, itself included), as each decoding step
of a GPU gets slower the more sequences share the batch.

Like vLLM it serves `GET /metrics` with the gauges `vllm:num_requests_running` and
`vllm:num_requests_waiting` (`metrics=False`: 404, as a server without them). Requests
slower than `client_timeout` from arrival to answer (the client would have given up)
are counted in `timeouts`.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from watcher.core.settings import DEFAULT_PIPELINE_VERSION, PADDLEOCR_VL_MODELS
from watcher.service.http import serve_app

WARMUP_SIZE = (640, 200)


def png_size(b64: str) -> tuple[int, int]:
    """Width and height from the PNG IHDR chunk: no image decoding, no CPU to speak of."""
    head = base64.b64decode(b64[:64])
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@dataclass
class GpuSimulator:
    slots: int = 8
    service_time: float = 0.5
    per_running: float = 0.0
    metrics: bool = True
    client_timeout: float | None = None
    model: str = PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION][0]
    host: str = "127.0.0.1"
    port: int = 0
    busy_slot_seconds: float = 0.0
    requests: int = 0
    timeouts: int = 0
    first_request: float | None = None
    last_arrival: float | None = None
    last_response: float | None = None
    max_queued: int = 0
    max_inflight: int = 0
    first_full: float | None = None  # when every slot was first busy: the client's ramp ends
    _queued: int = 0
    _inflight: int = 0
    _runner: web.AppRunner | None = None
    # (start, end) of every counted request's service, to cut them to any window later.
    _busy: list[tuple[float, float]] = field(default_factory=list)
    _sem: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._sem = asyncio.Semaphore(self.slots)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> GpuSimulator:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        if self.metrics:
            app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner, self.port = await serve_app(app, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _metrics(self, _request: web.Request) -> web.Response:
        label = f'{{model_name="{self.model}"}}'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(self._inflight)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} {float(self._queued)}\n"
        )
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _chat(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        image = next(p for p in body["messages"][0]["content"] if p.get("type") == "image_url")
        size = png_size(image["image_url"]["url"].split(",", 1)[1])
        counted = size != WARMUP_SIZE
        arrived = time.perf_counter()
        if counted:
            if self.first_request is None:
                self.first_request = arrived
            self.last_arrival = arrived
        self._queued += 1
        if self._sem.locked():  # every slot busy: this request waits in the "scheduler"
            self.max_queued = max(self.max_queued, self._queued)
        # The counters are the /metrics gauges: a request dropped half-way must leave them.
        try:
            await self._sem.acquire()
        finally:
            self._queued -= 1
        try:
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)
            started = time.perf_counter()
            if self.first_full is None and self._inflight >= self.slots and counted:
                self.first_full = started
            await asyncio.sleep(self.service_time + self.per_running * self._inflight)
            finished = time.perf_counter()
        finally:
            self._inflight -= 1
            self._sem.release()
        if counted:
            self.requests += 1
            self.busy_slot_seconds += finished - started
            self._busy.append((started, finished))
            self.last_response = finished
            if self.client_timeout is not None and finished - arrived > self.client_timeout:
                self.timeouts += 1
        text = "WATCHER WARMUP 2026" if not counted else f"Simulated text of a {size[0]}x{size[1]} page"
        return web.json_response({
            "id": f"sim-{self.requests}", "object": "chat.completion", "model": self.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
        })

    def utilisation(self) -> float:
        if self.first_request is None or self.last_response is None:
            return 0.0
        wall = self.last_response - self.first_request
        return self.busy_slot_seconds / (self.slots * wall) if wall > 0 else 0.0

    def utilisation_while_backlogged(self) -> float:
        """Utilisation from the first counted arrival to the last one: while the client
        still had work to send, any idle slot is the client's doing, not the tail's."""
        return self.utilisation_between(self.first_request, self.last_arrival)

    def utilisation_after_ramp(self) -> float:
        """The same from the moment every slot was first busy: the client's steady state,
        its ramp (`ramp_seconds`) left out."""
        return self.utilisation_between(self.first_full, self.last_arrival)

    def ramp_seconds(self) -> float | None:
        if self.first_full is None or self.first_request is None:
            return None
        return self.first_full - self.first_request

    def utilisation_between(self, begin: float | None, end: float | None) -> float:
        if begin is None or end is None or end <= begin:
            return 0.0
        busy = sum(max(0.0, min(f, end) - max(s, begin)) for s, f in self._busy)
        return busy / (self.slots * (end - begin))
