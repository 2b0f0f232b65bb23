"""The openai-vlm engine: any OCR VLM behind an OpenAI-compatible endpoint (vLLM).

Each page is one chat-completions request with the page as a PNG data URL. The number
of requests in flight adapts to the server (watcher/engines/capacity.py: vLLM's own
running/waiting gauges when it has them, latency otherwise), so that the GPU always has
the next request queued and no request waits long enough to time out;
WATCHER_VLM_MAX_CONCURRENCY is only its upper bound. It tells three failures apart,
because each needs a different answer:

* server down, 5xx, timeouts: retried with backoff and jitter; still failing, the engine
  is marked unavailable (the document waits, /ready is 503) and a background probe of
  `/health` brings it back by itself;
* 401/403/404 (wrong served model name, wrong key): a configuration error that no retry
  fixes: the engine turns FAILED with a message naming the model, documents wait, and the
  probe restores it once the server serves the configured model;
* other 4xx (the page is too large for the context, ...): a problem with this page; it
  counts as an engine crash, so the worker retries then records `engine_failed`.

Answers are streamed, and a request whose output starts to loop (engines/repetition.py)
is stopped there: closing the stream makes vLLM abort the request, so a loop costs a few
hundred characters, not `max_tokens`. The page is asked once more with a repetition
penalty; if it loops again, what was read before the loop is kept, with a
`repetition_cut` warning.

Output: with the `paddleocr-vl` preset the model answers Markdown/plain text without
coordinates, so each paragraph becomes a `text` block whose bbox is the whole page.
With `granite-docling` the answer is DocTags, whose elements carry locations on a
0..500 grid; those become blocks with real bboxes in page pixels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
from typing import Any

import aiohttp
from PIL import Image
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from watcher.core.errors import EngineUnavailable
from watcher.core.logs import get_logger
from watcher.core.pages import PageResult, RenderedPage
from watcher.core.settings import Settings
from watcher.engines import vlm_server
from watcher.engines.base import Engine, EngineState, check_warm_page, synthetic_page
from watcher.engines.capacity import AdaptiveLimit, poll_server_gauges
from watcher.engines.doctags import doctags_page, text_page
from watcher.engines.repetition import CHECK_EVERY, loop_cut

log = get_logger("watcher.engine")

PRESET_PROMPTS = {
    "paddleocr-vl": "OCR:",
    "granite-docling": "Convert this page to docling.",
}

# Statuses that mean "this deployment is misconfigured", not "this page is bad".
_CONFIG_STATUSES = {401, 403, 404}
# vLLM's sampling parameter, asked for when a page looped once (1.0 is none).
REPETITION_PENALTY = 1.1


class _Transient(Exception):
    """The server is down, overloaded or slow: worth another try."""


class VlmRequestRejected(Exception):
    """The server refused this page (4xx): counted as an engine crash by the worker."""


def encode_png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    # compress_level 1: the bytes only cross loopback, and zlib time is CPU the box needs.
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _server_message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):
            return str(data["message"])
    return body.strip()[:300]


class OpenAIVlmEngine(Engine):
    structured = True
    uses_vlm_server = True

    name = "openai-vlm"

    def __init__(
        self,
        settings: Settings,
        probe_interval: float = 2.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
    ) -> None:
        super().__init__()
        self.model = settings.vlm_model
        self.url = settings.vlm_url
        self.preset = settings.vlm_prompt_preset
        self.prompt = settings.vlm_prompt or PRESET_PROMPTS[self.preset]
        self.max_concurrency = settings.vlm_max_concurrency
        self.max_retries = settings.vlm_max_retries
        self.max_tokens = settings.vlm_max_tokens
        self.startup_timeout = settings.vlm_startup_timeout
        self.request_timeout = aiohttp.ClientTimeout(total=settings.vlm_timeout)
        self.api_key = settings.vlm_api_key.get_secret_value() if settings.vlm_api_key else None
        self.probe_interval = probe_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.requests = AdaptiveLimit(upper=self.max_concurrency, timeout=settings.vlm_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._probe: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        # Set while the server rejects our configuration (model name, key); cleared by
        # the probe once the server serves the configured model again.
        self._config_error: str | None = None

    # --- life ----------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A couple of spare connections for the probe beside the bounded requests.
            connector = aiohttp.TCPConnector(limit=self.max_concurrency + 4)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def warm(self) -> None:
        session = self._http()
        if self._probe is None:
            self._probe = asyncio.create_task(
                vlm_server.probe_forever(self, session, self.url, self.probe_interval,
                                         on_healthy=self._recover_config),
                name="vlm-probe",
            )
        if self._gauges is None:
            self._gauges = asyncio.create_task(
                poll_server_gauges(self.requests, session, self.url, api_key=self.api_key),
                name="vlm-gauges",
            )
        await vlm_server.wait_for_health(session, self.url, self.startup_timeout, self.name)
        try:
            await vlm_server.check_model(session, self.url, self.model, self.api_key)
        except RuntimeError as exc:
            self._config_error = str(exc)
            raise
        await self._warm_retrying()

    async def _warm_retrying(self) -> None:
        # A server that just came up may still stall or 5xx its first requests; only a
        # configuration error, or running out of WATCHER_VLM_STARTUP_TIMEOUT, ends warm-up.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        while True:
            try:
                await self._warm_page()
                return
            except EngineUnavailable:
                if self._config_error is not None or loop.time() > deadline:
                    raise
                log.warning("vlm_warmup_retry", engine=self.name, reason=self.unavailable)
            await asyncio.sleep(1.0)

    async def _warm_page(self) -> None:
        check_warm_page(await self.recognise(synthetic_page()))

    async def _recover_config(self) -> None:
        """Probe hook: leave FAILED once the server serves the configured model."""
        if self._config_error is None:
            return
        models = await vlm_server.served_models(self._http(), self.url, self.api_key)
        if models is not None and self.model not in models:
            return
        self._config_error = None
        try:
            await self._warm_page()
        except Exception as exc:
            if self._config_error is None:
                self._config_error = f"{type(exc).__name__}: {exc}"
            return
        self.state = EngineState.READY
        self.error = None
        log.info("engine_recovered", engine=self.name, model=self.model)

    async def close(self) -> None:
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
            self._gauges = None
        await vlm_server.close_probe_and_session(self._probe, self._session)
        self._probe, self._session = None, None

    def pages_wanted(self) -> int:
        # Enough rendered pages to fill the limit and to show the limiter that the server
        # could take more (it grows only while the whole limit is in use).
        return math.ceil(self.requests.limit * 1.5) + 2

    def request_limit(self) -> int:
        return self.requests.limit

    def snapshot(self) -> dict[str, Any]:
        return {"vlm_requests": {
            "limit": self.requests.limit,
            "upper_bound": self.requests.upper,
            "inflight": self.requests.inflight,
            "mode": self.requests.mode,
            **self.requests.server_view(),
        }}

    # --- requests ------------------------------------------------------------------------
    async def recognise(self, page: RenderedPage) -> PageResult:
        # PNG encoding of a full page takes tens of milliseconds: not on the event loop.
        image_b64 = await asyncio.to_thread(encode_png_b64, page.image)
        index, width, height = page.index, page.width, page.height
        del page  # hundreds of pages may wait on the server: keep their PNGs, not bitmaps
        text, looped = await self.complete(image_b64)
        warnings = []
        if looped:
            log.warning("vlm_output_looped", engine=self.name, page=index, kept_chars=len(text))
            again, looped_again = await self.complete(image_b64, REPETITION_PENALTY)
            if not looped_again:
                text = again
            else:
                text = max(text, again, key=len)
                warnings.append({"code": "repetition_cut", "message": (
                    f"page {index + 1}: the VLM repeated itself in a loop, also when asked again "
                    f"with a repetition penalty; the text read before the loop is kept "
                    f"({len(text)} characters) and the rest of the page may be missing")})
        page_result = (doctags_page(index, width, height, text) if self.preset == "granite-docling"
                       else text_page(index, width, height, text))
        page_result.warnings.extend(warnings)
        return page_result

    async def complete(self, image_b64: str, repetition_penalty: float | None = None) -> tuple[str, bool]:
        """The page's text, and whether it was cut where the model started to loop."""
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
                    {"type": "text", "text": self.prompt},
                ],
            }],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
        }
        if repetition_penalty is not None:
            payload["repetition_penalty"] = repetition_penalty
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            # Full jitter: many pages failing together must not retry in lockstep.
            wait=wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max),
            retry=retry_if_exception_type(_Transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    answer = await self._post(payload)
        except _Transient as exc:
            reason = (f"VLM server {self.url} still failing after {self.max_retries + 1} "
                      f"attempts: {exc}")
            self.mark_unavailable(reason)
            raise EngineUnavailable(reason) from exc
        self.mark_available()
        return answer

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("vlm_request_retry", engine=self.name, attempt=state.attempt_number,
                    error=str(exc))

    async def _post(self, payload: dict[str, Any]) -> tuple[str, bool]:
        session = self._http()
        headers = vlm_server.auth_headers(self.api_key)
        # The slot is held for the request only, never across a backoff sleep.
        async with self.requests.slot():
            try:
                async with session.post(f"{self.url}/chat/completions", json=payload,
                                        headers=headers, timeout=self.request_timeout) as resp:
                    status = resp.status
                    if status == 200 and resp.content_type == "text/event-stream":
                        # Leaving the block closes the stream: vLLM aborts a loop there.
                        return await _streamed(resp)
                    body = await resp.text()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                self.requests.record_failure()
                raise _Transient(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
            if status >= 500 or status == 429:
                # Overload answers shrink the limit, and stay out of its latency samples.
                self.requests.record_failure()
                raise _Transient(f"HTTP {status}: {_server_message(body)}")
        if status in _CONFIG_STATUSES:
            self._config_failed(status, _server_message(body))
        if status >= 400:
            raise VlmRequestRejected(f"the VLM server rejected the page: HTTP {status}: "
                                     f"{_server_message(body)}")
        try:
            data = json.loads(body)
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise VlmRequestRejected(f"unexpected answer from the VLM server: {body[:200]!r}") from exc
        # A server that does not stream answers whole: a loop is cut after the fact.
        return _cut(str(content or ""))

    def _config_failed(self, status: int, message: str) -> None:
        if status == 404:
            error = vlm_server.model_mismatch_message(self.model, message)
        else:
            error = (f"the VLM server refused our credentials (HTTP {status}: {message}); "
                     f"check WATCHER_VLM_API_KEY")
        if self.state is not EngineState.FAILED or self.error != error:
            log.error("engine_failed", engine=self.name, model=self.model, error=error)
        self._config_error = error
        self.state = EngineState.FAILED
        self.error = error
        raise EngineUnavailable(error)


async def _streamed(resp: aiohttp.ClientResponse) -> tuple[str, bool]:
    """An OpenAI-style event stream read until it ends or its text starts to loop."""
    parts: list[str] = []
    size = checked = 0
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        try:
            choices = json.loads(data).get("choices")
            if not choices:
                continue  # a usage or keep-alive event: no text
            delta = str((choices[0].get("delta") or {}).get("content") or "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise VlmRequestRejected(f"unexpected event from the VLM server: {data[:200]!r}") from exc
        parts.append(delta)
        size += len(delta)
        if size - checked >= CHECK_EVERY:
            checked = size
            text, looped = _cut("".join(parts))
            if looped:
                return text, True
    return _cut("".join(parts))


def _cut(text: str) -> tuple[str, bool]:
    at = loop_cut(text)
    return (text, False) if at is None else (text[:at], True)
