"""Faults found under abuse (kill -9, outages, tricky keys, floods), each reproduced here
against SeaweedFS with the real CPU engine."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from conftest import CountingEngine, daemon_running, leftovers, make_settings, object_exists, wait_for_keys
from docgen import make_image
from waiting import eventually

from watcher.bucket.leases import LeaseRecord
from watcher.bucket.names import Names, key_fits
from watcher.cli.embedded import SeaweedS3
from watcher.core.pages import PageResult, RenderedPage
from watcher.core.refs import ObjectRef


def metric(daemon: Any, outcome: str) -> float:
    value: float = daemon.metrics.documents.labels(outcome)._value.get()
    return value


async def test_names_the_store_refuses_are_reported_once_and_workers_live_on(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    # SeaweedFS, like other filer-backed stores, refuses path segments over 255 bytes.
    too_long = "input/" + "a" * 251 + ".png"  # its result name would be 260 bytes
    long_ok = "input/" + "b" * 244 + ".png"  # result fits; its error record would not
    long_bad = "input/" + "c" * 244 + ".txt"  # unsupported: the error record cannot be named
    for key, body in ((too_long, make_image(["Too long"], "PNG")),
                      (long_ok, make_image(["Long but fine"], "PNG")),
                      (long_bad, b"plain text, not a document"),
                      ("input/ok.png", make_image(["Short name"], "PNG"))):
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    settings = make_settings(weed, bucket, poll_interval=0.2)
    names = Names.from_settings(settings)
    assert not key_fits(f".watcher/leases/{too_long}.lease")
    assert names.lease(too_long).startswith(".watcher/leases/_sha256/")
    async with daemon_running(settings) as daemon:
        await wait_for_keys(s3, bucket, ["output/ok.png.json", names.result_json(long_ok)])
        polls = daemon.polls
        await daemon.wait_polls(polls + 5, timeout=30)  # several more offers of the same keys
        assert metric(daemon, "refused") == 2  # each said once, never a loop
        # Both workers are alive and take new work.
        s3.put_object(Bucket=bucket, Key="input/later.png", Body=make_image(["Later"], "PNG"))
        await wait_for_keys(s3, bucket, ["output/later.png.json"])
        assert metric(daemon, "refused") == 2
        assert daemon.workers_down() == 0
    assert not object_exists(s3, bucket, names.error_json(long_ok))
    assert leftovers(s3, bucket) == []


async def test_a_worker_loop_that_ends_is_restarted(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    settings = make_settings(weed, bucket, max_inflight_documents=1)
    async with daemon_running(settings) as daemon:
        await asyncio.wait_for(daemon.started.wait(), 30)
        assert daemon.pool is not None
        real_wait = daemon.pool.ready
        broken = {"left": 1}

        async def wait_then_break() -> None:
            await real_wait()
            if broken["left"]:
                broken["left"] -= 1
                raise RuntimeError("a bug outside any document")

        daemon.pool.ready = wait_then_break
        # The only worker finishes this document, then its loop breaks on the next turn.
        s3.put_object(Bucket=bucket, Key="input/first.png", Body=make_image(["First"], "PNG"))
        await wait_for_keys(s3, bucket, ["output/first.png.json"])
        await eventually(lambda: daemon.metrics.worker_restarts._value.get() == 1, 10, "a worker restart")
        assert daemon.metrics.worker_restarts._value.get() == 1
        # The restarted loop is the one that does the next document.
        s3.put_object(Bucket=bucket, Key="input/after.png", Body=make_image(["After"], "PNG"))
        await wait_for_keys(s3, bucket, ["output/after.png.json"])
        assert daemon.workers_down() == 0


class GatedEngine(CountingEngine):
    """The real CPU engine, recording the first words of each page in the order read; its
    first page waits for `gate`, so the test decides what is queued when that one ends."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.gate = asyncio.Event()

    async def recognise(self, page: RenderedPage) -> PageResult:
        if not self.order and not self.gate.is_set():
            self.order.append("(waiting)")
            await self.gate.wait()
            self.order.pop()
        result = await super().recognise(page)
        self.order.append(" ".join(b.text for b in result.blocks[:1]))
        return result


async def test_a_crashed_replicas_document_is_taken_over_when_its_lease_expires_not_last(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    engine = GatedEngine()
    # One poll only (it is poked): without the timed retry the orphan would wait for the
    # next listing, behind everything that poll found.
    settings = make_settings(weed, bucket, max_inflight_documents=1, poll_interval=300)
    async with daemon_running(settings, engine) as daemon:
        urgent: list[str] = []
        offer_urgent = daemon.queue.offer_urgent

        def spy(ref: ObjectRef) -> bool:
            urgent.append(ref.key)
            return offer_urgent(ref)

        daemon.queue.offer_urgent = spy  # type: ignore[method-assign]
        s3.put_object(Bucket=bucket, Key="input/crashed.png", Body=make_image(["Orphan document"], "PNG"))
        newer = 6
        for n in range(newer):
            s3.put_object(Bucket=bucket, Key=f"input/newer-{n}.png",
                          Body=make_image([f"Newer document {n}"], "PNG"))
        # A replica died while holding the oldest: its lease runs out in a few seconds.
        lease = LeaseRecord(owner="dead-replica", source_key="input/crashed.png", source_etag="x",
                            expires_at=time.time() + 5, host="another-host", pid=1, incarnation="gone")
        s3.put_object(Bucket=bucket, Key=".watcher/leases/input/crashed.png.lease", Body=lease.encode())
        daemon.poke()
        # The orphan is met first (oldest), held; the only worker goes on to the next
        # document, whose page waits; meanwhile the lease runs out and the orphan is
        # offered again through the urgent lane.
        await eventually(lambda: "input/crashed.png" in urgent, 60,
                         "the orphan offered again once its lease ran out")
        assert engine.order == ["(waiting)"]
        engine.gate.set()
        await wait_for_keys(s3, bucket, ["output/crashed.png.json",
                                         *(f"output/newer-{n}.png.json" for n in range(newer))])
    # Read right after the page that was under way, ahead of the newer work still queued.
    assert len(engine.order) == newer + 1 and "ORPHAN" in engine.order[1].upper(), engine.order


async def test_an_error_record_and_a_result_never_share_a_name(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/y.png", Body=b"\x89PNG\r\n\x1a\n broken")
    s3.put_object(Bucket=bucket, Key="input/y.png.error", Body=make_image(["Shadow"], "PNG"))
    s3.put_object(Bucket=bucket, Key="input/z.png.error", Body=make_image(["Alone"], "PNG"))
    engine = CountingEngine()
    settings = make_settings(weed, bucket, poll_interval=0.2)
    async with daemon_running(settings, engine) as daemon:
        await wait_for_keys(s3, bucket, ["output/y.png.error.json", "output/y.png.error.error.json",
                                         "output/z.png.error.json"])
        await daemon.wait_polls(daemon.polls + 10, timeout=30)
        processed = metric(daemon, "done") + metric(daemon, "error")
    assert processed == 3  # each once, then left alone: no reprocessing loop

    def record(key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        return data

    y = record("output/y.png.error.json")
    assert y["source"]["key"] == "input/y.png" and y["error"]["code"] == "corrupt"
    shadow = record("output/y.png.error.error.json")
    assert shadow["source"]["key"] == "input/y.png.error"
    assert shadow["error"]["code"] == "name_collision" and "rename" in shadow["error"]["message"]
    # Without a sibling, a name ending in .error is an ordinary document.
    assert record("output/z.png.error.json")["source"]["key"] == "input/z.png.error"
    assert len(engine.calls) == 1
