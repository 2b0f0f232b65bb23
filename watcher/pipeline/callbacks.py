"""Callbacks: tell a consumer's endpoint when a document's result or error record is out.

With WATCHER_CALLBACK_URL set, each finished document is POSTed there as JSON, signed
with HMAC-SHA256 over the exact body (`X-Watcher-Signature: sha256=<hex>`, key
WATCHER_CALLBACK_SECRET) beside `X-Watcher-Timestamp`. Posting runs on a task of its own
behind a bounded queue: a slow or absent endpoint never holds a document back or fails
it. Each notification is retried with exponential backoff for about ten minutes; one that
still fails, or finds the queue full, is dropped with a log line (the result itself is in
S3 either way, and the consumer can list it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_random_exponential

from watcher.bucket.names import Names
from watcher.bucket.storage import ObjectRef
from watcher.core.logs import get_logger
from watcher.pipeline.result import now

log = get_logger("watcher.pipeline.callbacks")

QUEUE_SIZE = 10_000
ATTEMPTS = 12
TIMEOUT = aiohttp.ClientTimeout(total=10)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class CallbackFailed(Exception):
    pass


class Notifier:
    def __init__(self, url: str, secret: str | None, bucket: str, names: Names,
                 max_wait: float = 60.0) -> None:
        self.url = url
        self.secret = secret
        self.bucket = bucket
        self.names = names
        self.max_wait = max_wait
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self.sent = 0
        self.dropped = 0

    def done(self, ref: ObjectRef) -> None:
        self._put(ref, "done", {"json": self.names.result_json(ref.key),
                                "markdown": self.names.result_markdown(ref.key)})

    def failed(self, ref: ObjectRef, code: str) -> None:
        self._put(ref, "error", {"error": self.names.error_json(ref.key), "code": code})

    def _put(self, ref: ObjectRef, outcome: str, result: dict[str, str]) -> None:
        event = {"event": f"document.{outcome}", "bucket": self.bucket,
                 "source": {"key": ref.key, "etag": ref.etag}, "result": result, "at": now()}
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("callback_dropped", key=ref.key, reason="queue full")

    async def run(self) -> None:
        """Post queued notifications one by one, until cancelled."""
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            while True:
                event = await self.queue.get()
                try:
                    await self._deliver(http, event)
                finally:
                    self.queue.task_done()

    async def _deliver(self, http: aiohttp.ClientSession, event: dict[str, Any]) -> None:
        body = json.dumps(event, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "X-Watcher-Timestamp": str(int(time.time()))}
        if self.secret:
            headers["X-Watcher-Signature"] = sign(self.secret, body)
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(ATTEMPTS),
                                               wait=wait_random_exponential(multiplier=0.5,
                                                                            max=self.max_wait)):
                with attempt:
                    await self._post(http, body, headers)
        except RetryError as exc:
            self.dropped += 1
            log.warning("callback_failed", key=event["source"]["key"], attempts=ATTEMPTS,
                        error=str(exc.last_attempt.exception()))
            return
        self.sent += 1

    async def _post(self, http: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> None:
        try:
            async with http.post(self.url, data=body, headers=headers) as resp:
                if resp.status >= 300:
                    raise CallbackFailed(f"HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CallbackFailed(f"{type(exc).__name__}: {exc}") from exc
