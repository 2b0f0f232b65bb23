"""One document through the flow: claim, fetch, decode, engine, render, publish, settle.

Each stage lives in its own module; this one only strings them together, measures them,
and decides what a failure means: a DocumentError is permanent (error record, never
retried for this version), S3 or engine unavailability is transient (release, retry on
the next poll), and an engine crash is retried up to WATCHER_MAX_ATTEMPTS times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import structlog

from watcher.claim import Claims, Lease
from watcher.decode import Decoder, Document, Limits
from watcher.engines.base import Engine, PageResult
from watcher.errors import DocumentError, EngineUnavailable, ErrorCode
from watcher.fetch import fetch
from watcher.layout import Layout
from watcher.logs import get_logger
from watcher.metrics import Metrics
from watcher.publish import publish_error, publish_result
from watcher.render import render_document, render_error
from watcher.settings import Settings
from watcher.settle import settle
from watcher.storage import ObjectRef, PreconditionFailed, Storage, StorageUnavailable

log = get_logger("watcher.worker")
T = TypeVar("T")


class LeaseLost(Exception):
    """Another replica took the claim over; our result must not be published."""


class DocumentWorker:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        engine: Engine,
        metrics: Metrics,
        decoder: Decoder,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.engine = engine
        self.metrics = metrics
        self.decoder = decoder
        self.layout = Layout.from_settings(settings)
        self.claims = Claims(storage, settings, self.layout)
        self.limits = Limits(settings.max_pages, settings.max_page_pixels, settings.render_dpi)
        self._crashes: dict[tuple[str, str], int] = {}

    async def process(self, ref: ObjectRef) -> str:
        """Run `ref` through every stage; returns the outcome label for metrics."""
        structlog.contextvars.bind_contextvars(key=ref.key, etag=ref.etag, size=ref.size)
        started = time.perf_counter()
        try:
            outcome = await self._claimed(ref)
        except (StorageUnavailable, EngineUnavailable, LeaseLost) as exc:
            log.warning("document_deferred", reason=type(exc).__name__, error=str(exc))
            outcome = "retry"
        except Exception as exc:
            # A bug or an input our decoders choke on in an unforeseen way: retried a few
            # times like an engine crash, then recorded, so one document never stalls others.
            log.error("document_crashed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            outcome = await self._crashed(ref, exc)
        finally:
            structlog.contextvars.unbind_contextvars("key", "etag", "size")
        self.metrics.documents.labels(outcome).inc()
        self.metrics.stage_seconds.labels("document").observe(time.perf_counter() - started)
        return outcome

    async def _claimed(self, ref: ObjectRef) -> str:
        with self.metrics.stage("claim"):
            if await self.claims.is_done(ref):
                log.info("document_already_done")
                return "skipped"
            lease = await self.claims.acquire(ref)
        if lease is None:
            return "skipped"
        log.info("document_claimed")
        try:
            outcome = await self._fetched(ref, lease)
            if outcome == "done":
                # A failed source stays where it is, for its owner to inspect or replace.
                with self.metrics.stage("settle"):
                    await settle(self.storage, self.layout, ref, self.settings.source_action)
            return outcome
        finally:
            await lease.release()

    async def _fetched(self, ref: ObjectRef, lease: Lease) -> str:
        timings: dict[str, float] = {}
        path: Path | None = None
        try:
            t0 = time.perf_counter()
            with self.metrics.stage("fetch"):
                path = await fetch(self.storage, ref, self.settings.temp_dir,
                                   self.settings.max_object_bytes)
            timings["fetch_seconds"] = time.perf_counter() - t0
            log.info("document_fetched", seconds=round(timings["fetch_seconds"], 3))
            fmt, pages = await self._recognise(ref, path, timings)
        except DocumentError as exc:
            return await self._fail(ref, exc.code, exc.message)
        except (PreconditionFailed, FileNotFoundError):
            log.info("document_changed_or_gone")
            return "skipped"
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
            await publish_result(self.storage, self.layout, ref, result, markdown)
        self._crashes.pop((ref.key, ref.etag), None)
        log.info(
            "document_done", pages=len(pages), outcome="done",
            publish_seconds=round(time.perf_counter() - t0, 3),
            **{k: round(v, 3) for k, v in timings.items()},
        )
        return "done"

    async def _recognise(
        self, ref: ObjectRef, path: Path, timings: dict[str, float]
    ) -> tuple[str, list[PageResult]]:
        t0 = time.perf_counter()
        with self.metrics.stage("decode"):
            doc = await self.decoder.open(path, ref.size, self.limits, ref.key)
        timings["decode_seconds_sum"] = time.perf_counter() - t0
        log.info("document_decoded", format=doc.format.value, pages=doc.page_count)
        try:
            if self.engine.document_level:
                t1 = time.perf_counter()
                with self.metrics.stage("engine"):
                    pages = await self._engine_call(
                        ref, self.engine.recognize_document(path, doc.format.value, doc.page_count)
                    )
                timings["engine_seconds_sum"] = time.perf_counter() - t1
                self.metrics.pages.inc(len(pages))
            else:
                pages = await self._pages(ref, doc, timings)
        finally:
            await self.decoder.close(doc)
        timings["recognise_seconds"] = time.perf_counter() - t0
        return doc.format.value, pages

    async def _pages(
        self, ref: ObjectRef, doc: Document, timings: dict[str, float]
    ) -> list[PageResult]:
        """Pages rendered on demand, at most WATCHER_PAGE_CONCURRENCY of them in memory."""
        results: list[PageResult | None] = [None] * doc.page_count
        gate = asyncio.Semaphore(self.settings.page_concurrency)
        # Sums over pages: with several pages in flight they can exceed the wall time.
        timings.setdefault("decode_seconds_sum", 0.0)
        timings.setdefault("engine_seconds_sum", 0.0)

        async def one(index: int) -> None:
            async with gate:
                t0 = time.perf_counter()
                with self.metrics.stage("decode"):
                    page = await self.decoder.render(doc, index)
                t1 = time.perf_counter()
                with self.metrics.stage("engine"):
                    results[index] = await self._engine_call(ref, self.engine.recognize(page))
                del page  # free the bitmap before the gate lets the next page render
                t2 = time.perf_counter()
                timings["decode_seconds_sum"] += t1 - t0
                timings["engine_seconds_sum"] += t2 - t1
                self.metrics.pages.inc()

        try:
            async with asyncio.TaskGroup() as group:
                for index in range(doc.page_count):
                    group.create_task(one(index))
        except BaseExceptionGroup as group_error:
            # Report the first real cause, not the group: callers branch on its type.
            raise group_error.exceptions[0] from None
        return [r for r in results if r is not None]

    async def _engine_call(self, ref: ObjectRef, call: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(call, timeout=self.settings.engine_timeout)
        except (DocumentError, EngineUnavailable):
            raise
        except Exception as exc:
            key = (ref.key, ref.etag)
            self._crashes[key] = self._crashes.get(key, 0) + 1
            attempts = self._crashes[key]
            log.error("engine_crashed", attempts=attempts, error=f"{type(exc).__name__}: {exc}")
            if attempts >= self.settings.max_attempts:
                raise DocumentError(
                    ErrorCode.ENGINE_FAILED,
                    f"the OCR engine failed on this document {attempts} times "
                    f"(last: {type(exc).__name__}: {exc}); giving up (WATCHER_MAX_ATTEMPTS)",
                ) from exc
            raise EngineUnavailable(f"engine crashed (attempt {attempts})") from exc

    async def _crashed(self, ref: ObjectRef, exc: Exception) -> str:
        key = (ref.key, ref.etag)
        self._crashes[key] = self._crashes.get(key, 0) + 1
        if self._crashes[key] < self.settings.max_attempts:
            return "retry"
        try:
            return await self._fail(
                ref, ErrorCode.INTERNAL,
                f"processing failed {self._crashes[key]} times "
                f"(last: {type(exc).__name__}: {exc}); giving up (WATCHER_MAX_ATTEMPTS)",
            )
        except StorageUnavailable:
            return "retry"

    async def _fail(self, ref: ObjectRef, code: ErrorCode, message: str) -> str:
        attempts = self._crashes.pop((ref.key, ref.etag), 1)
        with self.metrics.stage("publish"):
            await publish_error(
                self.storage, self.layout, ref, render_error(ref, code, message, attempts)
            )
        log.warning("document_failed", code=code.value, message=message, outcome="error")
        return "error"
