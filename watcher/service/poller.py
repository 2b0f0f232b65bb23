"""The poll loop: discovery every WATCHER_POLL_INTERVAL (or at once when poked), what it
finds offered to the work queue, and what the last poll saw for /health and /ready."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from watcher.bucket.storage import StorageUnavailable
from watcher.core.logs import get_logger
from watcher.core.metrics import Metrics
from watcher.core.refs import ObjectRef
from watcher.intake.queue import WorkQueue

log = get_logger("watcher.service.poller")

# Items handled between two yields to the event loop.
BATCH = 500


class Scanner(Protocol):
    async def scan(self) -> list[ObjectRef]: ...


class Poller:
    def __init__(self, queue: WorkQueue, metrics: Metrics, interval: float,
                 busy: Callable[[], set[ObjectRef]] = set) -> None:
        self.queue = queue
        self.metrics = metrics
        self.interval = interval
        self.busy = busy
        self.polls = 0
        self.backlog = 0
        self.last_poll: dict[str, Any] = {}
        self.s3_reachable: bool | None = None
        self.s3_error: str | None = None
        # Versions the last poll offered (None after a failed poll): --once stops at 0.
        self.offered_last: int | None = None
        # Counts list requests sent (the daemon feeds it from the S3 client).
        self.list_requests = 0
        self.done = asyncio.Condition()
        self._now = asyncio.Event()

    def poke(self) -> None:
        """Start the next poll now (notifications call this)."""
        self._now.set()

    async def run(self, scanner: Scanner) -> None:
        while True:
            self._now.clear()
            await self.poll_once(scanner)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._now.wait()

    async def wait_polls(self, count: int, timeout: float) -> None:
        """Until `count` polls have completed (tests, the demo)."""
        async with asyncio.timeout(timeout):
            async with self.done:
                await self.done.wait_for(lambda: self.polls >= count)

    async def next_poll(self, stopped: Callable[[], bool]) -> None:
        """Ask for a poll now and wait until it has completed (or the daemon stops)."""
        seen = self.polls
        self.poke()
        async with self.done:
            await self.done.wait_for(lambda: self.polls > seen or stopped())

    async def poll_once(self, scanner: Scanner) -> None:
        started = time.perf_counter()
        lists_before = self.list_requests
        try:
            todo = await scanner.scan()
        except Exception as exc:
            # Whatever went wrong, discovery must live on and say why on /ready.
            error = str(exc) if isinstance(exc, StorageUnavailable) else f"{type(exc).__name__}: {exc}"
            if self.s3_reachable is not False:
                log.error("s3_unreachable", error=error, exc_info=not isinstance(exc, StorageUnavailable))
            self.s3_reachable, self.s3_error = False, error
            self.metrics.s3_errors.inc()
            self.offered_last = None
        else:
            if self.s3_reachable is False:
                log.info("s3_reachable_again")
            self.s3_reachable, self.s3_error = True, None
            await self._offer(todo, started, lists_before)
        async with self.done:
            self.polls += 1
            self.done.notify_all()

    async def _offer(self, todo: list[ObjectRef], started: float, lists_before: int) -> None:
        offered = backlog = 0
        busy = self.busy()
        for n, ref in enumerate(todo, 1):
            offered += self.queue.offer(ref)
            backlog += ref not in busy
            if n % BATCH == 0:
                await asyncio.sleep(0)  # /health answers between batches
        self.backlog = backlog
        self.offered_last = offered
        self.metrics.polls.inc()
        seconds = time.perf_counter() - started
        self.metrics.poll_seconds.observe(seconds)
        self.last_poll = {"seconds": round(seconds, 3), "found": len(todo),
                          "list_requests": self.list_requests - lists_before}
        if offered:
            log.info("discovery_found", new=offered, backlog=self.backlog, seconds=round(seconds, 3))
