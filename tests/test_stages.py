"""Each stage on its own, over the in-memory S3 and on virtual time (the fast tier).

What a failure means (fate), what recognise reads a page from, the order a commit
writes in, which version settle touches, page checkpoints, the queue's lanes, what a
notification names, the outcome hooks, and the pipeline's one block that turns a failed
run into an error record, a retry or nothing. The engine and the reader here are
in-memory stand-ins for the stage under test; the end-to-end tests run the real ones.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from memory_s3 import Faults, MemoryS3
from PIL import Image
from simulation import VirtualClock, run_virtual

from watcher.bucket.leases import Inherited, Lease, LeaseLost
from watcher.bucket.names import SOURCE_ETAG_META, Names
from watcher.bucket.storage import Conditions, KeyRefused, PreconditionFailed, Storage, StorageUnavailable
from watcher.core.errors import DocumentError, EngineCrashed, EngineUnavailable, ErrorCode
from watcher.core.identity import Identity
from watcher.core.metrics import Metrics, StageTimer
from watcher.core.outcome import Outcome, Report
from watcher.core.pages import Block, PageResult, RenderedPage, TextSource
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings, SourceAction, TextLayerMode, load_settings
from watcher.engines.base import Engine
from watcher.intake.discovery import Discovery
from watcher.intake.events import BadEvent, EventIntake
from watcher.intake.queue import WorkQueue
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.checkpoint import CHECKPOINT_MIN_PAGES, Checkpoints
from watcher.pipeline.decode import Decoder, Document
from watcher.pipeline.document import DocumentPipeline, Parts
from watcher.pipeline.fate import Fate, classify
from watcher.pipeline.outputs import outputs_of
from watcher.pipeline.publish import Publisher, Superseded
from watcher.pipeline.recognise import EVERYTHING_AT_ONCE, Reading, ReadPlan, Recogniser, unreadable
from watcher.pipeline.settle import Settled, settle
from watcher.pipeline.textlayer import TextLayer, take_exact_text
from watcher.service.hooks import HeldRetry, LastOutcomes

BUCKET = "stages"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"s3_endpoint": "http://memory.invalid", "s3_bucket": BUCKET,
                              "s3_access_key": "t:k", "s3_secret_key": "s", "lease_seconds": 30}
    values.update(overrides)
    return load_settings(**values)


def page(index: int, text: str, source: TextSource = TextSource.OCR) -> PageResult:
    blocks = [Block("text", [0, 0, 10, 10], text)] if text else []
    return PageResult(index=index, width=10, height=10, blocks=blocks, markdown=text,
                      text_source=source.value)


# --- fate: what a failure means ------------------------------------------------------
@pytest.mark.parametrize(("exc", "fate", "code"), [
    (DocumentError(ErrorCode.CORRUPT, "no xref table"), Fate.PERMANENT, ErrorCode.CORRUPT),
    (StorageUnavailable("S3 did not answer"), Fate.TRANSIENT, None),
    (EngineUnavailable("the VLM server is down"), Fate.TRANSIENT, None),
    (LeaseLost("input/a.pdf"), Fate.TRANSIENT, None),
    (KeyRefused("KeyTooLongError"), Fate.REFUSED, ErrorCode.KEY_REFUSED),
    (PreconditionFailed("input/a.pdf"), Fate.GONE, None),
    (FileNotFoundError("input/a.pdf"), Fate.GONE, None),
    (Superseded("input/a.pdf"), Fate.GONE, None),
    (EngineCrashed("hung", "no answer in 300 s"), Fate.CRASH, ErrorCode.ENGINE_FAILED),
    (ZeroDivisionError("a bug"), Fate.CRASH, ErrorCode.INTERNAL),
])
def test_every_failure_has_one_fate(exc: Exception, fate: Fate, code: ErrorCode | None) -> None:
    failure = classify(exc)
    assert (failure.fate, failure.code) == (fate, code)
    assert failure.message


# --- recognise: where a page's text comes from ---------------------------------------
class PageEngine(Engine):
    """In-memory engine: answers every page with `text` (or raises `fails`)."""

    name = "memory"

    def __init__(self, text: str, structured: bool = False, fails: Exception | None = None) -> None:
        super().__init__()
        self.text = text
        self.structured = structured
        self.fails = fails
        self.calls = 0

    async def warm(self) -> None:
        pass

    async def recognise(self, page_in: RenderedPage) -> PageResult:
        self.calls += 1
        if self.fails is not None:
            raise self.fails
        return page(page_in.index, self.text)


class LayerDecoder(Decoder):
    """Decoder whose page 0 has the given text layer (None: an image, no layer at all)."""

    def __init__(self, layer: TextLayer | None, render_fails: DocumentError | None = None) -> None:
        self.layer = layer
        self.render_fails = render_fails
        self.layer_reads = 0

    async def render(self, doc: Document, index: int) -> RenderedPage:
        if self.render_fails is not None:
            raise self.render_fails
        return RenderedPage(index, Image.new("RGB", (10, 10), "white"), 10, 10,
                            warnings=[{"code": "damaged", "message": "a repaired xref"}])

    async def text_layer(self, doc: Document, index: int) -> TextLayer | None:
        self.layer_reads += 1
        if self.layer is None:
            return None
        return replace(self.layer, result=page(index, self.layer.result.markdown, TextSource.TEXT_LAYER))


LAYER_TEXT = "Договор поставки № 17 от 3 марта 2026 года"


def layer(trusted: bool, reason: str = "", text: str = LAYER_TEXT) -> TextLayer:
    return TextLayer(page(0, text, TextSource.TEXT_LAYER), trusted, reason, len(text.replace(" ", "")))


@dataclass(frozen=True)
class Row:
    mode: TextLayerMode
    structured: bool
    layer: TextLayer | None
    engine_text: str
    source: TextSource
    text: str
    engine_calls: int
    warnings: tuple[str, ...]


ENGINE_TEXT = "Текст, прочитанный с картинки"
ROWS = {
    "plain engine, trusted layer: the layer, no rendering":
        Row(TextLayerMode.AUTO, False, layer(True), ENGINE_TEXT, TextSource.TEXT_LAYER, LAYER_TEXT, 0, ()),
    "plain engine, a scan: the engine":
        Row(TextLayerMode.AUTO, False, layer(False, "no_text_layer", ""), ENGINE_TEXT,
            TextSource.OCR, ENGINE_TEXT, 1, ("damaged",)),
    "plain engine sees nothing on an untrusted but sane layer: the layer, said so":
        Row(TextLayerMode.AUTO, False, layer(False, "mostly_image"), "", TextSource.TEXT_LAYER, LAYER_TEXT, 1,
            ("damaged", "engine_read_nothing", "text_layer_untrusted")),
    "plain engine sees nothing, the layer is garbled: no text, said so":
        Row(TextLayerMode.AUTO, False, layer(False, "garbled"), "", TextSource.OCR, "", 1,
            ("damaged", "no_text")),
    "structured engine reads even a trusted layer's page; a block with no location keeps its reading":
        Row(TextLayerMode.AUTO, True, layer(True), ENGINE_TEXT, TextSource.OCR, ENGINE_TEXT, 1, ("damaged",)),
    "structured engine on an untrusted layer's page: its own reading":
        Row(TextLayerMode.AUTO, True, layer(False, "mostly_image"), ENGINE_TEXT, TextSource.OCR,
            ENGINE_TEXT, 1, ("damaged",)),
    "structured engine sees nothing: the trusted layer, said so":
        Row(TextLayerMode.AUTO, True, layer(True), "", TextSource.TEXT_LAYER, LAYER_TEXT, 1,
            ("damaged", "engine_read_nothing")),
    "ocr: the engine alone, even when it sees nothing":
        Row(TextLayerMode.OCR, False, layer(True), "", TextSource.OCR, "", 1, ("damaged", "no_text")),
    "text: an untrusted layer as it is, said so":
        Row(TextLayerMode.TEXT, False, layer(False, "mojibake"), ENGINE_TEXT, TextSource.TEXT_LAYER,
            LAYER_TEXT, 0, ("text_layer_untrusted",)),
    "text: an empty layer is not sent to the engine":
        Row(TextLayerMode.TEXT, True, layer(False, "no_text_layer", ""), ENGINE_TEXT, TextSource.TEXT_LAYER,
            "", 0, ("no_text",)),
    "text: an image has no layer, the engine reads it":
        Row(TextLayerMode.TEXT, False, None, ENGINE_TEXT, TextSource.OCR, ENGINE_TEXT, 1, ("damaged",)),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_recognise_takes_each_page_from_the_right_source(name: str) -> None:
    row = ROWS[name]
    engine = PageEngine(row.engine_text, structured=row.structured)
    recogniser = Recogniser(LayerDecoder(row.layer), engine, row.mode)
    result = run_virtual(lambda: recogniser.page(Document(), 0, StageTimer()))
    assert (result.text_source, result.text, engine.calls) == (row.source.value, row.text, row.engine_calls)
    assert tuple(w["code"] for w in result.warnings) == row.warnings
    assert result.error is None


def test_vlm_text_blocks_take_the_exact_layer_text_inside_their_boxes() -> None:
    lines = ["Договор поставки № 17", "Поставщик передаёт товар,", "а покупатель его оплачивает.",
             "Итого 1 250,00 руб."]
    layer_page = PageResult(index=0, width=1000, height=1000, markdown="\n".join(lines),
                            text_source=TextSource.TEXT_LAYER.value, blocks=[
                                Block("text", [100, 100 + 50 * i, 900, 130 + 50 * i], line)
                                for i, line in enumerate(lines)])
    read = PageResult(index=0, width=500, height=500, blocks=[  # the VLM saw it at half the size
        Block("doc_title", [40, 45, 460, 70], "Договор поставки № 1?"),
        Block("text", [40, 75, 460, 115], "Поставщик передаёт тoвар,\nа покупатель ero оплачивает."),
        Block("table", [40, 120, 460, 145], "Итого 1 250,00 руб."),
        Block("text", [40, 200, 460, 230], "Подпись"),  # no layer line inside: the VLM's
    ], markdown="# Договор поставки № 1?\n\nПоставщик передаёт тoвар,\nа покупатель ero "
                "оплачивает.\n\n<table/>\n\nПодпись")
    assert take_exact_text(read, layer_page) == 2
    assert [b.extra["text_source"] for b in read.blocks] == ["text_layer", "text_layer", "engine", "engine"]
    assert read.blocks[1].text == "Поставщик передаёт товар,\nа покупатель его оплачивает."
    assert read.markdown == ("# Договор поставки № 17\n\nПоставщик передаёт товар,\nа покупатель его "
                             "оплачивает.\n\n<table/>\n\nПодпись")
    no_location = PageResult(index=0, width=500, height=500, markdown="Поставщик передаёт тoвар",
                             blocks=[Block("text", [0, 0, 500, 500], "Поставщик передаёт тoвар")])
    assert take_exact_text(no_location, layer_page) == 0
    assert no_location.blocks[0].extra["text_source"] == "engine"
    turned = replace(read, rotation=90)
    assert take_exact_text(turned, layer_page) == 0  # another frame: nothing is matched


def test_a_page_that_cannot_be_rendered_keeps_its_error_on_the_page() -> None:
    bad = DocumentError(ErrorCode.PAGE_TOO_LARGE, "page 1 is 40,000 x 40,000 pixels")
    recogniser = Recogniser(LayerDecoder(None, render_fails=bad), PageEngine("x"), TextLayerMode.AUTO)
    result = run_virtual(lambda: recogniser.page(Document(), 0, StageTimer()))
    assert result.error == {"code": "page_too_large", "message": "page 1 is 40,000 x 40,000 pixels"}
    assert result.blocks == []


def test_an_engine_that_raises_something_unforeseen_crashes_the_page_not_the_loop() -> None:
    engine = PageEngine("x", fails=KeyError("boxes"))
    recogniser = Recogniser(LayerDecoder(None), engine, TextLayerMode.AUTO)
    with pytest.raises(EngineCrashed, match="KeyError"):
        run_virtual(lambda: recogniser.page(Document(), 0, StageTimer()))


def test_a_document_is_unreadable_only_when_no_page_could_be_read() -> None:
    broken = replace(page(0, ""), error={"code": "corrupt", "message": "page 1: bad stream"})
    assert unreadable([]) is None
    assert unreadable([broken, page(1, "text")]) is None
    one = unreadable([broken])
    assert one is not None and one.code is ErrorCode.CORRUPT and one.message == "page 1: bad stream"
    many = unreadable([replace(broken, index=i) for i in range(7)])
    assert many is not None and many.message.startswith("none of its 7 pages could be read: ")
    assert many.message.endswith("(and 2 more)")


# --- the bucket's pieces for one replica ---------------------------------------------
def parts_for(store: MemoryS3, clock: VirtualClock, actor: str = "replica", **overrides: Any) -> Parts:
    s = settings(replica_id=actor, **overrides)
    identity = Identity(actor, host=f"host-{actor}", pid=1, incarnation=f"{actor}-1",
                        clock=clock.wall, alive={1}.__contains__)
    return Parts.of(Storage(store.client(actor), BUCKET, max_attempts=3), s, identity)


def applied(store: MemoryS3, actor: str, since: int = 0) -> list[tuple[str, str]]:
    return [(r.op, r.key) for r in store.requests[since:] if r.actor == actor and r.applied]


# --- publish: the order a commit writes in -------------------------------------------
async def claimed(store: MemoryS3, parts: Parts) -> tuple[ObjectRef, Lease]:
    """`input/a.pdf` uploaded, and this replica's lease on it."""
    ref = ObjectRef(BUCKET, "input/a.pdf", store.put("input/a.pdf", b"%PDF-1.7 v1"), 11)
    lease = await parts.leases.acquire(ref)
    assert isinstance(lease, Lease)
    return ref, lease


