"""A GPU-capacity simulator behind the OpenAI chat-completions protocol.

It models what matters for keeping a vLLM GPU busy, not the model: a fixed number of
concurrent sequence slots S and a fixed service time per request. Requests beyond S wait
inside the simulator, as they wait in vLLM's scheduler queue. It records busy
slot-seconds, so that utilisation = busy / (S x wall time) says how well a client keeps
the "GPU" fed. The warm-up page (640 x 200) is served but left out of the figures.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from watcher.health import serve_app

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
    model: str = "PaddleOCR-VL-0.9B"
    host: str = "127.0.0.1"
    port: int = 0
    busy_slot_seconds: float = 0.0
    requests: int = 0
    first_request: float | None = None
    last_response: float | None = None
    max_queued: int = 0
    max_inflight: int = 0
    _queued: int = 0
    _inflight: int = 0
    _runner: web.AppRunner | None = None
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

    async def _chat(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        image = next(p for p in body["messages"][0]["content"] if p.get("type") == "image_url")
        size = png_size(image["image_url"]["url"].split(",", 1)[1])
        counted = size != WARMUP_SIZE
        arrived = time.perf_counter()
        if counted and self.first_request is None:
            self.first_request = arrived
        self._queued += 1
        if self._sem.locked():  # every slot busy: this request waits in the "scheduler"
            self.max_queued = max(self.max_queued, self._queued)
        async with self._sem:
            self._queued -= 1
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)
            started = time.perf_counter()
            await asyncio.sleep(self.service_time)
            finished = time.perf_counter()
            self._inflight -= 1
        if counted:
            self.requests += 1
            self.busy_slot_seconds += finished - started
            self.last_response = finished
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
