"""One document through the flow: claim, fetch, read (decode and recognise), result,
publish, settle.

A document with crashes on record is a suspect and runs alone on the replica, page by
page (pipeline/isolation.py); on its last attempt the pages blamed for its crashes are
left out with a page error, so that one poison page costs that page, not the document,
and a pod-killing document is charged for its own deaths only.

Each stage lives in its own module; this one only strings them together and times them.
What a failure means is decided in pipeline/fate.py; what follows from it (error record,
release, attempt counted in the lease) happens in `_failed`, once. A run ends in a
`Report`, which the service hands to its outcome hooks (metrics, callbacks, SQS, ...).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from watcher.bucket.done import HAS_RESULT, Done, DoneMarkers
from watcher.bucket.leases import Lease, LeaseLost, Leases
from watcher.bucket.names import Names, key_fits
from watcher.bucket.storage import KeyRefused, PreconditionFailed, Storage, StorageUnavailable
from watcher.core.bounded import BoundedSet
from watcher.core.errors import DocumentError, ErrorCode
from watcher.core.identity import Identity
from watcher.core.logs import get_logger
from watcher.core.metrics import Metrics, StageTimer
from watcher.core.outcome import Outcome, Report
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings, SourceAction
from watcher.engines.base import Engine
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.checkpoint import Checkpoints
from watcher.pipeline.claim import Claim, Claimer
from watcher.pipeline.decode import Decoder
from watcher.pipeline.fate import Fate, classify
from watcher.pipeline.fetch import fetch, prepare_work_dir
from watcher.pipeline.isolation import Entry, Isolation
from watcher.pipeline.outputs import outputs_of
from watcher.pipeline.publish import Publisher, Superseded
from watcher.pipeline.recognise import EVERYTHING_AT_ONCE, DocumentReader, Reader, ReadPlan
from watcher.pipeline.result import build_result, error_record, timings_of
from watcher.pipeline.settle import Settled, settle

log = get_logger("watcher.pipeline.document")

# Versions whose names the store refuses and that could not get an error record.
REFUSED_REMEMBERED = 10_000


@dataclass(frozen=True)
class Parts:
    """What the pipeline works with: the bucket's pieces for one replica."""

    storage: Storage
    names: Names
    leases: Leases
    done: DoneMarkers
    checkpoints: Checkpoints

    @classmethod
    def of(cls, storage: Storage, settings: Settings, identity: Identity | None = None) -> Parts:
        names = Names.from_settings(settings)
        return cls(storage, names, Leases(storage, settings, names, identity),
                   DoneMarkers(storage, names), Checkpoints(storage, names))


