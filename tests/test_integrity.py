"""Exactly the newest version, exactly once, against a real SeaweedFS: exact bytes after
a cut download, a new version uploaded while the old one is read, notifications as hints,
deployments sharing a lease prefix, and stores that ignore conditional deletes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from conftest import (
    CountingEngine,
    GatedEngine,
    daemon_running,
    leftovers,
    make_settings,
    object_exists,
    wait_for_keys,
)
from docgen import make_image
from s3proxy import s3_proxy
from waiting import eventually

from watcher.bucket.names import SOURCE_ETAG_META, Names
from watcher.bucket.storage import PreconditionFailed, StorageUnavailable, open_storage
from watcher.cli.embedded import SeaweedS3
from watcher.pipeline import document as document_module
from watcher.pipeline.settle import Settled

TOKEN = "integrity-hook-token"


def result_of(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    return dict(json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def etag_of(s3: Any, bucket: str, key: str) -> str:
    return str(s3.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')


def names_source(s3: Any, bucket: str, key: str, etag: str) -> bool:
    """Whether the result JSON at `key` names source ETag `etag`."""
    if not object_exists(s3, bucket, key):
        return False
    return bool(s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(SOURCE_ETAG_META) == etag)


async def wait_for_result_of(s3: Any, bucket: str, key: str, etag: str, timeout: float = 120) -> None:
    await eventually(lambda: names_source(s3, bucket, key, etag), timeout, f"{key} to name {etag}", 0.3)


async def test_a_download_cut_off_half_way_is_fetched_again_whole(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    body = make_image(["Whole bytes only"], "PNG")
    s3.put_object(Bucket=bucket, Key="input/long.png", Body=body)
    cuts = {"left": 1}

    def cut_once(path: str) -> bool:
        if path.endswith("/input/long.png") and cuts["left"]:
            cuts["left"] -= 1
            return True
        return False

    async with s3_proxy(weed, cut=cut_once) as (endpoint, log):
        settings = make_settings(weed, bucket, s3_endpoint=endpoint)
        async with daemon_running(settings):
            await wait_for_keys(s3, bucket, ["output/long.png.json"])
    assert log.cut == [f"/{bucket}/input/long.png"]
    result = result_of(s3, bucket, "output/long.png.json")
    assert result["source"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert result["source"]["size"] == len(body)
    assert "WHOLE BYTES ONLY" in result["markdown"].upper()


@pytest.mark.parametrize("action", ["keep", "move", "delete"])
async def test_a_version_uploaded_while_the_last_is_read_ends_with_its_own_result(
    weed: SeaweedS3, bucket: str, s3: Any, action: str
) -> None:
    s3.put_object(Bucket=bucket, Key="input/contract.png", Body=make_image(["Version one"], "PNG"))
    engine = GatedEngine()
    settings = make_settings(weed, bucket, source_action=action)
    async with daemon_running(settings, engine):
        await asyncio.wait_for(engine.entered.wait(), 60)
        # v1 is in the engine: v2 arrives.
        v2 = make_image(["Version two"], "PNG")
        s3.put_object(Bucket=bucket, Key="input/contract.png", Body=v2)
        v2_etag = hashlib.md5(v2).hexdigest()
        engine.gate.set()
        await wait_for_result_of(s3, bucket, "output/contract.png.json", v2_etag)
        if action != "keep":
            await wait_for_gone(s3, bucket, "input/contract.png")
    result = result_of(s3, bucket, "output/contract.png.json")
    assert "VERSION TWO" in result["markdown"].upper()
    if action == "keep":
        assert etag_of(s3, bucket, "input/contract.png") == v2_etag
    elif action == "move":
        # What was moved is v2, and only once it had its result.
        assert s3.get_object(Bucket=bucket, Key="done/contract.png")["Body"].read() == v2
    assert not object_exists(s3, bucket, "input/contract.png") or action == "keep"
    assert leftovers(s3, bucket) == []


@pytest.mark.parametrize("action", ["move", "delete"])
async def test_a_version_uploaded_between_the_result_and_the_settle_is_left_alone(
    weed: SeaweedS3, bucket: str, s3: Any, action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put_object(Bucket=bucket, Key="input/late.png", Body=make_image(["Version one"], "PNG"))
    v2 = make_image(["Version two"], "PNG")
    real_settle = document_module.settle
    uploaded = []

    async def upload_first(storage: Any, names: Names, ref: Any, source_action: Any) -> Settled:
        if not uploaded:  # v1 has its result; v2 lands before v1 is moved or deleted
            uploaded.append(ref.etag)
            s3.put_object(Bucket=bucket, Key="input/late.png", Body=v2)
        return await real_settle(storage, names, ref, source_action)

    monkeypatch.setattr(document_module, "settle", upload_first)
    engine = CountingEngine()
    async with daemon_running(make_settings(weed, bucket, source_action=action), engine):
        await wait_for_result_of(s3, bucket, "output/late.png.json", hashlib.md5(v2).hexdigest())
        await wait_for_gone(s3, bucket, "input/late.png")
    assert len(engine.calls) == 2  # v2 was read, not moved or deleted unread
    assert "VERSION TWO" in result_of(s3, bucket, "output/late.png.json")["markdown"].upper()
    if action == "move":
        assert s3.get_object(Bucket=bucket, Key="done/late.png")["Body"].read() == v2


async def wait_for_gone(s3: Any, bucket: str, key: str, timeout: float = 60) -> None:
    await eventually(lambda: not object_exists(s3, bucket, key), timeout, f"{key} to be gone", 0.3)


async def post_event(port: int, body: bytes, chunked: bool = False) -> tuple[int, dict[str, Any]]:
    async def pieces() -> Any:
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{port}/events", data=pieces() if chunked else body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    ) as resp:
        return resp.status, await resp.json(content_type=None)


def record(bucket: str, key: str, etag: str, size: Any) -> dict[str, Any]:
    return {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": etag, "size": size}}}


async def test_the_webhook_reads_whole_bodies_chunked_or_in_pieces(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    body = make_image(["Chunked delivery"], "PNG")
    s3.put_object(Bucket=bucket, Key="input/chunked.png", Body=body)
    padding = [record("another-bucket", f"input/p{n}.png", "0" * 32, 1) for n in range(1500)]
    event = json.dumps({"Records": [*padding, record(bucket, "input/chunked.png",
                                                      hashlib.md5(body).hexdigest(), len(body))]}).encode()
    assert len(event) > 200_000
    settings = make_settings(weed, bucket, webhook_token=TOKEN, poll_interval=300,
                             webhook_max_bytes=300_000)
    async with daemon_running(settings, CountingEngine()) as daemon:
        await daemon.wait_polls(1, timeout=30)
        status, answer = await post_event(daemon.http.port, event, chunked=True)
        assert (status, answer["accepted"], answer["ignored"]) == (200, 1, 1500)
        await wait_for_keys(s3, bucket, ["output/chunked.png.json"])
        # Sent in two pieces with a pause between: the second piece is read too.
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.http.port)
        small = json.dumps({"Records": [record(bucket, "input/chunked.png", "1" * 32, 5)]}).encode()
        head = (f"POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(small)}\r\n"
                "Connection: close\r\n\r\n").encode()
        writer.write(head + small[:10])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(small[10:])
        await writer.drain()
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["accepted"] == 1
        # Over the limit, chunked or not: 413, whatever the sender claims.
        too_big = json.dumps({"Records": padding * 2}).encode()
        assert (await post_event(daemon.http.port, too_big, chunked=True))[0] == 413
        assert (await post_event(daemon.http.port, too_big))[0] == 413


async def test_malformed_events_get_400_and_never_poison_a_valid_copy(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    body = make_image(["After the bad copies"], "PNG")
    s3.put_object(Bucket=bucket, Key="input/later.png", Body=body)
    etag = hashlib.md5(body).hexdigest()
    settings = make_settings(weed, bucket, webhook_token=TOKEN, poll_interval=300)
    async with daemon_running(settings, CountingEngine()) as daemon:
        await daemon.wait_polls(1, timeout=30)
        port = daemon.http.port
        nested = b'{"Records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        huge = f'{{"Records": [{{"s3": {{"object": {{"size": {"9" * 5000}}}}}}}]}}'.encode()
        for bad in (nested, huge, b"\xff\xfe not json", b'{"Records": 5}'):
            status, answer = await post_event(port, bad)
            assert status == 400 and "error" in answer, (status, answer)
        # A copy that names the key with an absurd size: accepted, the size is a hint.
        absurd = json.dumps({"Records": [record(bucket, "input/later.png", etag, 1)]}).encode()
        absurd = absurd.replace(b'"size": 1', b'"size": 1e400')
        status, answer = await post_event(port, absurd)
        assert (status, answer["accepted"]) == (200, 1)
        # Keys no object can have are refused, with the reason, and not retried.
        for raw in ("input/%FF%FE.png", "input/a%00b.png"):
            status, answer = await post_event(port, json.dumps(
                {"Records": [record(bucket, raw, "2" * 32, 10)]}).encode())
            assert status == 200 and answer["accepted"] == 0 and len(answer["refused"]) == 1, answer
        await wait_for_keys(s3, bucket, ["output/later.png.json"])
    assert result_of(s3, bucket, "output/later.png.json")["source"]["size"] == len(body)


@pytest.mark.parametrize("hint", [0, None, 10**12])
async def test_a_notifications_size_is_a_hint_never_evidence(
    weed: SeaweedS3, bucket: str, s3: Any, hint: int | None
) -> None:
    body = make_image(["Real content"], "PNG")
    s3.put_object(Bucket=bucket, Key="input/hinted.png", Body=body)
    settings = make_settings(weed, bucket, webhook_token=TOKEN, poll_interval=300,
                             max_object_bytes=len(body) * 4)
    async with daemon_running(settings, CountingEngine()) as daemon:
        await daemon.wait_polls(1, timeout=30)
        event = record(bucket, "input/hinted.png", hashlib.md5(body).hexdigest(), hint)
        if hint is None:
            del event["s3"]["object"]["size"]
        status, _answer = await post_event(daemon.http.port, json.dumps({"Records": [event]}).encode())
        assert status == 200
        await wait_for_keys(s3, bucket, ["output/hinted.png.json"])
    assert not object_exists(s3, bucket, "output/hinted.png.error.json")
    assert result_of(s3, bucket, "output/hinted.png.json")["source"]["size"] == len(body)


async def test_two_deployments_sharing_a_lease_prefix_keep_to_their_own_prefixes(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="a/in/first.png", Body=make_image(["Deployment A"], "PNG"))
    s3.put_object(Bucket=bucket, Key="b/in/second.png", Body=make_image(["Deployment B"], "PNG"))
    first = make_settings(weed, bucket, input_prefix="a/in/", output_prefix="a/out/",
                          done_prefix="a/done/", replica_id="a-1")
    second = make_settings(weed, bucket, input_prefix="b/in/", output_prefix="b/out/",
                           done_prefix="b/done/", replica_id="b-1")
    async with daemon_running(first) as one, daemon_running(second) as two:
        await wait_for_keys(s3, bucket, ["a/out/first.png.json", "b/out/second.png.json"])
        await one.wait_polls(one.polls + 2, timeout=30)
        await two.wait_polls(two.polls + 2, timeout=30)
        # Each lists for its own deployment: both are listers, neither follows the other.
        assert one.fleet is not None and two.fleet is not None
        assert (one.fleet.lister, two.fleet.lister) == ("a-1", "b-1")
    outputs = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
                     if "/out/" in o["Key"])
    assert outputs == ["a/out/first.png.json", "a/out/first.png.md",
                       "b/out/second.png.json", "b/out/second.png.md"]
    assert Names.from_settings(first).fleet_prefix != Names.from_settings(second).fleet_prefix


async def test_a_settle_cut_off_after_the_marker_is_finished_by_the_next_poll(
    weed: SeaweedS3, bucket: str, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put_object(Bucket=bucket, Key="input/moved.png", Body=make_image(["Move me"], "PNG"))
    real_settle = document_module.settle
    failures = {"left": 1}

    async def away_once(*args: Any) -> Settled:
        if failures["left"]:
            failures["left"] -= 1
            raise StorageUnavailable("S3 delete failed: connection refused")
        return await real_settle(*args)

    monkeypatch.setattr(document_module, "settle", away_once)
    engine = CountingEngine()
    async with daemon_running(make_settings(weed, bucket, source_action="move"), engine):
        await wait_for_gone(s3, bucket, "input/moved.png")
    assert failures["left"] == 0
    assert object_exists(s3, bucket, "done/moved.png") and object_exists(s3, bucket, "output/moved.png.json")
    assert len(engine.calls) == 1  # read once; only the settling was done again


async def test_markers_of_settled_sources_are_removed(
    weed: SeaweedS3, bucket: str, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("watcher.intake.discovery.ORPHAN_MARKER_SLACK_SECONDS", 0.0)
    s3.put_object(Bucket=bucket, Key="input/gone.png", Body=make_image(["Deleted after"], "PNG"))
    settings = make_settings(weed, bucket, source_action="delete")
    names = Names.from_settings(settings)
    async with daemon_running(settings) as daemon:
        await wait_for_gone(s3, bucket, "input/gone.png")
        await daemon.wait_polls(daemon.polls + 3, timeout=30)
    assert s3.list_objects_v2(Bucket=bucket, Prefix=names.markers_prefix).get("KeyCount", 0) == 0
    assert object_exists(s3, bucket, "output/gone.png.json")  # results outlive their source


async def test_a_store_that_ignores_conditional_deletes_and_copies_is_compared_first(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    async with s3_proxy(weed, ignore=frozenset({"delete", "copy"})) as (endpoint, log):
        settings = make_settings(weed, bucket, s3_endpoint=endpoint, source_action="move")
        async with open_storage(settings) as storage:
            conditions = await storage.probe_conditions(settings.lease_prefix)
            assert (conditions.put, conditions.delete, conditions.copy) == (True, False, False)
            old = await storage.put("input/replaced.png", b"old", "image/png")
            await storage.put("input/replaced.png", b"new", "image/png")
            # The compare keeps the newer version that an ignored If-Match would have lost.
            with pytest.raises(PreconditionFailed):
                await storage.delete("input/replaced.png", if_match=old)
            with pytest.raises(PreconditionFailed):
                await storage.copy("input/replaced.png", "done/replaced.png", if_match=old)
            assert s3.get_object(Bucket=bucket, Key="input/replaced.png")["Body"].read() == b"new"
            await storage.delete("input/replaced.png")
        s3.put_object(Bucket=bucket, Key="input/x.png", Body=make_image(["Compared first"], "PNG"))
        async with daemon_running(settings) as daemon:
            await wait_for_gone(s3, bucket, "input/x.png")
            probe = daemon.status.health()["claims"]["probe"]
    assert "ignores If-Match on DELETE and CopySourceIfMatch on copy" in probe
    assert object_exists(s3, bucket, "done/x.png") and object_exists(s3, bucket, "output/x.png.json")
    assert log.stripped  # the probe's conditions did reach the proxy and were dropped
