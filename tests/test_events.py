"""`POST /events`: S3 notifications in the real formats of MinIO, Ceph RGW and AWS start
documents at once; bad requests are refused; duplicates and stale deliveries do nothing."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from conftest import CountingEngine, daemon_running, make_settings, wait_for_keys
from docgen import make_image

from watcher.cli.embedded import SeaweedS3

TOKEN = "hook-token-7c1e9b"


def minio(bucket: str, key: str, etag: str, sequencer: str) -> dict[str, Any]:
    # MinIO escapes the key like a query string: "/" as %2F, spaces as "+".
    escaped = key.replace("%", "%25").replace("/", "%2F").replace(" ", "+")
    return {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}", "Records": [{
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
        "eventTime": "2026-12-01T10:00:00.000Z", "eventName": "s3:ObjectCreated:Put",
        "userIdentity": {"principalId": "minio"}, "requestParameters": {"sourceIPAddress": "10.0.0.1"},
        "responseElements": {"x-amz-request-id": "17A"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minio"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": escaped, "size": 100, "eTag": etag, "contentType": "image/png",
                          "userMetadata": {"content-type": "image/png"}, "sequencer": sequencer}},
        "source": {"host": "10.0.0.1", "port": "", "userAgent": "aws-cli"}}]}


def ceph(bucket: str, key: str, etag: str, sequencer: str) -> dict[str, Any]:
    # Ceph RGW sends the key as it is, and eventName without the "s3:" prefix.
    return {"Records": [{
        "eventVersion": "2.2", "eventSource": "ceph:s3", "awsRegion": "default",
        "eventTime": "2026-12-01T10:00:00.000000Z", "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "tester"}, "requestParameters": {"sourceIPAddress": ""},
        "responseElements": {"x-amz-request-id": "abc", "x-amz-id-2": "def"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "watcher",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "tester"},
                          "arn": f"arn:aws:s3:::{bucket}", "id": "b1"},
               "object": {"key": key, "size": 100, "eTag": etag, "versionId": "",
                          "sequencer": sequencer, "metadata": [], "tags": []}},
        "eventId": "1", "opaqueData": ""}]}


def aws(bucket: str, key: str, etag: str, sequencer: str) -> dict[str, Any]:
    # AWS URL-encodes the key, spaces as "+", slashes kept.
    return {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "eu-central-1",
        "eventTime": "2026-12-01T10:00:00.000Z", "eventName": "ObjectCreated:CompleteMultipartUpload",
        "userIdentity": {"principalId": "AWS:X"}, "requestParameters": {"sourceIPAddress": "1.2.3.4"},
        "responseElements": {"x-amz-request-id": "R", "x-amz-id-2": "I"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "watcher",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "X"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": key.replace(" ", "+"), "size": 100, "eTag": etag,
                          "sequencer": sequencer}}}]}


async def post(url: str, body: Any, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers=headers) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


async def test_notifications_start_documents_without_waiting_for_a_poll(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    engine = CountingEngine()
    # The poll runs once at start and then not for five minutes: only events can start work.
    settings = make_settings(weed, bucket, poll_interval=300, webhook_token=TOKEN)
    async with daemon_running(settings, engine) as daemon:
        await daemon.wait_polls(1, timeout=30)
        url = f"http://127.0.0.1:{daemon.http.port}/events"
        senders = {"input/from minio.png": minio, "input/ceph+plus.png": ceph, "input/from aws.png": aws}
        bodies = []
        for n, (key, sender) in enumerate(senders.items()):
            s3.put_object(Bucket=bucket, Key=key, Body=make_image([f"Event number {n}"], "PNG"))
            etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
            bodies.append(sender(bucket, key, etag, f"00000000000000000{n + 2}"))
            status, answer = await post(url, bodies[-1])
            assert (status, answer) == (200, {"accepted": 1, "ignored": 0}), (key, answer)
        await wait_for_keys(s3, bucket, [f"output/{k[len('input/'):]}.json" for k in senders], timeout=60)
        assert daemon.polls == 1
        # At least once, out of order: a repeat or an older delivery is dropped on arrival.
        for body in bodies:
            assert await post(url, body) == (200, {"accepted": 0, "ignored": 1})
        key = "input/from minio.png"
        stale = minio(bucket, key, "0123456789abcdef0123456789abcdef", "000000000000000001")
        assert await post(url, stale) == (200, {"accepted": 0, "ignored": 1})
    assert sorted(engine.calls) == [0, 0, 0]


async def test_bad_requests_are_refused_and_foreign_records_ignored(
    weed: SeaweedS3, bucket: str
) -> None:
    settings = make_settings(weed, bucket, poll_interval=300, webhook_token=TOKEN,
                             webhook_max_bytes=4096)
    async with daemon_running(settings) as daemon:
        url = f"http://127.0.0.1:{daemon.http.port}/events"
        good = aws(bucket, "input/x.png", "e" * 32, "01")
        assert (await post(url, good, token=None))[0] == 401
        assert (await post(url, good, token="wrong"))[0] == 401
        assert (await post(url, b"x" * 5000))[0] == 413
        assert (await post(url, b"{not json"))[0] == 400
        assert (await post(url, {"Records": "nope"}))[0] == 400
        foreign = [aws("another-bucket", "input/x.png", "e" * 32, "02"),
                   aws(bucket, "elsewhere/x.png", "e" * 32, "03"),
                   aws(bucket, "input/folder/", "e" * 32, "04")]
        removed = aws(bucket, "input/x.png", "e" * 32, "05")
        removed["Records"][0]["eventName"] = "ObjectRemoved:Delete"
        records = [r for body in [*foreign, removed] for r in body["Records"]]
        assert await post(url, {"Records": records}) == (200, {"accepted": 0, "ignored": 4})
        test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": bucket}
        assert await post(url, test_event) == (200, {"accepted": 0, "ignored": 0})
        health_url = f"http://127.0.0.1:{daemon.http.port}/health"
        async with aiohttp.ClientSession() as http, http.get(health_url) as r:
            status, health = r.status, await r.json()
        assert status == 200 and TOKEN not in json.dumps(health)


async def test_without_a_token_there_is_no_endpoint(weed: SeaweedS3, bucket: str) -> None:
    async with daemon_running(make_settings(weed, bucket)) as daemon:
        status, _ = await post(f"http://127.0.0.1:{daemon.http.port}/events", {"Records": []})
    assert status in (404, 405)