def test_a_commit_fences_writes_markdown_then_json_then_marks_done() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        parts = parts_for(store, clock)
        store.put("output/a.pdf.error.json", b"{}", metadata={SOURCE_ETAG_META: "old"})
        ref, lease = await claimed(store, parts)
        etag = ref.etag
        since = len(store.requests)
        await Publisher(parts.storage, parts.names, parts.done).result(ref, lease, b"{}", b"# a")
        lease_key, marker = parts.names.lease(ref.key), parts.names.marker(ref.key, etag)
        assert applied(store, "replica", since) == [
            ("put", lease_key),  # the fence: a holder cut off stops here
            ("put", "output/a.pdf.md"),
            ("put", "output/a.pdf.json"),
            ("delete", "output/a.pdf.error.json"),  # an older version's failure is gone
            ("put", lease_key),
            ("put", marker),  # last: done only once everything is out
        ]
        assert store.objects["output/a.pdf.json"].metadata[SOURCE_ETAG_META] == etag
        await lease.finish()

    run_virtual(main, clock)


def test_chunks_are_written_before_the_json_and_removed_with_the_result() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        parts = parts_for(store, clock)
        publisher = Publisher(parts.storage, parts.names, parts.done, outputs_of(settings(chunks=True)))
        ref, lease = await claimed(store, parts)
        since = len(store.requests)
        await publisher.result(ref, lease, b"{}", b"# a", {".chunks.jsonl": b'{"id": "c1"}\n'})
        puts = [key for op, key in applied(store, "replica", since) if op == "put"]
        assert puts.index("output/a.pdf.chunks.jsonl") < puts.index("output/a.pdf.json")
        # With figures: written first, and a version without them takes them away.
        await publisher.result(ref, lease, b"{}", b"# a", {".chunks.jsonl": b""},
                               {"page-1-figure-1.png": b"png1", "page-2-figure-1.png": b"png2"})
        assert store.keys("output/a.pdf.assets/") == ["output/a.pdf.assets/page-1-figure-1.png",
                                                      "output/a.pdf.assets/page-2-figure-1.png"]
        await publisher.result(ref, lease, b"{}", b"# a", {".chunks.jsonl": b""},
                               {"page-1-figure-1.png": b"png1"})
        assert store.keys("output/a.pdf.assets/") == ["output/a.pdf.assets/page-1-figure-1.png"]
        # The same version failing later (a repair run): its error record replaces all of it.
        await publisher.error(ref, lease, {"error": {"code": "corrupt", "message": "x"}})
        assert store.keys("output/") == ["output/a.pdf.error.json"]
        await lease.finish()

    run_virtual(main, clock)


