"""Restarts and replicas: nothing lost, nothing done twice (engine calls counted)."""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from typing import Any

from conftest import CountingEngine, daemon_running, leftovers, lenient_store, make_settings, wait_for_keys
from docgen import make_image, make_pdf
from waiting import eventually

from watcher.cli.embedded import SeaweedS3
from watcher.core.pages import PageResult, RenderedPage
from watcher.service.daemon import Daemon, running


def upload_batch(s3: Any, bucket: str, count: int) -> list[str]:
    rels = []
    for i in range(count):
        rel = f"batch/doc-{i:02d}.pdf"
        s3.put_object(Bucket=bucket, Key=f"input/{rel}",
                      Body=make_pdf([[f"Batch document {i}", "first page"], ["second page"]]))
        rels.append(rel)
    return rels


def result_keys(rels: list[str]) -> list[str]:
    return [f"output/{rel}.json" for rel in rels]


def count_results(s3: Any, bucket: str) -> int:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="output/batch/")
    return sum(1 for o in listing.get("Contents", []) if o["Key"].endswith(".json"))


async def test_restart_in_the_middle_of_a_batch(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    rels = upload_batch(s3, bucket, 6)
    settings = make_settings(weed, bucket, max_inflight_documents=2)
    first = CountingEngine()
    async with daemon_running(settings, first):
        await eventually(lambda: asyncio.to_thread(lambda: count_results(s3, bucket) >= 2), 120,
                         "two results", every=0.1)
        # Leaving the block sends the stop: in-flight documents finish within the drain.
    done_after_first = await asyncio.to_thread(count_results, s3, bucket)
    assert 2 <= done_after_first < len(rels), "the restart must land mid-batch"
    assert len(first.calls) == 2 * done_after_first  # in-flight work was finished, not dropped
    stamps = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]}

    second = CountingEngine()
    async with daemon_running(settings, second):
        await wait_for_keys(s3, bucket, result_keys(rels))
    assert len(first.calls) + len(second.calls) == 2 * len(rels)  # every page exactly once
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]}
    assert all(after[k] == v for k, v in stamps.items())  # the first run's results untouched
    assert leftovers(s3, bucket) == []


async def test_a_cut_off_drain_releases_its_lease_and_the_next_start_resumes(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/long.pdf",
                  Body=make_pdf([[f"Long document page {i}"] for i in range(12)]))
    settings = make_settings(weed, bucket, drain_seconds=0, page_concurrency=1)
    first = CountingEngine()
    async with daemon_running(settings, first):
        await eventually(lambda: len(first.calls) >= 5, 120, "five pages recognised", every=0.05)
    # No grace: the document was cancelled mid-way, its lease deleted, nothing published,
    # but the pages already recognised were kept.
    assert s3.list_objects_v2(Bucket=bucket, Prefix="output/").get("KeyCount", 0) == 0
    internal = leftovers(s3, bucket)
    assert not [k for k in internal if k.endswith(".lease")]
    kept = {int(k.rsplit("/", 1)[1].split(".")[0]) for k in internal if "/_pages/" in k}
    assert len(kept) >= 4 and kept <= set(first.calls)
    second = CountingEngine()
    # With a grace period this time: the run goes on after the result appears (it clears
    # the checkpoints, then the lease), and a drain lets it finish.
    async with daemon_running(settings.model_copy(update={"drain_seconds": 30.0}), second):
        await wait_for_keys(s3, bucket, ["output/long.pdf.json"], timeout=60)
    # Only the pages not kept are recognised again.
    assert sorted(second.calls) == sorted(set(range(12)) - kept)
    result = json.loads(s3.get_object(Bucket=bucket, Key="output/long.pdf.json")["Body"].read())
    texts = [" ".join(b["text"] for b in p["blocks"]) for p in result["pages"]]
    assert [p["index"] for p in result["pages"]] == list(range(12))
    assert all(f"page {i}" in t for i, t in enumerate(texts)), texts
    # Published: checkpoints and lease are gone.
    assert leftovers(s3, bucket) == []


