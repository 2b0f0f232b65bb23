"""One document through the flow: claim, fetch, decode, engine, render, publish, settle.

Each stage lives in its own module; this one only strings them together and measures
them. What a failure means is decided in watcher/pipeline/fate.py; what follows from it
(error record, release, attempt counted in the lease) happens in `_failed`, once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from watcher.bucket.done import Done, DoneMarkers
from watcher.bucket.leases import Held, Lease, LeaseLost, Leases
from watcher.bucket.names import Names, key_fits
from watcher.bucket.storage import KeyRefused, ObjectRef, Storage, StorageUnavailable
from watcher.core.errors import DocumentError, ErrorCode
from watcher.core.logs import get_logger
from watcher.core.metrics import Metrics
from watcher.core.outcome import Outcome
from watcher.core.pages import PageResult
from watcher.core.settings import Settings
from watcher.engines.base import Engine
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.callbacks import Notifier
from watcher.pipeline.checkpoint import Checkpoints
from watcher.pipeline.decode import Decoder, Document, Limits
from watcher.pipeline.fate import Fate, classify
from watcher.pipeline.fetch import fetch, prepare_work_dir
from watcher.pipeline.publish import publish_error, publish_result, repoint_result
from watcher.pipeline.recognise import Recogniser, engine_call, unreadable
from watcher.pipeline.result import engine_of, render_document, render_error
from watcher.pipeline.settle import settle

log = get_logger("watcher.pipeline.document")


class DocumentWorker:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        engine: Engine,
        metrics: Metrics,
        decoder: Decoder,
        budget: PageBudget | None = None,
        work_dir: Path | None = None,
        retry_at: Callable[[ObjectRef, float], None] = lambda ref, when: None,
        notifier: Notifier | None = None,
    ) -> None:
        self.notifier = notifier
        self.retry_at = retry_at
        self.work_dir = work_dir or prepare_work_dir(settings.temp_dir)
        self.budget = budget or PageBudget(lambda: None)
        self.settings = settings
        self.storage = storage
        self.engine = engine
        self.metrics = metrics
        self.decoder = decoder
        self.names = Names.from_settings(settings)
        self.leases = Leases(storage, settings, self.names)
        self.done = DoneMarkers(storage, self.names)
        self.checkpoints = Checkpoints(storage, self.names)
        self.recogniser = Recogniser(decoder, engine, metrics, settings.text_layer)
        self.limits = Limits(settings.max_pages, settings.max_page_pixels, settings.render_dpi)
        # Versions whose names the store refuses and that could not get an error record.
        self._refused: set[tuple[str, str]] = set()

    async def process(self, ref: ObjectRef, ticket: Ticket | None = None) -> Outcome:
        """Run `ref` through every stage and say how it ended."""
        structlog.contextvars.bind_contextvars(key=ref.key, etag=ref.etag, size=ref.size)
        started = time.perf_counter()
        try:
            outcome = await self._claimed(ref, ticket or Ticket(self.budget, reservation=False))
        finally:
            structlog.contextvars.unbind_contextvars("key", "etag", "size")
        self.metrics.documents.labels(outcome.value).inc()
        self.metrics.stage_seconds.labels("document").observe(time.perf_counter() - started)
        return outcome

    async def _claimed(self, ref: ObjectRef, ticket: Ticket) -> Outcome:
        if (ref.key, ref.etag) in self._refused:
            return Outcome.SKIPPED  # said and counted once; the owner must rename it
        if not self.names.result_keys_fit(ref.key):
            return await self._refuse(ref, None, (
                "the source's name is too long for its result's name "
                f"({self.names.result_json(ref.key)!r} exceeds the store's limits); rename it"))
        try:
            with self.metrics.stage("claim"):
                if await self.done.is_marked(ref):
                    log.info("document_already_done")
                    return Outcome.SKIPPED
                lease = await self.leases.acquire(ref)
        except Exception as exc:
            return await self._failed(ref, None, exc)
        if lease is None:
            return Outcome.HELD  # a race with another replica, lost: the winner has it
        if isinstance(lease, Held):
            # Its holder may have died: look again the moment the lease runs out.
            self.retry_at(ref, lease.expires_at)
            return Outcome.HELD
        try:
            # Another replica may have published it between our check and our lease (it
            # publishes before it lets its lease go): look again, now that nobody else can.
            done = await self.done.check(ref)
        except Exception as exc:
            return await self._failed(ref, lease, exc)
        if done is not None:
            return await self._already_done(ref, lease, done)
        log.info("document_claimed", crashes=lease.crashes)
        if lease.crashes >= self.settings.max_attempts:
            # Every earlier attempt ended with its process: do not offer it another.
            return await self._give_up(ref, lease, ErrorCode.ENGINE_FAILED)
        try:
            await self._check_name_collision(ref)
            await self._run(ref, lease, ticket)
        except asyncio.CancelledError:
            await lease.release()  # drained: the next holder starts at once
            raise
        except Exception as exc:
            return await self._failed(ref, lease, exc)
        await lease.finish()
        return Outcome.DONE

    async def _already_done(self, ref: ObjectRef, lease: Lease, done: Done) -> Outcome:
        await lease.finish()
        if done is not Done.RESULT:
            log.info("document_already_done", known_by=done.value)
            return Outcome.SKIPPED
        # Its result is out but its publisher stopped before the rest (S3 went away, the
        # pod died): do what it did not, so the document counts, is told and is settled.
        log.info("document_done", outcome="done", hint="published earlier; finished now")
        await self._finished(ref)
        return Outcome.DONE

    async def close(self) -> None:
        await self.leases.close()

    async def _check_name_collision(self, ref: ObjectRef) -> None:
        """Raise when this source's result would take another source's error-record name."""
        shadowing = self.names.shadowed_by(ref.key)
        if shadowing is not None and await self.storage.head(shadowing) is not None:
            raise DocumentError(ErrorCode.NAME_COLLISION, (
                f"its result would be named {self.names.result_json(ref.key)!r}, the name of "
                f"the error record of {shadowing!r}; rename one of the two sources"))

    async def _failed(self, ref: ObjectRef, lease: Lease | None, exc: Exception) -> Outcome:
        """The one place where a failed run turns into an error record, a retry or nothing.

        `lease` is None when the claim itself failed."""
        failure = classify(exc)
        if failure.fate is Fate.GONE:
            log.info("document_changed_or_gone")
            if lease is not None:
                await lease.release()
            return Outcome.SKIPPED
        if failure.fate is Fate.TRANSIENT:
            log.warning("document_deferred", reason=failure.message)
            if lease is not None:
                await lease.release()
            return Outcome.RETRY
        if failure.fate is Fate.PERMANENT:
            assert failure.code is not None
            return await self._record_error(ref, lease, failure.code, failure.message)
        if failure.fate is Fate.REFUSED:
            return await self._refuse(ref, lease, failure.message)
        log.error("document_crashed", error=failure.message,
                  attempt=lease.crashes + 1 if lease is not None else None,
                  exc_info=failure.code is ErrorCode.INTERNAL)
        if lease is None:
            return Outcome.RETRY  # nothing claimed, nothing to count: the next poll retries
        try:
            crashes = await lease.record_crash(failure.message)
        except StorageUnavailable:
            await lease.release()
            return Outcome.RETRY
        if crashes < self.settings.max_attempts:
            return Outcome.RETRY
        assert failure.code is not None
        return await self._give_up(ref, lease, failure.code)

    async def _give_up(self, ref: ObjectRef, lease: Lease, code: ErrorCode) -> Outcome:
        what = "the OCR engine failed on" if code is ErrorCode.ENGINE_FAILED else "processing failed for"
        message = (f"{what} this document {lease.crashes} times; giving up "
                   f"(WATCHER_MAX_ATTEMPTS={self.settings.max_attempts}). "
                   f"Attempts: {'; '.join(lease.history) or 'no details recorded'}")
        return await self._record_error(ref, lease, code, message)

    async def _refuse(self, ref: ObjectRef, lease: Lease | None, message: str) -> Outcome:
        """The store refuses a name this document needs: say so once, never loop on it."""
        if key_fits(self.names.error_json(ref.key)):
            return await self._record_error(ref, lease, ErrorCode.KEY_REFUSED, message)
        return await self._skip_refused(ref, lease, message)

    async def _skip_refused(self, ref: ObjectRef, lease: Lease | None, message: str) -> Outcome:
        self._refused.add((ref.key, ref.etag))
        if lease is not None:
            await lease.finish()
        log.error("document_key_refused", message=message, outcome="refused",
                  hint="no error record can be written under this name either; rename the source")
        return Outcome.REFUSED

    async def _record_error(
        self, ref: ObjectRef, lease: Lease | None, code: ErrorCode, message: str
    ) -> Outcome:
        crashes = lease.crashes if lease is not None else 0
        try:
            with self.metrics.stage("publish"):
                await publish_error(self.storage, self.names, ref,
                                    render_error(ref, code, message, max(1, crashes)))
        except StorageUnavailable as exc:
            log.warning("document_deferred", reason=f"error record not written: {exc}")
            if lease is not None:
                await lease.release()
            return Outcome.RETRY
        except KeyRefused as exc:
            return await self._skip_refused(ref, lease, f"{message}; the error record too: {exc}")
        await self.checkpoints.clear(ref)
        if lease is not None:
            await lease.finish()
        log.warning("document_failed", code=code.value, message=message, outcome="error")
        if self.notifier is not None:
            self.notifier.failed(ref, code.value)
        return Outcome.ERROR

    async def _run(self, ref: ObjectRef, lease: Lease, ticket: Ticket) -> None:
        timings: dict[str, float] = {}
        path: Path | None = None
        try:
            t0 = time.perf_counter()
            with self.metrics.stage("fetch"):
                path, digest = await fetch(self.storage, ref, self.work_dir,
                                           self.settings.max_object_bytes)
            ref = replace(ref, sha256=digest)
            timings["fetch_seconds"] = time.perf_counter() - t0
            log.info("document_fetched", seconds=round(timings["fetch_seconds"], 3), sha256=digest)
            if await self._repointed(ref, lease):
                return
            fmt, pages = await self._recognise(ref, path, timings, ticket)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
        if lease.lost:
            raise LeaseLost(ref.key)
        with self.metrics.stage("render"):
            markdown, result = await asyncio.to_thread(
                render_document, ref, self.engine, fmt, pages, timings
            )
        t0 = time.perf_counter()
        with self.metrics.stage("publish"):
            await publish_result(self.storage, self.names, ref, result, markdown)
        if self.checkpoints.wanted(len(pages)):
            await self.checkpoints.clear(ref)
        log.info(
            "document_done", pages=len(pages), outcome="done",
            publish_seconds=round(time.perf_counter() - t0, 3),
            **{k: round(v, 3) for k, v in timings.items()},
        )
        await self._finished(ref)

    async def _repointed(self, ref: ObjectRef, lease: Lease) -> bool:
        """True when this version's content was read before: its result now points here."""
        if lease.lost:
            raise LeaseLost(ref.key)
        with self.metrics.stage("publish"):
            reused_from = await repoint_result(self.storage, self.names, ref, engine_of(self.engine))
        if reused_from is None:
            return False
        log.info("document_done", outcome="done", reused_from_etag=reused_from,
                 hint="same content as the version already read: result re-pointed")
        await self._finished(ref)
        return True

    async def _finished(self, ref: ObjectRef) -> None:
        """The result is out: tell whoever asked, then settle the source."""
        if self.notifier is not None:
            self.notifier.done(ref)
        # A failed source stays where it is, for its owner to inspect or replace.
        with self.metrics.stage("settle"):
            await settle(self.storage, self.names, ref, self.settings.source_action)

    async def _recognise(
        self, ref: ObjectRef, path: Path, timings: dict[str, float], ticket: Ticket
    ) -> tuple[str, list[PageResult]]:
        t0 = time.perf_counter()
        with self.metrics.stage("decode"):
            doc = await self.decoder.open(path, ref.size, self.limits, ref.key)
        timings["decode_seconds_sum"] = time.perf_counter() - t0
        log.info("document_decoded", format=doc.format.value, pages=doc.page_count)
        try:
            kept = await self.checkpoints.load(ref, doc.page_count)
            pages = await self._pages(ref, doc, timings, kept, ticket)
        finally:
            await self.decoder.close(doc)
        failure = unreadable(pages)
        if failure is not None:
            raise failure
        t1 = time.perf_counter()
        with self.metrics.stage("engine"):
            pages = await engine_call(self.engine.finish_document(pages))
        timings["engine_seconds_sum"] += time.perf_counter() - t1
        timings["recognise_seconds"] = time.perf_counter() - t0
        return doc.format.value, pages

    async def _pages(
        self, ref: ObjectRef, doc: Document, timings: dict[str, float],
        kept: dict[int, PageResult], ticket: Ticket,
    ) -> list[PageResult]:
        """Pages rendered on demand, at most WATCHER_PAGE_CONCURRENCY of them in memory;
        pages kept from an earlier attempt are not recognised again."""
        results: list[PageResult | None] = [kept.get(i) for i in range(doc.page_count)]
        checkpointed = self.checkpoints.wanted(doc.page_count)
        gate = asyncio.Semaphore(self.settings.page_concurrency)
        # Sums over pages: with several pages in flight they can exceed the wall time.
        timings.setdefault("decode_seconds_sum", 0.0)
        timings.setdefault("engine_seconds_sum", 0.0)

        async def one(index: int) -> None:
            async with gate:
                await self.budget.acquire(ticket)
                try:
                    result = results[index] = await self.recogniser.page(doc, index, timings)
                    if checkpointed:
                        await self.checkpoints.save(ref, result)
                finally:
                    self.budget.release()
                self.metrics.pages.inc()

        try:
            async with asyncio.TaskGroup() as group:
                for index in range(doc.page_count):
                    if results[index] is None:
                        group.create_task(one(index))
        except BaseExceptionGroup as group_error:
            # Report the first real cause, not the group: callers branch on its type.
            raise group_error.exceptions[0] from None
        return [r for r in results if r is not None]