class DocumentPipeline:
    def __init__(self, settings: Settings, parts: Parts, reader: Reader, metrics: Metrics,
                 budget: PageBudget, work_dir: Path) -> None:
        self.settings = settings
        self.storage = parts.storage
        self.names = parts.names
        self.leases = parts.leases
        self.done = parts.done
        self.checkpoints = parts.checkpoints
        self.reader = reader
        self.metrics = metrics
        self.budget = budget
        self.work_dir = work_dir
        self.claimer = Claimer(parts.leases, parts.done)
        self.publisher = Publisher(parts.storage, parts.names, parts.done, outputs_of(settings))
        self._refused: BoundedSet[tuple[str, str]] = BoundedSet(REFUSED_REMEMBERED)
        self.isolation = Isolation()

    @classmethod
    def reading_with(cls, engine: Engine, settings: Settings, storage: Storage, metrics: Metrics,
                     budget: PageBudget | None = None, work_dir: Path | None = None,
                     identity: Identity | None = None, decoder: Decoder | None = None) -> DocumentPipeline:
        """The pipeline as the daemon builds it: `decoder` (the daemon's decode workers; in
        this process when None), the text layer and `engine` reading."""
        parts = Parts.of(storage, settings, identity)
        budget = budget or PageBudget(lambda: None)
        reader = DocumentReader(decoder or Decoder(), engine, settings, parts.checkpoints, budget, metrics)
        return cls(settings, parts, reader, metrics, budget,
                   work_dir or prepare_work_dir(settings.temp_dir))

    async def process(self, ref: ObjectRef, ticket: Ticket | None = None) -> Report:
        """Run `ref` through every stage and say how it ended."""
        structlog.contextvars.bind_contextvars(key=ref.key, etag=ref.etag, size=ref.size)
        started = time.perf_counter()
        timer = self.metrics.timer()
        try:
            report = await self._process(ref, ticket or Ticket(self.budget, reservation=False), timer)
        finally:
            structlog.contextvars.unbind_contextvars("key", "etag", "size")
        return replace(report, seconds=time.perf_counter() - started)

    async def close(self) -> None:
        await self.leases.close()

    async def _process(self, ref: ObjectRef, ticket: Ticket, timer: StageTimer) -> Report:
        if (ref.key, ref.etag) in self._refused:
            return Report(ref, Outcome.SKIPPED, message="its names are refused by the store")
        if not self.names.result_keys_fit(ref.key):
            return await self._refuse(ref, None, (
                "the source's name is too long for its result's name "
                f"({self.names.result_json(ref.key)!r} exceeds the store's limits); rename it"))
        async with self.isolation.admitted(ref, ticket) as entry:
            return await self._admitted(ref, ticket, timer, entry)

    async def _claim(self, ref: ObjectRef, timer: StageTimer) -> Claim | Report:
        try:
            with timer.stage("claim"):
                return await self.claimer.claim(ref)
        except Exception as exc:
            return await self._failed(ref, None, exc)

    async def _admitted(self, ref: ObjectRef, ticket: Ticket, timer: StageTimer, entry: Entry) -> Report:
        claim = await self._claim(ref, timer)
        if isinstance(claim, Report):
            return claim
        lease = claim.lease
        if lease is not None and lease.crashes and not self._spent(lease) and not entry.alone_now():
            # A suspect with company: give the lease back (its count stays), wait holding
            # nothing until the replica is empty, then claim again and run alone.
            log.info("document_waits_to_run_alone", crashes=lease.crashes,
                     others=self.isolation.inside - 1)
            await lease.release()
            await entry.wait_alone()
            claim = await self._claim(ref, timer)
            if isinstance(claim, Report):
                return claim
        if claim.done is not None:
            return await self._already_done(ref, claim.done, timer)
        if claim.held is not None:
            # Its holder may have died: look again the moment the lease runs out.
            return Report(ref, Outcome.HELD, message=f"held by {claim.held.owner}",
                          retry_at=claim.held.expires_at)
        if claim.lease is None:
            return Report(ref, Outcome.HELD, message="another replica claimed it first")
        lease = claim.lease
        log.info("document_claimed", crashes=lease.crashes, alone=entry.alone or None,
                 blamed_pages=lease.blamed or None)
        if ref.last_modified is not None and not lease.crashes:
            waited = time.time() - ref.last_modified.timestamp()
            self.metrics.pickup_seconds.observe(max(0.0, waited))
        plan = self._plan(lease, entry)
        if plan is None:
            # Every earlier attempt ended with its process: do not offer it another.
            return await self._give_up(ref, lease, ErrorCode.ENGINE_FAILED)
        try:
            await self._check_name_collision(ref)
            with self.metrics.progress.reading(ref):
                report = await self._run(ref, lease, ticket, timer, plan)
        except asyncio.CancelledError:
            await lease.release()  # drained: the next holder starts at once
            raise
        except Exception as exc:
            return await self._failed(ref, lease, exc)
        await lease.finish()
        return report

    def _spent(self, lease: Lease) -> bool:
        """Its attempts are used up: given up without another run.

        One more is allowed past WATCHER_MAX_ATTEMPTS when the deaths that used them up
        were blamed on pages, since those pages are not read again; after that, or
        without a page to blame, it is given up."""
        limit = self.settings.max_attempts
        return lease.crashes >= limit and (not lease.blamed or lease.crashes > limit)

    def _plan(self, lease: Lease, entry: Entry) -> ReadPlan | None:
        """How to read a claimed document (its last attempt leaves the blamed pages out),
        or None when it is to be given up."""
        limit = self.settings.max_attempts
        crashes = lease.crashes
        if self._spent(lease):
            return None
        if not crashes:
            return EVERYTHING_AT_ONCE
        skip = frozenset(lease.blamed) if crashes >= limit - 1 else frozenset()
        return ReadPlan(alone=entry.alone, skip=skip, attempts=crashes, progress=lease.working_on)

    async def _already_done(self, ref: ObjectRef, done: Done, timer: StageTimer) -> Report:
        """Done before we looked. A source with its result still in the input prefix under
        `move` or `delete` was not settled (its settler was cut off): settle it now. A
        failed source stays, for its owner to inspect or replace."""
        settled = Settled.KEPT
        if done in HAS_RESULT and self.settings.source_action is not SourceAction.KEEP:
            try:
                if done is Done.RESULT or await self.done.has_result(ref):
                    settled = await self._settle(ref, timer)
                else:
                    await self.done.remark_as_error(ref)  # an old marker of an error record
            except (StorageUnavailable, KeyRefused) as exc:
                log.warning("source_not_settled", error=str(exc))
        if done is Done.RESULT:
            # Its result was out but its publisher stopped before the marker (S3 went
            # away, the pod died): it counts, is told and is settled now.
            log.info("document_done", outcome="done", hint="published earlier; finished now")
            return Report(ref, Outcome.DONE, output=self.names.result_json(ref.key))
        log.info("document_already_done", known_by=done.value,
                 settled=settled.value if settled is not Settled.KEPT else None)
        return Report(ref, Outcome.SKIPPED, message=f"already done ({done.value})")

    async def _check_name_collision(self, ref: ObjectRef) -> None:
        """Raise when this source's result would take another source's error-record name."""
        shadowing = self.names.shadowed_by(ref.key)
        if shadowing is not None and await self.storage.head(shadowing) is not None:
            raise DocumentError(ErrorCode.NAME_COLLISION, (
                f"its result would be named {self.names.result_json(ref.key)!r}, the name of "
                f"the error record of {shadowing!r}; rename one of the two sources"))

    # --- the run --------------------------------------------------------------------
    async def _run(self, ref: ObjectRef, lease: Lease, ticket: Ticket, timer: StageTimer,
                   plan: ReadPlan) -> Report:
        with timer.stage("fetch"):
            fetched = await fetch(self.storage, ref, self.work_dir, self.settings.max_object_bytes)
        if fetched.size != ref.size:
            log.info("document_size_differs", listed=ref.size, fetched=fetched.size,
                     hint="a notification's or listing's size is a hint; the bytes decide")
        ref = replace(ref, size=fetched.size, sha256=fetched.sha256)
        try:
            log.info("document_fetched", seconds=round(timer.seconds["fetch"], 3),
                     sha256=fetched.sha256, bytes=fetched.size)
            reused_from = await self._repointed(ref, lease, timer)
            if reused_from is not None:
                log.info("document_done", outcome="done", reused_from_etag=reused_from,
                         hint="same content as the version already read: result re-pointed")
                await self._settle(ref, timer)
                return Report(ref, Outcome.DONE, output=self.names.result_json(ref.key))
            reading = await self.reader.read(ref, fetched.path, fetched.size, timer, ticket, plan)
        finally:
            fetched.path.unlink(missing_ok=True)
        if not lease.valid():
            raise LeaseLost(ref.key)
        with timer.stage("render"):
            markdown, result, extras = await asyncio.to_thread(
                build_result, ref, self.reader.engine_id(), reading.format, reading.pages,
                timer.seconds, self.publisher.outputs, self.names.asset_folder(ref.key))
        with timer.stage("publish"):
            await self.publisher.result(ref, lease, result, markdown, extras, reading.assets)
        if plan.alone or self.checkpoints.wanted(len(reading.pages)):
            await self.checkpoints.clear(ref)
        log.info("document_done", pages=len(reading.pages), outcome="done",
                 publish_seconds=round(timer.seconds["publish"], 3),
                 render_seconds=round(timer.seconds["render"], 3),
                 **{k: round(v, 3) for k, v in timings_of(timer.seconds).items()})
        await self._settle(ref, timer)
        return Report(ref, Outcome.DONE, output=self.names.result_json(ref.key),
                      pages=len(reading.pages))

    async def _repointed(self, ref: ObjectRef, lease: Lease, timer: StageTimer) -> str | None:
        """The ETag whose result now serves this version (same content read before), or None."""
        if not lease.valid():
            raise LeaseLost(ref.key)
        with timer.stage("publish"):
            return await self.publisher.repoint(ref, lease, self.reader.engine_id())

    async def _settle(self, ref: ObjectRef, timer: StageTimer) -> Settled:
        """Keep, move or delete the source once its result is out. A failure leaves it in
        the input prefix, marked done: whoever sees it next settles it (claim stage)."""
        try:
            with timer.stage("settle"):
                return await settle(self.storage, self.names, ref, self.settings.source_action)
        except (StorageUnavailable, KeyRefused) as exc:
            log.warning("source_not_settled", error=str(exc),
                        hint="it stays in the input prefix until the next poll settles it")
            return Settled.KEPT

    # --- failures -------------------------------------------------------------------
    async def _failed(self, ref: ObjectRef, lease: Lease | None, exc: Exception) -> Report:
        """The one place where a failed run turns into an error record, a retry or nothing.

        `lease` is None when the claim itself failed."""
        failure = classify(exc)
        if failure.fate is Fate.GONE:
            log.info("document_changed_or_gone", reason=failure.message)
            if lease is not None:
                await lease.release()
            return Report(ref, Outcome.SKIPPED, message=failure.message)
        if failure.fate is Fate.TRANSIENT:
            log.warning("document_deferred", reason=failure.message)
            if lease is not None:
                await lease.release()
            return Report(ref, Outcome.RETRY, message=failure.message)
        if failure.fate is Fate.PERMANENT:
            assert failure.code is not None
            if failure.code is ErrorCode.ENGINE_FAILED and lease is not None and lease.crashes:
                # Every page was left out for the crashes on record (this run was one
                # more attempt): say what they were.
                return await self._give_up(ref, lease, failure.code, lease.crashes + 1)
            return await self._record_error(ref, lease, failure.code, failure.message)
        if failure.fate is Fate.REFUSED:
            return await self._refuse(ref, lease, failure.message)
        log.error("document_crashed", error=failure.message,
                  attempt=lease.crashes + 1 if lease is not None else None,
                  exc_info=failure.code is ErrorCode.INTERNAL)
        if lease is None:
            # Nothing claimed, nothing to count: the next poll retries.
            return Report(ref, Outcome.RETRY, message=failure.message)
        try:
            crashes = await lease.record_crash(failure.message, failure.page)
        except StorageUnavailable:
            await lease.release()
            return Report(ref, Outcome.RETRY, message=failure.message)
        if crashes < self.settings.max_attempts or (failure.page is not None
                                                    and crashes == self.settings.max_attempts):
            return Report(ref, Outcome.RETRY, message=failure.message)
        assert failure.code is not None
        return await self._give_up(ref, lease, failure.code)

    async def _give_up(self, ref: ObjectRef, lease: Lease, code: ErrorCode,
                       attempts: int | None = None) -> Report:
        what = "the OCR engine failed on" if code is ErrorCode.ENGINE_FAILED else "processing failed for"
        attempts = attempts or lease.crashes
        left_out = ", and no page of it is left to read" if attempts > lease.crashes else ""
        message = (f"{what} this document {lease.crashes} times{left_out}; giving up "
                   f"(WATCHER_MAX_ATTEMPTS={self.settings.max_attempts}). "
                   f"Attempts: {'; '.join(lease.history) or 'no details recorded'}")
        return await self._record_error(ref, lease, code, message, attempts)

    async def _refuse(self, ref: ObjectRef, lease: Lease | None, message: str) -> Report:
        """The store refuses a name this document needs: say so once, never loop on it."""
        if key_fits(self.names.error_json(ref.key)):
            return await self._record_error(ref, lease, ErrorCode.KEY_REFUSED, message)
        return await self._skip_refused(ref, lease, message)

    async def _skip_refused(self, ref: ObjectRef, lease: Lease | None, message: str) -> Report:
        self._refused.add((ref.key, ref.etag))
        if lease is not None:
            await lease.finish()
        log.error("document_key_refused", message=message, outcome="refused",
                  hint="no error record can be written under this name either; rename the source")
        return Report(ref, Outcome.REFUSED, message=message)

    async def _record_error(
        self, ref: ObjectRef, lease: Lease | None, code: ErrorCode, message: str,
        attempts: int | None = None,
    ) -> Report:
        crashes = attempts or (lease.crashes if lease is not None else 0)
        try:
            await self.publisher.error(ref, lease, error_record(ref, code, message, max(1, crashes)))
        except (StorageUnavailable, LeaseLost) as exc:
            log.warning("document_deferred", reason=f"error record not written: {exc}")
            if lease is not None:
                await lease.release()
            return Report(ref, Outcome.RETRY, message=str(exc))
        except (Superseded, PreconditionFailed, FileNotFoundError):
            log.info("document_changed_or_gone", reason="replaced before its error record was written")
            if lease is not None:
                await lease.release()
            return Report(ref, Outcome.SKIPPED, message="the source changed or was deleted")
        except KeyRefused as exc:
            return await self._skip_refused(ref, lease, f"{message}; the error record too: {exc}")
        await self.checkpoints.clear(ref)
        if lease is not None:
            await lease.finish()
        log.warning("document_failed", code=code.value, message=message, outcome="error")
        return Report(ref, Outcome.ERROR, output=self.names.error_json(ref.key), code=code.value,
                      message=message)
