"""Completion callbacks: signed, retried, and never in a document's way."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import daemon_running, leftovers, make_settings, wait_for_keys
from docgen import make_image
from waiting import eventually

from watcher.bucket.names import Names
from watcher.cli.embedded import SeaweedS3, free_ports
from watcher.core.outcome import Outcome, Report
from watcher.core.refs import ObjectRef
from watcher.pipeline.callbacks import Notifier
from watcher.service.http import serve_app

SECRET = "callback-secret-42"


@contextlib.asynccontextmanager
async def receiver(
    fail_first: int, attempts: list[tuple[bytes, dict[str, str]]] | None = None,
) -> AsyncIterator[tuple[str, list[tuple[bytes, dict[str, str]]]]]:
    """A consumer's endpoint: answers 500 to the first `fail_first` posts, then records them
    (every post, failed ones too, goes to `attempts`). `/moved` redirects to `/hook`."""
    received: list[tuple[bytes, dict[str, str]]] = []
    failures = [fail_first]

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if attempts is not None:
            attempts.append((body, dict(request.headers)))
        if failures[0] > 0:
            failures[0] -= 1
            return web.Response(status=500)
        received.append((body, dict(request.headers)))
        return web.Response(status=204)

    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/hook")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/moved", moved)
    runner, port = await serve_app(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


async def test_each_finished_document_is_posted_signed_after_retries(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/good.png", Body=make_image(["Call me back"], "PNG"))
    s3.put_object(Bucket=bucket, Key="input/bad.png", Body=b"\x89PNG\r\n\x1a\n broken")
    attempts: list[tuple[bytes, dict[str, str]]] = []
    async with receiver(fail_first=2, attempts=attempts) as (url, received):
        settings = make_settings(weed, bucket, callback_url=url, callback_secret=SECRET)
        async with daemon_running(settings):
            await wait_for_keys(s3, bucket, ["output/good.png.json", "output/bad.png.error.json"])
            try:
                await eventually(lambda: len(received) >= 2, 60, "two callbacks received")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {received}") from None
    assert len(attempts) == 4  # two refused, then one each
    ids_by_key: dict[str, set[str]] = {}
    for body, headers in attempts:
        # Each attempt is signed over its own timestamp and the body, and names its event.
        timestamp = headers["X-Watcher-Timestamp"]
        assert timestamp.isdigit()
        expected = "sha256=" + hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body,
                                        hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Watcher-Signature"], expected)
        event = json.loads(body)
        assert headers["X-Watcher-Event-Id"] == event["id"]
        ids_by_key.setdefault(event["source"]["key"], set()).add(event["id"])
    # A retried event keeps its id; two events never share one.
    assert all(len(ids) == 1 for ids in ids_by_key.values())
    assert len({id_ for ids in ids_by_key.values() for id_ in ids}) == 2
    events = {}
    for body, _headers in received:
        event = json.loads(body)
        events[event["source"]["key"]] = event
    assert events["input/good.png"]["event"] == "document.done"
    assert events["input/good.png"]["result"] == {"json": "output/good.png.json",
                                                  "markdown": "output/good.png.md"}
    assert events["input/good.png"]["source"]["etag"] == s3.head_object(
        Bucket=bucket, Key="input/good.png")["ETag"].strip('"')
    assert events["input/bad.png"]["event"] == "document.error"
    assert events["input/bad.png"]["result"] == {"error": "output/bad.png.error.json", "code": "corrupt"}


async def test_an_absent_endpoint_never_holds_a_document_back(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    (closed,) = free_ports(1)
    s3.put_object(Bucket=bucket, Key="input/a.png", Body=make_image(["Nobody listens"], "PNG"))
    settings = make_settings(weed, bucket, callback_url=f"http://127.0.0.1:{closed}/hook",
                             drain_seconds=1)
    async with daemon_running(settings) as daemon:
        await wait_for_keys(s3, bucket, ["output/a.png.json"])
        await daemon.wait_polls(daemon.polls + 2, timeout=30)
        assert daemon.notifier is not None and daemon.notifier.sent == 0
    assert leftovers(s3, bucket) == []


async def test_redirects_are_not_followed_and_each_attempt_is_stamped_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = Names("input/", "output/", ".watcher/leases/", "done/")
    ref = ObjectRef("b", "input/x.png", "e" * 32, 1)
    async with receiver(fail_first=0) as (url, received):
        moved = url.replace("/hook", "/moved")
        notifier = Notifier(moved, SECRET, "b", names, max_wait=0.01)
        notifier.ended(Report(ref, Outcome.DONE))
        event = notifier.queue.get_nowait()
        async with aiohttp.ClientSession() as http:
            await notifier._deliver(http, event)
    assert received == [] and notifier.dropped == 1  # the body never went where it was sent on
    body = json.dumps(event).encode()
    clock = iter([1_000_000.0, 1_000_042.0])
    monkeypatch.setattr("watcher.pipeline.callbacks.time.time", lambda: next(clock))
    first, second = notifier._headers(event["id"], body), notifier._headers(event["id"], body)
    assert (first["X-Watcher-Timestamp"], second["X-Watcher-Timestamp"]) == ("1000000", "1000042")
    assert first["X-Watcher-Signature"] != second["X-Watcher-Signature"]
    assert first["X-Watcher-Event-Id"] == second["X-Watcher-Event-Id"] == event["id"]
