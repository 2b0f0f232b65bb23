"""What a poll costs over a bucket of finished documents: requests and seconds.

Fills an embedded SeaweedFS with N finished documents (a source and its done-marker each,
as publishing leaves them), then runs the daemon's own discovery (`Daemon.build_discovery`,
the object `watcher run` polls with) for 1 and for 3 replicas and counts every S3
request by operation, for the first poll of a fresh replica and for a steady poll after
it. Listings are paced to the budget (`WATCHER_LIST_REQUESTS_PER_SECOND`), so seconds
are shown with the default budget and unpaced; `shared listing off` is the old shape,
every replica listing for itself.

    python bench/listing.py --docs 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from watcher.bucket.names import Names
from watcher.bucket.storage import Storage, client_config, open_storage
from watcher.cli.embedded import SeaweedS3
from watcher.core.pages import PageResult
from watcher.core.settings import Settings, load_settings
from watcher.engines.base import Engine
from watcher.intake.fleet import FleetDiscovery
from watcher.service.daemon import Daemon

BODY = b"%PDF-1.4 finished document"


class NoEngine(Engine):
    """Discovery only: no page is ever recognised here."""

    async def warm(self) -> None:
        return None

    async def recognise(self, page: Any) -> PageResult:
        raise AssertionError("the listing benchmark recognises nothing")


def settings_for(weed: SeaweedS3, replica: str, **overrides: Any) -> Settings:
    return load_settings(s3_endpoint=weed.endpoint, s3_bucket="bench", s3_access_key=weed.access_key,
                         s3_secret_key=weed.secret_key, replica_id=replica, lease_seconds=60,
                         **overrides)


async def fill(weed: SeaweedS3, docs: int) -> float:
    settings = settings_for(weed, "filler")
    names = Names.from_settings(settings)
    etag = hashlib.md5(BODY).hexdigest()
    gate = asyncio.Semaphore(64)
    started = time.perf_counter()
    async with get_session().create_client(
        "s3", endpoint_url=weed.endpoint, aws_access_key_id=weed.access_key,
        aws_secret_access_key=weed.secret_key, config=client_config(settings),
    ) as client:
        async def one(n: int) -> None:
            key = f"input/batch-{n // 1000:03d}/doc-{n:06d}.pdf"
            async with gate:
                await client.put_object(Bucket="bench", Key=key, Body=BODY)
                await client.put_object(Bucket="bench", Key=names.marker(key, etag), Body=b"")

        for start in range(0, docs, 5000):
            await asyncio.gather(*(one(n) for n in range(start, min(docs, start + 5000))))
    return time.perf_counter() - started


async def poll(discovery: FleetDiscovery, storage: Storage) -> tuple[Counter[str], float, int]:
    counted: Counter[str] = Counter()
    storage.on_request = lambda op: counted.update([op])
    started = time.perf_counter()
    todo = await discovery.scan()
    return counted, time.perf_counter() - started, len(todo)


def shown(counted: Counter[str]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counted.items())) or "none"


async def fleet(weed: SeaweedS3, replicas: int, **overrides: Any) -> list[str]:
    rows = []
    async with contextlib.AsyncExitStack() as stack:
        members: list[tuple[FleetDiscovery, Storage]] = []
        for n in range(replicas):
            settings = settings_for(weed, f"replica-{n}", **overrides)
            storage = await stack.enter_async_context(open_storage(settings))
            members.append((Daemon(settings, engine=NoEngine()).build_discovery(storage), storage))
        for label in ("first", "steady"):
            total: Counter[str] = Counter()
            slowest = 0.0
            for discovery, storage in members:
                counted, seconds, found = await poll(discovery, storage)
                assert found == 0, f"{found} documents look pending"
                total += counted
                slowest = max(slowest, seconds)
            roles = "+".join(sorted(d.role.value for d, _ in members))
            rows.append(f"| {replicas} ({roles}) | {overrides_label(overrides)} | {label} | "
                        f"{shown(total)} | {sum(total.values())} | {slowest:.1f} |")
        for discovery, _storage in members:
            await discovery.close()
    return rows


def overrides_label(overrides: dict[str, Any]) -> str:
    parts = []
    if overrides.get("shared_listing") is False:
        parts.append("shared listing off")
    rate = overrides.get("list_requests_per_second")
    parts.append("unpaced" if rate and rate > 1e5 else f"budget {rate or 100:g}/s")
    return ", ".join(parts)


async def run(docs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="watcher-listing-") as tmp, \
            SeaweedS3(data_dir=Path(tmp) / "weed", buckets=("bench",)) as weed:
        filled = await fill(weed, docs)
        print(f"{docs} finished documents (source + done-marker) written in {filled:.0f} s\n")
        print("| replicas | listing | poll | requests by operation (whole fleet) | requests | seconds |")
        print("|---|---|---|---|---|---|")
        unpaced = {"list_requests_per_second": 1e9}
        for replicas, overrides in ((1, {}), (1, unpaced), (1, {"list_requests_per_second": 20}),
                                    (3, {}), (3, unpaced), (3, {**unpaced, "shared_listing": False})):
            for row in await fleet(weed, replicas, **overrides):
                print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(run(args.docs))


if __name__ == "__main__":
    main()
