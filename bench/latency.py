"""PUT-to-start latency: from an upload's completion to a worker taking the document.

Three ways of finding work, each with the real daemon in-process (CPU engine, default
settings otherwise) and N uploads at random gaps:

- polling: SeaweedFS, `WATCHER_POLL_INTERVAL` 5 s (the default), no notifications;
- webhook: SeaweedFS, poll every 300 s, and after each upload this script POSTs the AWS
  record for it to `POST /events`, as MinIO or Ceph RGW would (SeaweedFS pushes none);
- sqs: moto's server (S3 that delivers ObjectCreated events to its own SQS), poll every
  300 s, `WATCHER_SQS_QUEUE_URL` set.

"Start" is the moment a worker takes the document from the work queue (before its claim).

    python bench/latency.py --docs 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
from botocore.config import Config

from watcher.cli.embedded import SeaweedS3, free_ports
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings, load_settings
from watcher.engines import EngineState
from watcher.service.daemon import Daemon, running

TOKEN = "bench-webhook-token"
BUCKET = "latency"


def text_pdf(n: int) -> bytes:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from docgen import make_pdf  # the test suite's generator: a text layer, read without OCR

    return make_pdf([[f"Latency document {n}", "a line of text to read from the layer"]])


def record(key: str, etag: str, n: int) -> dict[str, Any]:
    return {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                         "eventTime": "2026-12-01T10:00:00.000Z",
                         "s3": {"bucket": {"name": BUCKET},
                                "object": {"key": key, "size": 1, "eTag": etag,
                                           "sequencer": f"{n + 1:016X}"}}}]}


def watch_starts(daemon: Daemon, starts: dict[str, float]) -> None:
    take = daemon.queue.take

    async def timed() -> ObjectRef:
        ref = await take()
        starts.setdefault(ref.key, time.perf_counter())
        return ref

    daemon.queue.take = timed  # type: ignore[method-assign]


async def measure(settings: Settings, s3: Any, docs: int,
                  after_put: Callable[[Daemon, str, str, int], Any] | None = None) -> list[float]:
    daemon = Daemon(settings)
    starts: dict[str, float] = {}
    watch_starts(daemon, starts)
    put_at: dict[str, float] = {}
    async with running(daemon):
        while daemon.engine.state is not EngineState.READY or daemon.polls < 1:
            await asyncio.sleep(0.1)
        for n in range(docs):
            await asyncio.sleep(random.uniform(0.2, 2.0))
            key = f"input/lat/{n:03d}.pdf"
            put = await asyncio.to_thread(s3.put_object, Bucket=settings.s3_bucket, Key=key, Body=text_pdf(n))
            put_at[key] = time.perf_counter()
            if after_put is not None:
                await after_put(daemon, key, put["ETag"].strip('"'), n)
        async with asyncio.timeout(120):
            while len(starts) < docs:
                await asyncio.sleep(0.05)
    return [starts[key] - put_at[key] for key in put_at]


async def post_event(daemon: Daemon, key: str, etag: str, n: int) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{daemon.http.port}/events", data=json.dumps(record(key, etag, n)),
            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200, await resp.text()


def seaweed_settings(weed: SeaweedS3, **overrides: Any) -> Settings:
    return load_settings(s3_endpoint=weed.endpoint, s3_bucket=BUCKET, s3_access_key=weed.access_key,
                         s3_secret_key=weed.secret_key, http_port=0, http_host="127.0.0.1",
                         log_level="WARNING", **overrides)


@contextlib.contextmanager
def moto_with_queue() -> Iterator[tuple[str, str, Any]]:
    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        kwargs: dict[str, Any] = {"endpoint_url": endpoint, "region_name": "us-east-1",
                                  "aws_access_key_id": "bench", "aws_secret_access_key": "bench",
                                  "config": Config(retries={"max_attempts": 10})}
        s3, sqs = boto3.client("s3", **kwargs), boto3.client("sqs", **kwargs)
        for _ in range(100):
            with contextlib.suppress(Exception):
                s3.list_buckets()
                break
            time.sleep(0.1)
        queue_url = sqs.create_queue(QueueName="watcher-events")["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        arn = attributes["Attributes"]["QueueArn"]
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
        yield endpoint, queue_url, s3
    finally:
        server.terminate()
        server.wait(10)


def summary(name: str, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"| {name} | {len(ordered)} | {statistics.median(ordered) * 1000:.0f} | {p95 * 1000:.0f} | "
            f"{ordered[-1] * 1000:.0f} |")


async def run(docs: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="watcher-latency-") as tmp:
        with SeaweedS3(data_dir=Path(tmp) / "poll", buckets=(BUCKET,)) as weed:
            rows.append(summary("polling (every 5 s)", await measure(
                seaweed_settings(weed, poll_interval=5), weed.sync_client(), docs)))
        with SeaweedS3(data_dir=Path(tmp) / "hook", buckets=(BUCKET,)) as weed:
            rows.append(summary("webhook `POST /events` (poll every 300 s)", await measure(
                seaweed_settings(weed, poll_interval=300, webhook_token=TOKEN), weed.sync_client(),
                docs, post_event)))
    with moto_with_queue() as (endpoint, queue_url, s3):
        settings = load_settings(s3_endpoint=endpoint, s3_bucket=BUCKET, s3_access_key="bench",
                                 s3_secret_key="bench", s3_region="us-east-1", http_port=0,
                                 http_host="127.0.0.1", log_level="WARNING", poll_interval=300,
                                 sqs_queue_url=queue_url, sqs_endpoint=endpoint)
        rows.append(summary("SQS (moto's S3 → SQS; poll every 300 s)", await measure(settings, s3, docs)))
    print("| discovery | documents | p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.docs))


if __name__ == "__main__":
    main()
