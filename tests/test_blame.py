"""Only the guilty pay: suspects run alone, and the page that kills is the page that pays.

Pods of the real pipeline (claim, fetch, read page by page, publish) over the in-memory
S3 on virtual time; a pod is killed the way SIGKILL does it (cut off from S3, every task
gone, nothing released, its process gone). The decoder and the engine are in-memory
stand-ins: a page of a "poison" document kills the whole pod while it is decoded (as a
native fault in the daemon or the OOM killer does), or kills the engine's worker every
time it is read. The end-to-end test of the same in a real daemon is in
test_restart_loop.py.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from memory_s3 import MemoryS3
from PIL import Image
from simulation import SeveredClient, VirtualClock, run_virtual

from watcher.bucket.leases import LeaseRecord
from watcher.bucket.names import Names
from watcher.bucket.storage import Storage
from watcher.core.errors import EngineCrashed
from watcher.core.identity import Identity
from watcher.core.metrics import Metrics
from watcher.core.outcome import Report
from watcher.core.pages import Block, PageResult, RenderedPage
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings, load_settings
from watcher.engines.base import Engine
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.decode import Decoder, Document, Format, Limits
from watcher.pipeline.document import DocumentPipeline, Parts
from watcher.pipeline.recognise import DocumentReader
from watcher.pipeline.textlayer import TextLayer

BUCKET = "blame"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"s3_endpoint": "http://memory.invalid", "s3_bucket": BUCKET,
                              "s3_access_key": "t:k", "s3_secret_key": "s", "lease_seconds": 30,
                              "replica_id": "pod", "page_concurrency": 4}
    values.update(overrides)
    return load_settings(**values)


@dataclass
class MemoryDocument(Document):
    """`<name>.<pages>p` documents; `kills` says which page kills what ("pod" or "worker")."""

    key: str
    page_count: int
    kills: dict[int, str] = field(default_factory=dict)
    format: Format = Format.PDF

    def render(self, index: int) -> RenderedPage:
        raise AssertionError("rendered through MemoryDecoder")

    def close(self) -> None:
        pass


class Pod:
    """One life of a pod: the real pipeline over its own S3 client and process id."""

    def __init__(self, world: World, life: int) -> None:
        self.world = world
        self.life = life
        self.client = SeveredClient(world.store.client(f"pod#{life}"))
        identity = Identity("pod", host="host", pid=life, incarnation=f"pod-{life}",
                            clock=world.clock.wall, alive=world.alive.__contains__)
        world.alive.add(life)
        s = world.settings
        parts = Parts.of(Storage(self.client, BUCKET, 3), s, identity)
        engine = MemoryEngine(world)
        self.budget = PageBudget(lambda: None)
        reader = DocumentReader(MemoryDecoder(self), engine, s, parts.checkpoints, self.budget, Metrics())
        self.pipeline = DocumentPipeline(s, parts, reader, Metrics(), self.budget,
                                         world.work_dir / f"life-{life}")
        self.pipeline.work_dir.mkdir()
        self.tasks: list[asyncio.Task[Report]] = []
        self.killed = asyncio.Event()

    def kill(self) -> None:
        """SIGKILL: cut off from S3, its process gone, every task dropped unfinished."""
        self.world.deaths += 1
        self.world.in_flight_at_deaths.append(self.holding())
        self.client.dead = True
        self.world.alive.discard(self.life)
        self.killed.set()
        for task in self.tasks:
            task.cancel()

    def holding(self) -> list[str]:
        """The sources whose lease this pod holds (in flight, whatever the stage)."""
        held = []
        for key in self.world.store.keys(".watcher/leases/input/"):
            record = LeaseRecord.parse(self.world.store.objects[key].body)
            if record is not None and not record.released and record.pid == self.life:
                held.append(record.source_key)
        return held

    async def run(self, refs: list[ObjectRef]) -> list[Report]:
        """Every ref at once (as a pool with room for all of them does); [] when killed."""
        self.tasks = [asyncio.create_task(self.pipeline.process(ref, Ticket(self.budget, False)))
                      for ref in refs]
        done = asyncio.gather(*self.tasks, return_exceptions=True)
        killed = asyncio.create_task(self.killed.wait())
        await asyncio.wait({done, killed}, return_when=asyncio.FIRST_COMPLETED)
        killed.cancel()
        answers = await done
        if self.killed.is_set():
            return []
        await self.pipeline.close()
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [a for a in answers if isinstance(a, Report)]


class MemoryDecoder(Decoder):
    def __init__(self, pod: Pod) -> None:
        self.pod = pod

    async def open(self, path: Path, size: int, limits: Limits, key: str) -> Document:
        return self.pod.world.documents[key]

    async def render(self, doc: Document, index: int) -> RenderedPage:
        assert isinstance(doc, MemoryDocument)
        world = self.pod.world
        world.reads.append((doc.key, index))
        if doc.kills.get(index) == "pod":
            self.pod.kill()
            await asyncio.Event().wait()  # never returns: the pod is gone
        await asyncio.sleep(1.0)  # decoding takes a while: documents overlap
        image = Image.new("RGB", (10, 10), "white")
        page = RenderedPage(index, image, 10, 10)
        page.warnings = [{"code": "_key", "message": doc.key}]  # for the engine below
        return page

    async def text_layer(self, doc: Document, index: int) -> TextLayer | None:
        return None

    async def close(self, doc: Document) -> None:
        pass


class MemoryEngine(Engine):
    name = "memory"

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    async def warm(self) -> None:
        pass

    async def recognise(self, page: RenderedPage) -> PageResult:
        key = page.warnings.pop()["message"]
        if self.world.documents[key].kills.get(page.index) == "worker":
            raise EngineCrashed("crash", "the worker was killed by SIGSEGV")
        text = f"{key} page {page.index + 1}"
        return PageResult(page.index, 10, 10, [Block("text", [0, 0, 10, 10], text)], text)


class World:
    def __init__(self, tmp: Path, clock: VirtualClock, **overrides: Any) -> None:
        self.store = MemoryS3(random.Random(7))
        self.clock = clock
        self.settings = settings(**overrides)
        self.alive: set[int] = set()
        self.documents: dict[str, MemoryDocument] = {}
        self.work_dir = tmp
        self.deaths = 0
        self.in_flight_at_deaths: list[list[str]] = []
        self.reads: list[tuple[str, int]] = []

    def add(self, name: str, pages: int, kills: dict[int, str] | None = None) -> None:
        key = f"input/{name}.pdf"
        self.documents[key] = MemoryDocument(key, pages, kills or {})
        self.store.put(key, f"%PDF {name}".encode())

    def result(self, key: str) -> dict[str, Any] | None:
        found = self.store.objects.get(f"output/{key.removeprefix('input/')}.json")
        return json.loads(found.body) if found else None

    def error(self, key: str) -> dict[str, Any] | None:
        found = self.store.objects.get(f"output/{key.removeprefix('input/')}.error.json")
        return json.loads(found.body) if found else None

    def assert_nothing_left(self) -> None:
        """No claim held or left released, no page checkpoint kept."""
        assert self.store.keys(".watcher/leases/input/") == []
        assert self.store.keys(".watcher/leases/_pages/") == []

    def unanswered(self) -> list[ObjectRef]:
        return [ObjectRef(BUCKET, key, self.store.objects[key].etag, len(self.store.objects[key].body))
                for key in self.documents if self.result(key) is None and self.error(key) is None]

    async def restart_loop(self, lives: int = 12) -> None:
        """A pod in a restart loop (as Kubernetes runs it) until every document is answered."""
        for life in range(1, lives + 1):
            todo = self.unanswered()
            if not todo:
                return
            await Pod(self, life).run(todo)
            await asyncio.sleep(5)  # the restart's back-off
        raise AssertionError(f"not answered after {lives} lives: {[r.key for r in self.unanswered()]}")


def in_world(tmp: Path, build: Callable[[World], None], **overrides: Any) -> World:
    clock = VirtualClock()
    world = World(tmp, clock, **overrides)
    build(world)

    async def main() -> None:
        await world.restart_loop()

    run_virtual(main, clock)
    return world


def test_a_pod_killing_page_costs_only_its_own_document(tmp_path: Path) -> None:
    def build(world: World) -> None:
        world.add("poison", 3, {1: "pod"})
        for n in range(20):
            world.add(f"good-{n:02d}", 2)

    world = in_world(tmp_path, build, max_attempts=2)
    # Every good document gets its result, whatever it was caught in.
    for n in range(20):
        result = world.result(f"input/good-{n:02d}.pdf")
        assert result is not None and [p["markdown"] for p in result["pages"]] == [
            f"input/good-{n:02d}.pdf page 1", f"input/good-{n:02d}.pdf page 2"]
    # The first death (everything in flight) and one more with the poison alone; then its
    # killing page is left out and its other pages keep their text.
    assert world.deaths == 2
    assert len(world.in_flight_at_deaths[0]) == 21
    assert world.in_flight_at_deaths[1] == ["input/poison.pdf"]
    poison = world.result("input/poison.pdf")
    assert poison is not None
    assert [p.get("error", {}).get("code") for p in poison["pages"]] == [None, "engine_crashed", None]
    assert poison["pages"][2]["markdown"] == "input/poison.pdf page 3"
    assert [w["code"] for w in poison["warnings"]] == ["engine_crashed"]
    world.assert_nothing_left()


def test_a_single_page_document_that_kills_the_pod_gets_engine_failed(tmp_path: Path) -> None:
    def build(world: World) -> None:
        world.add("poison", 1, {0: "pod"})
        for n in range(5):
            world.add(f"good-{n}", 1)

    world = in_world(tmp_path, build)  # the default WATCHER_MAX_ATTEMPTS
    record = world.error("input/poison.pdf")
    assert record is not None and record["error"]["code"] == "engine_failed"
    assert "page 1" in record["error"]["message"]
    assert world.deaths <= world.settings.max_attempts
    assert all(world.result(f"input/good-{n}.pdf") is not None for n in range(5))
    world.assert_nothing_left()


def test_a_page_that_kills_the_worker_every_time_is_left_out_on_the_last_attempt(tmp_path: Path) -> None:
    def build(world: World) -> None:
        world.add("datasheet", 5, {2: "worker"})
        world.add("contract", 2)

    world = in_world(tmp_path, build)
    result = world.result("input/datasheet.pdf")
    assert result is not None and world.deaths == 0
    pages = result["pages"]
    assert [p.get("error", {}).get("code") for p in pages] == [None, None, "engine_crashed", None, None]
    assert [p["markdown"] for p in pages if "error" not in p] == [
        f"input/datasheet.pdf page {i}" for i in (1, 2, 4, 5)]
    # Page 3 was read WATCHER_MAX_ATTEMPTS - 1 times, then left out; the pages read alone
    # and checkpointed were not read again.
    assert world.reads.count(("input/datasheet.pdf", 2)) == world.settings.max_attempts - 1
    assert world.result("input/contract.pdf") is not None
    world.assert_nothing_left()


def test_a_suspect_waits_for_the_others_and_runs_with_no_other_lease_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leases_seen: list[list[str]] = []
    suspect = "input/doc-0.pdf"
    real_render = MemoryDecoder.render

    async def render(self: MemoryDecoder, doc: Document, index: int) -> RenderedPage:
        if getattr(doc, "key", "") == suspect:
            leases_seen.append(self.pod.world.store.keys(".watcher/leases/input/"))
        return await real_render(self, doc, index)

    monkeypatch.setattr(MemoryDecoder, "render", render)

    def build(world: World) -> None:
        for n in range(4):
            world.add(f"doc-{n}", 2)
        # doc-0 was on a pod that died: a suspect, with one crash on record.
        record = LeaseRecord(owner="pod", source_key=suspect, source_etag=world.store.objects[suspect].etag,
                             expires_at=0.0, crashes=1, history=["replica pod died while processing"],
                             released=True)
        world.store.put(Names.from_settings(world.settings).lease(suspect), record.encode())

    world = in_world(tmp_path, build)
    lease = Names.from_settings(world.settings).lease(suspect)
    assert len(leases_seen) == 2 and all(keys == [lease] for keys in leases_seen)
    assert all(world.result(f"input/doc-{n}.pdf") is not None for n in range(4))
    world.assert_nothing_left()