def test_a_commit_for_a_replaced_source_writes_nothing() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        parts = parts_for(store, clock)
        v1 = ObjectRef(BUCKET, "input/a.pdf", store.put("input/a.pdf", b"v1"), 2)
        lease = await parts.leases.acquire(v1)
        assert isinstance(lease, Lease)
        store.put("input/a.pdf", b"v2")  # a producer replaced it while v1 was read
        with pytest.raises(Superseded):
            await Publisher(parts.storage, parts.names, parts.done).result(v1, lease, b"{}", b"# v1")
        assert store.keys("output/") == [] and store.keys(".watcher/leases/_done/") == []
        await lease.release()

    run_virtual(main, clock)


def test_a_commit_that_replaces_an_older_versions_result_unmarks_that_version() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        parts = parts_for(store, clock)
        publisher = Publisher(parts.storage, parts.names, parts.done)
        v1 = ObjectRef(BUCKET, "input/a.pdf", store.put("input/a.pdf", b"v1"), 2)
        await publisher.result(v1, None, b'{"v": 1}', b"v1")
        v2 = ObjectRef(BUCKET, "input/a.pdf", store.put("input/a.pdf", b"v2"), 2)
        await publisher.error(v2, None, {"error": {"code": "corrupt", "message": "bad"}})
        # v2's error record replaced v1's result: v1's bytes uploaded again must be read again.
        assert store.keys("output/") == ["output/a.pdf.error.json"]
        assert await parts.done.marked(v1) is None
        assert await parts.done.marked(v2) is not None

    run_virtual(main, clock)