async def test_two_replicas_share_a_backlog_without_doing_anything_twice(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    rels = upload_batch(s3, bucket, 6)
    engines = [CountingEngine(), CountingEngine()]
    async with (
        daemon_running(make_settings(weed, bucket, replica_id="replica-a"), engines[0]),
        daemon_running(make_settings(weed, bucket, replica_id="replica-b"), engines[1]),
    ):
        await wait_for_keys(s3, bucket, result_keys(rels))
    assert len(engines[0].calls) + len(engines[1].calls) == 2 * len(rels)
    assert engines[0].calls and engines[1].calls  # both replicas did real work


async def test_a_live_lease_is_respected_and_an_expired_one_taken_over(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/held.png", Body=make_image(["Held elsewhere"], "PNG"))
    s3.put_object(Bucket=bucket, Key="input/stale.png", Body=make_image(["Stale lease"], "PNG"))
    now = time.time()
    for rel, expires in (("held.png", now + 3600), ("stale.png", now - 5)):
        lease = {"owner": "crashed-replica", "source_key": f"input/{rel}", "expires_at": expires}
        s3.put_object(Bucket=bucket, Key=f".watcher/leases/input/{rel}.lease", Body=json.dumps(lease))
    engine = CountingEngine()
    settings = make_settings(weed, bucket, replica_id="replica-c")
    daemon = Daemon(settings, engine=engine)
    async with running(daemon):
        await wait_for_keys(s3, bucket, ["output/stale.png.json"])
        await daemon.wait_polls(daemon.polls + 3, timeout=30)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]}
    assert "output/held.png.json" not in keys
    assert len(engine.calls) == 1
    # The held lease is untouched; the stale one was taken over, then released.
    leases = set(leftovers(s3, bucket))
    assert leases == {".watcher/leases/input/held.png.lease"}


async def test_shard_mode_splits_keys_between_replicas(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    rels = upload_batch(s3, bucket, 6)
    engines = [CountingEngine(), CountingEngine()]
    async with (
        daemon_running(make_settings(weed, bucket, claim_mode="shard", shard_count=2,
                                     shard_index=0), engines[0]),
        daemon_running(make_settings(weed, bucket, claim_mode="shard", shard_count=2,
                                     shard_index=1), engines[1]),
    ):
        await wait_for_keys(s3, bucket, result_keys(rels))
    assert len(engines[0].calls) + len(engines[1].calls) == 2 * len(rels)
    assert leftovers(s3, bucket) == []


class LivePageTracker(CountingEngine):
    """The real CPU engine, tracking how many rendered pages are alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.alive = 0
        self.max_alive = 0

    def _gone(self) -> None:
        self.alive -= 1

    async def recognise(self, page: RenderedPage) -> PageResult:
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(page.image, self._gone)
        return await super().recognise(page)


async def test_long_pdf_pages_are_rendered_on_demand(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    pages = 30
    s3.put_object(Bucket=bucket, Key="input/long.pdf",
                  Body=make_pdf([[f"Page number {i}"] for i in range(pages)]))
    settings = make_settings(weed, bucket, render_dpi=40, page_concurrency=3)
    engine = LivePageTracker()
    async with daemon_running(settings, engine):
        await wait_for_keys(s3, bucket, ["output/long.pdf.json"], timeout=240)
    assert sorted(engine.calls) == list(range(pages))
    # Memory is bounded by the setting, not by the page count: at most 3 pages in flight,
    # plus one whose bitmap the OCR thread has not let go of yet when the next is rendered.
    assert 2 <= engine.max_alive <= 3 + 1
    result = json.loads(s3.get_object(Bucket=bucket, Key="output/long.pdf.json")["Body"].read())
    assert [p["index"] for p in result["pages"]] == list(range(pages))


async def test_a_store_that_ignores_conditional_writes_gets_shards(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/a.png", Body=make_image(["Sharded anyway"], "PNG"))
    async with lenient_store(weed) as endpoint:
        settings = make_settings(weed, bucket, s3_endpoint=endpoint)
        async with daemon_running(settings) as daemon:
            await wait_for_keys(s3, bucket, ["output/a.png.json"])
            claims = daemon.status.health()["claims"]
            role = daemon.status.health()["discovery"]["role"]
    assert claims["mode"] == "shard" and claims["shard_count"] == 1
    assert role == "alone"  # no lister lease without conditional writes: each shard lists
    assert "ignores If-None-Match and If-Match" in claims["probe"]


async def test_a_store_that_enforces_them_keeps_leases(weed: SeaweedS3, bucket: str) -> None:
    async with daemon_running(make_settings(weed, bucket)) as daemon:
        await daemon.wait_polls(1, timeout=30)
        claims = daemon.status.health()["claims"]
    assert claims["mode"] == "lease" and claims["probe"] == "conditional writes enforced"
