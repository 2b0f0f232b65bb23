"""Supervised engine workers: native inference in child processes the daemon owns.

Paddle, the layout model, Tesseract and PDFium's cousins are native code that can
hang on an image, abort on a page or grow without bound; none of that may reach the
event loop that answers /health or take the daemon's process down. So each heavy engine
runs in WATCHER_ENGINE_CONCURRENCY worker processes (watcher/engines/child.py), and this
module owns them:

* a call that runs past WATCHER_ENGINE_TIMEOUT kills its worker (`timeout`);
* a worker that dies (abort, segfault, OOM kill) is noticed at once (`crash`);
* a worker whose resident memory passed WATCHER_ENGINE_MAX_RSS_MB is replaced after the
  call it just finished (`memory`), so nothing in flight is lost;
* every new worker is warmed (the synthetic page) before it takes a page, and the
  engine is READY while at least one worker is;
* a failed batch of several pages is retried page by page, so that only the page that
  hangs or kills its worker is charged with the failure;
* a slot never dies silently: anything unforeseen while starting (a spawn that fails
  with OSError), warming or serving a worker is logged, the worker is replaced with
  backoff, the pages of its batch fail as a crash of theirs and the pages it held back
  go to another worker; and a page submitted waits at most a generous deadline
  (`submit_deadline`) before it is handed back as unavailable, so that nothing waits for
  ever on a worker that will not come;
* a worker whose reader says its settings cannot work (`EngineMisconfigured`: a layout
  device that is not there) is not started again: its slot fails for good with the
  reader's message, and when no worker is left the engine is `failed` with it and the
  pages waiting are handed back as unavailable, uncharged. A warm-up that fails for any
  other reason (the VLM server late, a crash) is retried with backoff.

Pages reach the workers through one queue; a worker takes up to `batch_limit()` of them
per call (a fixed `batch_pages`, or what the engine steers it to: PaddleOCR-VL's follows
the VLM server's gauges). Nothing unbounded crosses the
pipe: rendered pages go one batch at a time, results come back per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from watcher.core.errors import DocumentError, EngineCrashed, EngineUnavailable, ErrorCode
from watcher.core.logs import get_logger
from watcher.core.pages import PageResult, RenderedPage
from watcher.engines import child
from watcher.engines.base import Engine, EngineState
from watcher.engines.child import EngineMisconfigured, ReaderSpec

log = get_logger("watcher.engine")

# A worker told to stop gets this long to exit before it is killed.
STOP_GRACE_SECONDS = 5.0
MAX_WARM_BACKOFF_SECONDS = 60.0
REAP_POLL_SECONDS = 0.01


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    FAILED = "failed"
    STOPPED = "stopped"


class _WorkerGone(Exception):
    """The worker process died, or its pipe broke, during a call."""


class _CallTimeout(Exception):
    """A call ran past its limit."""


@dataclass
class _Job:
    op: str  # "pages" or "finish"
    payload: Any
    future: asyncio.Future[Any]
    solo: bool = False  # retried alone after its batch failed: the failure is its own


@dataclass
class _Worker:
    index: int
    state: WorkerState = WorkerState.STOPPED
    process: BaseProcess | None = None
    conn: Connection | None = None
    io: ThreadPoolExecutor | None = None
    exited: asyncio.Future[None] | None = None
    restarts: int = 0
    last_restart_reason: str | None = None
    last_restart_at: str | None = None
    rss_mb: float | None = None
    error: str | None = None
    calls: int = 0
    carry: list[_Job] = field(default_factory=list)
    batch: list[_Job] = field(default_factory=list)  # the pages of the call in flight
    misconfigured: bool = False  # its reader cannot work with these settings: not restarted

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process from /proc (Linux); None where that is not readable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker stopped answering"
    if exitcode < 0:
        try:
            return f"the worker was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"the worker was killed by signal {-exitcode}"
    return f"the worker exited with code {exitcode}"


class SupervisedEngine(Engine):
    """An engine whose reader runs in supervised worker processes."""

    def __init__(
        self,
        spec: ReaderSpec,
        *,
        name: str,
        model: str,
        workers: int = 1,
        timeout: float = 600.0,
        warm_timeout: float = 600.0,
        max_rss_mb: int = 0,
        batch_pages: int = 1,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.spec = spec
        self.timeout = timeout
        self.warm_timeout = warm_timeout
        self.max_rss_mb = max_rss_mb
        self.batch_pages = max(1, batch_pages)
        self.workers = [_Worker(i) for i in range(workers)]
        self._jobs: asyncio.Queue[_Job] | None = None
        self._slots: list[asyncio.Task[None]] = []
        self._changed: asyncio.Event | None = None
        self._closing = False

    # --- the Engine interface ------------------------------------------------------------
    async def warm(self) -> None:
        """Start the workers (once) and wait until one is warm, or every one failed."""
        if not self._slots:
            self._jobs = asyncio.Queue()
            self._changed = asyncio.Event()
            self._slots = [
                asyncio.create_task(self._run_slot(w), name=f"engine-worker-{w.index}")
                for w in self.workers
            ]
        assert self._changed is not None
        while True:
            states = {w.state for w in self.workers}
            if states & {WorkerState.READY, WorkerState.BUSY}:
                return
            if states == {WorkerState.FAILED}:
                errors = "; ".join(sorted({w.error or "unknown" for w in self.workers}))
                if self._none_can_serve():
                    raise EngineMisconfigured(errors)
                raise RuntimeError(errors)
            self._changed.clear()
            await self._changed.wait()

    async def recognise(self, page: RenderedPage) -> PageResult:
        result: PageResult = await self.call(page)
        return result

    async def call(self, request: Any) -> Any:
        """One request to a worker's reader (batched with others where it allows):
        what its `recognise_pages` answers for it."""
        results: list[Any] = await self._submit("pages", request)
        return results[0]

    async def finish_document(self, pages: list[PageResult]) -> list[PageResult]:
        if not self._needs_finish(pages):
            return pages
        results: list[PageResult] = await self._submit("finish", pages)
        return results

    def pages_wanted(self) -> int:
        # Each worker busy with one batch and the next one rendered and waiting.
        return len(self.workers) * (self.batch_limit() + 1) * 2

    def batch_limit(self) -> int:
        """Pages a worker takes per call now; engines that steer it override this."""
        return self.batch_pages

    def pages_in_calls(self) -> list[int]:
        """Pages of the call each busy worker is in now."""
        return [len(w.batch) for w in self.workers if w.state is WorkerState.BUSY]

    def _needs_finish(self, pages: list[PageResult]) -> bool:
        """Readers without cross-page work skip the round trip; see PaddleOcrVlEngine."""
        return False

    async def close(self) -> None:
        self._closing = True
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        await asyncio.gather(*(self._stop_process(w) for w in self.workers))
        if self._jobs is not None:
            while not self._jobs.empty():
                job = self._jobs.get_nowait()
                if not job.future.done():
                    job.future.set_exception(EngineUnavailable("the engine is shutting down"))

    def snapshot(self) -> dict[str, Any]:
        return {"workers": [
            {
                "index": w.index,
                "pid": w.pid,
                "state": w.state.value,
                "restarts": w.restarts,
                "last_restart_reason": w.last_restart_reason,
                "last_restart_at": w.last_restart_at,
                "rss_mb": w.rss_mb,
                "calls": w.calls,
                "error": w.error,
            }
            for w in self.workers
        ]}

    # --- submitting work -------------------------------------------------------------------
    def submit_deadline(self) -> float:
        """How long a page may wait for its answer, queue included: a warm-up, then two
        full calls per batch queued ahead of it per worker. Past it the page is handed
        back as unavailable (retried later, no attempt used)."""
        assert self._jobs is not None
        ahead = self._jobs.qsize() / (self.batch_limit() * len(self.workers))
        return self.warm_timeout + self.timeout * 2 * (1 + ahead)

    async def _submit(self, op: str, payload: Any) -> Any:
        if self._jobs is None or self._closing:
            raise EngineUnavailable("the engine is not running")
        if self._none_can_serve():
            raise EngineUnavailable(self.error or "the engine is misconfigured")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        deadline = self.submit_deadline()
        self._jobs.put_nowait(_Job(op, payload, future))
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            future.cancel()  # a worker that takes it later skips it
            log.error("engine_page_not_answered", engine=self.name, seconds=round(deadline, 1))
            raise EngineUnavailable(f"no engine worker answered within {deadline:.0f} s") from None
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def _next_job(self) -> _Job:
        assert self._jobs is not None
        while True:
            job = await self._jobs.get()
            if not job.future.done():  # its document was cancelled while it queued
                return job

    def _take_more(self, first: _Job, worker: _Worker) -> list[_Job]:
        """`first` plus whatever pages are already queued, up to the batch size. Calls
        that go alone (a document's finish, a page retried alone) are not let cut the
        batch short: the worker keeps them for its next calls."""
        assert self._jobs is not None
        batch = [first]
        if first.op != "pages" or first.solo:
            return batch
        size = self.batch_limit()
        while len(batch) < size and not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job.future.done():
                continue
            if job.op != "pages" or job.solo:
                worker.carry.append(job)
                continue
            batch.append(job)
        return batch

    async def _wait_for_work(self, worker: _Worker) -> list[_Job] | None:
        """The next batch, or None when the worker died while it waited."""
        if worker.carry:
            first = worker.carry.pop(0)
            return self._take_more(first, worker) if not first.future.done() else []
        assert worker.exited is not None and self._jobs is not None
        getter = asyncio.ensure_future(self._next_job())
        waiting: set[asyncio.Future[Any]] = {getter, worker.exited}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
        if getter.cancelled():
            return None
        job = getter.result()
        if worker.exited.done():  # died in the same instant: the page is not to blame
            self._jobs.put_nowait(job)
            return None
        return self._take_more(job, worker)

    # --- one worker slot's life --------------------------------------------------------------
    async def _run_slot(self, worker: _Worker) -> None:
        """One worker's life, again and again until the engine closes: nothing unforeseen
        ends it (a bug, a spawn that fails), it only costs a restart with backoff."""
        backoff = 1.0
        while not self._closing:
            try:
                if await self._life(worker):
                    return
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                worker.error = f"{type(exc).__name__}: {exc}"
                log.error("engine_worker_failed", engine=self.name, worker=worker.index,
                          error=worker.error, retry_in_seconds=backoff, exc_info=True)
                self._fail_batch(worker, f"the engine's worker slot failed: {worker.error}")
                with contextlib.suppress(Exception):
                    await self._stop_process(worker, kill=True)
                self._set_state(worker, WorkerState.FAILED)
                self._record_restart(worker, "error", worker.error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_WARM_BACKOFF_SECONDS)

    def _fail_batch(self, worker: _Worker, detail: str) -> None:
        """The call in flight failed with its slot: its pages crash (a batch of several is
        retried page by page); pages the worker held back were not started: requeued."""
        batch, worker.batch = worker.batch, []
        if batch:
            self._charge(batch, "crash", detail)
        carried, worker.carry = worker.carry, []
        self._requeue(carried)

    async def _life(self, worker: _Worker) -> bool:
        """Start, warm and serve one worker process; True when the slot is to end for good
        (its reader cannot work with these settings, or the engine is closing)."""
        if not await self._started(worker):
            return True
        worker.error = None
        self._set_state(worker, WorkerState.READY)
        log.info("engine_worker_ready", engine=self.name, worker=worker.index, pid=worker.pid,
                 rss_mb=worker.rss_mb)
        reason, detail = await self._serve(worker)
        # What it held back for its next calls goes to the other workers, not to wait for
        # this one's warm-up.
        carried, worker.carry = worker.carry, []
        self._requeue(carried)
        # Only a worker recycled for memory is healthy enough to be asked to stop.
        await self._stop_process(worker, kill=reason != "memory")
        self._record_restart(worker, reason, detail)
        return False

    async def _started(self, worker: _Worker) -> bool:
        """A worker process started and warm, retried with backoff; False when its reader
        cannot work with these settings, or the engine closed meanwhile."""
        backoff = 1.0
        while not self._closing:
            try:
                await self._start_process(worker)
                await self._call(worker, ("warm",), self.warm_timeout)
                return True
            except _Misconfigured as exc:
                await self._give_up(worker, str(exc))
                return False
            except (_WorkerGone, _CallTimeout, _EngineRaised, _DocumentRejected, OSError) as exc:
                worker.error = f"warm-up failed: {exc}"
                log.error("engine_worker_warm_failed", engine=self.name, worker=worker.index,
                          error=worker.error, retry_in_seconds=backoff)
                await self._stop_process(worker)
                self._set_state(worker, WorkerState.FAILED)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_WARM_BACKOFF_SECONDS)
        return False

    async def _give_up(self, worker: _Worker, message: str) -> None:
        """The worker's reader cannot work with these settings: stop, and never restart."""
        worker.error, worker.misconfigured = message, True
        log.error("engine_worker_misconfigured", engine=self.name, worker=worker.index,
                  error=message, retried=False)
        await self._stop_process(worker)
        self._set_state(worker, WorkerState.FAILED)
        if self._none_can_serve():
            self._hand_back_waiting(message)

    def _none_can_serve(self) -> bool:
        return all(w.misconfigured for w in self.workers)

    def _hand_back_waiting(self, reason: str) -> None:
        """No worker will ever take them: pages waiting go back as unavailable, uncharged."""
        waiting = [job for w in self.workers for job in w.carry]
        for w in self.workers:
            w.carry.clear()
        while self._jobs is not None and not self._jobs.empty():
            waiting.append(self._jobs.get_nowait())
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(EngineUnavailable(reason))

    def _record_restart(self, worker: _Worker, reason: str, detail: str) -> None:
        worker.restarts += 1
        worker.last_restart_reason = reason
        worker.last_restart_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.on_restart(reason)
        log.warning("engine_worker_restarting", engine=self.name, worker=worker.index,
                    reason=reason, detail=detail, restarts=worker.restarts)

    async def _serve(self, worker: _Worker) -> tuple[str, str]:
        """Answer batches until the worker must be replaced; returns (reason, detail)."""
        while True:
            batch = await self._wait_for_work(worker)
            if batch is None:
                assert worker.process is not None
                await self._reap(worker)
                return "crash", describe_exit(worker.process.exitcode)
            if not batch:
                continue
            self._set_state(worker, WorkerState.BUSY)
            worker.batch = batch
            op = batch[0].op
            payload = [job.payload for job in batch] if op == "pages" else batch[0].payload
            try:
                reply = await self._call(worker, (op, payload), self.timeout)
            except (_CallTimeout, _WorkerGone, _EngineRaised, _DocumentRejected, _Misconfigured) as exc:
                worker.batch = []
                ended = self._failed_call(batch, exc)
                if ended is not None:
                    return ended
            else:
                self._deliver(batch, op, reply)
                worker.batch = []
            worker.calls += 1
            self._set_state(worker, WorkerState.READY)
            if self.max_rss_mb and worker.rss_mb is not None and worker.rss_mb > self.max_rss_mb:
                return "memory", (f"resident memory {worker.rss_mb:.0f} MB over "
                                  f"{self.max_rss_mb} MB (WATCHER_ENGINE_MAX_RSS_MB)")

    def _failed_call(self, batch: list[_Job], exc: Exception) -> tuple[str, str] | None:
        """Charge or requeue the pages of a call that failed; (reason, detail) when the
        worker must be replaced."""
        if isinstance(exc, _CallTimeout):
            detail = f"no answer within {self.timeout:g} s (WATCHER_ENGINE_TIMEOUT)"
            self._charge(batch, "timeout", detail)
            return "timeout", detail
        if isinstance(exc, _WorkerGone):
            self._charge(batch, "crash", str(exc))
            return "crash", str(exc)
        if isinstance(exc, _EngineRaised):
            self._charge(batch, "error", str(exc), connection_error=exc.connection_error)
        elif isinstance(exc, _DocumentRejected):
            if len(batch) > 1:
                self._requeue_alone(batch)
            else:
                batch[0].future.set_exception(DocumentError(exc.code, exc.message))
        elif isinstance(exc, _Misconfigured):
            # Not the pages' fault: they wait for a worker, and this one is warmed again,
            # which ends its slot if the settings still cannot work.
            self._requeue(batch)
            return "misconfigured", str(exc)
        return None

    def _deliver(self, batch: list[_Job], op: str, results: Any) -> None:
        if op == "finish":
            if not batch[0].future.done():
                batch[0].future.set_result(results)
            return
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result([result])

    def _charge(self, batch: list[_Job], reason: str, detail: str, connection_error: bool = False) -> None:
        """Fail the page that failed; a batch is retried page by page to find it."""
        if len(batch) > 1:
            self._requeue_alone(batch)
            return
        job = batch[0]
        if not job.future.done():
            job.future.set_exception(EngineCrashed(reason, detail, connection_error))

    def _requeue(self, batch: list[_Job]) -> None:
        assert self._jobs is not None
        for job in batch:
            if not job.future.done():
                self._jobs.put_nowait(job)

    def _requeue_alone(self, batch: list[_Job]) -> None:
        assert self._jobs is not None
        for job in batch:
            if not job.future.done():
                job.solo = True
                self._jobs.put_nowait(job)

    # --- the process -------------------------------------------------------------------------
    async def _start_process(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=child.main, args=(child_conn, self.spec, os.getpid()),
            name=f"watcher-engine-{worker.index}", daemon=True,
        )
        self._set_state(worker, WorkerState.STARTING)
        # Started on the loop's thread: the kernel's parent-death signal follows the
        # thread that forked, and a pool thread may end before the worker does.
        process.start()
        child_conn.close()
        exited: asyncio.Future[None] = loop.create_future()
        sentinel = process.sentinel

        def on_exit() -> None:
            loop.remove_reader(sentinel)
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(sentinel, on_exit)
        worker.process, worker.conn, worker.exited = process, parent_conn, exited
        worker.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-io-{worker.index}")
        worker.rss_mb = None
        log.info("engine_worker_started", engine=self.name, worker=worker.index, pid=process.pid)

    async def _call(self, worker: _Worker, message: tuple[Any, ...], timeout: float) -> Any:
        assert worker.conn is not None and worker.io is not None and worker.process is not None
        loop = asyncio.get_running_loop()
        conn, io = worker.conn, worker.io
        try:
            async with asyncio.timeout(timeout):
                await loop.run_in_executor(io, conn.send, message)
                reply = await loop.run_in_executor(io, conn.recv)
        except TimeoutError:
            raise _CallTimeout(f"no answer within {timeout:g} s") from None
        except (EOFError, OSError):
            await self._reap(worker)
            raise _WorkerGone(describe_exit(worker.process.exitcode)) from None
        except asyncio.CancelledError:
            # Whoever waited is gone (shutdown); the worker may be deep in a page nobody
            # wants, so it is not reused.
            await self._stop_process(worker, kill=True)
            raise
        pid = worker.pid
        worker.rss_mb = rss_mb(pid) if pid is not None else None
        kind = reply[0]
        if kind == "ok":
            return reply[1]
        if kind == "document_error":
            raise _DocumentRejected(ErrorCode(reply[1]), reply[2])
        if kind == "misconfigured":
            raise _Misconfigured(reply[2])
        raise _EngineRaised(f"{reply[1]}: {reply[2]}", connection_error=bool(reply[3]))

    @staticmethod
    async def _wait_exit(worker: _Worker, seconds: float) -> bool:
        """Wait up to `seconds` for the worker process to end; True when it has."""
        if worker.exited is None:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.shield(worker.exited)
        return worker.exited.done()

    async def _reap(self, worker: _Worker, seconds: float = 2.0) -> None:
        """Wait briefly for a broken worker's exit status, for the log and the record.

        The sentinel fires when the kernel closes the dead worker's descriptors, which is
        before it has freed the memory and threads and made the status reapable; reading
        the status at once then says "stopped answering" for what was an abort.
        """
        process = worker.process
        if process is None:
            return
        await self._wait_exit(worker, seconds)
        if not worker.exited or not worker.exited.done():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while process.exitcode is None and loop.time() < deadline:  # exitcode polls waitpid
            await asyncio.sleep(REAP_POLL_SECONDS)

    async def _stop_process(self, worker: _Worker, kill: bool = False) -> None:
        process, conn = worker.process, worker.conn
        if process is None:
            return
        loop = asyncio.get_running_loop()
        stopped = False
        if not kill and conn is not None and process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
            stopped = await self._wait_exit(worker, STOP_GRACE_SECONDS)
        if not stopped and process.is_alive():
            process.kill()
            await self._wait_exit(worker, STOP_GRACE_SECONDS)
        process.join(timeout=0)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(process.sentinel)
        if conn is not None:
            conn.close()
        if worker.io is not None:
            worker.io.shutdown(wait=False, cancel_futures=True)
        worker.process, worker.conn, worker.io = None, None, None
        self._set_state(worker, WorkerState.STOPPED)

    # --- state -------------------------------------------------------------------------------
    def _set_state(self, worker: _Worker, state: WorkerState) -> None:
        worker.state = state
        if self._changed is not None:
            self._changed.set()
        if self.state is EngineState.NOT_INITIALIZED or self._closing:
            return
        states = {w.state for w in self.workers}
        if states & {WorkerState.READY, WorkerState.BUSY}:
            self.state, self.error = EngineState.READY, None
        elif states == {WorkerState.FAILED}:
            self.state = EngineState.FAILED
            self.error = "; ".join(sorted({w.error or "unknown" for w in self.workers}))
        else:
            self.state = EngineState.WARMING


class _EngineRaised(Exception):
    def __init__(self, message: str, connection_error: bool) -> None:
        super().__init__(message)
        self.connection_error = connection_error


class _Misconfigured(Exception):
    """The reader raised EngineMisconfigured; the message names the setting to change."""


class _DocumentRejected(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