def test_a_holder_whose_lease_was_taken_over_cannot_commit() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        ours, theirs = parts_for(store, clock, "ours"), parts_for(store, clock, "theirs")
        ref = ObjectRef(BUCKET, "input/a.pdf", store.put("input/a.pdf", b"v1"), 2)
        lease = await ours.leases.acquire(ref)
        assert isinstance(lease, Lease) and lease._renewer is not None
        lease._renewer.cancel()  # cut off: no renewal from here on
        await asyncio.sleep(120)
        taken = await theirs.leases.acquire(ref)
        assert isinstance(taken, Lease)
        with pytest.raises(LeaseLost):
            await Publisher(ours.storage, ours.names, ours.done).result(ref, lease, b"{}", b"#")
        assert store.keys("output/") == []
        await lease.release()
        assert store.keys(".watcher/leases/") == [theirs.names.lease(ref.key)]  # theirs stays
        await taken.finish()

    run_virtual(main, clock)


# --- settle: only the version with its result ----------------------------------------
@pytest.mark.parametrize("conditions", [Conditions(), Conditions(delete=False, copy=False)],
                         ids=["store-enforces-conditions", "store-ignores-them"])
@pytest.mark.parametrize(("action", "replaced", "settled", "left"), [
    (SourceAction.KEEP, False, Settled.KEPT, ["input/a.pdf"]),
    (SourceAction.MOVE, False, Settled.MOVED, ["done/a.pdf"]),
    (SourceAction.DELETE, False, Settled.DELETED, []),
    (SourceAction.MOVE, True, Settled.NEWER, ["input/a.pdf"]),
    (SourceAction.DELETE, True, Settled.NEWER, ["input/a.pdf"]),
])
def test_settle_touches_only_the_version_that_has_its_result(
        conditions: Conditions, action: SourceAction, replaced: bool, settled: Settled,
        left: list[str]) -> None:
    async def main() -> None:
        store = MemoryS3(faults=Faults(ignored_conditions=frozenset(
            name for name in ("delete", "copy") if not getattr(conditions, name))))
        storage = Storage(store.client("replica"), BUCKET, max_attempts=3)
        storage.conditions = conditions
        ref = ObjectRef(BUCKET, "input/a.pdf", store.put("input/a.pdf", b"v1"), 2)
        if replaced:
            store.put("input/a.pdf", b"v2")
        names = Names.from_settings(settings())
        assert await settle(storage, names, ref, action) is settled
        assert store.keys() == left
        if replaced:
            assert store.objects["input/a.pdf"].body == b"v2"  # the new version waits its turn
        if left == ["done/a.pdf"]:
            assert store.objects["done/a.pdf"].body == b"v1"

    run_virtual(main)


