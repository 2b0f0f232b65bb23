"""An adaptive limit on the requests in flight to the VLM server.

A GPU behind vLLM is only fully used while its scheduler has a little work queued: a
request that finishes must find the next one already waiting. Too many requests in flight
is the opposite failure: they queue inside vLLM until they hit the client timeout. No
fixed number is right for every GPU, model and page mix, so the limit adapts by itself
and WATCHER_VLM_MAX_CONCURRENCY is only its upper bound (`upper`).

The limit runs in one of two modes.

**metrics** (while the server's gauges are fresh, polled from vLLM's `/metrics` by
`poll_server_gauges`): the server says how many requests it runs and how many wait.
Let Q = max(2, ceil(0.1 x running)) be the queue we want waiting at the server, about a
tenth of a service round. (A client whose requests leave in waves, as PaddleOCR-VL's
pipeline sends a call's blocks all at once and waits for them all, wants a deeper queue:
one wave's worth, so that the server stays full while a worker is between calls. It
sets `queue_share`, and says what it has in flight through `in_use`.)

* waiting > Q: the queue is longer than wanted; limit = min(limit, ceil(running + Q)).
  It is idempotent, so gauges that lag while the server works through what we already
  sent cannot shrink the limit twice for the same queue. Other clients of the same server
  count in `running` too, so we then shrink less than we would alone: their queue is
  theirs to trim.
* waiting <= Q/2 and we use our whole limit (inflight >= limit - 1), so the server could
  take more: grow fast, limit = max(limit + Q, 2 x limit), once per observation.
  The next observations see the new requests and the rule above trims the overshoot, so
  against a fixed-capacity server the limit settles at capacity + Q/2..Q.
* in between: hold.

Growth also waits while the recent latency exceeds a third of the request timeout (with
batching, each step slows as the batch grows; twice the requests must not push a
request past half the timeout, where the guard below cuts).

**latency** (no gauges: the endpoint is absent, 404s, or the poller has missed ~3
intervals): a gradient limiter. Every max(4, limit // 2) completions ("a window"):

* recent = EMA (weight 0.7) of the windows' mean latency;
* baseline = the lowest window mean seen. It rises ("decays") only towards windows
  measured at no more concurrency than it was measured at: a slower answer at the same
  load means the service itself got slower (longer pages, another model), while a slower
  answer at a higher load is our own queue, which must not raise the baseline or the
  limit would ratchet up until requests time out. Windows at a load of 4 or less always
  count, so a limit pushed down to the gradient's floor by a stale baseline recovers;
* gradient = clamp(2.0 x baseline / recent, 0.5, 1.0): latency up to twice the baseline
  is tolerated as queueing;
* limit = floor(limit x gradient + sqrt(limit)), the square root being the headroom
  queue. It grows only when the window used the whole limit.

Against a fixed-capacity server this settles where latency is a little over twice the
baseline: a server queue about as long as one batch, never growing without bound.

In both modes: a request slower than half the timeout, or `record_failure` (5xx, 429,
timeout), cuts the limit to 0.7 x. Only one cut per round trip counts: the requests that
were already in flight when the limit was cut were sent under the old limit and say
nothing about the new one, so a burst of failures from one event does not collapse the
limit to `lower`. After a cut, growth waits one round trip. The limit always stays within
[lower, upper].
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from watcher.core.logs import get_logger
from watcher.engines.vlm_server import PROBE_TIMEOUT, auth_headers, server_root

log = get_logger("watcher.engine")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"

TOLERANCE = 2.0
MIN_GRADIENT = 0.5
DECREASE = 0.7
GROWTH = 2.0
BASELINE_DRIFT = 0.1
MIN_WINDOW = 4
# Where the 0.5 gradient floor holds the limit (L = 0.5 L + sqrt(L)): a limit pushed down
# there by a stale baseline must still be able to refresh it.
BASELINE_LOAD_FLOOR = 4
RECENT_WEIGHT = 0.7
QUEUE_SHARE = 0.1
ERROR_LOG_EVERY = 60.0


@dataclass
class _Slot:
    """One slot held by one request: what its latency sample needs to know."""

    owner: AdaptiveLimit
    started: float
    load: int
    failed: bool = False
    active: bool = True


_held: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("watcher_vlm_slot", default=None)


@dataclass
class _Window:
    size: int
    latencies: list[float] = field(default_factory=list)
    load: int = 0


class AdaptiveLimit:
    """How many requests may be in flight to the VLM server now; see the module docstring."""

    def __init__(
        self,
        upper: int,
        lower: int = 1,
        initial: int = 4,
        timeout: float = 120.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        in_use: Callable[[], int] | None = None,
        queue_share: float = QUEUE_SHARE,
    ) -> None:
        if lower < 1 or upper < lower:
            raise ValueError(f"need 1 <= lower <= upper, got lower={lower}, upper={upper}")
        self.upper = upper
        self.lower = lower
        self.timeout = timeout
        self.limit = min(upper, max(lower, initial))
        self.inflight = 0
        # Gauges older than this count as gone; poll_server_gauges sets it to 3 intervals.
        self.stale_after = 1.5
        self.recent_latency: float | None = None
        # The server's (running, waiting) as last read, shown on /health and /metrics.
        self.server_gauges: tuple[float, float] | None = None
        self.baseline_latency: float | None = None
        self._baseline_load = 0
        self._clock = clock
        # Requests of ours the server holds now. A client that sends them itself counts
        # its slots; one whose requests leave from elsewhere (PaddleOCR-VL's pipeline in
        # a worker process) says what it has in flight.
        self._in_use = in_use or (lambda: self.inflight)
        # The queue wanted at the server, as a share of what it runs (Q in the docstring).
        self.queue_share = queue_share
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._gauges_at: float | None = None
        self._last_decrease = -math.inf
        self._window = _Window(size=self._window_size())

    def server_view(self) -> dict[str, float | None]:
        """The server's queue as last read; None while its gauges are stale or absent."""
        fresh = self.mode == "metrics" and self.server_gauges is not None
        running, waiting = self.server_gauges if fresh and self.server_gauges else (None, None)
        return {"server_running": running, "server_waiting": waiting}

    @property
    def mode(self) -> str:
        fresh = self._gauges_at is not None and self._clock() - self._gauges_at <= self.stale_after
        return "metrics" if fresh else "latency"

    # --- slots ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        held = _Slot(owner=self, started=self._clock(), load=self.inflight)
        token = _held.set(held)
        try:
            yield
        except BaseException:
            # An exception is no answer from the server: its duration is no latency sample.
            held.failed = True
            raise
        finally:
            self._release(held)
            # Only fails when the generator is finalised outside the request's context,
            # where there is nothing left to reset.
            with contextlib.suppress(ValueError):
                _held.reset(token)

    async def _acquire(self) -> None:
        # Waiters are served first come, first served: a newcomer must not overtake them.
        if not self._waiters and self.inflight < self.limit:
            self.inflight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted a slot in the same tick as cancelled: hand it to the next waiter.
                self.inflight -= 1
                self._wake()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self, held: _Slot) -> None:
        held.active = False
        # The load a request saw is what ran beside it: a request that entered first in a
        # burst still shared the server with the whole burst.
        held.load = max(held.load, self.inflight)
        self.inflight -= 1
        if not held.failed:
            self._on_latency(self._clock() - held.started, held)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.inflight < self.limit:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            # The slot is counted here, not when the waiter runs, so that a limit that
            # shrinks in between cannot be overrun.
            self.inflight += 1
            waiter.set_result(None)

    def _set_limit(self, new: int) -> None:
        self.limit = min(self.upper, max(self.lower, new))
        self._wake()

    # --- signals -------------------------------------------------------------------------
    def record_failure(self) -> None:
        """A 5xx, a 429 or a timeout. Called inside the slot, it also keeps that request's
        duration out of the latency statistics."""
        held = _held.get()
        if held is not None and held.owner is self and held.active:
            held.failed = True
            self._decrease(held.started)
        else:
            self._decrease(None)

    def observe_server(self, running: float, waiting: float) -> None:
        self._gauges_at = self._clock()
        self.server_gauges = (running, waiting)
        queue = max(2, math.ceil(self.queue_share * running))
        if waiting > queue:
            target = math.ceil(running + queue)
            if target < self.limit:
                self._set_limit(target)
        elif (waiting <= queue / 2 and self._in_use() >= self.limit - 1 and self._may_grow()
              and not self._too_slow()):
            self._set_limit(max(self.limit + queue, math.ceil(self.limit * GROWTH)))

    # --- control law ---------------------------------------------------------------------
    def _window_size(self) -> int:
        return max(MIN_WINDOW, self.limit // 2)

    def _round_trip(self) -> float:
        return self.recent_latency or 0.0

    def _may_grow(self) -> bool:
        return self._clock() - self._last_decrease >= self._round_trip()

    def _too_slow(self) -> bool:
        return self.recent_latency is not None and self.recent_latency > self.timeout / 3

    def _decrease(self, started: float | None) -> None:
        now = self._clock()
        if started is not None:
            if started <= self._last_decrease:
                return
        elif now - self._last_decrease < (self.recent_latency or 1.0):
            return
        self._last_decrease = now
        self._set_limit(math.floor(self.limit * DECREASE))

    def _on_latency(self, latency: float, held: _Slot) -> None:
        if latency > 0.5 * self.timeout:
            self._decrease(held.started)
        window = self._window
        window.latencies.append(latency)
        window.load = max(window.load, held.load)
        if len(window.latencies) < window.size:
            return
        self._window = _Window(size=self._window_size())
        mean = statistics.fmean(window.latencies)
        recent = self.recent_latency
        self.recent_latency = mean if recent is None else recent + RECENT_WEIGHT * (mean - recent)
        baseline = self.baseline_latency
        if baseline is None or mean < baseline:
            self.baseline_latency = mean
            self._baseline_load = window.load if baseline is None else min(self._baseline_load, window.load)
        elif window.load <= max(self._baseline_load, BASELINE_LOAD_FLOOR):
            self.baseline_latency = baseline + BASELINE_DRIFT * (mean - baseline)
        if self.mode == "latency":
            self._gradient_step(window.load)

    def _gradient_step(self, load: int) -> None:
        recent, baseline = self.recent_latency, self.baseline_latency
        if recent is None or baseline is None or recent <= 0:
            return
        gradient = min(1.0, max(MIN_GRADIENT, TOLERANCE * baseline / recent))
        new = math.floor(self.limit * gradient + math.sqrt(self.limit))
        if new > self.limit and not (load >= self.limit - 1 and self._may_grow()):
            return
        if new != self.limit:
            self._set_limit(new)


# --- the server's gauges -------------------------------------------------------------------
def parse_vllm_gauges(text: str) -> tuple[float, float] | None:
    """(running, waiting) summed over label sets from vLLM's /metrics; None when absent."""
    # The page carries hundreds of histogram lines; parsing only the lines that name the
    # two gauges keeps a poll every half second cheap on the event loop.
    wanted = "\n".join(line for line in text.splitlines() if RUNNING in line or WAITING in line)
    sums = {RUNNING: 0.0, WAITING: 0.0}
    seen: set[str] = set()
    try:
        for family in text_string_to_metric_families(wanted + "\n"):
            for sample in family.samples:
                # Exact names: vLLM also has e.g. vllm:num_requests_waiting_by_reason.
                if sample.name in sums:
                    sums[sample.name] += sample.value
                    seen.add(sample.name)
    except ValueError:
        return None
    running, waiting = sums[RUNNING], sums[WAITING]
    if len(seen) < 2 or not (math.isfinite(running) and math.isfinite(waiting)):
        return None
    return running, waiting


async def poll_server_gauges(
    limit: AdaptiveLimit,
    session: aiohttp.ClientSession,
    url: str,
    interval: float = 0.25,
    api_key: str | None = None,
) -> None:
    """Feed vLLM's running/waiting gauges to `limit` until cancelled.

    When the gauges are absent (404, another server, errors), the limit's last observation
    ages past 3 intervals and it falls back to latency mode by itself.
    """
    metrics_url = f"{server_root(url)}/metrics"
    # One slow or failed poll must not flip the mode; three in a row do.
    limit.stale_after = 3 * interval
    last_log = -math.inf
    unavailable_logged = False
    while True:
        problem: str | None = None
        expected = False
        try:
            async with session.get(metrics_url, headers=auth_headers(api_key),
                                   timeout=PROBE_TIMEOUT) as resp:
                if resp.status == 200:
                    gauges = parse_vllm_gauges(await resp.text())
                    if gauges is None:
                        problem, expected = f"no {RUNNING} / {WAITING} gauges", True
                    else:
                        limit.observe_server(*gauges)
                else:
                    problem, expected = f"HTTP {resp.status}", resp.status == 404
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The poller must outlive any surprise: without it the limit is latency-only.
            problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if problem is None:
            if unavailable_logged:
                log.info("vlm_gauges_available", url=metrics_url, mode=limit.mode)
                unavailable_logged = False
        elif time.monotonic() - last_log >= ERROR_LOG_EVERY:
            # A server without /metrics is a supported set-up, not an error.
            emit = log.info if expected else log.warning
            emit("vlm_gauges_unavailable", url=metrics_url, reason=problem, fallback="latency")
            last_log = time.monotonic()
            unavailable_logged = True
        await asyncio.sleep(interval)
