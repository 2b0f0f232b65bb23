"""Listing that stays cheap: one lister per fleet, a manifest for the others, a paced budget."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from conftest import CountingEngine, daemon_running, leftovers, make_settings, wait_for_keys
from docgen import make_image
from test_events import TOKEN, aws, post
from waiting import eventually

from watcher.bucket import storage as storage_module
from watcher.bucket.names import Names
from watcher.bucket.storage import UNCHANGED, ListPace, open_storage
from watcher.cli.embedded import SeaweedS3
from watcher.core.refs import ObjectRef
from watcher.core.settings import load_settings
from watcher.intake.discovery import Discovery
from watcher.intake.fleet import Role, decode_manifest, encode_manifest
from watcher.service.daemon import Daemon

# The defaults: input/, output/, .watcher/leases/.
_NAMES = Names("input/", "output/", ".watcher/leases/", "done/")
LISTER_LEASE = _NAMES.lease(_NAMES.lister_key)


def list_requests(daemon: Daemon) -> float:
    return daemon.metrics.s3_requests.labels("list")._value.get()  # type: ignore[no-any-return]


async def wait_role(daemon: Daemon, role: Role, timeout: float = 30) -> None:
    await eventually(lambda: daemon.fleet is not None and daemon.fleet.role is role, timeout, f"the {role}")


async def test_one_replica_lists_for_the_fleet_and_hands_over_when_it_stops(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    for n in range(4):
        s3.put_object(Bucket=bucket, Key=f"input/a{n}.png", Body=make_image([f"Fleet {n}"], "PNG"))
    first_settings = make_settings(weed, bucket, replica_id="replica-a")
    second_settings = make_settings(weed, bucket, replica_id="replica-b")
    async with daemon_running(first_settings) as first:
        await wait_role(first, Role.LISTER)
        async with daemon_running(second_settings) as second:
            await wait_role(second, Role.FOLLOWER)
            await wait_for_keys(s3, bucket, [f"output/a{n}.png.json" for n in range(4)])
            lists_before = list_requests(second)
            polls = second.polls
            for n in range(4, 8):
                s3.put_object(Bucket=bucket, Key=f"input/a{n}.png", Body=make_image([f"Fleet {n}"], "PNG"))
            await wait_for_keys(s3, bucket, [f"output/a{n}.png.json" for n in range(8)])
            await second.wait_polls(polls + 3, timeout=30)
            # The follower polled, read the manifest, and listed nothing itself.
            assert list_requests(second) == lists_before
            assert second.fleet is not None and second.fleet.lister == "replica-a"
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{second.http.port}/health") as resp:
                discovery = (await resp.json())["discovery"]
            assert discovery["role"] == "follower" and discovery["lister"] == "replica-a"
            # The lister drains: it hands the lease over, and the follower lists from its next poll.
            first.request_stop()
            await wait_role(second, Role.LISTER, timeout=30)
            s3.put_object(Bucket=bucket, Key="input/after.png", Body=make_image(["After"], "PNG"))
            await wait_for_keys(s3, bucket, ["output/after.png.json"])
            assert list_requests(second) > lists_before
    assert leftovers(s3, bucket) == []


async def test_a_dead_listers_lease_is_taken_over_when_it_expires(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    # A lister that was killed (nothing released): its lease names a replica on another host.
    s3.put_object(Bucket=bucket, Key=LISTER_LEASE, Body=json.dumps({
        "owner": "replica-dead", "source_key": _NAMES.lister_key, "source_etag": "fleet",
        "expires_at": 0, "host": "elsewhere", "pid": 1}).encode())
    s3.put_object(Bucket=bucket, Key="input/x.png", Body=make_image(["Taken over"], "PNG"))
    async with daemon_running(make_settings(weed, bucket)) as daemon:
        await wait_for_keys(s3, bucket, ["output/x.png.json"])
        assert daemon.fleet is not None and daemon.fleet.role is Role.LISTER


async def test_shard_mode_and_once_list_alone(weed: SeaweedS3, bucket: str) -> None:
    daemon = Daemon(make_settings(weed, bucket, claim_mode="shard"), engine=CountingEngine())
    async with open_storage(daemon.settings) as storage:
        assert daemon.build_discovery(storage).role is Role.ALONE
    daemon = Daemon(make_settings(weed, bucket), engine=CountingEngine(), once=True)
    async with open_storage(daemon.settings) as storage:
        assert daemon.build_discovery(storage).role is Role.ALONE


async def test_the_manifest_is_read_only_when_it_changed(weed: SeaweedS3, bucket: str) -> None:
    settings = make_settings(weed, bucket)
    async with open_storage(settings) as storage:
        requests: list[str] = []
        storage.on_request = requests.append
        assert await storage.get_if_changed("m.json", None) is None
        refs = [ObjectRef(bucket, f"input/{n}.pdf", f"etag{n}", n) for n in range(3)]
        etag = await storage.put("m.json", encode_manifest("me", refs), "application/json")
        got = await storage.get_if_changed("m.json", None)
        assert got is not None and got is not UNCHANGED
        body, seen = got
        assert seen == etag and decode_manifest(bucket, body) == refs
        assert await storage.get_if_changed("m.json", etag) is UNCHANGED
        assert requests == ["get", "put", "get", "get"]
    assert decode_manifest(bucket, b"{not json") == []


async def test_list_requests_are_paced_to_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # Time is the loop's: the pace asks to sleep so that requests keep 1/rate apart.
    slept: list[float] = []
    now = [100.0]

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(storage_module.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: now[0])
    pace = ListPace(4.0)
    for _ in range(5):
        await pace.wait()
    assert slept == [0.25, 0.25, 0.25, 0.25]
    slept.clear()
    now[0] += 10  # a long pause owes nothing
    await pace.wait()
    assert slept == []
    unpaced = ListPace(None)
    await unpaced.wait()
    assert slept == []


async def test_the_budget_paces_a_real_listing(weed: SeaweedS3, bucket: str, s3: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(6):
        s3.put_object(Bucket=bucket, Key=f"input/p{n}", Body=b"x")
    paces: list[float] = []
    real_wait = ListPace.wait

    async def counted(self: ListPace) -> None:
        paces.append(self.gap)
        await real_wait(self)

    monkeypatch.setattr(ListPace, "wait", counted)
    settings = make_settings(weed, bucket, list_requests_per_second=50, shard_count=2,
                             shard_index=0, claim_mode="shard")
    daemon = Daemon(settings, engine=CountingEngine())
    async with open_storage(settings) as storage:
        storage.list_page_size = 2
        daemon.build_discovery(storage)
        keys = [ref.key async for ref in storage.list_objects("input/")]
    assert len(keys) == 6
    # Three pages, each paced; two shards share the budget: 25 requests/s each.
    assert paces == [pytest.approx(1 / 25)] * 3
    assert list_requests(daemon) == 3


async def test_the_poll_finds_what_notifications_missed(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    engine = CountingEngine()
    settings = make_settings(weed, bucket, poll_interval=2, webhook_token=TOKEN)
    async with daemon_running(settings, engine) as daemon:
        await daemon.wait_polls(1, timeout=30)
        url = f"http://127.0.0.1:{daemon.http.port}/events"
        keys = [f"input/n{n}.png" for n in range(4)]
        for n, key in enumerate(keys):
            s3.put_object(Bucket=bucket, Key=key, Body=make_image([f"Notified {n}"], "PNG"))
            if n % 2 == 0:  # every other notification is lost on its way
                etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
                assert (await post(url, aws(bucket, key, etag, f"0{n + 1}")))[0] == 200
        await wait_for_keys(s3, bucket, [f"output/n{n}.png.json" for n in range(4)], timeout=60)
        polls = daemon.polls
        await daemon.wait_polls(polls + 2, timeout=30)
    # Notified or listed, each document ran once.
    assert sorted(engine.calls) == [0, 0, 0, 0]


class LeaseStore:
    """In memory: sources, markers and leases as discovery lists them, with their ages."""

    def __init__(self, objects: dict[str, float]) -> None:
        self.objects = objects  # key -> last modified (epoch seconds)
        self.deleted: list[str] = []

    async def list_objects(self, prefix: str) -> Any:
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            modified = datetime.fromtimestamp(self.objects[key], UTC)
            yield ObjectRef(bucket="b", key=key, etag="e", size=1, last_modified=modified)

    async def delete(self, key: str, if_match: str | None = None) -> bool:
        self.deleted.append(key)
        return self.objects.pop(key, None) is not None


async def test_leases_left_by_a_dead_replica_on_finished_versions_are_swept() -> None:
    settings = load_settings(s3_endpoint="http://stand-in", s3_bucket="bucket", s3_access_key="a:b",
                             s3_secret_key="s", lease_seconds=60)
    names = Names.from_settings(settings)
    now = time.time()
    old, fresh = now - 4 * 60, now - 30
    store = LeaseStore({
        "input/done.pdf": old, names.marker("input/done.pdf", "e"): old,
        names.lease("input/done.pdf"): old,  # its holder published, then was killed
        "input/busy.pdf": old, names.marker("input/busy.pdf", "e"): old,
        names.lease("input/busy.pdf"): fresh,  # renewed: someone lives
        "input/failing.pdf": old, names.lease("input/failing.pdf"): old,  # attempts counted, not done
        names.lease("input/deleted.pdf"): old,  # its source is gone
    })
    await Discovery(store, settings, names).scan()  # type: ignore[arg-type]
    assert sorted(store.deleted) == sorted([names.lease("input/done.pdf"),
                                            names.lease("input/deleted.pdf")])
