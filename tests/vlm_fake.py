"""A PROTOCOL FAKE of the GPU VLM server (vLLM's OpenAI-compatible API).

vLLM with an OCR VLM needs a GPU that CI does not have, so this boundary is faked: a real
aiohttp server on a loopback port that speaks the same protocol (`GET /health`,
`GET /v1/models`, `POST /v1/chat/completions`, vLLM's 404 body for an unknown model).
It is honest about the content: it decodes the base64 PNG it is sent and reads it with
the real CPU OCR (Tesseract), so the words in the results really come from the page image.

Knobs for the failure tests: `served_model`, `answer` (what the model says instead of
the OCR reading, given the image's width and height: a misreading, DocTags with boxes, a
loop), `loop` (after the answer, this text again and again until the client hangs up, as
a looping model does; `loop_when_penalised=False`: not when the request asks for a
repetition penalty), `delay` (seconds per request),
`fail_next` (answer the next N requests with 500), `hang_next`/`hang_seconds` (hold the
next N requests), `stop()`/`start()` (the server goes away and comes back on the same
port). It records requests, statuses and the maximum number of requests in flight. A request with
`"stream": true` is answered as vLLM streams (server-sent events of chat.completion.chunk
objects, then `data: [DONE]`); `streamed_chars` counts what the client took before it hung up.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

from watcher.core.pages import RenderedPage
from watcher.core.settings import DEFAULT_PIPELINE_VERSION, PADDLEOCR_VL_MODELS
from watcher.engines.cpu import CpuEngine
from watcher.service.http import serve_app

_ocr: CpuEngine | None = None


def shared_ocr() -> CpuEngine:
    """One CPU OCR for every fake in the session."""
    global _ocr
    if _ocr is None:
        _ocr = CpuEngine(concurrency=1)
    return _ocr


@dataclass
class FakeVlmServer:
    served_model: str = PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION][0]
    answer: Callable[[int, int], str] | None = None
    loop: str | None = None
    loop_when_penalised: bool = True
    delay: float = 0.0
    fail_next: int = 0
    hang_next: int = 0
    hang_seconds: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    requests: int = 0
    statuses: list[int] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    prompts: list[str] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    penalties: list[float | None] = field(default_factory=list)
    streamed_chars: list[int] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def start(self) -> FakeVlmServer:
        # reuse_address: tests stop and restart the fake on the same port.
        self._runner, self.port = await serve_app(self.app(), self.host, self.port,
                                                  reuse_address=True)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "object": "list",
            "data": [{"id": self.served_model, "object": "model", "owned_by": "vllm"}],
        })

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            response = await self._answer(request)
        finally:
            self.inflight -= 1
        self.statuses.append(response.status)
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        self.auth_headers.append(request.headers.get("Authorization"))
        if body.get("model") != self.served_model:
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                           "type": "NotFoundError", "code": 404}},
                status=404,
            )
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response(
                {"error": {"message": "injected failure", "type": "InternalServerError",
                           "code": 500}}, status=500)
        if self.hang_next > 0:
            self.hang_next -= 1
            await asyncio.sleep(self.hang_seconds)
        image_url, prompt = "", ""
        for part in body["messages"][0]["content"]:
            if part.get("type") == "image_url":
                image_url = part["image_url"]["url"]
            elif part.get("type") == "text":
                prompt = part["text"]
        self.prompts.append(prompt)
        penalty = body.get("repetition_penalty")
        started = time.perf_counter()
        text = await self.read_image(image_url)
        counted = not text.startswith("WATCHER WARMUP")
        if counted:
            self.penalties.append(penalty)
        remaining = self.delay - (time.perf_counter() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)
        loops = counted and self.loop is not None and (penalty is None or self.loop_when_penalised)
        if body.get("stream"):
            return await self._stream(request, text, self.loop if loops else None)
        if loops:
            text += (self.loop or "") * 2000  # a model that loops until max_tokens
        return web.json_response({
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "model": self.served_model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    async def _stream(self, request: web.Request, text: str, loop: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = 0

        async def send(piece: str) -> None:
            chunk = {"id": f"chatcmpl-{self.requests}", "object": "chat.completion.chunk",
                     "model": self.served_model,
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

        try:
            for start in range(0, len(text), 16):
                await send(text[start:start + 16])
                sent += len(text[start:start + 16])
            # An endless loop ends only when the client goes away (vLLM aborts the request).
            for _ in range(100_000 if loop else 0):
                await send(loop or "")
                sent += len(loop or "")
                await asyncio.sleep(0)
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.streamed_chars.append(sent)
            raise
        self.streamed_chars.append(sent)
        return response

    async def read_image(self, data_url: str) -> str:
        prefix = "data:image/png;base64,"
        if not data_url.startswith(prefix):
            raise web.HTTPBadRequest(text="expected a PNG data URL")
        image = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))).convert("RGB")
        if self.answer is not None and image.size != (640, 200):  # not the warm-up page
            return self.answer(*image.size)
        result = await shared_ocr().recognise(RenderedPage(0, image, image.width, image.height))
        return result.markdown