def test_settling_a_source_already_gone_is_not_an_error() -> None:
    async def main() -> None:
        store = MemoryS3()
        storage = Storage(store.client("replica"), BUCKET, max_attempts=3)
        ref = ObjectRef(BUCKET, "input/a.pdf", "e" * 32, 2)
        names = Names.from_settings(settings())
        assert await settle(storage, names, ref, SourceAction.MOVE) is Settled.GONE
        assert await settle(storage, names, ref, SourceAction.DELETE) is Settled.GONE
        assert store.keys() == []

    run_virtual(main)


# --- checkpoints ---------------------------------------------------------------------
def test_checkpoints_belong_to_one_version_and_are_cleared_for_all() -> None:
    async def main() -> None:
        store = MemoryS3()
        storage = Storage(store.client("replica"), BUCKET, max_attempts=3)
        checkpoints = Checkpoints(storage, Names.from_settings(settings()))
        pages = CHECKPOINT_MIN_PAGES + 2
        v1 = ObjectRef(BUCKET, "input/long.pdf", "1" * 32, 10)
        v2 = replace(v1, etag="2" * 32)
        for index in (0, 3, 9):
            await checkpoints.save(v1, page(index, f"страница {index + 1}"))
        await checkpoints.save(v2, page(1, "v2"))
        kept = await checkpoints.load(v1, pages)
        assert sorted(kept) == [0, 3, 9] and kept[3].text == "страница 4"
        assert sorted(await checkpoints.load(v2, pages)) == [1]  # never another version's pages
        assert await checkpoints.load(v1, CHECKPOINT_MIN_PAGES - 1) == {}  # short: not kept
        assert await checkpoints.load(v1, 5) == {}
        # A damaged checkpoint, or one beyond the document's pages, is read again instead.
        damaged = next(k for k in store.keys() if k.endswith("000003.json") and "1" * 32 in k)
        store.put(damaged, b"{not json")
        assert sorted(await checkpoints.load(v1, 9)) == [0]
        await checkpoints.clear(v1)
        assert store.keys() == []

    run_virtual(main)


