"""Shared fixtures: a real SeaweedFS S3 server, a warmed real CPU engine, daemons in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))
# Labelled fakes (fake_paddleocr); spawned engine workers inherit this path.
sys.path.insert(0, str(Path(__file__).parent / "fakes"))


from waiting import eventually

from watcher.cli.embedded import SeaweedS3
from watcher.core.pages import PageResult, RenderedPage
from watcher.core.settings import Settings, load_settings
from watcher.engines.base import Engine
from watcher.engines.cpu import CpuEngine
from watcher.service.daemon import Daemon, running
from watcher.service.http import serve_app

# Fixtures that bring a real server, process or network: a test using one is end to end.
E2E_FIXTURES = {"weed", "own_weed", "bucket", "s3", "moto", "moto_endpoint", "fleet_weed", "vlm", "fake",
                "lenient_store"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests in tiers: `-m "not e2e"` runs the fast ones (in-memory, seconds); the README's
    command runs everything."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(data_dir=tmp_path_factory.mktemp("weed"), buckets=("warmup",))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def bucket(weed: SeaweedS3) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    weed.sync_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(weed: SeaweedS3) -> Any:
    return weed.sync_client()


FAKES = Path(__file__).parent / "fakes"
_shared_cpu: CpuEngine | None = None


class CountingEngine(Engine):
    """The real CPU engine, shared across the session (warmed once), counting its calls.

    Counting is how tests prove "nothing done twice"; sharing only saves the model load.
    """

    def __init__(self) -> None:
        super().__init__()
        global _shared_cpu
        if _shared_cpu is None:
            _shared_cpu = CpuEngine(concurrency=1)
        self.inner = _shared_cpu
        self.name = self.inner.name
        self.model = self.inner.model
        self.calls: list[int] = []

    async def warm(self) -> None:
        await self.inner.warm()

    async def recognise(self, page: RenderedPage) -> PageResult:
        self.calls.append(page.index)
        return await self.inner.recognise(page)


class GatedEngine(CountingEngine):
    """The real CPU engine, held at a gate so that a test can act while a page is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def recognise(self, page: RenderedPage) -> PageResult:
        self.entered.set()
        await self.gate.wait()
        return await super().recognise(page)


def make_settings(server: SeaweedS3, bucket: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "s3_endpoint": server.endpoint,
        "s3_bucket": bucket,
        "s3_access_key": server.access_key,
        "s3_secret_key": server.secret_key,
        "poll_interval": 0.5,
        "http_port": 0,
        "http_host": "127.0.0.1",
        "lease_seconds": 10,
        "drain_seconds": 20,
        "s3_max_attempts": 3,
        "s3_connect_timeout": 1,
        "s3_read_timeout": 10,
        "render_dpi": 100,
    }
    values.update(overrides)
    return load_settings(**values)


@contextlib.asynccontextmanager
async def daemon_running(settings: Settings, engine: Engine | None = None) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, engine=engine or CountingEngine())
    async with running(daemon):
        await asyncio.wait_for(daemon.listening.wait(), 10)
        yield daemon


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        # A zombie still "exists" for kill(0); it no longer runs.
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def files_under(path: Path) -> list[Path]:
    """Files left anywhere under `path` (download directories may remain, empty)."""
    return [f for f in path.rglob("*") if not f.is_dir()]


def leftovers(s3: Any, bucket: str) -> list[str]:
    """Internal objects left behind (leases, checkpoints); done-markers and the fleet's
    manifest are meant to stay."""
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=".watcher/").get("Contents", [])
    return [o["Key"] for o in listing
            if "/_done/" not in o["Key"]
            and not ("/_fleet/" in o["Key"] and o["Key"].endswith("/manifest.json"))]


def object_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except Exception:
        return False
    return True


async def wait_for_keys(s3: Any, bucket: str, keys: list[str], timeout: float = 120) -> None:
    """Wait until every key exists in the bucket (results are the daemon's only output)."""
    missing = list(keys)

    async def all_there() -> bool:
        exists = await asyncio.gather(*(asyncio.to_thread(object_exists, s3, bucket, k) for k in missing))
        missing[:] = [k for k, ok in zip(missing, exists, strict=True) if not ok]
        return not missing

    await eventually(all_there, timeout, f"{missing}", every=0.3)


@contextlib.asynccontextmanager
async def lenient_store(weed: SeaweedS3) -> AsyncIterator[str]:
    """SeaweedFS behind a proxy that turns 412 into 200: how a store that ignores
    conditional headers looks from outside (the request is forwarded unchanged, signature
    and all, so only the answer differs)."""
    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length",)}
        async with aiohttp.ClientSession(auto_decompress=False) as http, http.request(
            request.method, f"{weed.endpoint}{request.rel_url}", headers=headers,
            data=await request.read(), allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            status = 200 if upstream.status == 412 else upstream.status
            passed = {k: v for k, v in upstream.headers.items()
                      if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")}
            return web.Response(status=status, body=b"" if status != upstream.status else body,
                                headers=passed)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner, port = await serve_app(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
