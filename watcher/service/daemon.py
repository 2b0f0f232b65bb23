"""The daemon's life: start-up, the main loop, and a shutdown whose order is written once.

start-up: the HTTP surface first (it answers /health from the first second), then S3
(the conditional-write probe picks leases or shards), the pipeline and its worker pool,
the background parts (engine warm-up, callbacks, SQS) and discovery.

main loop: wait for a stop (SIGTERM/SIGINT, `request_stop()`), or with `--once` for a
poll that finds nothing new.

shutdown (`SHUTDOWN`): discovery stops; idle workers stop, busy ones get
WATCHER_DRAIN_SECONDS to finish their document, and whatever still runs then is
cancelled and its lease released, so another replica (or the next start) takes it over at
once; the SQS reader deletes the messages of what the drain finished and hands the rest
back; listing is handed over; queued callbacks get a few seconds. A second signal skips
the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher.bucket.names import Names
from watcher.bucket.storage import KeyRefused, Storage, StorageUnavailable, open_storage
from watcher.core.identity import Identity
from watcher.core.logs import get_logger, resolve_format
from watcher.core.metrics import Metrics
from watcher.core.outcome import Outcome, OutcomeHook, Report
from watcher.core.refs import ObjectRef
from watcher.core.settings import ClaimMode, Settings
from watcher.engines import Engine, EngineState, create_engine
from watcher.intake.discovery import Discovery
from watcher.intake.events import EventIntake
from watcher.intake.fleet import FleetDiscovery
from watcher.intake.queue import WorkQueue
from watcher.intake.sqs import SqsSource
from watcher.pipeline.budget import PageBudget
from watcher.pipeline.callbacks import Notifier
from watcher.pipeline.decode_workers import ProcessDecoder, decode_workers
from watcher.pipeline.document import DocumentPipeline, Parts
from watcher.pipeline.fetch import prepare_work_dir
from watcher.service.console import DocumentLines, OnceRun, Stopped
from watcher.service.hooks import HeldRetry, LastOutcomes, MetricsHook, RecentWork
from watcher.service.http import HealthServer, StatusPage, Webhook
from watcher.service.poller import Poller
from watcher.service.status import Status
from watcher.service.tasks import keep_running
from watcher.service.workers import WorkerPool

log = get_logger("watcher.service.daemon")
# At shutdown, callbacks still queued get this long to go out.
CALLBACK_FLUSH_SECONDS = 5.0
# Clocks of replicas differ a little; look again just after a lease's stated expiry.
LEASE_EXPIRY_SLACK_SECONDS = 1.0

StorageFactory = Callable[[Settings], AbstractAsyncContextManager[Storage]]


@dataclass
class Running:
    """The parts that exist between start-up and shutdown."""

    storage: Storage
    work_dir: Path
    pipeline: DocumentPipeline
    pool: WorkerPool
    fleet: FleetDiscovery
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        storage_factory: StorageFactory = open_storage,
        once: bool = False,
        identity: Identity | None = None,
    ) -> None:
        self.settings = settings
        # `watcher run --once`: work through what is pending, drain and stop (backfills,
        # Kubernetes Jobs).
        self.once = once
        self.unfinished_reason: str | None = None
        # A configuration or start-up problem that kept it from working (exit 2).
        self.start_problem: str | None = None
        self.released = 0  # documents the drain cut off
        # A person reads stdout (WATCHER_LOG_FORMAT human, or auto on a terminal): a line
        # per document, and a summary when it stops.
        self.for_people = resolve_format(settings.log_format) == "human"
        self.identity = identity or Identity(settings.replica_id)
        self.engine = engine or create_engine(settings)
        self.storage_factory = storage_factory
        self.metrics = Metrics()
        self.engine.on_restart = lambda reason: self.metrics.engine_restarts.labels(reason).inc()
        self.queue = WorkQueue(settings.queue_size)
        self.pages = PageBudget(self.engine.pages_wanted)
        # PDFium and Pillow run in worker processes of their own (pipeline/decode_workers.py).
        self.decoding = decode_workers(settings)
        self.outcomes = LastOutcomes()
        self.names = Names.from_settings(settings)
        self.notifier = (Notifier(settings.callback_url, settings.callback_secret.get_secret_value()
                                  if settings.callback_secret else None, settings.s3_bucket,
                                  self.names,
                                  counted=lambda result: self.metrics.callbacks.labels(result).inc())
                         if settings.callback_url else None)
        self.poller = Poller(self.queue, self.metrics, settings.poll_interval, self._busy)
        self.sqs = (SqsSource(settings, self.queue, self.poke, lambda: self._stop.is_set(),
                              counted=lambda result: self.metrics.notifications.labels("sqs", result).inc())
                    if settings.sqs_queue_url else None)
        self.status = Status(settings, self.engine, self.metrics, self.poller, self.pages, sqs=self.sqs,
                             decoding=self.decoding)
        intake = EventIntake(settings.s3_bucket, self.names, self.queue.offer, self.poke)
        webhook = (Webhook(intake, settings.webhook_token.get_secret_value(), settings.webhook_max_bytes)
                   if settings.webhook_token is not None else None)
        self.recent = RecentWork()
        self.page = (StatusPage(settings.webhook_token.get_secret_value() if settings.webhook_token else None,
                                self.recent, self._read_output)
                     if settings.status_page else None)
        self.http = HealthServer(self.status, settings.http_host, settings.http_port, webhook, self.page)
        self.running: Running | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.listening = asyncio.Event()
        self.started = asyncio.Event()  # S3 reached, workers running

    # --- control -----------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second_stop_signal_skipping_drain")
            self._force.set()
        self._stop.set()

    def poke(self) -> None:
        """Start the next discovery poll now (notifications call this)."""
        self.poller.poke()

    def retry_at(self, ref: ObjectRef, when: float) -> None:
        """Offer `ref` again, ahead of discovered work, once the epoch time `when` passed."""
        delay = max(0.0, when - self.identity.clock()) + LEASE_EXPIRY_SLACK_SECONDS
        asyncio.get_running_loop().call_later(delay, self._offer_urgent, ref)

    def _offer_urgent(self, ref: ObjectRef) -> None:
        # A timer that fires during or after the drain finds the daemon stopping: no-op.
        if not self._stop.is_set() and self.queue.offer_urgent(ref):
            log.info("lease_expired_retrying", key=ref.key)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    # --- what tests, the demo and --once read -----------------------------------------
    @property
    def polls(self) -> int:
        return self.poller.polls

    async def wait_polls(self, count: int, timeout: float) -> None:
        await self.poller.wait_polls(count, timeout)

    @property
    def fleet(self) -> FleetDiscovery | None:
        return self.running.fleet if self.running is not None else None

    @property
    def pool(self) -> WorkerPool | None:
        return self.running.pool if self.running is not None else None

    def workers_down(self) -> int:
        return self.running.pool.down() if self.running is not None else 0

    def unfinished(self) -> list[Report]:
        """--once: sources whose last run did not end with a result."""
        return self.outcomes.unfinished()

    async def _read_output(self, key: str) -> bytes | None:
        """What the status page links to: objects under the output prefix only."""
        if self.running is None or not key.startswith(self.settings.output_prefix):
            return None
        got = await self.running.storage.get_bytes(key)
        return got[0] if got is not None else None

    def stopped(self) -> Stopped:
        """For the stop summary."""
        where = f"s3://{self.settings.s3_bucket}/{self.settings.output_prefix}"
        return Stopped(self.outcomes.counts, self.released, where)

    def once_run(self) -> OnceRun:
        """For `--once`'s summary: this run's error records and what stayed unfinished,
        and the sources whose error record is from an earlier run."""
        failed = self.outcomes.ended_with(Outcome.ERROR)
        now = {r.ref.key for r in failed}
        fleet = self.fleet
        earlier = [(ref.key, self.names.error_json(ref.key))
                   for ref in (fleet.discovery.error_recorded if fleet is not None else [])
                   if ref.key not in now]
        unfinished = self.outcomes.ended_with(Outcome.RETRY, Outcome.REFUSED, Outcome.HELD)
        return OnceRun(self.outcomes.counts, failed, unfinished, earlier,
                       self.start_problem or self.unfinished_reason)

    def _busy(self) -> set[ObjectRef]:
        return self.running.pool.busy() if self.running is not None else set()

    # --- life --------------------------------------------------------------------------
    async def run(self) -> None:
        await self.http.start()
        log.info("http_listening", host=self.settings.http_host, port=self.http.port)
        self.listening.set()
        try:
            async with self.storage_factory(self.settings) as storage:
                self.running = await self._startup(storage)
                try:
                    await self._main_loop()
                finally:
                    await self._shutdown(self.running)
        finally:
            self.status.draining = True
            await self.engine.close()
            await self.decoding.close()
            await self.http.stop()
            log.info("daemon_stopped")

    async def _startup(self, storage: Storage) -> Running:
        await self._choose_claim_mode(storage)
        work_dir = prepare_work_dir(self.settings.temp_dir)
        await self.decoding.start()
        pipeline = DocumentPipeline.reading_with(self.engine, self.settings, storage, self.metrics,
                                                 self.pages, work_dir, self.identity,
                                                 ProcessDecoder(self.decoding))
        fleet = self.build_discovery(storage)
        hooks: list[OutcomeHook] = [MetricsHook(self.metrics, self.status.refresh_gauges),
                                    self.outcomes, self.recent, HeldRetry(self.retry_at), fleet]
        hooks += [hook for hook in (self.sqs, self.notifier) if hook is not None]
        if self.for_people:
            hooks.append(DocumentLines())
        pool = WorkerPool(pipeline, self.queue, self.pages, self.metrics, hooks,
                          self._wait_engine_ready, self.settings.max_inflight_documents)
        running = Running(storage, work_dir, pipeline, pool, fleet)
        self.status.pool, self.status.fleet = pool, fleet
        self.status.isolation = pipeline.isolation
        if self.notifier is not None:
            running.tasks["callbacks"] = keep_running("callbacks", self.notifier.run)
        if self.sqs is not None:
            running.tasks["sqs"] = keep_running("sqs", self.sqs.run)
        running.tasks["engine-warm"] = asyncio.create_task(self._keep_engine_warm(), name="engine-warm")
        running.tasks["discovery"] = keep_running("discovery", lambda: self.poller.run(fleet))
        pool.start()
        log.info(
            "daemon_started", bucket=self.settings.s3_bucket, engine=self.engine.name,
            input_prefix=self.settings.input_prefix, output_prefix=self.settings.output_prefix,
            replica=self.settings.replica_id,
        )
        self.started.set()
        return running

    async def _main_loop(self) -> None:
        if self.once:
            await self._until_nothing_pending()
            self._stop.set()
        await self._stop.wait()

    async def _shutdown(self, running: Running) -> None:
        """The drain, in the order that loses nothing (see the module's docstring)."""
        self.status.draining = True
        log.info("drain_started", inflight=running.pool.inflight, grace_seconds=self.settings.drain_seconds)
        await _cancel(running.tasks.pop("discovery"), running.tasks.pop("engine-warm"))
        self.released = await running.pool.drain(self.settings.drain_seconds, self._force)
        # After the drain: the messages of documents it finished are deleted first.
        await _cancel(*(t for t in [running.tasks.pop("sqs", None)] if t is not None))
        await running.fleet.close()  # hands listing over; a failed delete is logged there
        await self._flush_callbacks(running.tasks.pop("callbacks", None))
        await running.pipeline.close()
        shutil.rmtree(running.work_dir, ignore_errors=True)

    async def _choose_claim_mode(self, storage: Storage) -> None:
        """Leases need conditional writes; a store that ignores them gets key-hash shards.
        The probe also says whether conditional deletes and copies hold (Conditions)."""
        if self.settings.claim_mode is ClaimMode.SHARD:
            self.status.claims_probe = "not probed (WATCHER_CLAIM_MODE=shard)"
            return
        try:
            conditions = await storage.probe_conditions(self.settings.lease_prefix)
        except (StorageUnavailable, KeyRefused) as exc:
            self.status.claims_probe = f"not probed: {exc}"
            log.warning("claims_probe_failed", error=str(exc), mode="lease")
            return
        ignored = conditions.ignored()
        if conditions.put:
            self.status.claims_probe = "conditional writes enforced" + (
                f"; the store ignores {' and '.join(ignored)}" if ignored else "")
            if ignored:
                log.warning("conditional_requests_ignored", ignored=ignored,
                            hint="deletes and moves compare first (a HEAD) instead")
            return
        self.status.claims_probe = "the store ignores If-None-Match and If-Match"
        self.settings = self.settings.model_copy(update={"claim_mode": ClaimMode.SHARD})
        self.status.settings = self.settings
        log.error("conditional_writes_ignored_using_shards", ignored=ignored,
                  shard=f"{self.settings.shard_index}/{self.settings.shard_count}",
                  hint="give each replica WATCHER_SHARD_INDEX and all WATCHER_SHARD_COUNT "
                  "(a StatefulSet's pod ordinal is used when the index is not set)")

    def build_discovery(self, storage: Storage) -> FleetDiscovery:
        """Count every S3 request; pace listings to the budget; one lister per fleet where
        leases work (a shard lists only its keys, but every shard lists: budget split)."""
        storage.on_request = self._count_request
        parts = Parts.of(storage, self.settings, self.identity)
        shard = self.settings.claim_mode is ClaimMode.SHARD
        shared = self.settings.shared_listing and not shard and not self.once
        budget = self.settings.list_requests_per_second
        storage.pace_listing(budget / self.settings.shard_count if shard else budget)
        discovery = Discovery(storage, self.settings, parts.names, self.identity.clock,
                              parts.leases.holder_is_dead)
        return FleetDiscovery(discovery, parts.leases, storage, parts.names, shared)

    def _count_request(self, op: str) -> None:
        self.metrics.s3_requests.labels(op).inc()
        if op == "list":
            self.poller.list_requests += 1

    async def _flush_callbacks(self, task: asyncio.Task[None] | None) -> None:
        """Give queued callbacks a few seconds to go out; the results are in S3 regardless."""
        if self.notifier is not None and not self.notifier.queue.empty():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CALLBACK_FLUSH_SECONDS):
                    await self.notifier.queue.join()
        if task is not None:
            await _cancel(task)

    async def _until_nothing_pending(self) -> None:
        """--once: poll, work through what it found, poll again; done when a poll finds
        nothing new. A document that keeps failing transiently (S3 or the engine away)
        is offered again each round, WATCHER_MAX_ATTEMPTS + 1 rounds at most."""
        for _round in range(self.settings.max_attempts + 2):
            await self.poller.next_poll(self._stop.is_set)
            if self._stop.is_set():
                return
            if self.poller.offered_last == 0:
                return
            while self.queue.unfinished():
                if self.engine.state is EngineState.FAILED:
                    self.start_problem = f"the engine failed to start: {self.engine.error}"
                    return
                await asyncio.sleep(0.1)
        if self.poller.s3_reachable is False:
            where = f"at {self.settings.s3_endpoint} (bucket {self.settings.s3_bucket})"
            if not self.poller.last_poll:
                self.start_problem = (f"S3 could not be listed {where}: {self.poller.s3_error}; "
                                      "`watcher check` says why")
            else:
                self.unfinished_reason = f"S3 stopped answering {where}: {self.poller.s3_error}"
            return
        self.unfinished_reason = "documents were still pending after the last round"

    async def _keep_engine_warm(self) -> None:
        """Warm the engine; if warm-up fails (VLM server late or broken), try again later."""
        await self.engine.start()
        while True:
            await asyncio.sleep(self.settings.engine_retry_seconds)
            problem = self.status.liveness_problem()  # keeps the VLM's down-time counted
            if problem is not None:
                log.error("vlm_server_down_too_long", problem=problem)
            if self.engine.state is EngineState.FAILED:
                log.info("engine_retrying_warm_up", engine=self.engine.name)
                await self.engine.start()

    async def _wait_engine_ready(self) -> None:
        while self.engine.state is not EngineState.READY or self.engine.unavailable:
            await asyncio.sleep(0.2)


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[asyncio.Task[None]]:
    """Run a daemon in the background of the current loop; stop and drain on exit."""
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        yield task
    finally:
        # A stop already asked for (Ctrl-C, SIGTERM) is not asked again: a second request
        # means "skip the drain".
        if not daemon.stop_requested:
            daemon.request_stop()
        await task