def test_a_checkpoint_that_cannot_be_saved_costs_only_that_page() -> None:
    async def main() -> None:
        store = MemoryS3(random.Random(1), Faults(server_error=1.0))
        storage = Storage(store.client("replica"), BUCKET, max_attempts=2)
        checkpoints = Checkpoints(storage, Names.from_settings(settings()))
        await checkpoints.save(ObjectRef(BUCKET, "input/long.pdf", "1" * 32, 10), page(0, "x"))
        assert store.keys() == []

    run_virtual(main)


# --- the work queue's lanes ----------------------------------------------------------
def ref_of(key: str, etag: str = "1") -> ObjectRef:
    return ObjectRef(BUCKET, f"input/{key}", etag * 32, 1)


def test_urgent_work_goes_before_everything_discovery_found() -> None:
    async def main() -> None:
        queue = WorkQueue(maxsize=3)
        a, b, c, held = ref_of("a"), ref_of("b"), ref_of("c"), ref_of("held")
        assert queue.offer(a) and queue.offer(b) and queue.offer(c)
        assert not queue.offer(ref_of("d"))  # full
        assert not queue.offer(a)  # queued already
        assert queue.offer_urgent(held)
        assert queue.offer_urgent(c)  # already queued: moved up, still taken once
        taken = [await queue.take() for _ in range(4)]
        assert taken == [held, c, a, b]
        assert queue.qsize() == 0 and queue.unfinished() == 4
        assert not queue.offer_urgent(a)  # in flight: not twice
        for ref in taken:
            queue.finish(ref)
        assert queue.unfinished() == 0 and queue.offer(a)  # may be offered again after its run

    run_virtual(main)


def test_a_parked_version_goes_first_once_its_key_is_free() -> None:
    async def main() -> None:
        queue = WorkQueue(maxsize=10)
        v1, v2, other, later = ref_of("a", "1"), ref_of("a", "2"), ref_of("b"), ref_of("c")
        assert queue.offer(v1) and queue.offer(v2) and queue.offer(other)
        assert await queue.take() == v1
        assert await queue.take() == other  # v2 parks behind v1
        queue.offer(later)
        queue.finish(v1)
        assert await queue.take() == v2  # ahead of work found later
        assert await queue.take() == later

    run_virtual(main)


# --- notifications -------------------------------------------------------------------
def record(key: str, etag: str | None = "e" * 32, bucket: str = BUCKET, event: str = "ObjectCreated:Put",
           sequencer: str = "", size: Any = 100, source: str = "aws:s3") -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "size": size}
    if etag is not None:
        obj["eTag"] = etag
    if sequencer:
        obj["sequencer"] = sequencer
    return {"eventSource": source, "eventName": event, "eventTime": "2026-12-04T10:00:00.000Z",
            "s3": {"bucket": {"name": bucket}, "object": obj}}


def body(*records: dict[str, Any]) -> bytes:
    return json.dumps({"Records": list(records)}).encode()


class Intake:
    def __init__(self) -> None:
        self.offered: list[ObjectRef] = []
        self.pokes = 0
        self.events = EventIntake(BUCKET, Names.from_settings(settings()), self.offer, self.poke)

    def offer(self, ref: ObjectRef) -> bool:
        self.offered.append(ref)
        return True

    def poke(self) -> None:
        self.pokes += 1


def test_a_notification_names_new_versions_of_our_documents_only() -> None:
    intake = Intake()
    found = intake.events.refs(body(
        record("input/%D0%B4%D0%BE%D0%B3%D0%BE%D0%B2%D0%BE%D1%80+%E2%84%96+1.pdf", sequencer="0A"),
        record("input/b.png", bucket="someone-elses"),
        record("input/c.png", event="ObjectRemoved:Delete"),
        record("output/a.pdf.json"),
        record("input/folder/"),
        record("input/no-etag.png", etag=None),
        record("input/junk-size.png", size="1e400"),
    ))
    assert [r.key for r in found.refs] == ["input/договор № 1.pdf", "input/junk-size.png"]
    assert found.refs[1].size == 0  # a size is a hint; junk reads as unknown
    assert (found.polled, found.ignored, intake.pokes) == (1, 4, 1)


