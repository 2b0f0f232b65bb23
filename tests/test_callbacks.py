"""Completion callbacks: signed, retried, and never in a document's way."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from conftest import daemon_running, leftovers, make_settings, wait_for_keys
from docgen import make_image

from watcher.cli.embedded import SeaweedS3, free_ports
from watcher.service.http import serve_app

SECRET = "callback-secret-42"


@contextlib.asynccontextmanager
async def receiver(fail_first: int) -> AsyncIterator[tuple[str, list[tuple[bytes, dict[str, str]]]]]:
    """A consumer's endpoint: answers 500 to the first `fail_first` posts, then records them."""
    received: list[tuple[bytes, dict[str, str]]] = []
    failures = [fail_first]

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if failures[0] > 0:
            failures[0] -= 1
            return web.Response(status=500)
        received.append((body, dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
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
    async with receiver(fail_first=2) as (url, received):
        settings = make_settings(weed, bucket, callback_url=url, callback_secret=SECRET)
        async with daemon_running(settings):
            await wait_for_keys(s3, bucket, ["output/good.png.json", "output/bad.png.error.json"])
            deadline = asyncio.get_running_loop().time() + 60
            while len(received) < 2:
                assert asyncio.get_running_loop().time() < deadline, received
                await asyncio.sleep(0.1)
    events = {}
    for body, headers in received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Watcher-Signature"], expected)
        assert headers["X-Watcher-Timestamp"].isdigit()
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
