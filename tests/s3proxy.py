"""A proxy in front of SeaweedFS that makes it behave like other stores, or a bad network.

Requests pass through re-signed with SigV4 (the test credentials), so that the proxy can
change them as a store or the network would:

- `strip`: drop conditional headers a store ignores (If-Match on DELETE, the copy
  source conditions on a copy), so that the request is *applied* unconditionally, as such
  a store applies it;
- `cut`: answer a GET with its full Content-Length but close the connection half-way
  through the body, as a network that drops a long download does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from watcher.cli.embedded import SeaweedS3
from watcher.service.http import serve_app

_HOP = {"host", "content-length", "transfer-encoding", "authorization", "x-amz-date",
        "x-amz-content-sha256", "x-amz-security-token", "connection", "expect",
        "accept-encoding", "amz-sdk-invocation-id", "amz-sdk-request"}
_STRIPPED = {"delete": {"if-match"},
             "copy": {"x-amz-copy-source-if-match", "x-amz-copy-source-if-none-match"}}


@dataclass
class ProxyLog:
    """What the proxy did, for the test to assert on."""

    stripped: list[str] = field(default_factory=list)  # "<METHOD> <path>"
    cut: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def s3_proxy(weed: SeaweedS3, ignore: frozenset[str] = frozenset(),
                   cut: Callable[[str], bool] = lambda path: False) -> AsyncIterator[tuple[str, ProxyLog]]:
    """`ignore`: "delete" and/or "copy" conditions are dropped; `cut(path)`: whether this
    GET's body is cut off half-way. Yields the proxy's endpoint and its log."""
    credentials = Credentials(weed.access_key, weed.secret_key)
    log = ProxyLog()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        kind = ("copy" if request.method == "PUT" and "x-amz-copy-source" in {k.lower() for k in headers}
                else "delete" if request.method == "DELETE" else "")
        dropped = {k for k in headers if k.lower() in _STRIPPED.get(kind, set()) and kind in ignore}
        if dropped:
            log.stripped.append(f"{request.method} {request.path}")
        headers = {k: v for k, v in headers.items() if k not in dropped}
        url = f"{weed.endpoint}{request.rel_url}"
        signed = AWSRequest(method=request.method, url=url, data=body, headers=headers)
        S3SigV4Auth(credentials, "s3", "ru-central-1").add_auth(signed)
        async with aiohttp.ClientSession(auto_decompress=False) as http, http.request(
            request.method, url, headers=dict(signed.headers.items()), data=body,
            allow_redirects=False,
        ) as upstream:
            data = await upstream.read()
            passed = {k: v for k, v in upstream.headers.items()
                      if k.lower() not in ("content-length", "transfer-encoding", "content-encoding",
                                           "connection")}
            if request.method == "GET" and upstream.status == 200 and len(data) > 1 and cut(request.path):
                log.cut.append(request.path)
                response = web.StreamResponse(status=200, headers=passed)
                response.content_length = len(data)
                await response.prepare(request)
                await response.write(data[: len(data) // 2])
                assert request.transport is not None
                request.transport.close()  # the rest never comes
                return response
            return web.Response(status=upstream.status, body=data, headers=passed)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner, port = await serve_app(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        await runner.cleanup()