def test_repeated_and_stale_deliveries_are_ignored() -> None:
    intake = Intake()
    assert len(intake.events.refs(body(record("input/a.pdf", "2" * 32, sequencer="0B"))).refs) == 1
    again = intake.events.refs(body(record("input/a.pdf", "2" * 32, sequencer="0B"),
                                    record("input/a.pdf", "1" * 32, sequencer="0A")))
    assert again.refs == [] and again.ignored == 2
    newer = intake.events.refs(body(record("input/a.pdf", "3" * 32, sequencer="000C")))
    assert [r.etag for r in newer.refs] == ["3" * 32]
    intake.events.forget(newer.refs[0])  # its run is to be retried: named again, taken again
    assert len(intake.events.refs(body(record("input/a.pdf", "3" * 32, sequencer="000C"))).refs) == 1


@pytest.mark.parametrize("raw", [b"not json", b'{"Records": 5}', b"[1, 2]", b"\xff\xfe",
                                 b"[" * 100_000 + b"]" * 100_000])
def test_a_body_that_is_not_a_notification_is_refused(raw: bytes) -> None:
    with pytest.raises(BadEvent):
        Intake().events.refs(raw)


def test_a_key_no_object_can_have_is_refused_and_the_rest_taken() -> None:
    intake = Intake()
    taken = intake.events.take(body(record("input/a%00b.pdf"), record("input/%FF.pdf"),
                                    record("input/fine.pdf")))
    assert taken.accepted == 1 and len(taken.refused) == 2
    assert [r.key for r in intake.offered] == ["input/fine.pdf"]
    assert intake.events.refs(b'{"Event": "s3:TestEvent"}').accepted == 0


# --- outcome hooks -------------------------------------------------------------------
def test_outcome_hooks_remember_what_is_unfinished_and_look_again_at_held_work() -> None:
    last = LastOutcomes(limit=3)
    retries: list[tuple[str, float]] = []
    held = HeldRetry(lambda ref, at: retries.append((ref.key, at)))
    reports = [Report(ref_of("a"), Outcome.ERROR), Report(ref_of("b"), Outcome.DONE),
               Report(ref_of("c"), Outcome.HELD, retry_at=1234.0), Report(ref_of("d"), Outcome.RETRY),
               Report(ref_of("a"), Outcome.DONE)]
    for report in reports:
        last.ended(report)
        held.ended(report)
    assert [r.ref.key for r in last.unfinished()] == ["input/c", "input/d"]  # a's last run was done
    assert list(last.reports) == ["input/c", "input/d", "input/a"]  # bounded, newest last
    assert retries == [("input/c", 1234.0)]


# --- the pipeline: one block turns a failure into a record, a retry or nothing --------
class MemoryReader:
    """In-memory stand-in for decode and recognise: does what `plan` says per call."""

    def __init__(self, plan: list[Callable[[ObjectRef], Reading]]) -> None:
        self.plan = plan
        self.calls = 0

    def engine_id(self) -> dict[str, str]:
        return {"name": "memory", "model": "m"}

    async def read(self, ref: ObjectRef, path: Path, size: int, timer: StageTimer,
                   ticket: Ticket, plan: ReadPlan = EVERYTHING_AT_ONCE) -> Reading:
        step = self.plan[min(self.calls, len(self.plan) - 1)]
        self.calls += 1
        assert (await asyncio.to_thread(path.stat)).st_size == size  # fetched before it is read
        return step(ref)


def reads(text: str) -> Callable[[ObjectRef], Reading]:
    return lambda ref: Reading("pdf", [page(0, text)])


def raises(exc: Exception) -> Callable[[ObjectRef], Reading]:
    def step(ref: ObjectRef) -> Reading:
        raise exc
    return step


def run_pipeline(plan: list[Callable[[ObjectRef], Reading]], runs: int, tmp_path: Path,
                 **overrides: Any) -> tuple[MemoryS3, list[Report]]:
    clock = VirtualClock()

    async def main() -> tuple[MemoryS3, list[Report]]:
        store = MemoryS3()
        store.put("input/a.pdf", b"%PDF-1.7 contract")
        parts = parts_for(store, clock, max_attempts=2, **overrides)
        pipeline = DocumentPipeline(settings(max_attempts=2, **overrides), parts, MemoryReader(plan),
                                    Metrics(), PageBudget(lambda: None), tmp_path)
        reports = []
        for _ in range(runs):
            obj = store.objects["input/a.pdf"]
            reports.append(await pipeline.process(ObjectRef(BUCKET, "input/a.pdf", obj.etag, len(obj.body))))
        await pipeline.close()
        return store, reports

    return run_virtual(main, clock)


