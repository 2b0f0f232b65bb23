"""Callbacks: tell a consumer's endpoint when a document's result or error record is out.

With WATCHER_CALLBACK_URL set, each finished document is POSTed there as JSON with an
`id` of its own (also in `X-Watcher-Event-Id`: a receiver drops repeats by it). Each
attempt carries the time it was sent (`X-Watcher-Timestamp`, Unix seconds) and an
HMAC-SHA256 over `<timestamp>.<body>` (`X-Watcher-Signature: sha256=<hex>`, key
WATCHER_CALLBACK_SECRET), so a receiver can refuse an old or replayed request by its
timestamp and know the timestamp was ours. Redirects are not followed (a 3xx is a
failed attempt): the body and its signature go only where they were configured to go.
Posting runs on a task of its own
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
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_random_exponential

from watcher.bucket.names import Names
from watcher.core.logs import get_logger
from watcher.core.outcome import Outcome, Report
from watcher.core.refs import ObjectRef
from watcher.pipeline.result import now

log = get_logger("watcher.pipeline.callbacks")

QUEUE_SIZE = 10_000
ATTEMPTS = 12
TIMEOUT = aiohttp.ClientTimeout(total=10)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    signed = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


class CallbackFailed(Exception):
    pass


class Notifier:
    def __init__(self, url: str, secret: str | None, bucket: str, names: Names,
                 max_wait: float = 60.0, counted: Callable[[str], None] = lambda _result: None) -> None:
        self.url = url
        self.secret = secret
        self.bucket = bucket
        self.names = names
        self.max_wait = max_wait
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self.sent = 0
        self.dropped = 0
        # Told "sent", "failed" (attempts used up) or "dropped" (queue full) per callback.
        self.counted = counted

    def ended(self, report: Report) -> None:
        """An outcome hook: results and error records are told; other outcomes are not."""
        ref = report.ref
        if report.outcome is Outcome.DONE:
            self._put(ref, "done", {"json": self.names.result_json(ref.key),
                                    "markdown": self.names.result_markdown(ref.key)})
        elif report.outcome is Outcome.ERROR:
            self._put(ref, "error", {"error": self.names.error_json(ref.key), "code": report.code or ""})

    def _put(self, ref: ObjectRef, outcome: str, result: dict[str, str]) -> None:
        event = {"id": uuid.uuid4().hex, "event": f"document.{outcome}", "bucket": self.bucket,
                 "source": {"key": ref.key, "etag": ref.etag}, "result": result, "at": now()}
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self.counted("dropped")
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
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(ATTEMPTS),
                                               wait=wait_random_exponential(multiplier=0.5,
                                                                            max=self.max_wait)):
                with attempt:
                    await self._post(http, body, self._headers(event["id"], body))
        except RetryError as exc:
            self.dropped += 1
            self.counted("failed")
            log.warning("callback_failed", key=event["source"]["key"], attempts=ATTEMPTS,
                        error=str(exc.last_attempt.exception()))
            return
        self.sent += 1
        self.counted("sent")

    def _headers(self, event_id: str, body: bytes) -> dict[str, str]:
        """Fresh for each attempt: its own timestamp, signed with the body."""
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Watcher-Timestamp": timestamp,
                   "X-Watcher-Event-Id": event_id}
        if self.secret:
            headers["X-Watcher-Signature"] = sign(self.secret, timestamp, body)
        return headers

    async def _post(self, http: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> None:
        try:
            async with http.post(self.url, data=body, headers=headers, allow_redirects=False) as resp:
                if resp.status >= 300:
                    raise CallbackFailed(f"HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CallbackFailed(f"{type(exc).__name__}: {exc}") from exc
