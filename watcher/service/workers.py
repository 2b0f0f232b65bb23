"""The worker pool: WATCHER_MAX_INFLIGHT_DOCUMENTS loops that take a document from the
queue, run it through the pipeline and tell the outcome hooks how it ended.

No loop ends except at shutdown: a loop that ends anyway (a bug) is logged, counted and
started again. The drain lets busy loops finish their document within the grace period
and cancels the rest, whose leases the pipeline then releases.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from watcher.core.logs import get_logger
from watcher.core.metrics import Metrics
from watcher.core.outcome import Outcome, OutcomeHook, Report
from watcher.core.refs import ObjectRef
from watcher.intake.queue import WorkQueue
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.document import DocumentPipeline

log = get_logger("watcher.service.workers")


class WorkerPool:
    def __init__(self, pipeline: DocumentPipeline, queue: WorkQueue, budget: PageBudget,
                 metrics: Metrics, hooks: Sequence[OutcomeHook],
                 ready: Callable[[], Awaitable[None]], size: int) -> None:
        self.pipeline = pipeline
        self.queue = queue
        self.budget = budget
        self.metrics = metrics
        self.hooks = list(hooks)
        self.ready = ready
        self.size = size
        self.stopping = False
        self._busy: dict[asyncio.Task[None], ObjectRef | None] = {}
        self._loops: list[asyncio.Task[None]] = []

    @property
    def inflight(self) -> int:
        return sum(1 for ref in self._busy.values() if ref is not None)

    def busy(self) -> set[ObjectRef]:
        return {ref for ref in self._busy.values() if ref is not None}

    def down(self) -> int:
        """Loops not running (restarted at once, so normally 0)."""
        return 0 if self.stopping else sum(1 for task in self._loops if task.done())

    def start(self) -> None:
        self._loops = [self._start(i) for i in range(self.size)]

    def _start(self, index: int) -> asyncio.Task[None]:
        task = asyncio.create_task(self._loop(), name=f"worker-{index}")
        task.add_done_callback(lambda done: self._ended(done, index))
        return task

    def _ended(self, task: asyncio.Task[None], index: int) -> None:
        """Only shutdown ends a loop; anything else is logged, counted and undone."""
        self._busy.pop(task, None)
        if self.stopping or task.cancelled():
            return
        error = task.exception()
        log.error("worker_task_ended", worker=index,
                  error=f"{type(error).__name__}: {error}" if error else "returned", exc_info=error)
        self.metrics.worker_restarts.inc()
        self._loops[index] = self._start(index)

    async def _loop(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._busy[me] = None
        while not self.stopping:
            await self.ready()
            ref = await self.queue.take()
            ticket: Ticket | None = None
            try:
                ticket = await self.budget.admit()
            finally:
                if ticket is None:  # cancelled while waiting: idle, as far as drain knows
                    self.queue.finish(ref)
            self._busy[me] = ref
            report = Report(ref, Outcome.RETRY, message="the run raised")
            try:
                report = await self.pipeline.process(ref, ticket)
            except Exception as exc:
                # A bug must cost one document, never the loop: it goes on.
                log.error("worker_loop_error", key=ref.key, error=f"{type(exc).__name__}: {exc}",
                          exc_info=True)
            except asyncio.CancelledError:
                ticket.close()
                self._busy[me] = None
                self.queue.finish(ref)
                raise  # drained: hooks are not told (an SQS message goes back at shutdown)
            ticket.close()
            self._busy[me] = None
            self.queue.finish(ref)
            self._tell(report)

    def _tell(self, report: Report) -> None:
        for hook in self.hooks:
            try:
                hook.ended(report)
            except Exception as exc:
                log.error("outcome_hook_failed", hook=type(hook).__name__,
                          error=f"{type(exc).__name__}: {exc}", exc_info=True)

    async def drain(self, grace: float, force: asyncio.Event) -> int:
        """Idle loops stop now; busy ones get `grace` seconds (less when `force` is set).
        Returns how many documents were cut off (their leases released)."""
        self.stopping = True
        for task in self._loops:
            if self._busy.get(task) is None:
                task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        pending = {t for t in self._loops if not t.done() and self._busy.get(t) is not None}
        forced: asyncio.Task[Any] = asyncio.create_task(force.wait())
        while pending and not force.is_set() and loop.time() < deadline:
            _done, waiting = await asyncio.wait(
                {*pending, forced}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            pending = {t for t in waiting if t is not forced}
        forced.cancel()
        leftover = [t for t in pending if not t.done()]
        if leftover:
            log.warning("drain_timeout_releasing", documents=len(leftover))
            for task in leftover:
                task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        return len(leftover)