def test_a_document_read_is_published_and_its_lease_ended(tmp_path: Path) -> None:
    store, [report] = run_pipeline([reads("Договор поставки")], 1, tmp_path)
    assert report.outcome is Outcome.DONE and report.output == "output/a.pdf.json"
    result = json.loads(store.objects["output/a.pdf.json"].body)
    assert result["pages"][0]["markdown"] == "Договор поставки"
    assert store.keys(".watcher/leases/") == [k for k in store.keys(".watcher/leases/_done/")]


def test_a_bad_document_gets_its_error_record_at_once(tmp_path: Path) -> None:
    store, [report] = run_pipeline([raises(DocumentError(ErrorCode.ENCRYPTED, "a password is needed"))],
                                   1, tmp_path)
    assert (report.outcome, report.code) == (Outcome.ERROR, "encrypted")
    record = json.loads(store.objects["output/a.pdf.error.json"].body)
    assert record["error"]["code"] == "encrypted" and "password" in record["error"]["message"]
    assert store.keys("output/") == ["output/a.pdf.error.json"]


def test_an_outage_defers_the_document_without_using_an_attempt(tmp_path: Path) -> None:
    store, reports = run_pipeline([raises(StorageUnavailable("S3 away")), reads("text")], 2, tmp_path)
    assert [r.outcome for r in reports] == [Outcome.RETRY, Outcome.DONE]
    assert store.keys("output/") == ["output/a.pdf.json", "output/a.pdf.md"]


def test_crashes_are_counted_in_the_lease_then_recorded(tmp_path: Path) -> None:
    crash = raises(EngineCrashed("died", "signal 9 (SIGKILL)"))
    store, reports = run_pipeline([crash], 2, tmp_path)
    assert [r.outcome for r in reports] == [Outcome.RETRY, Outcome.ERROR]
    record = json.loads(store.objects["output/a.pdf.error.json"].body)
    assert record["error"]["code"] == "engine_failed"
    assert "2 times" in record["error"]["message"] and "SIGKILL" in record["error"]["message"]


def test_a_source_replaced_while_it_was_read_publishes_nothing(tmp_path: Path) -> None:
    box: dict[str, MemoryS3] = {}

    def replaced(ref: ObjectRef) -> Reading:
        box["store"].put("input/a.pdf", b"%PDF-1.7 v2")
        return Reading("pdf", [page(0, "v1")])

    clock = VirtualClock()

    async def main() -> Report:
        store = box["store"] = MemoryS3()
        store.put("input/a.pdf", b"%PDF-1.7 v1")
        parts = parts_for(store, clock)
        pipeline = DocumentPipeline(settings(), parts, MemoryReader([replaced]), Metrics(),
                                    PageBudget(lambda: None), tmp_path)
        obj = store.objects["input/a.pdf"]
        report = await pipeline.process(ObjectRef(BUCKET, "input/a.pdf", obj.etag, len(obj.body)))
        await pipeline.close()
        return report

    report = run_virtual(main, clock)
    assert report.outcome is Outcome.SKIPPED
    store = box["store"]
    assert store.keys("output/") == [] and store.keys(".watcher/leases/") == []


def test_a_version_done_before_is_skipped_without_reading(tmp_path: Path) -> None:
    _, reports = run_pipeline([reads("text"), raises(AssertionError("read twice"))], 2, tmp_path)
    assert [r.outcome for r in reports] == [Outcome.DONE, Outcome.SKIPPED]
    assert reports[1].message == "already done (marked)"


# --- discovery: what a restarted pod cleans up at once --------------------------------
def test_a_lease_left_by_a_dead_process_on_a_done_version_goes_at_once() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3(now=clock.wall)
        s = settings(replica_id="pod")
        names = Names.from_settings(s)
        alive = {2}
        identity = Identity("pod", host="host", pid=2, incarnation="pod-2", clock=clock.wall,
                            alive=alive.__contains__)
        parts = Parts.of(Storage(store.client("pod"), BUCKET, max_attempts=3), s, identity)
        for name, pid in (("dead", 1), ("live", 2)):
            key = f"input/{name}.pdf"
            ref = ObjectRef(BUCKET, key, store.put(key, b"%PDF"), 4)
            await parts.done.mark(ref)  # published and marked, then killed before letting go
            record = parts.leases.record(ref, Inherited(), released=False)
            record.pid, record.incarnation = pid, f"pod-{pid}"
            store.put(names.lease(key), record.encode())
        discovery = Discovery(parts.storage, s, names, clock.wall, parts.leases.holder_is_dead)
        assert await discovery.scan() == []
        # The dead process's goes now; a live holder's stays until it lets go (or for
        # several lease periods unrenewed, whoever held it).
        assert store.keys(".watcher/leases/input/") == [names.lease("input/live.pdf")]

    run_virtual(main, clock)
