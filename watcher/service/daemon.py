"""The daemon's life: HTTP first, engine warm-up, discovery and workers, then a drain.

Shutdown (SIGTERM/SIGINT, or `request_stop()`): discovery stops, idle workers stop, busy
workers get WATCHER_DRAIN_SECONDS to finish their document; whatever is still running
then is cancelled and its lease released, so another replica (or the next start) takes
it over at once. A second signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from watcher.bucket.leases import Leases, ignored_conditions
from watcher.bucket.names import Names
from watcher.bucket.storage import KeyRefused, ObjectRef, Storage, StorageUnavailable, open_storage
from watcher.core.logs import get_logger, scrubber
from watcher.core.metrics import Metrics
from watcher.core.outcome import FINISHED, Outcome
from watcher.core.settings import ClaimMode, Settings
from watcher.engines import Engine, EngineState, create_engine
from watcher.intake.discovery import BATCH as DISCOVERY_BATCH
from watcher.intake.discovery import Discovery
from watcher.intake.events import EventIntake
from watcher.intake.fleet import FleetDiscovery, Role
from watcher.intake.queue import WorkQueue
from watcher.intake.sqs import SqsSource
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.callbacks import Notifier
from watcher.pipeline.decode import Decoder
from watcher.pipeline.document import DocumentWorker
from watcher.pipeline.fetch import prepare_work_dir
from watcher.service.http import HealthServer

log = get_logger("watcher.service.daemon")
# At shutdown, callbacks still queued get this long to go out.
CALLBACK_FLUSH_SECONDS = 5.0
# Clocks of replicas differ a little; look again just after a lease's stated expiry.
LEASE_EXPIRY_SLACK_SECONDS = 1.0

StorageFactory = Callable[[Settings], AbstractAsyncContextManager[Storage]]


class Daemon:
    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        storage_factory: StorageFactory = open_storage,
        once: bool = False,
    ) -> None:
        self.settings = settings
        # `watcher run --once`: work through what is pending, drain and stop (backfills,
        # Kubernetes Jobs). `last_outcomes` says how each document's last run ended.
        self.once = once
        self.last_outcomes: dict[str, Outcome] = {}
        self.unfinished_reason: str | None = None
        self.claims_probe = "not probed yet"
        self._offered_last_poll: int | None = None
        self.engine = engine or create_engine(settings)
        self.storage_factory = storage_factory
        self.metrics = Metrics()
        self.engine.on_restart = lambda reason: self.metrics.engine_restarts.labels(reason).inc()
        self.queue = WorkQueue(settings.queue_size)
        self.pages = PageBudget(self.engine.pages_wanted)
        self.decoder = Decoder()
        self.notifier = (Notifier(settings.callback_url, settings.callback_secret.get_secret_value()
                                  if settings.callback_secret else None, settings.s3_bucket,
                                  Names.from_settings(settings))
                         if settings.callback_url else None)
        intake = EventIntake(settings.s3_bucket, Names.from_settings(settings), self.queue.offer, self.poke)
        self.http = HealthServer(self, settings.http_host, settings.http_port, intake)
        self.sqs = (SqsSource(settings, self.queue, self.poke, lambda: self._stop.is_set())
                    if settings.sqs_queue_url else None)
        self.started_at = time.monotonic()
        self.s3_reachable: bool | None = None
        self.s3_error: str | None = None
        self.inflight = 0
        self.backlog = 0
        self.polls = 0
        self.fleet: FleetDiscovery | None = None
        self.last_poll: dict[str, Any] = {}
        self._list_requests = 0
        self.draining = False
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._poll_now = asyncio.Event()
        self._busy: dict[asyncio.Task[None], ObjectRef | None] = {}
        self._workers: list[asyncio.Task[None]] = []
        self.poll_done = asyncio.Condition()
        self.listening = asyncio.Event()

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
        self._poll_now.set()

    def retry_at(self, ref: ObjectRef, when: float) -> None:
        """Offer `ref` again, ahead of discovered work, once the epoch time `when` passed."""
        delay = max(0.0, when - time.time()) + LEASE_EXPIRY_SLACK_SECONDS
        asyncio.get_running_loop().call_later(delay, self._offer_urgent, ref)

    def _offer_urgent(self, ref: ObjectRef) -> None:
        # A timer that fires during or after the drain finds the daemon stopping: no-op.
        if not self._stop.is_set() and self.queue.offer_urgent(ref):
            log.info("lease_expired_retrying", key=ref.key)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def scrub(self, data: Any) -> Any:
        return scrubber.scrub(data)

    def workers_down(self) -> int:
        """Document worker loops not running (restarted at once, so normally 0)."""
        return 0 if self.draining else sum(1 for task in self._workers if task.done())

    def refresh_gauges(self) -> None:
        self.metrics.inflight.set(self.inflight)
        self.metrics.backlog.set(self.backlog)
        self.metrics.engine_ready.set(1 if self.engine.state is EngineState.READY else 0)
        self.metrics.lister.set(1 if self.fleet is not None and self.fleet.role is Role.LISTER else 0)
        wanted = self.engine.pages_wanted()
        if wanted is not None:
            self.metrics.pages_wanted.set(wanted)
        limit = self.engine.request_limit()
        if limit is not None:
            self.metrics.vlm_request_limit.set(limit)

    async def wait_polls(self, count: int, timeout: float) -> None:
        """Test and demo helper: wait until `count` discovery polls have completed."""
        async with asyncio.timeout(timeout):
            async with self.poll_done:
                await self.poll_done.wait_for(lambda: self.polls >= count)

    # --- life --------------------------------------------------------------------------
    async def run(self) -> None:
        await self.http.start()
        log.info("http_listening", host=self.settings.http_host, port=self.http.port)
        self.listening.set()
        try:
            async with self.storage_factory(self.settings) as storage:
                await self._serve(storage)
        finally:
            self.draining = True
            await self.engine.close()
            await self.http.stop()
            log.info("daemon_stopped")

    async def _choose_claim_mode(self, storage: Storage) -> None:
        """Leases need conditional writes; a store that ignores them gets key-hash shards."""
        if self.settings.claim_mode is ClaimMode.SHARD:
            self.claims_probe = "not probed (WATCHER_CLAIM_MODE=shard)"
            return
        try:
            ignored = await ignored_conditions(storage, self.settings.lease_prefix)
        except (StorageUnavailable, KeyRefused) as exc:
            self.claims_probe = f"not probed: {exc}"
            log.warning("claims_probe_failed", error=str(exc), mode="lease")
            return
        if not ignored:
            self.claims_probe = "conditional writes enforced"
            return
        self.claims_probe = f"the store ignores {' and '.join(ignored)}"
        self.settings = self.settings.model_copy(update={"claim_mode": ClaimMode.SHARD})
        log.error("conditional_writes_ignored_using_shards", ignored=ignored,
                  shard=f"{self.settings.shard_index}/{self.settings.shard_count}",
                  hint="give each replica WATCHER_SHARD_INDEX and all WATCHER_SHARD_COUNT "
                  "(a StatefulSet's pod ordinal is used when the index is not set)")

    async def _serve(self, storage: Storage) -> None:
        await self._choose_claim_mode(storage)
        work_dir = prepare_work_dir(self.settings.temp_dir)
        worker = DocumentWorker(self.settings, storage, self.engine, self.metrics, self.decoder,
                                self.pages, work_dir, self.retry_at, self.notifier)
        notices = asyncio.create_task(self.notifier.run() if self.notifier else asyncio.sleep(0),
                                      name="callbacks")
        reader = asyncio.create_task(self.sqs.run() if self.sqs else asyncio.sleep(0), name="sqs")
        discovery = self._discovery(storage)
        warm = asyncio.create_task(self._keep_engine_warm(), name="engine-warm")
        poller = asyncio.create_task(self._discover_forever(discovery), name="discovery")
        self._workers = [self._start_worker(worker, i)
                         for i in range(self.settings.max_inflight_documents)]
        log.info(
            "daemon_started", bucket=self.settings.s3_bucket, engine=self.engine.name,
            input_prefix=self.settings.input_prefix, output_prefix=self.settings.output_prefix,
            replica=self.settings.replica_id,
        )
        if self.once:
            await self._until_nothing_pending()
            self._stop.set()
        await self._stop.wait()
        self.draining = True
        log.info("drain_started", inflight=self.inflight, grace_seconds=self.settings.drain_seconds)
        poller.cancel()
        warm.cancel()
        await self._drain(self._workers)
        reader.cancel()  # after the drain: the messages of documents it finished are deleted
        await self._hand_listing_over()
        await self._flush_callbacks(notices)
        await worker.close()
        await asyncio.gather(poller, warm, reader, return_exceptions=True)
        shutil.rmtree(work_dir, ignore_errors=True)

    def _discovery(self, storage: Storage) -> FleetDiscovery:
        """Count every S3 request; pace listings to the budget; one lister per fleet where
        leases work (a shard lists only its keys, but every shard lists: budget split)."""
        storage.on_request = self._count_request
        names = Names.from_settings(self.settings)
        shard = self.settings.claim_mode is ClaimMode.SHARD
        shared = self.settings.shared_listing and not shard and not self.once
        budget = self.settings.list_requests_per_second
        storage.pace_listing(budget / self.settings.shard_count if shard else budget)
        self.fleet = FleetDiscovery(Discovery(storage, self.settings, names),
                                    Leases(storage, self.settings, names), storage, names, shared)
        return self.fleet

    def _count_request(self, op: str) -> None:
        self.metrics.s3_requests.labels(op).inc()
        if op == "list":
            self._list_requests += 1

    def _start_worker(self, worker: DocumentWorker, index: int) -> asyncio.Task[None]:
        task = asyncio.create_task(self._work_forever(worker), name=f"worker-{index}")
        task.add_done_callback(lambda done: self._worker_ended(done, worker, index))
        return task

    def _worker_ended(self, task: asyncio.Task[None], worker: DocumentWorker, index: int) -> None:
        """Only shutdown ends a worker loop; anything else is logged, counted and undone."""
        if self._stop.is_set() or task.cancelled():
            return
        error = task.exception()
        log.error("worker_task_ended", worker=index,
                  error=f"{type(error).__name__}: {error}" if error else "returned",
                  exc_info=error)
        self.metrics.worker_restarts.inc()
        self._busy.pop(task, None)
        self._workers[index] = self._start_worker(worker, index)

    async def _drain(self, workers: list[asyncio.Task[None]]) -> None:
        for task in workers:
            if self._busy.get(task) is None:
                task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_seconds
        pending = {t for t in workers if not t.done() and self._busy.get(t) is not None}
        force: asyncio.Task[Any] = asyncio.create_task(self._force.wait())
        while pending and not self._force.is_set() and loop.time() < deadline:
            _done, waiting = await asyncio.wait(
                {*pending, force}, timeout=deadline - loop.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            pending = {t for t in waiting if t is not force}
        force.cancel()
        leftover = [t for t in pending if not t.done()]
        if leftover:
            log.warning("drain_timeout_releasing", documents=len(leftover))
            for task in leftover:
                task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    async def _hand_listing_over(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()  # a delete S3 refuses is logged there, never raised

    async def _flush_callbacks(self, notices: asyncio.Task[None]) -> None:
        """Give queued callbacks a few seconds to go out; the results are in S3 regardless."""
        if self.notifier is not None and not self.notifier.queue.empty():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CALLBACK_FLUSH_SECONDS):
                    await self.notifier.queue.join()
        notices.cancel()
        await asyncio.gather(notices, return_exceptions=True)

    async def _until_nothing_pending(self) -> None:
        """--once: poll, work through what it found, poll again; done when a poll finds
        nothing new. A document that keeps failing transiently (S3 or the engine away)
        is offered again each round, WATCHER_MAX_ATTEMPTS + 1 rounds at most."""
        for _round in range(self.settings.max_attempts + 2):
            await self._next_poll()
            if self._stop.is_set():
                return
            if self._offered_last_poll == 0:
                return
            while self.queue.unfinished():
                if self.engine.state is EngineState.FAILED:
                    self.unfinished_reason = f"the engine failed to start: {self.engine.error}"
                    return
                await asyncio.sleep(0.1)
        self.unfinished_reason = "documents were still pending after the last round"

    async def _next_poll(self) -> None:
        seen = self.polls
        self.poke()
        async with self.poll_done:
            await self.poll_done.wait_for(lambda: self.polls > seen or self._stop.is_set())

    def unfinished(self) -> list[str]:
        """--once: sources whose last run did not end with a result."""
        return sorted(key for key, outcome in self.last_outcomes.items()
                      if outcome in (Outcome.ERROR, Outcome.RETRY, Outcome.REFUSED, Outcome.HELD))

    async def _keep_engine_warm(self) -> None:
        """Warm the engine; if warm-up fails (VLM server late or broken), try again later."""
        await self.engine.start()
        while True:
            await asyncio.sleep(self.settings.engine_retry_seconds)
            if self.engine.state is EngineState.FAILED:
                log.info("engine_retrying_warm_up", engine=self.engine.name)
                await self.engine.start()

    async def _wait_engine_ready(self) -> None:
        while self.engine.state is not EngineState.READY or self.engine.unavailable:
            await asyncio.sleep(0.2)

    async def _work_forever(self, worker: DocumentWorker) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._busy[me] = None
        while not self._stop.is_set():
            await self._wait_engine_ready()
            ref = await self.queue.take()
            ticket: Ticket | None = None
            try:
                ticket = await self.pages.admit()
            finally:
                if ticket is None:  # cancelled while waiting: idle, as far as drain knows
                    self.queue.finish(ref)
            self._busy[me] = ref
            self.inflight += 1
            outcome = Outcome.RETRY  # what a run that raised comes to
            try:
                outcome = self.last_outcomes[ref.key] = await worker.process(ref, ticket)
            except Exception as exc:
                # A bug must cost one document, never the worker: the loop goes on.
                log.error("worker_loop_error", key=ref.key, error=f"{type(exc).__name__}: {exc}",
                          exc_info=True)
                self.metrics.documents.labels("retry").inc()
            finally:
                ticket.close()
                self.inflight -= 1
                self._busy[me] = None
                self.queue.finish(ref)
                self.refresh_gauges()
            if self.sqs is not None:  # not when cancelled: its message is handed back at shutdown
                self.sqs.settled(ref, outcome)
            if self.fleet is not None and outcome in FINISHED:
                self.fleet.finished(ref)

    async def _discover_forever(self, discovery: FleetDiscovery) -> None:
        while not self._stop.is_set():
            self._poll_now.clear()
            await self._poll_once(discovery)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval):
                    await self._poll_now.wait()

    async def _poll_once(self, discovery: FleetDiscovery) -> None:
        started = time.perf_counter()
        lists_before = self._list_requests
        try:
            todo = await discovery.scan()
        except Exception as exc:
            # Whatever went wrong, discovery must live on and say why on /ready.
            error = str(exc) if isinstance(exc, StorageUnavailable) else f"{type(exc).__name__}: {exc}"
            if self.s3_reachable is not False:
                log.error("s3_unreachable", error=error,
                          exc_info=not isinstance(exc, StorageUnavailable))
            self.s3_reachable, self.s3_error = False, error
            self.metrics.s3_errors.inc()
            self._offered_last_poll = None
        else:
            if self.s3_reachable is False:
                log.info("s3_reachable_again")
            self.s3_reachable, self.s3_error = True, None
            offered = 0
            busy = {ref for ref in self._busy.values() if ref is not None}
            backlog = 0
            for n, ref in enumerate(todo, 1):
                offered += self.queue.offer(ref)
                backlog += ref not in busy
                if n % DISCOVERY_BATCH == 0:
                    await asyncio.sleep(0)  # /health answers between batches
            self.backlog = backlog
            self._offered_last_poll = offered
            self.metrics.polls.inc()
            seconds = time.perf_counter() - started
            self.metrics.poll_seconds.observe(seconds)
            self.last_poll = {"seconds": round(seconds, 3), "found": len(todo),
                              "list_requests": self._list_requests - lists_before}
            if offered:
                log.info("discovery_found", new=offered, backlog=self.backlog, seconds=round(seconds, 3))
        self.refresh_gauges()
        async with self.poll_done:
            self.polls += 1
            self.poll_done.notify_all()


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
